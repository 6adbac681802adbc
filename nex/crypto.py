"""Keys: NATS nkeys (node ``N…``, account ``A…``, user ``U…``) and curve xkeys (``X…``) with sealing.

The ``nkeys`` package signs and verifies but cannot create keys or handle curve keys, so the encoding
lives here: a prefix byte, the 32-byte key, a CRC-16 (nkeys' table), base32 without padding; seeds
carry ``S`` plus the role (``SN…``, ``SA…``, ``SX…``), as in the Go ``nkeys`` library.

Sealed data follows nkeys' xkv1 format, which nex uses for workload environments: ``b"xkv1"`` ‖ a
24-byte nonce ‖ a NaCl box (Curve25519, XSalsa20-Poly1305) from the sender's key to the recipient's.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import nacl.exceptions
import nacl.public
import nacl.signing
import nacl.utils
import nkeys

from nex.api import gojson

PREFIX_SEED = nkeys.PREFIX_BYTE_SEED
PREFIX_SERVER = nkeys.PREFIX_BYTE_SERVER  # N
PREFIX_ACCOUNT = nkeys.PREFIX_BYTE_ACCOUNT  # A
PREFIX_USER = nkeys.PREFIX_BYTE_USER  # U
PREFIX_CURVE = 23 << 3  # X

XKEY_VERSION = b"xkv1"
_ROLE_LETTER = {PREFIX_SERVER: "N", PREFIX_ACCOUNT: "A", PREFIX_USER: "U", PREFIX_CURVE: "X"}
_ROLE_NAME = {PREFIX_SERVER: "server", PREFIX_ACCOUNT: "account", PREFIX_USER: "user", PREFIX_CURVE: "curve"}


class InvalidKey(ValueError):
    """A key or seed that does not decode (bad base32, bad checksum, wrong role)."""


class SealError(ValueError):
    """Sealed data that cannot be opened: wrong format, wrong keys, or tampered."""


def _checksum(data: bytes) -> bytes:
    return int(nkeys.crc16(bytearray(data))).to_bytes(2, "little")


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode().rstrip("=")


def _unb32(text: str) -> bytes:
    try:
        return base64.b32decode(text + "=" * (-len(text) % 8))
    except (ValueError, TypeError) as exc:
        raise InvalidKey("not a base32 key") from exc


def encode_public(prefix: int, raw: bytes) -> str:
    body = bytes([prefix]) + raw
    return _b32(body + _checksum(body))


def encode_seed(prefix: int, raw: bytes) -> str:
    body = bytes([PREFIX_SEED | prefix >> 5, (prefix & 31) << 3]) + raw
    return _b32(body + _checksum(body))


def decode_public(text: str, prefix: int) -> bytes:
    """The raw 32 bytes of public key ``text``, which must have role ``prefix``."""
    data = _unb32(text)
    if len(data) != 35 or _checksum(data[:-2]) != data[-2:]:
        raise InvalidKey(f"{text[:8]}… is not a valid public key")
    if data[0] != prefix:
        raise InvalidKey(f"{text[:8]}… is not a {_ROLE_NAME[prefix]} key ({_ROLE_LETTER[prefix]}…)")
    return data[1:33]


def decode_seed(text: str, prefix: int) -> bytes:
    data = _unb32(text)
    if len(data) != 36 or _checksum(data[:-2]) != data[-2:]:
        raise InvalidKey("not a valid seed")
    role = (data[0] & 7) << 5 | (data[1] & 248) >> 3
    if data[0] & 248 != PREFIX_SEED or role != prefix:
        raise InvalidKey(f"not a {_ROLE_NAME[prefix]} seed (S{_ROLE_LETTER[prefix]}…)")
    return data[2:34]


def is_public_key(text: str, prefix: int) -> bool:
    try:
        decode_public(text, prefix)
    except InvalidKey:
        return False
    return True


def create_signing_key(prefix: int) -> nkeys.KeyPair:
    """A new nkey pair of the given role (server, account or user)."""
    return nkeys.from_seed(encode_seed(prefix, os.urandom(32)).encode())


def signing_key_from_seed(seed: str, prefix: int) -> nkeys.KeyPair:
    decode_seed(seed, prefix)  # clear error for the wrong role or a corrupt seed
    return nkeys.from_seed(seed.encode())


def signed_by(public_key: str, prefix: int, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the ed25519 signature of ``data`` by the nkey ``public_key`` (of the
    role ``prefix``); False for a key of another role, a malformed key or signature, or a mismatch."""
    try:
        nacl.signing.VerifyKey(decode_public(public_key, prefix)).verify(data, signature)
    except (nacl.exceptions.BadSignatureError, InvalidKey, ValueError):
        return False
    return True


