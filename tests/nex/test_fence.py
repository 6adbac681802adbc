"""The network fence against the real kernel: machines (namespaces joined to the host by veths whose
host ends carry the fence's interface group) connect to listeners on the host and in each other.

Every assertion that the fence refuses something is paired with the same connection succeeding
without it, so that a refusal cannot come from the topology instead of the rules.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import random
import secrets
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import pytest

from nex.net import fence, netns
from nex.net.fence import FencePlan, Opening

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the fence needs root (CAP_NET_ADMIN) and network namespaces"),
]

T = TypeVar("T")
REFUSED = {"ECONNREFUSED", "EHOSTUNREACH"}  # fast errors; a timeout is neither
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def in_netns(name: str, work: Callable[[], T]) -> T:
    """Run ``work`` in a fresh thread inside namespace ``name`` (sockets it makes stay in there)."""

    def inside() -> T:
        netns.enter(netns.NETNS_DIR / name)
        return work()

    with ThreadPoolExecutor(1) as pool:  # the thread ends with the pool: no thread is left in the netns
        return pool.submit(inside).result()


@dataclass(frozen=True)
class Machine:
    netns: str
    link: str
    address: str
    gateway: str

    def connect(self, address: str, port: int) -> str:
        return connect(address, port, self.netns)


def connect(address: str, port: int, netns_name: str | None = None) -> str:
    """A TCP connect from the host or a machine: "ok", "timeout" (after 3 s) or the errno's name."""
    sock = socket.socket() if netns_name is None else in_netns(netns_name, socket.socket)
    sock.settimeout(3)
    try:
        sock.connect((address, port))
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    finally:
        sock.close()
    return "ok"


def datagram_arrives(sender: Machine, receiver: Machine, timeout: float) -> bool:
    """Whether a UDP datagram from ``sender`` reaches ``receiver`` (one-way: no reply to refuse)."""
    inbox = in_netns(receiver.netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    outbox = in_netns(sender.netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    with inbox, outbox:
        inbox.bind((receiver.address, 0))
        inbox.settimeout(timeout)
        outbox.sendto(b"hello", inbox.getsockname())
        try:
            return inbox.recv(16) == b"hello"
        except TimeoutError:
            return False


@dataclass
class Lab:
    """Machines, listeners and fences of one test, all released by the fixture."""

    base: int = field(default_factory=lambda: random.randrange(0, 250))
    machines: list[Machine] = field(default_factory=list)
    sockets: list[socket.socket] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)

    def subnet(self, index: int) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"198.{18 + index}.{self.base}.0/24")  # 198.18.0.0/15: for tests

    def machine(self, index: int, host: int, group: int) -> Machine:
        """A machine made by the node's own code (netns.create: a /32 address routed via the gateway, as
        CNI's ptp plugin does, so that traffic to another machine goes through the host, where the fence
        is), its host link in ``group``."""
        tag = secrets.token_hex(5)
        subnet = self.subnet(index)
        machine = Machine(f"nxt{tag}", f"nxt{tag}h", str(subnet[host]), str(subnet[1]))
        self.machines.append(machine)
        network = netns.MachineNetwork(
            netns=machine.netns,
            host_link=machine.link,
            guest_link="veth0",
            address=machine.address,
            prefixlen=32,
            gateway=machine.gateway,
            group=group,
        )
        netns.create(network)
        return machine

    def listen(self, machine: Machine | None = None) -> socket.socket:
        """A TCP listener on every host address, or on ``machine``'s address inside it."""
        sock = socket.socket() if machine is None else in_netns(machine.netns, socket.socket)
        sock.bind(("0.0.0.0" if machine is None else machine.address, 0))
        sock.listen(16)
        sock.settimeout(3)
        self.sockets.append(sock)
        return sock

    def plan(self, index: int, group: int, port: int, *openings: Opening, masquerade: bool = False) -> FencePlan:
        self.tables.append(table := "nx" + secrets.token_hex(5))
        subnet = self.subnet(index)
        return FencePlan(table, group, str(subnet[1]), port, str(subnet), openings, masquerade)


def port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def group() -> int:
    return random.randrange(1 << 20, 1 << 30)


@pytest.fixture
def lab() -> Iterator[Lab]:
    before = set(fence.tables())
    forwarding = IP_FORWARD.read_text()
    state = Lab()
    try:
        IP_FORWARD.write_text("1\n")  # so that machine-to-machine traffic is the fence's to refuse
        yield state
    finally:
        IP_FORWARD.write_text(forwarding)
        for sock in state.sockets:
            sock.close()
        for table in state.tables:
            fence.remove(table)
        for machine in state.machines:
            netns.delete(machine.netns, machine.link)
    assert set(fence.tables()) == before
    assert not [m for m in state.machines if m.netns in netns.namespaces("nxt") or m.link in netns.links("nxt")]


