"""Machine ids and the host names derived from them.

Machine ids are xids as nex uses them (20 lowercase base32hex characters: a timestamp, then
machine, process and counter bytes), so they sort by creation time. Host object names (netns, veth)
come from a hash of the id, because an xid's prefix is its timestamp and would collide between
machines made in the same second; with the ``nx`` prefix and a suffix they stay within IFNAMSIZ.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import time

_ALPHABET = "0123456789abcdefghijklmnopqrstuv"
_MACHINE = hashlib.md5(socket.gethostname().encode(), usedforsecurity=False).digest()[:3]
_counter = itertools.count(int.from_bytes(os.urandom(3), "big"))

PREFIX = "nx"
IFNAMSIZ = 15


def new_vmid() -> str:
    """A new xid: 4 bytes of seconds, 3 of host, 2 of pid, 3 of counter, in base32hex."""
    raw = (
        int(time.time()).to_bytes(4, "big")
        + _MACHINE
        + (os.getpid() & 0xFFFF).to_bytes(2, "big")
        + (next(_counter) & 0xFFFFFF).to_bytes(3, "big")
    )
    value = int.from_bytes(raw, "big") << 4  # xid left-aligns 96 bits in 100
    chars = []
    for _ in range(20):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def short(vmid: str) -> str:
    """``nx`` and 10 hex characters of the id's hash: the netns name, and the stem of link names."""
    return PREFIX + hashlib.sha256(vmid.encode()).hexdigest()[:10]


def host_link(vmid: str) -> str:
    """The host end of the machine's veth pair (13 characters)."""
    return short(vmid) + "h"
