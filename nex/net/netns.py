"""A machine's network: its own namespace joined to the host by a veth pair (the CNI ``ptp`` topology).

    host                                  netns nx<hash>
    nx<hash>h  192.168.127.1/32  <─veth─>  veth0  192.168.127.N/32
    route 192.168.127.N/32 dev nx<hash>h   route 192.168.127.1 dev veth0, default via .1
    (in the node's interface group)        lo up

As with CNI's ptp plugin, the machine's address is a /32 and everything, its subnet included, goes
through the gateway: the host decides (with the node's fence, see :mod:`nex.net.fence`) what a
machine reaches, never the machine's own link. The host end is created in the node's interface group,
which is what the fence matches.

Every host-side object is named ``nx…`` and fits IFNAMSIZ. These are blocking functions for a worker
thread (see :mod:`nex.net.network`). Creating the namespace is done with ``unshare`` and a bind mount
in that thread rather than through pyroute2's helpers, which fork a process for each namespace, and
the requests go through :mod:`nex.net.rtnl`: a machine's network takes about 1.5 ms this way against
15 ms through pyroute2's helpers (measured on a 2-core VM).

Deleting is idempotent. The host end of the veth is deleted explicitly: unmounting the namespace
alone leaves the kernel to destroy the pair later, asynchronously.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from nex import affinity, linux

NETNS_DIR = Path("/run/netns")

_libc = linux.libc


@dataclass(frozen=True)
class MachineNetwork:
    """The network of one machine."""

    netns: str
    host_link: str
    guest_link: str
    address: str
    prefixlen: int
    gateway: str
    group: int = 0  # the host end's interface group (0: none)

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def create(net: MachineNetwork) -> None:
    """Make the namespace, the veth pair and both ends' addresses and routes (blocking)."""
    from .rtnl import Rtnl  # imported late: pyroute2 takes ~90 ms to import (see warm_up)

    affinity.unpin_current()  # this worker thread may run on any CPU, unlike the node's own two
    NETNS_DIR.mkdir(parents=True, exist_ok=True)
    host_ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _check(_libc.unshare(linux.CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        try:
            fd = os.open(net.netns_path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444)
            os.close(fd)
            path = str(net.netns_path).encode()
            _check(_libc.mount(b"/proc/thread-self/ns/net", path, None, linux.MS_BIND, None), "bind-mount the netns")
            with Rtnl() as inside:  # opened in the new namespace
                group = net.group or None
                inside.add_veth(net.guest_link, net.host_link, peer_netns_fd=host_ns, peer_group=group)
                inside.set_up("lo")
                inside.add_address(net.guest_link, net.address, net.prefixlen)
                inside.set_up(net.guest_link)
                inside.add_route(net.gateway, 32, device=net.guest_link)
                inside.add_route("0.0.0.0", 0, gateway=net.gateway)
        finally:
            _check(_libc.setns(host_ns, linux.CLONE_NEWNET), "return to the host netns")
    finally:
        os.close(host_ns)
    with Rtnl() as host:
        host.add_address(net.host_link, net.gateway, 32)
        host.set_up(net.host_link)
        host.add_route(net.address, 32, device=net.host_link)
    strict_source(net.host_link)


def strict_source(link: str) -> None:
    """Accept on ``link`` only packets whose source address routes back through it (strict reverse
    path filtering, RFC 3704): a machine that forges a neighbour's address (root in a VM can, a jailed
    workload cannot) has its packets dropped before the fence or anything else sees them, instead of
    having the host answer the neighbour in its name."""
    Path(f"/proc/sys/net/ipv4/conf/{link}/rp_filter").write_text("1")


def delete(netns: str, host_link: str) -> None:
    """Remove the veth pair and the namespace, whatever of them exists (blocking, idempotent)."""
    from .rtnl import Rtnl  # imported late (see warm_up)

    affinity.unpin_current()
    with Rtnl() as host:
        host.delete_link(host_link)  # takes its peer with it, at once (not when the netns goes)
    path = NETNS_DIR / netns
    unmounted = _libc.umount2(str(path).encode(), linux.MNT_DETACH) == 0
    if not unmounted and ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
        code = ctypes.get_errno()
        raise OSError(code, f"unmount {path}: {os.strerror(code)}")
    path.unlink(missing_ok=True)


def create_gateway_link(name: str, gateway: str) -> None:
    """A link of the node's own holding the gateway address, up (blocking): what the internal server
    listens on, so that it never listens on the host's other addresses. Replaces a leftover of that name."""
    from .rtnl import Rtnl

    affinity.unpin_current()
    with Rtnl() as host:
        host.delete_link(name)
        host.add_dummy(name)
        host.add_address(name, gateway, 32)
        host.set_up(name)


def delete_link(name: str) -> bool:
    """Delete link ``name`` of this namespace if it exists (blocking, idempotent)."""
    from .rtnl import Rtnl

    affinity.unpin_current()
    with Rtnl() as host:
        return host.delete_link(name)


def warm_up() -> None:
    """Import the netlink module (pyroute2's package takes ~90 ms to import) ahead of the first machine.

    The node calls this in a worker thread as it starts, so the import overlaps its other start-up
    work instead of delaying ``nex up`` or the first machine.
    """
    from . import rtnl  # noqa: F401


def namespaces(prefix: str) -> list[str]:
    """Names of the namespaces in /run/netns that start with ``prefix``."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(entry.name for entry in NETNS_DIR.iterdir() if entry.name.startswith(prefix))


def links(prefix: str) -> list[str]:
    """Names of the links of this network namespace that start with ``prefix``."""
    return sorted(name for _, name in socket.if_nameindex() if name.startswith(prefix))


def enter(netns_path: Path) -> None:
    """Move the calling thread (or the process, if single-threaded) into a namespace (blocking)."""
    fd = os.open(netns_path, os.O_RDONLY)
    try:
        _check(_libc.setns(fd, linux.CLONE_NEWNET), f"setns({netns_path})")
    finally:
        os.close(fd)


def has_capabilities() -> bool:
    """Whether this process may create namespaces and links (CAP_NET_ADMIN and CAP_SYS_ADMIN)."""
    return linux.has_capabilities(12, 21)
