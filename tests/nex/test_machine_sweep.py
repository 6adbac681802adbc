"""A machine's start-up cancelled at every step, with everything real: nothing may be left behind.

The machine runs in this process on the node's real parts (an internal nats-server with per-agent
credentials, the link, the handshake listener, the zygote, real namespaces and veths, leases in the
test's own directory on a subnet of its own). Run *k* cancels it after the *k*-th step of the Trio
run, for k = 1, 2, ... until a start completes uncancelled; after every run, no namespace, link,
lease, state directory, journal record, credential or agent process of that machine may remain.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pytest
import trio

from actors import Journal, Mailbox
from actors.testing import cancel_at_each_checkpoint
from nex import ids
from nex.bus.aio import open_asyncio_thread
from nex.bus.credentials import AgentCredentials
from nex.bus.link import NatsLink
from nex.bus.server import NatsServer, free_port
from nex.config import load
from nex.net import netns
from nex.net.network import Networks
from nex.sandbox import cgroups
from nex.sandbox.policy import HostSupport, Sandbox
from nex.vm.drivers.base import Driver
from nex.vm.drivers.process import ProcessDriver
from nex.vm.handshake import HandshakeBook, Handshakes
from nex.vm.launcher import ZygoteLauncher
from nex.vm.machine import Machine, MachineDeps, MachineMsg

from .support import processes_mentioning

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not netns.has_capabilities(), reason="needs CAP_NET_ADMIN and CAP_SYS_ADMIN (run as root)"),
]


HIERARCHY = cgroups.Hierarchy.detect() if netns.has_capabilities() else None
#: the real host, as a root node finds it: cgroups on, and the jail's other parts (built by the agent)
HOST = HostSupport(privileged=True, namespaced=True, user_namespaces=None, seccomp=None, cgroups=HIERARCHY or "")


def live_children(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@contextlib.asynccontextmanager
async def machines_of(
    tmp_path: Path,
    networks: Networks,
    driver: Driver,
    *,
    handshake_timeout: float,
    also: Sequence[Callable[..., Awaitable[object]]] = (),
) -> AsyncIterator[MachineDeps]:
    """What machines of ``driver`` need, real and running: an internal nats-server with per-agent
    credentials, the node's link to it, the handshake listener, and ``also`` (a launcher, say)."""
    credentials = AgentCredentials()
    port = free_port("127.0.0.1")
    server = NatsServer(
        "internal", host="0.0.0.0", port=port, work_dir=tmp_path / "nats", extra_config=credentials.render
    )
    credentials.attach(server)
    book = HandshakeBook()
    async with open_asyncio_thread("sweep-asyncio") as aio, trio.open_nursery() as nursery:
        await nursery.start(server.run)
        await nursery.start(credentials.run)
        link = NatsLink("internal", [f"nats://127.0.0.1:{port}"], aio, nkeys_seed_str=credentials.node_seed)
        await nursery.start(link.run)
        await nursery.start(Handshakes(link, book.waiting).run, Mailbox(1024, name="handshakes"))
        for run in also:
            await nursery.start(run)
        yield MachineDeps(
            driver=driver,
            credentials=credentials,
            handshakes=book,
            vm_root=tmp_path / "vm",
            journal=Journal(tmp_path / "journal"),
            agent_host=networks.agent_host,
            agent_port=port,
            handshake_timeout=handshake_timeout,
        )
        nursery.cancel_scope.cancel()


@pytest.fixture
async def machine_parts(tmp_path: Path) -> AsyncIterator[tuple[MachineDeps, AgentCredentials, ZygoteLauncher]]:
    config = load(None, {"cni.subnet": "10.213.7.0/24", "cni.network_name": "nextest"}).config
    networks = Networks(config, namespaced=True, lease_root=tmp_path / "leases")
    zygote = ZygoteLauncher(tmp_path)
    driver = ProcessDriver(networks, zygote, Sandbox(config, HOST))
    async with machines_of(tmp_path, networks, driver, handshake_timeout=10.0, also=[zygote.run]) as deps:
        yield deps, deps.credentials, zygote


class MachineStarts:
    """The sweeps' scenario: each run starts a new machine up to ready, then ends it."""

    def __init__(self, deps: MachineDeps, credentials: AgentCredentials) -> None:
        self.deps = deps
        self.credentials = credentials
        self.runs: list[str] = []  # the machine of each run
        self.ready: list[str] = []  # those that got to ready

    async def __call__(self) -> None:
        vmid, seed = await self.credentials.take()
        self.runs.append(vmid)
        machine = Machine(vmid, seed, self.deps)
        async with trio.open_nursery() as nursery:
            await nursery.start(machine.run, Mailbox[MachineMsg](4, name=vmid))
            self.ready.append(vmid)
            nursery.cancel_scope.cancel()


async def test_machine_start_cancelled_at_every_step_leaves_nothing(
    machine_parts: tuple[MachineDeps, AgentCredentials, ZygoteLauncher], tmp_path: Path
) -> None:
    deps, credentials, zygote = machine_parts
    scenario = MachineStarts(deps, credentials)

    def check(step: int) -> None:
        vmid = scenario.runs[-1]
        where = f"(cancelled after step {step})"
        assert ids.short(vmid) not in netns.namespaces("nx"), f"netns left {where}"
        assert ids.host_link(vmid) not in netns.links("nx"), f"veth left {where}"
        assert deps.driver.networks.ipam.leases() == {}, f"lease left {where}"  # type: ignore[attr-defined]
        assert not any(path.exists() for path in HIERARCHY.paths(ids.short(vmid))), f"cgroup left {where}"
        assert not (deps.vm_root / vmid).exists(), f"state dir left {where}"
        assert deps.journal is not None
        assert deps.journal.records() == [], f"journal record left {where}"
        assert credentials.agents() == [], f"credentials left {where}"
        assert vmid not in deps.handshakes.waiting, f"handshake waiter left {where}"
        assert zygote.pid is not None
        assert live_children(zygote.pid) == [], f"agent process left {where}"

    with trio.fail_after(600):
        swept = await cancel_at_each_checkpoint(scenario, check)
    print(f"swept {swept} cancellation points")
    assert swept >= 20, "a machine's start-up has many steps: netlink, cgroup, credentials, launch, handshake"
    assert scenario.ready, "the last run must complete"
    assert processes_mentioning(str(tmp_path / "vm")) == {}
