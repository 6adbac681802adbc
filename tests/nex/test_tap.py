"""A VM's tap joined to its machine's veth by tc redirects (nex.net.tap), with real namespaces and links.

The test stands where the VM would: it holds the tap's other end and speaks Ethernet on it. The host
asks for the machine's address (ARP), the "guest" answers with the veth's MAC, and the host's UDP
datagram then arrives on the tap: frames flow both ways through the redirects, and nothing of the
node's usual network (the veth, its address and routes, the host side) had to change.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import select
import socket
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest

from nex.net import netns, tap

pytestmark = pytest.mark.integration

T = TypeVar("T")
ADDRESS, GATEWAY = "198.18.77.2", "198.18.77.1"  # 198.18.0.0/15: for tests


def in_thread(work: Callable[[], T]) -> T:
    with ThreadPoolExecutor(1) as pool:  # a thread of its own: namespace moves stay in it
        return pool.submit(work).result()


@pytest.fixture
def machine() -> Iterator[netns.MachineNetwork]:
    if not netns.has_capabilities() or not os.path.exists(tap.TUN):
        pytest.skip("needs root and /dev/net/tun: a namespace, a veth and a tap")
    tag = secrets.token_hex(5)
    network = netns.MachineNetwork(
        netns=f"nxt{tag}", host_link=f"nxt{tag}h", guest_link="veth0", address=ADDRESS, prefixlen=32, gateway=GATEWAY
    )
    netns.create(network)
    yield network
    netns.delete(network.netns, network.host_link)
    assert network.netns not in netns.namespaces("nxt")
    assert network.host_link not in netns.links("nxt")


def read_frame(fd: int, ethertype: int) -> bytes:
    """The next frame of ``ethertype`` on the tap (others, such as IPv6 neighbour discovery, skipped)."""
    while True:
        ready, _, _ = select.select([fd], [], [], 5)
        assert ready, f"no frame of type {ethertype:#06x} came out of the tap"
        frame = os.read(fd, 65536)
        if struct.unpack_from("!H", frame, 12)[0] == ethertype:
            return frame


def arp_reply(request: bytes, mac: bytes) -> bytes:
    """The guest's answer to an ARP request for its address: ``mac`` has it."""
    asker_mac, asker_ip, wanted_ip = request[22:28], request[28:32], request[38:42]
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2) + mac + wanted_ip + asker_mac + asker_ip
    return asker_mac + mac + struct.pack("!H", 0x0806) + arp


def test_frames_flow_both_ways_between_the_host_and_the_tap(machine: netns.MachineNetwork) -> None:
    mac = in_thread(lambda: tap.add_redirected_tap(machine.netns_path, machine.guest_link, "tap0"))
    guest_mac = bytes.fromhex(mac.replace(":", ""))

    def attach() -> int:
        netns.enter(machine.netns_path)
        return tap.open_tap("tap0")

    fd = in_thread(attach)  # the VM's end of the tap
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"hello, guest", (ADDRESS, 9999))  # the host resolves the address first
            request = read_frame(fd, 0x0806)
            assert socket.inet_ntoa(request[38:42]) == ADDRESS  # host → veth → redirect → tap
            os.write(fd, arp_reply(request, guest_mac))  # tap → redirect → veth → host
            datagram = read_frame(fd, 0x0800)
        assert datagram[0:6] == guest_mac  # the host addressed the guest by the veth's MAC
        assert ipaddress.IPv4Address(datagram[14 + 16 : 14 + 20]) == ipaddress.IPv4Address(ADDRESS)
        assert datagram.endswith(b"hello, guest")
    finally:
        os.close(fd)
