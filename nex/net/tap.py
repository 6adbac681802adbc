"""A VM's tap in its machine's namespace, joined to the machine's veth as CNI's ``tc-redirect-tap`` does.

Inside the machine's network namespace: a persistent tap (``TUNSETIFF`` + ``TUNSETPERSIST`` on
``/dev/net/tun``), an ``ingress`` qdisc on the tap and on the veth's inner end, and on each a u32
filter that matches every frame and redirects it (``mirred egress redirect``) out of the other. A
frame the host sends down the veth leaves through the tap into the VM; a frame the VM writes to the
tap leaves through the veth to the host. The veth keeps the machine's address and routes (the host
side is unchanged from the process driver's), so the lease, the fence and the teardown are the same;
the guest takes the veth's MAC so that the host's neighbour entries stay right.

The namespace's teardown removes the tap and the filters with it. The tc messages go through
pyroute2's ``IPRoute`` (slower than :mod:`.rtnl`'s plain socket, but tc's nested attributes are its
to encode, and this runs once per VM).
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from pathlib import Path

from nex import affinity, linux

from . import netns

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
ETH_P_ALL = 0x0003
INGRESS = 0xFFFF0000  # the ingress qdisc's handle, ffff:
TUN = "/dev/net/tun"


def open_tap(name: str) -> int:
    """A descriptor attached to tap ``name`` of the calling thread's namespace (made if missing)."""
    fd = os.open(TUN, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def add_redirected_tap(netns_path: Path, veth: str, tap: str) -> str:
    """Make ``tap`` in the namespace at ``netns_path`` and redirect it both ways with ``veth`` there
    (blocking: run it in a worker thread, which it moves into the namespace and back). Returns the
    veth's MAC, which the guest must use."""
    from pyroute2 import IPRoute  # imported late: pyroute2 takes ~90 ms to import

    affinity.unpin_current()
    host_ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        netns.enter(netns_path)
        try:
            fd = open_tap(tap)
            try:
                fcntl.ioctl(fd, TUNSETPERSIST, 1)  # outlives this descriptor: the VM's monitor opens it
            finally:
                os.close(fd)
            with IPRoute() as ipr:
                veth_index, tap_index = socket.if_nametoindex(veth), socket.if_nametoindex(tap)
                ipr.link("set", index=tap_index, state="up")
                for source, target in ((veth_index, tap_index), (tap_index, veth_index)):
                    ipr.tc("add", "ingress", source)
                    ipr.tc(
                        "add-filter",
                        "u32",
                        source,
                        parent=INGRESS,
                        protocol=ETH_P_ALL,
                        keys=["0x0/0x0+0"],  # every frame
                        target=0x10001,  # a flowid pyroute2 insists on; no class on an ingress qdisc uses it
                        action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": target},
                    )
                mac = ipr.get_links(veth_index)[0].get_attr("IFLA_ADDRESS")
        finally:
            linux.setns(host_ns, linux.CLONE_NEWNET, "return to the host netns")
    finally:
        os.close(host_ns)
    return str(mac)