class XKey:
    """A curve (X25519) key pair that seals data to other xkeys and opens data sealed to it."""

    __slots__ = ("_private",)

    def __init__(self, private: nacl.public.PrivateKey) -> None:
        self._private = private

    @classmethod
    def generate(cls) -> XKey:
        return cls(nacl.public.PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: str) -> XKey:
        return cls(nacl.public.PrivateKey(decode_seed(seed, PREFIX_CURVE)))

    @property
    def seed(self) -> str:
        return encode_seed(PREFIX_CURVE, bytes(self._private))

    @property
    def public_key(self) -> str:
        return encode_public(PREFIX_CURVE, bytes(self._private.public_key))

    def seal(self, plaintext: bytes, recipient: str, *, nonce: bytes | None = None) -> bytes:
        """``xkv1`` ‖ nonce ‖ box(plaintext), from this key to ``recipient`` (an ``X…`` public key).

        ``nonce`` (24 bytes) is for test vectors only: a nonce must never be reused.
        """
        box = nacl.public.Box(self._private, nacl.public.PublicKey(decode_public(recipient, PREFIX_CURVE)))
        nonce = nonce if nonce is not None else nacl.utils.random(nacl.public.Box.NONCE_SIZE)
        return XKEY_VERSION + bytes(box.encrypt(plaintext, nonce))

    def open(self, sealed: bytes, sender: str) -> bytes:
        """The plaintext of ``sealed``, which ``sender`` (an ``X…`` public key) sealed to this key."""
        if not sealed.startswith(XKEY_VERSION):
            raise SealError("not xkv1 sealed data")
        try:
            sender_key = nacl.public.PublicKey(decode_public(sender, PREFIX_CURVE))
            return nacl.public.Box(self._private, sender_key).decrypt(sealed[len(XKEY_VERSION) :])
        except (InvalidKey, nacl.exceptions.CryptoError) as exc:
            raise SealError("cannot open: sealed to another key, by another sender, or tampered") from exc


class NodeIdentity:
    """The node's server nkey (its id, ``N…``) and its xkey (``X…``, the recipient of sealed requests)."""

    def __init__(self, nkey: nkeys.KeyPair, xkey: XKey) -> None:
        self.nkey = nkey
        self.xkey = xkey

    @property
    def node_id(self) -> str:
        return str(self.nkey.public_key.decode())

    @property
    def public_xkey(self) -> str:
        return self.xkey.public_key

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(create_signing_key(PREFIX_SERVER), XKey.generate())

    @classmethod
    def load_or_create(cls, state_dir: Path) -> NodeIdentity:
        """Read ``node.nk`` and ``node.xk`` from ``state_dir``, creating them (mode 0600) if missing."""
        nk_path, xk_path = state_dir / "node.nk", state_dir / "node.xk"
        nk_seed = read_or_create_seed(nk_path, lambda: encode_seed(PREFIX_SERVER, os.urandom(32)))
        xk_seed = read_or_create_seed(xk_path, lambda: XKey.generate().seed)
        try:
            nkey = signing_key_from_seed(nk_seed, PREFIX_SERVER)
        except (InvalidKey, nkeys.NkeysError) as exc:
            raise InvalidKey(f"{nk_path} does not hold a node (SN…) seed: {exc}; remove it to make a new one") from exc
        try:
            xkey = XKey.from_seed(xk_seed)
        except InvalidKey as exc:
            raise InvalidKey(f"{xk_path} does not hold an xkey (SX…) seed: {exc}; remove it to make a new one") from exc
        return cls(nkey, xkey)


def read_or_create_seed(path: Path, make: Callable[[], str]) -> str:
    """The seed in ``path``, or a new one from ``make()`` written there first (mode 0600, atomically)."""
    if path.exists():
        return path.read_text().strip()
    seed = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(seed + "\n")
    tmp.rename(path)
    return seed


# -- NATS JWTs ------------------------------------------------------------------------------------------

JWT_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}


