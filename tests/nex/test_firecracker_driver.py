"""The Firecracker driver's host side, for real on this host: the machine's network and tap, its files,
a start that fails (no Firecracker here) leaving nothing behind, and crash recovery's kill.

Firecracker itself is not run here (see test_firecracker_e2e.py). The crash-recovery test uses a
stand-in: a sleeping Python started under the name ``firecracker``, to show which processes the
releaser kills and which it refuses; it is not used to pretend a VM ran.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from actors import CleanupStack, Journal, ResourceRecord
from nex import ids, linux, proc
from nex.api.agent import MachineMetadata
from nex.config import load
from nex.net import netns, tap
from nex.net.network import Networks
from nex.sandbox.policy import HostSupport, Sandbox
from nex.vm.drivers import firecracker as fc
from nex.vm.drivers.base import MachineContext, NotOurs
from nex.vm.state import MachineDir, process_start_time

from .test_firecracker_api import SEED, definition

T = TypeVar("T")
HOST = HostSupport(privileged=True, namespaced=True, user_namespaces=None, seccomp=None, cgroups="not used")


def networks_for(tmp_path: Path, name: str, subnet: str) -> tuple[Networks, Sandbox]:
    config = load(None, {"cni.subnet": subnet, "cni.network_name": name}).config
    return Networks(config, namespaced=True, lease_root=tmp_path / "leases"), Sandbox(config, HOST)


def in_netns(path: Path, work: Callable[[], T]) -> T:
    def inside() -> T:
        host = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            netns.enter(path)
            try:
                return work()
            finally:
                linux.setns(host, linux.CLONE_NEWNET, "back")
        finally:
            os.close(host)

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(inside).result()


@pytest.mark.integration
@pytest.mark.skipif(
    not netns.has_capabilities() or not os.path.exists(tap.TUN), reason="needs root and /dev/net/tun: a netns and a tap"
)
async def test_prepare_makes_the_tap_and_files_and_a_failed_start_leaves_nothing(tmp_path: Path) -> None:
    networks, sandbox = networks_for(tmp_path, "nexfcprep", "10.213.11.0/24")
    driver = fc.FirecrackerDriver(
        networks,
        sandbox,
        kernel=tmp_path / "vmlinux",
        rootfs=tmp_path / "rootfs.ext4",
        initrd=None,
        template=sandbox.config.machine_template,
        firecracker=str(tmp_path / "no-firecracker-here"),
    )
    vmid = ids.new_vmid()
    folder = MachineDir(tmp_path / "vm", vmid)
    folder.create()
    journal = Journal(tmp_path / "journal")
    plan = networks.plan(vmid)
    metadata = MachineMetadata(vmid=vmid, node_nats_host="10.213.11.1", node_nats_port=9222, node_nats_nkey=SEED)

    async with CleanupStack(journal=journal, owner=vmid) as stack:
        context = MachineContext(vmid=vmid, dir=folder, cleanup=stack, metadata=metadata)
        await driver.prepare(context)

        name = fc.tap_name(vmid)
        assert in_netns(Path("/run/netns") / plan.netns, lambda: socket.if_nametoindex(name)) > 0  # the tap
        config = json.loads((folder.path / "firecracker.cfg").read_text())
        definition("FullVmConfiguration").validate(config)
        assert config["network-interfaces"][0]["host_dev_name"] == name
        facts = json.loads((folder.path / "driver.json").read_text())
        assert config["network-interfaces"][0]["guest_mac"] == facts["guest_mac"]
        assert facts["address"] == context.address
        for file in ("firecracker.log", "firecracker.metrics", "firecracker.stdout", "firecracker.stderr"):
            assert (folder.path / file).is_file(), file
        assert (folder.path / "firecracker.stdout").samefile(folder.stdout)  # the console, where the node looks
        assert json.loads((folder.path / "metadata.json").read_text())["node_nats_nkey"] == ""
        assert not [p.name for p in folder.path.iterdir() if p.is_file() and SEED in p.read_text(errors="replace")]
        assert driver.describe(context)["hosttap"] == name

        with pytest.raises(OSError, match="No such file"):
            await driver.start(context)
        assert "firecracker" in {record.kind for _, record in journal.records()}

    assert plan.netns not in netns.namespaces("nx")
    assert plan.host_link not in netns.links("nx")
    assert journal.records() == []
    assert not [p for p in (tmp_path / "leases").rglob("*") if p.is_file() and vmid in p.read_text(errors="replace")]


async def started(argv: list[str]) -> proc.ChildProcess:
    """``argv`` once it runs (it writes "up" once): until then its pid is still spawn's exec shim."""
    read, write = os.pipe()
    try:
        child = proc.spawn(argv, stdout=write)
    finally:
        os.close(write)
    async with trio.lowlevel.FdStream(read) as stream:
        with trio.fail_after(10):
            assert (await stream.receive_some(3)).startswith(b"u")  # any of it: the program runs
    return child


async def test_crash_recovery_kills_only_a_firecracker_of_that_machine(tmp_path: Path) -> None:
    networks, _ = networks_for(tmp_path, "nexfcrec", "10.213.12.0/24")
    release = fc.releasers(networks)["firecracker"].release
    vmid = ids.new_vmid()
    machine = tmp_path / "vm" / vmid
    machine.mkdir(parents=True)
    pidfile = machine / "firecracker.pid"
    stand_in = tmp_path / "firecracker"
    stand_in.symlink_to(sys.executable)
    sleep = ["-c", "import os, time; os.write(1, b'up'); time.sleep(60)", "--id", vmid]
    ours = await started([str(stand_in), *sleep])
    other = await started([sys.executable, *sleep])  # names the machine, but is no firecracker
    record = ResourceRecord(
        kind="firecracker", name="f", data={"vmid": vmid, "pidfile": str(pidfile)}, owner="", pid=1, created=0
    )
    try:
        pidfile.write_text(f"{other.pid} {process_start_time(other.pid)}\n")
        with pytest.raises(NotOurs, match="is not a Firecracker of machine"):
            await release(record)
        pidfile.write_text(f"{ours.pid} 1\n")  # the start time of another process: the pid was reused
        with pytest.raises(NotOurs, match="reused"):
            await release(record)
        elsewhere = ResourceRecord(
            kind="firecracker", name="f", data={"vmid": vmid, "pidfile": "/etc/passwd"}, owner="", pid=1, created=0
        )
        with pytest.raises(NotOurs, match="not the pidfile"):
            await release(elsewhere)
        assert (ours.returncode, other.returncode) == (None, None)

        pidfile.write_text(f"{ours.pid} {process_start_time(ours.pid)}\n")
        await release(record)

        assert await ours.wait() == -9
        assert other.returncode is None
        await release(record)  # idempotent: it is gone
        pidfile.unlink()
        await release(record)  # never started
    finally:
        for process in (ours, other):
            await process.stop(0)