def test_a_machine_reaches_only_nats_and_its_openings(lab: Lab) -> None:
    g = group()
    a, b = lab.machine(0, 2, g), lab.machine(0, 3, g)
    nats, other, inside_b = lab.listen(), lab.listen(), lab.listen(b)
    targets = [(a.gateway, port(nats)), (a.gateway, port(other)), (b.address, port(inside_b))]
    assert [a.connect(*t) for t in targets] == ["ok", "ok", "ok"]  # unfenced, each path works
    assert connect(b.address, port(inside_b)) == "ok"  # from the host

    plan = lab.plan(0, g, port(nats))
    fence.install(plan)
    results = [a.connect(*t) for t in targets]
    assert results[0] == "ok"
    assert results[1] in REFUSED, results  # another port of the host
    assert results[2] in REFUSED, results  # another machine
    assert connect(b.address, port(inside_b)) == "ok"  # the host still reaches machines (their replies pass)

    openings = (Opening(f"{b.address}/32", port(inside_b)), Opening(f"{a.gateway}/32", port(other)))
    fence.install(replace(plan, openings=openings))  # replaces the table
    assert [a.connect(*t) for t in targets] == ["ok", "ok", "ok"]
    assert a.connect(b.address, port(nats)) in REFUSED  # an opening is for its port only

    fence.install(plan)  # and back: openings gone
    assert [a.connect(*t) for t in targets][1:] == [results[1], results[2]]
    assert fence.tables(plan.table) == [plan.table]

    assert fence.remove(plan.table) is True
    assert [a.connect(*t) for t in targets] == ["ok", "ok", "ok"]
    assert fence.remove(plan.table) is False


def test_two_fences_leave_each_other_alone(lab: Lab) -> None:
    g1, g2 = group(), group()
    a, c = lab.machine(0, 2, g1), lab.machine(1, 2, g2)
    nats1, nats2 = lab.listen(), lab.listen()
    one, two = lab.plan(0, g1, port(nats1)), lab.plan(1, g2, port(nats2))
    fence.install(one)
    fence.install(two)
    assert a.connect(a.gateway, port(nats1)) == "ok"
    assert a.connect(a.gateway, port(nats2)) in REFUSED
    assert c.connect(c.gateway, port(nats2)) == "ok"
    assert c.connect(c.gateway, port(nats1)) in REFUSED

    fence.remove(one.table)
    assert a.connect(a.gateway, port(nats2)) == "ok"  # fence two does not match a's link
    assert c.connect(c.gateway, port(nats1)) in REFUSED


def test_beyond_the_node_only_openings_out_nothing_in_and_masquerade(lab: Lab) -> None:
    g = group()
    a, c = lab.machine(0, 2, g), lab.machine(1, 2, group())  # c: beyond this node, on another link
    nats, inside_c = lab.listen(), lab.listen(c)
    assert datagram_arrives(c, a, timeout=3)  # unfenced
    plan = lab.plan(0, g, port(nats), Opening(f"{c.address}/32", port(inside_c)))
    for masquerade, source in ((False, a.address), (True, c.gateway)):
        fence.install(replace(plan, masquerade=masquerade))
        assert a.connect(c.address, port(inside_c)) == "ok"
        conn, peer = inside_c.accept()
        conn.close()
        assert peer[0] == source  # masquerade: the address of the link the connection left by
    assert not datagram_arrives(c, a, timeout=0.5)  # dropped: nothing from elsewhere but replies


def test_refusals_leave_nothing(lab: Lab) -> None:
    before = fence.tables()
    for name in ("nft", "nx0123", "nx0123456789a", "NX0123456789", "filter"):
        with pytest.raises(ValueError):
            fence.remove(name)
    with pytest.raises(ValueError, match="host bits"):
        lab.plan(0, group(), 4222, Opening("10.1.2.3/8"))  # caught before anything is sent
    for bad in ({"port": 0}, {"group": 0}, {"gateway": "nope"}, {"table": "nxZZZZZZZZZZ"}):
        with pytest.raises(ValueError):
            replace(lab.plan(0, 1, 4222), **bad)
    with pytest.raises(ValueError):
        Opening("10.0.0.0/8", 80, "icmp")  # type: ignore[arg-type]

    # The kernel refuses the last message of a batch that created a table, chains and rules: none remain.
    plan = lab.plan(0, group(), 4222, Opening("fd00::/8", 0, "any"), masquerade=True)
    table = fence._Op(fence.NFT_MSG_NEWTABLE, fence.NLM_F_CREATE, [("NFTA_TABLE_NAME", plan.table)], "table")
    attrs = [("NFTA_RULE_TABLE", plan.table), ("NFTA_RULE_CHAIN", "nosuch")]
    bad = fence._Op(fence.NFT_MSG_NEWRULE, fence.NLM_F_CREATE, attrs, "bad", (fence._verdict(fence.NF_ACCEPT),))
    assert fence._commit([table, *fence._contents(plan), bad]) == [(bad, errno.ENOENT)]
    assert fence.tables() == before
