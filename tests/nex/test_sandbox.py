"""A hostile tenant against a real node: every attack fails in the jail, and succeeds without it.

The attacker is tests/nex/workloads/hostile.c, built with ``gcc -static`` and deployed through the
real control API, once on a node with the default jail and once on a node with ``no_sandbox``: each
attack that fails in the jail is shown to work where the jail is off, so an attack that "fails"
because it is broken is caught. Every attack is harmless where it works (hostile.c undoes it, or
writes only into this test's directories).

Run as root: the jail, the cgroups and the fence need it (the tests skip without).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nex import crypto, ids
from nex.api import control
from nex.net import netns
from nex.sandbox import cgroups
from nex.workload import request as workload_request

from .support import Bus, NatsServerProc, NodeProcess, internal_url, run_cli, wait_gone
from .test_telemetry import free_port, value, wait_metrics
from .workloads import Binaries, Requester, attacks, started

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not netns.has_capabilities() or os.geteuid() != 0, reason="the jail needs root"),
]

GATEWAY = "192.168.127.1"
JAIL, UNJAILED, VM = "jail", "no_sandbox", "qemu"


@pytest.fixture
def forwarding() -> Iterator[None]:
    """IPv4 forwarding on, as on a host that routes for its machines: only the fence then keeps one
    machine from another (restored after the test)."""
    path = Path("/proc/sys/net/ipv4/ip_forward")
    before = path.read_text()
    path.write_text("1")
    try:
        yield
    finally:
        path.write_text(before)


def start_node(
    home: Path, mode: str, server: NatsServerProc, bus: Bus, image: Any = None, **settings: Any
) -> NodeProcess:
    """A node whose machines are jailed processes, unjailed processes, or (``image``) VMs jailing
    their workloads inside."""
    config = {"machine_pool_size": 2, "no_sandbox": mode == UNJAILED, **settings}
    if image is not None:  # nex's sample config's shape: a kernel and a rootfs give VMs
        config |= {"kernel_path": str(image.kernel), "rootfs_path": str(image.rootfs)}
    path = home / f"{mode}.json"
    path.write_text(json.dumps(config))
    timeout = 240 if image is not None else 60  # a first VM node boots its template under TCG
    return NodeProcess(home, "--config", str(path), server=server.url, name=mode).start(bus, timeout=timeout)


class Tenant:
    """A deployer of workloads on one node, and what their logs say."""

    def __init__(self, bus: Bus, node: NodeProcess) -> None:
        self.bus = bus
        self.node = node
        self.requester = Requester(bus)
        self.logs = bus.collect(f"$NEX.logs.default.{node.node_id}.>")
        self.events = bus.collect("$NEX.events.default.*")

    def run(self, binary: bytes, name: str, argv: list[str], env: dict[str, str] | None = None) -> str:
        artifact = self.requester.upload(binary, name)
        body = self.requester.deploy_body(self.node.ping(self.bus), artifact, name, env or {}, argv=argv)
        return started(self.requester.deploy(self.node.node_id, body)).id

    def stop(self, vmid: str, name: str) -> None:
        body = workload_request.stop_request(
            vmid, name, self.node.node_id, self.requester.keys.issuer, issued_at=int(time.time()) + 1
        )
        assert self.requester.stop(self.node.node_id, body).error is None

    def lines(self, vmid: str, *, until: str = "DONE", timeout: float = 60) -> list[str]:
        """The workload's output lines up to the first that starts with ``until`` (included)."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while not seen or not seen[-1].startswith(until):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {until!r} from {vmid} within {timeout}s; saw {seen}\n{self.node.log()}")
            event = self.logs.wait(f".{vmid}", timeout=remaining)
            seen.append(event["text"])
        return seen

    def stopped(self, vmid: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            event = self.events.wait("workload_stopped", source=self.node.node_id, timeout=deadline - time.monotonic())
            if event["data"]["id"] == vmid:
                return dict(event["data"])

    def still_answers(self) -> None:
        """``nex ls`` and ``nex info`` answer while the attack goes on."""
        listed = run_cli("ls", "--json", "-s", self.bus.url, "--timeout", "5s")
        assert listed.returncode == 0, listed.stderr
        assert self.node.node_id in listed.stdout
        info = run_cli("info", self.node.node_id, "--json", "-s", self.bus.url, "--timeout", "5s")
        assert info.returncode == 0, info.stderr


def ready_pool(node: NodeProcess, bus: Bus, size: int, timeout: float = 20) -> list[control.PoolMember]:
    """The pool's members, oldest first, once ``size`` of them are ready (each round a real request)."""
    deadline = time.monotonic() + timeout
    while True:
        pool = node.info(bus).pool
        if len(pool) == size and all(member.state == "ready" for member in pool):
            return pool
        if time.monotonic() > deadline:
            raise AssertionError(f"the pool did not refill to {size} ready machines: {pool}")
        bus.run(bus.nc.flush())


def pid_with_env(marker: str) -> int:
    """A host process whose environment holds ``marker`` (the other tenant's workload)."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker.encode() in Path(entry.path, "environ").read_bytes():
                    return int(entry.name)
    raise AssertionError(f"no process with {marker} in its environment")


@pytest.fixture
def host_listener() -> Iterator[int]:
    """A TCP port on every host address: a host service the machines must not reach."""
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


# Attacks whose every outcome is fixed: BLOCKED in the jail, OK without it.
ESCAPES = (
    "read:node_key", "read:node_xkey", "read:issuer_key", "read:shadow", "read:other_machine",
    "read:other_environ", "proc_pids", "proc_mem", "setns", "mount", "mknod", "unshare", "unshare_user",
    "ptrace", "sethostname", "settimeofday", "init_module", "finit_module", "bpf", "keyctl", "perf_event_open",
    "userfaultfd", "process_vm_readv", "open_by_handle_at", "write:outside", "stat:venv", "plant", "journal",
    "connect:control_server", "connect:host_port", "connect:other_machine", "vsock", "af_alg", "uevent",
    "socketpair", "core_limit", "read:init_cmdline",
)  # fmt: skip


def qemu_of(vmid: str) -> int:
    """The host pid of machine ``vmid``'s qemu (its workload's processes are inside the VM)."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = Path(entry.path, "cmdline").read_bytes()
                if b"qemu-system" in cmdline and vmid.encode() in cmdline:
                    return int(entry.name)
    raise AssertionError(f"no qemu process of machine {vmid}")


