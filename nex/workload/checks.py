"""The checks of deploy and stop requests, each refusing with the reason the requester is told.

Pure functions of the request and what the node knows: no I/O, so that the workload manager's
order of checks reads as a list and each check can be tried on its own.
"""

from __future__ import annotations

import base64
import binascii
from typing import Protocol

import msgspec

from nex import crypto
from nex.api import control

from .names import NAME_RULE


class Refused(Exception):
    """A request that cannot be served; its message is the reply's error."""


class StartClaims(Protocol):
    """What a stop is checked against: the deploy's issuer, names and claims identifiers."""

    name: str
    issuer: str
    subject: str
    jti: str
    iat: int


def open_environment(xkey: crypto.XKey, request: control.DeployRequest) -> tuple[dict[str, str], str]:
    """The decrypted environment of a deploy request, and its sender's xkey."""
    if not request.environment or not request.sender_public_key:
        raise Refused("Failed to decrypt environment for deploy request: it has no environment or no sender_public_key")
    try:
        sealed = base64.b64decode(request.environment, validate=True)
        plain = xkey.open(sealed, request.sender_public_key)
        environment = msgspec.json.decode(plain, type=dict[str, str])
    except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
        raise Refused(f"Failed to decrypt environment for deploy request: {exc}") from None
    for key, value in environment.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise Refused(f"Invalid deploy request: environment variable {key!r} cannot be passed to a program")
    return environment, request.sender_public_key


def check_argv(argv: list[str]) -> None:
    """What exec cannot pass: a NUL byte ends a C string (Python refuses, and the workload never ran)."""
    for i, arg in enumerate(argv):
        if "\0" in arg:
            raise Refused(f"Invalid deploy request: argv[{i}] holds a NUL byte, which no program can receive")


def check_jwt(request: control.DeployRequest) -> crypto.GenericClaims:
    """The verified claims of a deploy; the name (``nats.name``, else ``sub``) must follow the rule."""
    if not request.workload_jwt:
        raise Refused("Invalid deploy request: it has no workload_jwt")
    try:
        claims = crypto.decode_generic_jwt(request.workload_jwt)
    except crypto.JwtError as exc:
        raise Refused(f"Invalid deploy request: {exc}") from None
    name = workload_name(claims)
    if not NAME_RULE.match(name):
        raise Refused(f"Invalid deploy request: workload name {name!r} must match {NAME_RULE.pattern}")
    if not claims.text("hash"):
        raise Refused("Invalid deploy request: the workload JWT has no hash claim")
    if request.workload_name is not None and request.workload_name != name:
        raise Refused(f"Invalid deploy request: workload_name {request.workload_name!r} is not the JWT's {name!r}")
    if request.hash is not None and request.hash != claims.text("hash"):
        raise Refused("Invalid deploy request: artifact hash claim does not match request")
    return claims


def check_stop(claims: crypto.GenericClaims, start: StartClaims, used: set[str]) -> None:
    """Refuse a stop whose JWT is not the deployer's, replays the deploy's or an earlier stop's, or
    names another workload (nex's ``StopRequest.Validate``, plus tokens already used)."""
    if claims.iss != start.issuer:
        raise Refused(
            "Invalid stop request: the only entity allowed to terminate a workload "
            "is the issuer that originally started it"
        )
    if claims.jti == start.jti or claims.iat == start.iat:
        raise Refused(
            "Invalid stop request: stop claims appear to be cloned or captured from the original start "
            "claims (same jti or iat). Rejecting for security reasons"
        )
    if claims.jti in used:
        raise Refused("Invalid stop request: this stop JWT was used before; sign a new one")
    if claims.sub not in (start.subject, start.name):
        raise Refused(
            f"Invalid stop request: stop claims subject {claims.sub!r} does not match the workload "
            f"({start.name!r}) or its original start claims subject"
        )


def check_size(size: int, limit: int) -> None:
    if limit and size > limit:
        raise Refused(f"Workload file size would exceed node limitations: {size} bytes, at most {limit} allowed")


def workload_name(claims: crypto.GenericClaims) -> str:
    """A workload's name in its JWT: ``sub`` as nex's clients set it (``nats.name`` if present)."""
    return claims.text("name") or claims.sub
