"""Keys and sealing, checked against the nkeys package and against tampering."""

from __future__ import annotations

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