@pytest.mark.parametrize("mode", [JAIL, UNJAILED, VM])
@pytest.mark.usefixtures("forwarding")
def test_a_hostile_tenant_cannot_reach_out_of_its_jail(
    mode: str,
    home: Path,
    open_nats_server: NatsServerProc,
    obus: Bus,
    binaries: Binaries,
    bystander: int,
    host_listener: int,
    request: pytest.FixtureRequest,
) -> None:
    image = request.getfixturevalue("guest_image") if mode == VM else None
    node = start_node(home, mode, open_nats_server, obus, image)
    tenant = Tenant(obus, node)
    user_keys = home / "user" / ".nex"
    user_keys.mkdir(parents=True)
    (user_keys / "issuer.nk").write_text(crypto.create_signing_key(crypto.PREFIX_ACCOUNT).seed.decode())
    owned = home / "owned"  # what the attacker may touch where it gets out: this test's own directories
    owned.mkdir()
    victim = owned / "victim"
    victim.mkdir()
    other = tenant.run(binaries.hostile, "other", ["escape_pidns"], {"TENANT_SECRET": "sealed-for-other"})
    tenant.lines(other)  # it runs, and stays until stopped
    vm_root = node.state_dir / "vm" / "system" / node.info(obus).tags["node_name"]
    # deploys take the oldest ready machine: the attacker gets the first, the next tenant the second
    _, (next_tenant, next_ip) = [(member.id, member.ip) for member in ready_pool(node, obus, 2)]
    # the other tenant's workload; in a VM, all the host has of it is its machine's qemu
    other_pid = qemu_of(other) if mode == VM else pid_with_env("TENANT_SECRET=sealed-for-other")
    record = {"kind": "dir", "name": "planted", "data": {"path": str(victim)}, "owner": "x", "pid": 1, "created": 0}
    env = {
        "READ_1": f"node_key={node.state_dir / 'node.nk'}",
        "READ_2": f"node_xkey={node.state_dir / 'node.xk'}",
        "READ_3": f"issuer_key={user_keys / 'issuer.nk'}",
        "READ_4": "shadow=/etc/shadow",
        "READ_5": f"other_machine={vm_root / other}",
        "READ_6": f"other_environ=/proc/{other_pid}/environ",
        "READ_7": "init_cmdline=/proc/1/cmdline",  # in the jail, init's: the agent's command line
        "HOST_PID": str(node.proc.pid if node.proc else 0),
        "HOST_PIDS_MIN": "10",
        "MEM_PID": str(bystander),
        "WRITE_1": f"outside={owned / 'escaped'}",
        "STAT_1": f"venv={Path(sys.prefix) / 'lib'}",
        "PLANT_DIR": str(vm_root / next_tenant),
        "PLANT_NAME": "workload",
        "PLANT_TARGET": str(owned / "stolen"),
        "JOURNAL_DIR": str(node.state_dir / "journal"),
        "JOURNAL_RECORD": json.dumps(record),
        "CONNECT_1": f"internal_server={internal_url(node).removeprefix('nats://')}",
        "CONNECT_2": f"control_server={GATEWAY}:{open_nats_server.port}",
        "CONNECT_3": f"host_port={GATEWAY}:{host_listener}",
        "CONNECT_4": f"other_machine={next_ip}:9",
    }

    attacker = tenant.run(binaries.hostile, "hostile", ["escape"], env)
    found = attacks(tenant.lines(attacker))

    expected = "OK" if mode == UNJAILED else "BLOCKED"
    wrong = {name: found.get(name) for name in ESCAPES if (found.get(name) or ("",))[0] != expected}
    assert not wrong, f"expected {expected} for every attack ({mode}), got: {wrong}"
    assert found["connect:internal_server"][0] == "OK", "the fence lets the internal server through"
    caps = found["caps"][1]
    if mode in (JAIL, VM):  # a VM jails its workload too: the VM is a second wall, not the only one
        cap_eff, no_new_privs, seccomp_mode, uid, _ = caps.split()
        assert (int(cap_eff, 16), no_new_privs, seccomp_mode) == (0, "1", "2")
        assert uid == "uid=0", "uid 0 in its own user namespace"
        assert found["sethostname"][1].endswith(attacker), "its hostname is its machine id"
    assert not (owned / "escaped").exists()
    # the plant (where it got through) is never followed: the next tenant's deploy is refused instead
    if mode == UNJAILED:
        assert (vm_root / next_tenant / "workload").is_symlink()
        refused = tenant.requester.deploy(
            node.node_id,
            tenant.requester.deploy_body(node.ping(obus), tenant.requester.upload(binaries.echo, "next"), "next", {}),
        )
        assert refused.error is not None
        assert "File exists" in refused.error
        assert not (owned / "stolen").exists()
    tenant.still_answers()
    assert node.stop() == 0
    if mode == UNJAILED:
        # the planted journal record is not acted on by the next start: it is not the node's own
        node.start(obus, timeout=60)
        node.wait_log("Ignored a journal record this node did not write")
        assert victim.is_dir()
        assert node.stop() == 0


