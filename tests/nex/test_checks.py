"""The deploy and stop checks on their own: each refusal names what is wrong."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import pytest

from nex import crypto
from nex.api import control
from nex.workload import checks
from nex.workload.checks import Refused


def sealed_request(node: crypto.XKey, sender: crypto.XKey, plain: bytes, **fields: object) -> control.DeployRequest:
    environment = base64.b64encode(sender.seal(plain, node.public_key)).decode()
    return control.DeployRequest(environment=environment, sender_public_key=sender.public_key, **fields)  # type: ignore[arg-type]


def test_the_environment_opens_only_for_this_node_and_must_be_a_string_map() -> None:
    node, sender, other = crypto.XKey.generate(), crypto.XKey.generate(), crypto.XKey.generate()
    environment, who = checks.open_environment(node, sealed_request(node, sender, b'{"A":"b"}'))
    assert environment == {"A": "b"}
    assert who == sender.public_key
    with pytest.raises(Refused, match=r"Failed to decrypt environment.*sealed to another key"):
        checks.open_environment(other, sealed_request(node, sender, b'{"A":"b"}'))
    with pytest.raises(Refused, match=r"Failed to decrypt environment.*Expected `str`"):
        checks.open_environment(node, sealed_request(node, sender, b'{"A":1}'))
    with pytest.raises(Refused, match="no environment or no sender_public_key"):
        checks.open_environment(node, control.DeployRequest())


@pytest.mark.parametrize("plain", [b'{"A":"x\\u0000y"}', b'{"A=B":"c"}', b'{"":"c"}', b'{"A\\u0000":"c"}'])
def test_an_environment_no_program_could_receive_is_refused(plain: bytes) -> None:
    """A workload that never ran must not be reported started (exec refuses a NUL, or an = in a name)."""
    node, sender = crypto.XKey.generate(), crypto.XKey.generate()
    with pytest.raises(Refused, match="cannot be passed to a program"):
        checks.open_environment(node, sealed_request(node, sender, plain))


def test_an_argument_with_a_nul_byte_is_refused() -> None:
    checks.check_argv(["--flag", "value"])
    with pytest.raises(Refused, match=r"argv\[1\] holds a NUL byte"):
        checks.check_argv(["ok", "x\0y"])


def test_the_jwt_must_verify_carry_a_hash_and_a_proper_name() -> None:
    issuer = crypto.create_signing_key(crypto.PREFIX_ACCOUNT)

    def request(name: str, data: dict[str, object], **fields: object) -> control.DeployRequest:
        return control.DeployRequest(workload_jwt=crypto.encode_generic_jwt(issuer, name, data), **fields)  # type: ignore[arg-type]

    claims = checks.check_jwt(request("id-1", {"hash": "ab", "name": "echo"}))
    assert checks.workload_name(claims) == "echo"  # nex v0.2.7: the name is a claim, sub an id
    assert checks.workload_name(checks.check_jwt(request("echo", {"hash": "ab"}))) == "echo"  # v0.2.2: sub
    with pytest.raises(Refused, match="workload name 'a b' must match"):
        checks.check_jwt(request("a b", {"hash": "ab"}))
    with pytest.raises(Refused, match="has no hash claim"):
        checks.check_jwt(request("echo", {}))
    with pytest.raises(Refused, match="workload_name 'other' is not the JWT's 'echo'"):
        checks.check_jwt(request("echo", {"hash": "ab"}, workload_name="other"))
    with pytest.raises(Refused, match="artifact hash claim does not match request"):
        checks.check_jwt(request("echo", {"hash": "ab"}, hash="cd"))
    with pytest.raises(Refused, match="it has no workload_jwt"):
        checks.check_jwt(control.DeployRequest())


@dataclass
class Start:
    name: str
    issuer: str
    subject: str
    jti: str
    iat: int


def test_a_stop_must_come_from_the_deployer_with_fresh_claims_for_that_workload() -> None:
    alice, mallory = crypto.create_signing_key(crypto.PREFIX_ACCOUNT), crypto.create_signing_key(crypto.PREFIX_ACCOUNT)
    deploy = crypto.decode_generic_jwt(crypto.encode_generic_jwt(alice, "req-1", {"name": "echo"}, issued_at=100))
    start = Start(name="echo", issuer=deploy.iss, subject=deploy.sub, jti=deploy.jti, iat=deploy.iat)

    def stop(who: object, sub: str, iat: int) -> crypto.GenericClaims:
        return crypto.decode_generic_jwt(crypto.encode_generic_jwt(who, sub, {}, issued_at=iat))  # type: ignore[arg-type]

    checks.check_stop(stop(alice, "echo", 200), start, set())  # by name (nex's NewStopRequest)
    checks.check_stop(stop(alice, "req-1", 200), start, set())  # by the deploy's subject
    with pytest.raises(Refused, match="the issuer that originally started it"):
        checks.check_stop(stop(mallory, "echo", 200), start, set())
    with pytest.raises(Refused, match="cloned or captured"):
        checks.check_stop(stop(alice, "echo", 100), start, set())
    fresh = stop(alice, "echo", 300)
    with pytest.raises(Refused, match="this stop JWT was used before"):
        checks.check_stop(fresh, start, {fresh.jti})
    with pytest.raises(Refused, match="subject 'other' does not match the workload"):
        checks.check_stop(stop(alice, "other", 200), start, set())


def test_sizes_over_a_limit_are_refused_and_zero_means_unlimited() -> None:
    checks.check_size(10, 0)
    checks.check_size(10, 10)
    with pytest.raises(Refused, match="11 bytes, at most 10 allowed"):
        checks.check_size(11, 10)
