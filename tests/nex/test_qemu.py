"""Machines as QEMU microvms, for real: the guest image, qemu (TCG here, KVM where it runs a guest),
taps redirected by tc, the agent as the VM's init, a pool restored from a template's snapshot.

The node is configured as nex's sample config is: a ``kernel_path`` and a ``rootfs_path`` and no
``driver``, which must give VMs. Every workload here is a real static ELF built by the tests.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import msgspec
import pytest
import trio

from nex import ids
from nex.api import control
from nex.net import netns
from nex.node import host
from nex.vm.image import GuestImage
from nex.vm.qemu.vm import QemuVm, VmFailed, launch

from .image_fixture import tcg_spec
from .support import (
    Bus,
    NatsServerProc,
    NodeProcess,
    host_objects,
    journaled_names,
    names_in,
    processes_mentioning,
    run_cli,
    wait_gone,
)
from .test_workloads import echo_env, echo_request, reach
from .workloads import Binaries

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not netns.has_capabilities(), reason="VMs need a tap in a namespace of their own: run as root"),
]

START_TIMEOUT = 240  # a node's first start boots the template VM: tens of seconds under TCG on 2 cores
RANDOM_C = r"""
#include <stdio.h>
#include <sys/random.h>
#include <time.h>
int main(void) {
    unsigned char b[16];
    if (getrandom(b, sizeof b, 0) != sizeof b) return 1;
    printf("RANDOM ");
    for (int i = 0; i < 16; i++) printf("%02x", b[i]);
    printf(" TIME %ld\n", (long)time(NULL));
    fflush(stdout);
    for (;;) pause();
}
"""


def vm_config(home: Path, image: object, **settings: object) -> str:
    """nex's sample config's shape: a kernel and a root filesystem, and no driver named."""
    path = home / "node.json"
    kernel, rootfs = image.kernel, image.rootfs
    path.write_text(json.dumps({"kernel_path": str(kernel), "rootfs_path": str(rootfs), **settings}))
    return str(path)


def qemus(marker: str) -> dict[int, str]:
    return {pid: cmd for pid, cmd in processes_mentioning(marker).items() if "qemu-system" in cmd}


def ready(node: NodeProcess, bus: Bus, size: int, timeout: float = 60) -> list[control.PoolMember]:
    deadline = time.monotonic() + timeout
    while True:
        pool = node.info(bus).pool
        if sum(1 for m in pool if m.state == "ready") >= size:
            return [m for m in pool if m.state == "ready"]
        if time.monotonic() > deadline:
            raise AssertionError(f"the pool did not reach {size} ready VMs within {timeout}s: {pool}\n{node.log()}")
        bus.run(bus.nc.flush())


def machine_dir(node: NodeProcess, vmid: str) -> Path:
    (found,) = node.state_dir.glob(f"vm/system/*/{vmid}")
    return found


def test_a_vm_pool_restored_from_a_snapshot_runs_the_echo_service_and_is_released(
    home: Path,
    open_nats_server: NatsServerProc,
    obus: Bus,
    binaries: Binaries,
    guest_image: object,
) -> None:
    config = vm_config(home, guest_image)
    node = NodeProcess(
        home, "--config", config, "--pool-size", "2", *reach(open_nats_server), server=open_nats_server.url
    )
    node.start(obus, timeout=START_TIMEOUT)
    pool = ready(node, obus, 2)
    node.wait_log("Saved the template VM")
    for member in pool:  # both restored from the template's snapshot, and both said hello
        facts = json.loads((machine_dir(node, member.id) / "driver.json").read_text())
        assert (facts["driver"], facts["start"]) == ("qemu", "snapshot")
        assert "vm (" in member.sandbox
    vm_processes = qemus(str(node.state_dir))
    assert len(vm_processes) == 2, vm_processes
    assert all("-incoming" in cmd for cmd in vm_processes.values())
    for cmd in vm_processes.values():  # nothing of the machine's identity is on the command line
        assert not re.findall(r"\bSU[A-Z0-9]{20,}", cmd)
    for pid in vm_processes:  # qemu itself is confined: its machine's uid, its own seccomp, a cgroup
        status = Path(f"/proc/{pid}/status").read_text()
        uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
        assert uids is not None
        assert "0" not in uids.group(1).split(), "qemu runs as its machine's unprivileged uid"
        assert re.search(r"^Seccomp:\s+2$", status, re.M), "qemu runs under its -sandbox filter"
        assert re.search(r"^CapEff:\s+0+$", status, re.M)
        assert "/nx" in Path(f"/proc/{pid}/cgroup").read_text(), "qemu runs in its machine's cgroup"

    (home / "bin").mkdir()
    (home / "bin" / "echo").write_bytes(binaries.echo)
    user = {"HOME": str(home / "user"), "NATS_URL": open_nats_server.url}
    events = obus.collect("$NEX.events.default.*")
    logs = obus.collect(f"$NEX.logs.default.{node.node_id}.echo.*")
    env_args = [f"--env={k}={v}" for k, v in echo_env(open_nats_server, "vm.echo", "sealed-").items()]
    run = run_cli("run", str(home / "bin" / "echo"), *env_args, "--json", "--timeout", "60s", env=user, timeout=120)
    assert run.returncode == 0, run.stderr + node.log()
    response = msgspec.json.decode(run.stdout, type=control.RunResponse)
    # it answers from inside the VM, with the prefix only its sealed environment holds
    assert echo_request(obus, "vm.echo", b"ping", timeout=60) == b"sealed-ping"
    assert logs.wait(f".echo.{response.id}", timeout=30)["text"] == "echo: answering on vm.echo"
    assert events.wait("default.workload_started", source=node.node_id)["data"]["id"] == response.id
    (vm_pid,) = [pid for pid, cmd in qemus(str(node.state_dir)).items() if response.id in cmd]

    stop = run_cli("stop", response.id, env=user)
    assert stop.returncode == 0, stop.stderr
    assert events.wait("default.workload_stopped", source=node.node_id)["data"]["id"] == response.id
    assert wait_gone([vm_pid], timeout=30) == [], "nex stop ends the VM"

    # a VM that dies is replaced
    victim = ready(node, obus, 2)[0].id
    (victim_pid,) = [pid for pid, cmd in qemus(str(node.state_dir)).items() if victim in cmd]
    os.kill(victim_pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while victim in {m.id for m in ready(node, obus, 2)}:
        assert time.monotonic() < deadline, f"the killed VM {victim} was not replaced"
    assert node.stop() == 0
    assert qemus(str(node.state_dir)) == {}


def test_clones_of_one_snapshot_draw_different_random_numbers_and_keep_the_hosts_time(
    home: Path,
    nats_server: NatsServerProc,
    bus: Bus,
    guest_image: object,
    tmp_path: Path,
) -> None:
    source = tmp_path / "random.c"
    source.write_text(RANDOM_C)
    binary = tmp_path / "random"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(binary), str(source)], check=True)
    node = NodeProcess(home, "--config", vm_config(home, guest_image), "--pool-size", "2", server=nats_server.url)
    node.start(bus, timeout=START_TIMEOUT)
    ready(node, bus, 2)
    user = {"HOME": str(home / "user"), "NATS_URL": nats_server.url}
    logs = bus.collect(f"$NEX.logs.default.{node.node_id}.>")
    drawn = []
    for name in ("first", "second"):
        run = run_cli("run", str(binary), "--name", name, "--json", "--timeout", "60s", env=user, timeout=120)
        assert run.returncode == 0, run.stderr + node.log()
        vmid = msgspec.json.decode(run.stdout, type=control.RunResponse).id
        line = logs.wait(f".{name}.{vmid}", timeout=60)["text"]
        match = re.fullmatch(r"RANDOM ([0-9a-f]{32}) TIME (\d+)", line)
        assert match, line
        drawn.append(match.group(1))
        assert abs(int(match.group(2)) - time.time()) < 30, "a clone takes the host's clock, not its template's"
    assert drawn[0] != drawn[1], "two clones of one snapshot drew the same random bytes"
    assert node.stop() == 0


def test_a_node_killed_with_its_vms_running_leaves_nothing_after_the_next_start(
    home: Path,
    nats_server: NatsServerProc,
    bus: Bus,
    guest_image: object,
) -> None:
    before = host_objects()
    config = vm_config(home, guest_image)
    node = NodeProcess(home, "--config", config, "--pool-size", "2", server=nats_server.url)
    node.start(bus, timeout=START_TIMEOUT)
    pool = ready(node, bus, 2)
    node_stem = host.node_stem(node.state_dir)
    made = {kind: found - before.get(kind, set()) for kind, found in host_objects().items()}
    assert {ids.short(m.id) for m in pool} <= made["namespaces"]
    assert {m.ip for m in pool} <= {Path(lease).name for lease in made["leases"]}
    for member in pool:  # each VM's tap, in its namespace
        assert tap_exists(ids.short(member.id), f"{ids.short(member.id)}t")
    vm_pids = list(qemus(str(node.state_dir)))
    snapshots = list((node.state_dir / "snapshots").glob("*/*.vmstate"))
    assert len(snapshots) == 1

    node.signal(signal.SIGKILL)
    node.wait()
    held = journaled_names(node.state_dir) - {node_stem}  # what the killed run's machines held
    assert {ids.short(m.id) for m in pool} <= held
    assert wait_gone(vm_pids, timeout=30) == [], "qemu dies with its node"
    node.start(bus, timeout=START_TIMEOUT)
    ready(node, bus, 2)
    # the restart reused the snapshot, and released what the killed run left
    assert "Booting the template VM" not in node.log().split("Starting nex node")[-1]
    # (the node's own link and fence table come back under the same names: only the machines' count;
    # an address may be leased again, so a lease is the old run's by its owner)
    left = {kind: sorted(o for o in found if names_in(o) & held) for kind, found in host_objects().items()}
    left["leases"] = [lease for lease in host_objects()["leases"] if leased_to(lease) & held]
    assert not any(left.values()), left
    assert qemus(str(node.state_dir)).keys().isdisjoint(vm_pids)
    assert node.stop() == 0


def leased_to(lease: str) -> set[str]:
    try:
        return set(Path(lease).read_text().split())
    except OSError:
        return set()


def tap_exists(namespace: str, tap: str) -> bool:
    shown = subprocess.run(["ip", "-n", namespace, "-o", "link", "show", tap], capture_output=True, text=True)
    return (
        shown.returncode == 0
        and "tap"
        in subprocess.run(
            ["ip", "-n", namespace, "-d", "-o", "link", "show", tap], capture_output=True, text=True
        ).stdout
    )


async def test_a_vm_writing_past_its_console_cap_is_ended_not_the_hosts_disk_filled(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    """The guest writes its console at will (root in a VM can write ttyS0 as fast as it likes): qemu's
    files are capped, and a VM that goes past is ended. A template VM (a hub port for a network)
    makes qemu warn at once, which is enough to go past 16 bytes; without the cap it runs on."""
    spec = tcg_spec(guest_image)
    capped: list[QemuVm] = []
    with pytest.raises(VmFailed), trio.fail_after(60):
        await launch(spec, console=tmp_path / "capped", started=capped, console_cap=16)
    assert await capped[0].wait() == -signal.SIGXFSZ
    assert (tmp_path / "capped").stat().st_size <= 16

    free: list[QemuVm] = []
    try:
        with trio.fail_after(60):
            await launch(spec, console=tmp_path / "free", started=free)
        assert (tmp_path / "free").stat().st_size > 16
    finally:
        for vm in capped + free:
            await vm.stop(1)