@pytest.mark.parametrize("mode", [JAIL, UNJAILED])
def test_memory_beyond_the_template_ends_in_an_oom_stop(
    mode: str, home: Path, open_nats_server: NatsServerProc, obus: Bus, binaries: Binaries
) -> None:
    port = free_port()
    node = start_node(
        home, mode, open_nats_server, obus, machine_template={"memsize_mib": 96}, otel_metrics=True,
        otel_metrics_port=port,
    )  # fmt: skip
    tenant = Tenant(obus, node)
    vmid = tenant.run(binaries.hostile, "hostile", ["memory", "384"])
    ended = tenant.stopped(vmid)
    tenant.still_answers()
    kills = wait_metrics(port, lambda s: True, "the metrics")
    if mode == JAIL:
        assert ended["code"] == -9, ended
        assert "out of memory" in ended["message"], ended
        assert value(kills, "nex_sandbox_kills_total", reason="oom") == 1, "counted as the sandbox's kill"
    else:
        assert ended["code"] == 0, "unjailed, it got all it asked for"
        assert value(kills, "nex_sandbox_kills_total") == 0
    assert node.stop() == 0


@pytest.mark.parametrize("mode", [JAIL, UNJAILED])
def test_socket_buffers_count_against_the_machine_too(
    mode: str, home: Path, open_nats_server: NatsServerProc, obus: Bus, binaries: Binaries
) -> None:
    """Memory the kernel holds for a workload in TCP buffers it never reads: host memory outside its
    heap, which cgroup v1 charges only to a cgroup that accounts TCP (a red team's finding)."""
    node = start_node(home, mode, open_nats_server, obus, machine_template={"memsize_mib": 96})
    tenant = Tenant(obus, node)
    vmid = tenant.run(binaries.hostile, "hostile", ["sockmem", "256"])
    status, detail = attacks(tenant.lines(vmid))["sockmem"]
    tenant.still_answers()
    held = int(detail.split()[0].removeprefix("held="))
    if mode == JAIL:
        assert (status, held <= 96) == ("BLOCKED", True), detail
    else:
        assert (status, held) == ("OK", 256), detail
    assert node.stop() == 0


