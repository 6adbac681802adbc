"""Keys and sealing, checked against the nkeys package and against tampering."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path

import nkeys
import pytest

from nex import crypto


def test_our_seed_and_public_key_encoding_match_nkeys() -> None:
    raw = os.urandom(32)
    ours = crypto.encode_seed(crypto.PREFIX_SERVER, raw)
    assert ours.encode() == nkeys.encode_seed(raw, nkeys.PREFIX_BYTE_SERVER)
    pair = nkeys.from_seed(ours.encode())
    assert crypto.encode_public(crypto.PREFIX_SERVER, bytes(pair._keys.verify_key)) == pair.public_key.decode()


@pytest.mark.parametrize(
    ("prefix", "letter"), [(crypto.PREFIX_SERVER, "N"), (crypto.PREFIX_ACCOUNT, "A"), (crypto.PREFIX_USER, "U")]
)
def test_signing_keys_have_their_role_letter(prefix: int, letter: str) -> None:
    pair = crypto.create_signing_key(prefix)
    assert pair.public_key.decode().startswith(letter)
    assert pair.seed.decode().startswith("S" + letter)
    assert crypto.is_public_key(pair.public_key.decode(), prefix)


def test_xkeys_round_trip_and_reject_the_wrong_role() -> None:
    key = crypto.XKey.generate()
    assert key.public_key.startswith("X")
    assert key.seed.startswith("SX")
    assert crypto.XKey.from_seed(key.seed).public_key == key.public_key
    with pytest.raises(crypto.InvalidKey, match="not a curve seed"):
        crypto.XKey.from_seed(crypto.encode_seed(crypto.PREFIX_SERVER, os.urandom(32)))
    node = crypto.create_signing_key(crypto.PREFIX_SERVER).public_key.decode()
    assert not crypto.is_public_key(node, crypto.PREFIX_CURVE)
    corrupt = key.public_key[:-1] + ("A" if key.public_key[-1] != "A" else "B")
    assert not crypto.is_public_key(corrupt, crypto.PREFIX_CURVE)


def test_seal_is_xkv1_and_opens_only_for_the_right_pair() -> None:
    sender, recipient, stranger = crypto.XKey.generate(), crypto.XKey.generate(), crypto.XKey.generate()
    sealed = sender.seal(b'{"SECRET":"1"}', recipient.public_key)
    assert sealed.startswith(b"xkv1")
    assert len(sealed) == 4 + 24 + 16 + 14
    assert recipient.open(sealed, sender.public_key) == b'{"SECRET":"1"}'
    with pytest.raises(crypto.SealError):
        stranger.open(sealed, sender.public_key)  # sealed to someone else
    with pytest.raises(crypto.SealError):
        recipient.open(sealed, stranger.public_key)  # not from this sender
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(crypto.SealError):
        recipient.open(tampered, sender.public_key)
    with pytest.raises(crypto.SealError, match="not xkv1"):
        recipient.open(b"xkv2" + sealed[4:], sender.public_key)


def test_identity_is_kept_private_in_the_state_dir(tmp_path: Path) -> None:
    first = crypto.NodeIdentity.load_or_create(tmp_path)
    again = crypto.NodeIdentity.load_or_create(tmp_path)
    assert (first.node_id, first.public_xkey) == (again.node_id, again.public_xkey)
    for name in ("node.nk", "node.xk"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert crypto.NodeIdentity.generate().node_id != first.node_id


def test_a_corrupt_identity_file_names_the_file_and_the_remedy(tmp_path: Path) -> None:
    (tmp_path / "node.nk").write_text("SXAGARBAGE\n")
    with pytest.raises(crypto.InvalidKey, match=r"node\.nk does not hold a node \(SN…\) seed.*remove it"):
        crypto.NodeIdentity.load_or_create(tmp_path)


# -- workload JWTs -------------------------------------------------------------------------------------


def _jwt_parts(token: str) -> list[bytes]:
    return [base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)) for part in token.split(".")]


def test_a_generic_jwt_has_nats_header_and_claims_and_verifies() -> None:
    issuer = crypto.create_signing_key(crypto.PREFIX_ACCOUNT)
    token = crypto.encode_generic_jwt(issuer, "echo", {"hash": "ab" * 32, "name": "echo"}, issued_at=1_700_000_000)
    header, _, signature = _jwt_parts(token)
    assert header == b'{"typ":"JWT","alg":"ed25519-nkey"}'
    decoded = crypto.decode_generic_jwt(token)
    assert decoded.iss == issuer.public_key.decode()
    assert decoded.sub == "echo"
    assert decoded.iat == 1_700_000_000
    assert decoded.nats == {"hash": "ab" * 32, "name": "echo", "version": 2}
    assert decoded.text("hash") == "ab" * 32
    assert decoded.text("version") == "", "only strings are text"
    # the jti is the SHA-512/256 of the standard claims without it (nats-io/jwt's ClaimsData.hash)
    base = json.dumps({"iat": 1_700_000_000, "iss": decoded.iss, "sub": "echo"}, separators=(",", ":")).encode()
    assert decoded.jti == base64.b32encode(hashlib.new("sha512_256", base).digest()).decode().rstrip("=")
    assert len(signature) == 64


def test_a_tampered_or_foreign_jwt_is_refused_saying_why() -> None:
    issuer = crypto.create_signing_key(crypto.PREFIX_ACCOUNT)
    token = crypto.encode_generic_jwt(issuer, "echo", {"hash": "00"})
    header, claims, signature = token.split(".")
    forged = base64.urlsafe_b64encode(_jwt_parts(token)[1].replace(b'"echo"', b'"evil"')).decode().rstrip("=")
    with pytest.raises(crypto.JwtError, match="signature does not verify"):
        crypto.decode_generic_jwt(f"{header}.{forged}.{signature}")
    other = crypto.create_signing_key(crypto.PREFIX_ACCOUNT)
    resigned = crypto.encode_generic_jwt(other, "echo", {"hash": "00"})
    with pytest.raises(crypto.JwtError, match="signature does not verify"):
        crypto.decode_generic_jwt(f"{header}.{claims}.{resigned.split('.')[2]}")
    with pytest.raises(crypto.JwtError, match=r"expected header\.claims\.signature"):
        crypto.decode_generic_jwt("not-a-jwt")
    hs256 = base64.urlsafe_b64encode(b'{"typ":"JWT","alg":"HS256"}').decode().rstrip("=")
    with pytest.raises(crypto.JwtError, match="unsupported JWT algorithm 'HS256'"):
        crypto.decode_generic_jwt(f"{hs256}.{claims}.{signature}")


def test_expired_and_not_yet_valid_jwts_are_refused() -> None:
    issuer = crypto.create_signing_key(crypto.PREFIX_ACCOUNT)
    token = crypto.encode_generic_jwt(issuer, "echo", {})
    claims = crypto.decode_generic_jwt(token)
    header = token.split(".")[0]

    def signed(extra: dict[str, int]) -> str:
        body = json.dumps({"iss": claims.iss, "sub": "echo", **extra}, separators=(",", ":")).encode()
        payload = f"{header}.{base64.urlsafe_b64encode(body).decode().rstrip('=')}"
        signature = base64.urlsafe_b64encode(issuer.sign(payload.encode())).decode().rstrip("=")
        return f"{payload}.{signature}"

    with pytest.raises(crypto.JwtError, match="it has expired"):
        crypto.decode_generic_jwt(signed({"exp": 1000}), now=2000)
    with pytest.raises(crypto.JwtError, match="not valid yet"):
        crypto.decode_generic_jwt(signed({"nbf": 3000}), now=2000)
    assert crypto.decode_generic_jwt(signed({"exp": 3000, "nbf": 1000}), now=2000).sub == "echo"
