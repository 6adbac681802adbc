"""A machine that forges a neighbour's source address gets nothing through its link to the host.

Root in a VM can send any source address down its tap (a jailed workload cannot: no raw or packet
sockets, no CAP_NET_ADMIN). Without reverse-path filtering the host accepts such a packet, and
answers the neighbour in the machine's name (a red team reflected a SYN flood into another tenant's
VM this way). The test stands where the machine would, in a real namespace made by
:func:`nex.net.netns.create`: a datagram from the machine's own address reaches a host socket, one
from a forged address does not, and does once the filter is turned off again.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest

from nex.net import netns

pytestmark = pytest.mark.integration

T = TypeVar("T")
ADDRESS, GATEWAY, FORGED = "198.18.78.2", "198.18.78.1", "198.18.78.3"  # 198.18.0.0/15: for tests
QUIET = 1.0  # seconds a datagram that should not arrive is waited for


def in_machine(network: netns.MachineNetwork, work: Callable[[], T]) -> T:
    def run() -> T:
        netns.enter(network.netns_path)
        return work()

    with ThreadPoolExecutor(1) as pool:  # a thread of its own, which enters the machine's namespace
        return pool.submit(run).result()


@pytest.fixture
def machine() -> Iterator[netns.MachineNetwork]:
    if not netns.has_capabilities():
        pytest.skip("needs root: a namespace and a veth")
    tag = secrets.token_hex(5)
    network = netns.MachineNetwork(
        netns=f"nxs{tag}", host_link=f"nxs{tag}h", guest_link="veth0", address=ADDRESS, prefixlen=32, gateway=GATEWAY
    )
    netns.create(network)
    yield network
    netns.delete(network.netns, network.host_link)


def forge(network: netns.MachineNetwork, address: str) -> None:
    """Give the machine's link a neighbour's address too, as root in a VM may."""
    from nex.net.rtnl import Rtnl

    def add() -> None:
        with Rtnl() as inside:
            inside.add_address(network.guest_link, address, 32)

    in_machine(network, add)


def send_from(network: netns.MachineNetwork, source: str, port: int, payload: bytes) -> None:
    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((source, 0))
            sock.sendto(payload, (GATEWAY, port))

    in_machine(network, send)


def received(listener: socket.socket, timeout: float) -> set[bytes]:
    listener.settimeout(timeout)
    seen = set()
    try:
        while True:
            seen.add(listener.recv(64))
    except TimeoutError:
        return seen


def test_a_forged_source_address_is_dropped_at_the_hosts_end_of_the_link(machine: netns.MachineNetwork) -> None:
    rp_filter = Path(f"/proc/sys/net/ipv4/conf/{machine.host_link}/rp_filter")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.settimeout(10)
        listener.bind((GATEWAY, 0))
        port = listener.getsockname()[1]
        send_from(machine, ADDRESS, port, b"own")  # first: it resolves the gateway's MAC too
        assert listener.recv(64) == b"own"
        forge(machine, FORGED)
        send_from(machine, FORGED, port, b"forged")
        assert received(listener, QUIET) == set(), "a forged source address does not get through"

        rp_filter.write_text("0")  # the protection off: the same forgery now reaches the host
        if Path("/proc/sys/net/ipv4/conf/all/rp_filter").read_text().strip() != "0":
            pytest.skip("the host's conf/all/rp_filter is on: the forgery cannot be shown to work without it")
        send_from(machine, FORGED, port, b"forged")
        assert received(listener, QUIET) == {b"forged"}
    assert os.path.exists(machine.netns_path)