@pytest.mark.parametrize("mode", [JAIL, UNJAILED])
def test_a_fork_bomb_stops_at_the_pids_limit(
    mode: str, home: Path, open_nats_server: NatsServerProc, obus: Bus, binaries: Binaries
) -> None:
    port = free_port()
    node = start_node(
        home, mode, open_nats_server, obus, machine_template={"pids_max": 64}, otel_metrics=True,
        otel_metrics_port=port,
    )  # fmt: skip
    tenant = Tenant(obus, node)
    vmid = tenant.run(binaries.hostile, "hostile", ["forkbomb", "300"])
    status, detail = attacks(tenant.lines(vmid))["forkbomb"]
    tenant.still_answers()
    forked = int(detail.split()[0].removeprefix("forked="))
    ended = tenant.stopped(vmid)
    counted = wait_metrics(port, lambda s: True, "the metrics")
    if mode == JAIL:
        assert status == "BLOCKED"
        assert forked < 64, detail
        assert "EAGAIN" in detail
        assert "its pids limit refused" in ended["message"], ended
        assert value(counted, "nex_sandbox_kills_total", reason="pids") == 1
    else:
        assert (status, forked) == ("OK", 300)
        assert "pids limit" not in ended["message"]
        assert value(counted, "nex_sandbox_kills_total") == 0
    assert node.stop() == 0


@pytest.mark.parametrize("mode", [JAIL, UNJAILED])
def test_a_cpu_hog_gets_at_most_its_vcpus(
    mode: str, home: Path, open_nats_server: NatsServerProc, obus: Bus, binaries: Binaries
) -> None:
    if os.cpu_count() == 1:
        pytest.skip("one CPU: a hog cannot take more than one anyway")
    node = start_node(home, mode, open_nats_server, obus, machine_template={"vcpu_count": 1})
    tenant = Tenant(obus, node)
    vmid = tenant.run(binaries.hostile, "hostile", ["cpu", "forever"])
    progress = _progress(tenant, vmid, count=4)
    if mode == JAIL:
        paths = cgroups.Hierarchy.detect().paths(ids.short(vmid))
        before, start = cgroups.cpu_usage_ns(paths), time.monotonic()
        _progress(tenant, vmid, count=2)  # two more seconds of spinning
        used = (cgroups.cpu_usage_ns(paths) - before) / 1e9 / (time.monotonic() - start)
        assert used <= 1.1, f"the machine's cgroup counted {used:.2f} CPUs"
        assert max(progress[1:]) <= 1.15, progress
    else:
        assert max(progress[1:]) > 1.3, f"unjailed it should use both CPUs: {progress}"
    tenant.still_answers()
    assert node.stop() == 0


def _progress(tenant: Tenant, vmid: str, count: int) -> list[float]:
    """The next ``count`` ``PROGRESS cpu ratio=R`` values (one a second)."""
    ratios: list[float] = []
    while len(ratios) < count:
        event = tenant.logs.wait(f".{vmid}", timeout=20)
        if event["text"].startswith("PROGRESS cpu ratio="):
            ratios.append(float(event["text"].rsplit("=", 1)[1]))
    return ratios


@pytest.mark.parametrize("mode", [JAIL, UNJAILED])
def test_filling_the_disk_gives_enospc_not_the_hosts_disk(
    mode: str, home: Path, open_nats_server: NatsServerProc, obus: Bus, binaries: Binaries
) -> None:
    node = start_node(home, mode, open_nats_server, obus, machine_template={"disk_mib": 16})
    tenant = Tenant(obus, node)
    vmid = tenant.run(binaries.hostile, "hostile", ["disk", "48"])
    status, detail = attacks(tenant.lines(vmid))["disk"]
    tenant.still_answers()
    written = int(detail.split()[0].removeprefix("written="))
    if mode == JAIL:
        assert status == "BLOCKED"
        assert "ENOSPC" in detail
        assert written <= 16
    else:
        assert (status, written) == ("OK", 48)
    assert node.stop() == 0


def test_what_a_workload_starts_is_gone_after_nex_stop(
    home: Path, open_nats_server: NatsServerProc, obus: Bus, binaries: Binaries
) -> None:
    node = start_node(home, JAIL, open_nats_server, obus)
    tenant = Tenant(obus, node)
    env = {"NATS_URL": f"nats://{GATEWAY}:1", "ECHO_SUBJECT": "d", "ECHO_DAEMON": "1"}
    vmid = tenant.run(binaries.echo, "echo", [], env)
    tenant.lines(vmid, until="echo: daemon ")
    paths = cgroups.Hierarchy.detect().paths(ids.short(vmid))
    members = {int(pid) for pid in Path(paths[0], "cgroup.procs").read_text().split()}
    assert len(members) >= 4, f"agent, init, workload and its daemon: {members}"
    tenant.stop(vmid, "echo")
    assert tenant.stopped(vmid)["id"] == vmid
    assert wait_gone(list(members), timeout=10) == [], "a process of the machine outlived it"
    deadline = time.monotonic() + 10  # the machine's teardown removes it once its processes are gone
    while any(Path(p).exists() for p in paths):
        assert time.monotonic() < deadline, "the machine's cgroup outlived it"
        obus.run(obus.nc.flush())
    assert node.stop() == 0