class JwtError(ValueError):
    """A JWT that does not decode, is not signed by its issuer, or whose claims are not valid now."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class GenericClaims(msgspec.Struct, frozen=True):
    """A decoded NATS generic-claims JWT (``jwt.GenericClaims``): standard claims and ``nats`` data."""

    iss: str
    sub: str = ""
    jti: str = ""
    iat: int = 0
    exp: int = 0
    nbf: int = 0
    name: str = ""
    aud: str = ""
    nats: dict[str, Any] = msgspec.field(default_factory=dict)

    def text(self, key: str) -> str:
        """A string in the ``nats`` data; "" when absent or not a string."""
        value = self.nats.get(key)
        return value if isinstance(value, str) else ""


_BASE_CLAIMS = ("aud", "exp", "jti", "iat", "iss", "name", "nbf", "sub")  # Go's ClaimsData order


def encode_generic_jwt(
    issuer: nkeys.KeyPair, subject: str, data: dict[str, object], *, issued_at: int | None = None
) -> str:
    """A NATS v2 generic-claims JWT, byte for byte as Go's ``jwt.GenericClaims.Encode`` makes it.

    The ``jti`` is the SHA-512/256 of the base claims (without ``jti``) in unpadded base32; ``nats``
    holds ``data`` plus ``"version": 2``, keys sorted as Go sorts map keys.
    """
    base: dict[str, object] = {
        "iat": issued_at if issued_at is not None else int(time.time()),
        "iss": issuer.public_key.decode(),
        "sub": subject,
    }
    ordered = {key: base[key] for key in _BASE_CLAIMS if key in base}
    jti = base64.b32encode(hashlib.new("sha512_256", gojson.dumps(ordered)).digest()).decode().rstrip("=")
    full = {**base, "jti": jti}
    claims = {key: full[key] for key in _BASE_CLAIMS if key in full}
    claims["nats"] = gojson.go_map({**data, "version": 2})
    signing_input = f"{_b64url(gojson.dumps(JWT_HEADER))}.{_b64url(gojson.dumps(claims))}"
    return f"{signing_input}.{_b64url(issuer.sign(signing_input.encode()))}"


def decode_generic_jwt(token: str, *, now: float | None = None) -> GenericClaims:
    """The claims of ``token`` after checking its header, its signature by ``iss``, and ``exp``/``nbf``.

    Raises:
        JwtError: saying which of those failed.
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtError("not a JWT (expected header.claims.signature)")
    try:
        header = msgspec.json.decode(_unb64url(parts[0]), type=dict[str, Any])
        claims = msgspec.json.decode(_unb64url(parts[1]), type=GenericClaims)
        signature = _unb64url(parts[2])
    except (ValueError, msgspec.DecodeError) as exc:
        raise JwtError(f"cannot decode the JWT: {exc}") from None
    except RecursionError:  # msgspec recurses per level: header and nats are dict[str, Any]
        raise JwtError("cannot decode the JWT: JSON is nested too deeply") from None
    if not isinstance(header.get("typ"), str) or header["typ"].upper() != JWT_HEADER["typ"]:
        raise JwtError(f"unsupported JWT type {header.get('typ')!r} (expected {JWT_HEADER['typ']})")
    if header.get("alg") != JWT_HEADER["alg"]:
        raise JwtError(f"unsupported JWT algorithm {header.get('alg')!r} (expected {JWT_HEADER['alg']})")
    prefix = {"A": PREFIX_ACCOUNT, "U": PREFIX_USER, "N": PREFIX_SERVER}.get(claims.iss[:1])
    if prefix is None or not is_public_key(claims.iss, prefix):
        raise JwtError(f"the JWT's issuer {claims.iss[:8]!r} is not a public account, user or server nkey")
    try:
        public = nacl.signing.VerifyKey(decode_public(claims.iss, prefix))
        public.verify(f"{parts[0]}.{parts[1]}".encode(), signature)
    except (nacl.exceptions.BadSignatureError, InvalidKey, ValueError) as exc:
        raise JwtError(f"the JWT's signature does not verify against its issuer: {exc}") from None
    moment = time.time() if now is None else now
    if claims.exp > 0 and moment > claims.exp:
        raise JwtError("standard claims within JWT are not valid: it has expired")
    if claims.nbf > 0 and claims.nbf > moment:
        raise JwtError("standard claims within JWT are not valid: it is not valid yet")
    return claims
