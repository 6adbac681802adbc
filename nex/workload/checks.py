"""The checks of deploy and stop requests, each refusing with the reason the requester is told.

Pure functions of the request and what the node knows: no I/O, so that the workload manager's
order of checks reads as a list and each check can be tried on its own.

A reason names the field at fault. It quotes what the requester sent only through :func:`shown`,
cut short: a reason travels back in a reply, which must fit in the server's ``max_payload`` even when
the request filled it (a reply that does not fit is never sent).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Protocol, TypeVar

import msgspec

from nex import crypto
from nex.api import control

from .artifact import ArtifactError, Location
from .names import NAME_RULE

T = TypeVar("T")

SHOWN = 64  # characters of a requester's value a reason quotes
#: an object store's bucket (nats.go's ``validBucketRe``) and a JetStream domain: one subject token
#: each, short enough that ``$JS.{domain}.API.STREAM.MSG.GET.OBJ_{bucket}`` fits in a protocol line
#: (the server closes a connection that sends a longer one: 4 KiB by default)
TOKEN_RULE = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
#: an object's name: its metadata's subject, ``$O.{bucket}.M.{base64(name)}``, was published once, so it
#: fit in a protocol line; a longer name is in no object store (and its lookup would exceed max_payload)
MAX_KEY_BYTES = 2048


class Refused(Exception):
    """A request that cannot be served; its message is the reply's error."""


def shown(value: str) -> str:
    """``value`` as a reason quotes it: ``repr``, cut to :data:`SHOWN` characters."""
    if len(value) <= SHOWN:
        return repr(value)
    return f"{value[:SHOWN]!r}… ({len(value)} characters)"


def decode(body: bytes, kind: type[T], what: str) -> T:
    """A request's body as ``kind``; refused as nex refuses it ("Unable to deserialize {what} request").

    msgspec reads nesting by recursion: a body nested deeper than Python's recursion limit allows (about
    a thousand ``[``, two kilobytes) raises :class:`RecursionError`, the body's fault like any other
    malformed JSON.
    """
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.DecodeError as exc:
        raise Refused(f"Unable to deserialize {what} request: {exc}") from None
    except RecursionError:
        raise Refused(f"Unable to deserialize {what} request: JSON is nested too deeply") from None


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
    if not crypto.is_public_key(request.sender_public_key, crypto.PREFIX_CURVE):
        raise Refused(
            "Failed to decrypt environment for deploy request: sender_public_key "
            f"{shown(request.sender_public_key)} is not a curve (X…) public key"
        )
    try:
        sealed = base64.b64decode(request.environment, validate=True)
        plain = xkey.open(sealed, request.sender_public_key)
        environment = msgspec.json.decode(plain, type=dict[str, str])
    except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
        raise Refused(f"Failed to decrypt environment for deploy request: {exc}") from None
    for key, value in environment.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise Refused(f"Invalid deploy request: environment variable {shown(key)} cannot be passed to a program")
    return environment, request.sender_public_key


def check_argv(argv: list[str]) -> None:
    """What exec cannot pass: a NUL byte ends a C string (Python refuses, and the workload never ran)."""
    for i, arg in enumerate(argv):
        if "\0" in arg:
            raise Refused(f"Invalid deploy request: argv[{i}] holds a NUL byte, which no program can receive")


def check_jwt(request: control.DeployRequest, *, at: float | None = None) -> crypto.GenericClaims:
    """The verified claims of a deploy; the name (``nats.name``, else ``sub``) must follow the rule.

    ``exp`` and ``nbf`` are judged at the unix time ``at`` (default: now): a node deploying again a
    request it accepted before judges them when it accepted it (see the workload manager's redeploy).
    """
    if not request.workload_jwt:
        raise Refused("Invalid deploy request: it has no workload_jwt")
    try:
        claims = crypto.decode_generic_jwt(request.workload_jwt, now=at)
    except crypto.JwtError as exc:
        raise Refused(f"Invalid deploy request: {exc}") from None
    except RecursionError:  # msgspec recurses per level of nesting (the header and nats are dict[str, Any])
        raise Refused("Invalid deploy request: cannot decode the JWT: JSON is nested too deeply") from None
    name = workload_name(claims)
    if not NAME_RULE.match(name):
        raise Refused(f"Invalid deploy request: workload name {shown(name)} must match {NAME_RULE.pattern}")
    if not claims.text("hash"):
        raise Refused("Invalid deploy request: the workload JWT has no hash claim")
    if request.workload_name is not None and request.workload_name != name:
        raise Refused(
            f"Invalid deploy request: workload_name {shown(request.workload_name)} is not the JWT's {shown(name)}"
        )
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
            f"Invalid stop request: stop claims subject {shown(claims.sub)} does not match the workload "
            f"({start.name!r}) or its original start claims subject"
        )


def artifact_location(request: control.DeployRequest) -> Location:
    """Where the artifact is: ``nats://BUCKET/key`` with a bucket (and ``jsdomain``) that can be put
    in a subject (see :data:`TOKEN_RULE`)."""
    url = request.location_url()
    if any(ord(c) < 0x20 or c == "\x7f" for c in url):  # urlsplit drops some of them: another location
        raise Refused(f"Invalid deploy request: location {shown(url)} holds a control character")
    try:
        location = Location.parse(url)
    except ArtifactError:
        raise Refused(f"Invalid deploy request: location must be nats://BUCKET/key, not {shown(url)}") from None
    if not TOKEN_RULE.match(location.bucket):
        raise Refused(
            f"Invalid deploy request: location's bucket {shown(location.bucket)} must match {TOKEN_RULE.pattern}"
        )
    if len(location.key.encode()) > MAX_KEY_BYTES:
        raise Refused(
            f"Invalid deploy request: location's key {shown(location.key)} is longer than {MAX_KEY_BYTES} bytes"
        )
    if request.jsdomain and not TOKEN_RULE.match(request.jsdomain):
        raise Refused(f"Invalid deploy request: jsdomain {shown(request.jsdomain)} must match {TOKEN_RULE.pattern}")
    return location


def check_size(size: int, limit: int) -> None:
    if limit and size > limit:
        raise Refused(f"Workload file size would exceed node limitations: {size} bytes, at most {limit} allowed")


def workload_name(claims: crypto.GenericClaims) -> str:
    """A workload's name in its JWT: ``sub`` as nex's clients set it (``nats.name`` if present)."""
    return claims.text("name") or claims.sub
