"""Keys: NATS nkeys (node ``N…``, account ``A…``, user ``U…``) and curve xkeys (``X…``) with sealing.

The ``nkeys`` package signs and verifies but cannot create keys or handle curve keys, so the encoding
lives here: a prefix byte, the 32-byte key, a CRC-16 (nkeys' table), base32 without padding; seeds
carry ``S`` plus the role (``SN…``, ``SA…``, ``SX…``), as in the Go ``nkeys`` library.

Sealed data follows nkeys' xkv1 format, which nex uses for workload environments: ``b"xkv1"`` ‖ a
24-byte nonce ‖ a NaCl box (Curve25519, XSalsa20-Poly1305) from the sender's key to the recipient's.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import nacl.exceptions
import nacl.public
import nacl.utils
import nkeys

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

    def seal(self, plaintext: bytes, recipient: str) -> bytes:
        """``xkv1`` ‖ nonce ‖ box(plaintext), from this key to ``recipient`` (an ``X…`` public key)."""
        box = nacl.public.Box(self._private, nacl.public.PublicKey(decode_public(recipient, PREFIX_CURVE)))
        return XKEY_VERSION + bytes(box.encrypt(plaintext, nacl.utils.random(nacl.public.Box.NONCE_SIZE)))

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
        nk_seed = _read_or_create(nk_path, lambda: encode_seed(PREFIX_SERVER, os.urandom(32)))
        xk_seed = _read_or_create(xk_path, lambda: XKey.generate().seed)
        try:
            nkey = signing_key_from_seed(nk_seed, PREFIX_SERVER)
        except (InvalidKey, nkeys.NkeysError) as exc:
            raise InvalidKey(f"{nk_path} does not hold a node (SN…) seed: {exc}; remove it to make a new one") from exc
        try:
            xkey = XKey.from_seed(xk_seed)
        except InvalidKey as exc:
            raise InvalidKey(f"{xk_path} does not hold an xkey (SX…) seed: {exc}; remove it to make a new one") from exc
        return cls(nkey, xkey)


def _read_or_create(path: Path, make: object) -> str:
    if path.exists():
        return path.read_text().strip()
    assert callable(make)
    seed = str(make())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(seed + "\n")
    tmp.rename(path)
    return seed
