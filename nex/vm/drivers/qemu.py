"""The QEMU driver: each machine is a ``-M microvm`` VM with the agent as its init.

Per machine, as root: the process driver's network (a lease, a namespace ``nx…``, a veth pair, the
fence), plus a tap ``nx…t`` in the namespace redirected both ways with the veth by tc (CNI's
``tc-redirect-tap``, :mod:`nex.net.tap`); qemu runs in the namespace. The root filesystem is the guest
image's, read-only and shared by every VM; each VM writes only to a tmpfs overlaid on it in its own
memory. The console goes to the machine's ``stdout`` file.

A machine is restored from the template's snapshot when there is one (:mod:`nex.vm.snapshots`),
and cold-booted otherwise, or when a restore fails (and the node says so). Either way the agent gets
its :class:`~nex.api.agent.GuestIdentity` over its private channel once qemu runs.

Inside the VM the workload is still jailed (the issue-6 jail, without the host's cgroups and bind
mounts, which the guest does not have): the VM is a second wall, not the only one.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import os
import re
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import trio

from actors import ResourceRecord
from nex import ids
from nex.api import agent as agent_api
from nex.net import tap as taps
from nex.net.network import Networks
from nex.sandbox.cgroups import Limits
from nex.sandbox.policy import Sandbox
from nex.vm.qemu import snapshots as qemu_snapshots
from nex.vm.qemu.command import VmSpec
from nex.vm.qemu.vm import QemuVm, VmFailed, launch, restore

from . import network as machine_network
from .base import DriverUnavailable, MachineContext, MachineHandle, NotOurs, Releaser
from .cgroup import prepare_cgroup

STOP_GRACE = 2.0
QEMU_OVERHEAD_MIB = 256
CONSOLE_MAX_BYTES = 16 << 20  # a machine's console file (its stdout): past it, the VM is ended
QEMU_PIDS = 64
TCG_CLONE_ALLOWANCE = 15.0
"""Seconds a restored clone may take beyond the handshake timeout under TCG: its memory is the
template's, but TCG translates every guest instruction it runs anew (the translation cache is not
part of a snapshot), so each clone costs a second or two of CPU, and clones restored together on
few cores wait for each other. Under KVM none is needed."""


def tap_name(vmid: str) -> str:
    return f"{ids.short(vmid)}t"


class QemuDriver:
    name = "qemu"

    def __init__(
        self,
        networks: Networks,
        sandbox: Sandbox,
        spec: VmSpec,
        *,
        image_digest: str,
        snapshot_dir: Path | None,
        boot_timeout: float,
    ) -> None:
        if not networks.namespaced:
            raise DriverUnavailable("VMs need a network namespace each: run the node as root (with CAP_NET_ADMIN)")
        self.nets = machine_network.MachineNetworks(networks)
        self.sandbox = sandbox
        self.spec = spec
        self.boot_timeout = boot_timeout
        self.snapshots = (
            qemu_snapshots.snapshots(spec, snapshot_dir, image_digest, boot_timeout, runas=sandbox.uid_for(None))
            if snapshot_dir
            else None
        )
        self._clones: set[str] = set()  # the vmids prepared to start as clones
        self._confined: dict[str, tuple[int, list[str]]] = {}  # by vmid: qemu's uid and cgroup

    async def prepare(self, machine: MachineContext) -> None:
        facts: dict[str, object] = {"driver": self.name, "accel": self.spec.accel, "sandbox": self.kind}
        network = await self.nets.prepare(machine, facts)
        tap = tap_name(machine.vmid)
        await trio.to_thread.run_sync(taps.add_redirected_tap, network.netns_path, network.guest_link, tap)
        machine.dir.note(f"tap {tap} redirected with {network.guest_link}")
        machine.address = network.address
        uid = self.sandbox.uid_for(network.address)  # the machine's own: qemu runs as it on the host
        machine.cleanup.push(f"plan of {machine.vmid}", self._forget(machine.vmid), durable=False)
        cgroup = await prepare_cgroup(machine, self.sandbox, self._limits())
        self._confined[machine.vmid] = (uid, cgroup)
        jail = self.sandbox.jail(machine.vmid, uid, [])
        if jail is not None:  # the guest has neither the host's cgroups nor its paths to bind
            jail = msgspec.structs.replace(jail, mounts=[], cgroup=[], own_network=False, rootless=False)
        machine.metadata = msgspec.structs.replace(machine.metadata, jail=jail, log_budget=self.sandbox.log_budget())
        clone = self.snapshots is not None and not self.snapshots.failed
        if clone:
            self._clones.add(machine.vmid)
        machine.boot_allowance = self._allowance(clone)
        facts |= {"tap": tap, "start": "snapshot" if clone else "cold boot"}
        machine.dir.write_json("driver.json", facts)
        machine.dir.write_json("metadata.json", msgspec.structs.replace(machine.metadata, node_nats_nkey=""))

    def _forget(self, vmid: str) -> Callable[[], Awaitable[None]]:
        async def forget() -> None:  # what prepare left for a start that never came
            self._clones.discard(vmid)
            self._confined.pop(vmid, None)

        return forget

    def _limits(self) -> Limits:
        """qemu's cgroup: the guest's memory plus qemu's own (its code, TCG's cache, device state), its
        vCPUs' worth of CPU, and the few threads it runs."""
        return Limits(
            memory_bytes=(self.spec.memory_mib + QEMU_OVERHEAD_MIB) << 20,
            cpus=self.spec.vcpus,
            pids_max=QEMU_PIDS,
            cpuset=self.sandbox.config.machine_template.cpuset,
        )

    def _allowance(self, clone: bool) -> float:
        """Seconds a machine's start may take beyond the handshake timeout: a cold boot's; a clone's
        under TCG; and while the template is still to be made, its boot and perhaps a cold boot
        after it (if it fails)."""
        if not clone:
            return self.boot_timeout
        allowance = TCG_CLONE_ALLOWANCE if self.spec.accel == "tcg" else 0.0
        if self.snapshots is not None and not self.snapshots.made:
            allowance += 2 * self.boot_timeout
        return allowance

    @property
    def kind(self) -> str:
        return f"vm ({self.spec.accel}) + {self.sandbox.kind}"

    async def start(self, machine: MachineContext) -> MachineHandle:
        vmid = machine.vmid
        network = self.nets.get(vmid)
        assert network is not None, "prepare makes the network"
        started: list[QemuVm] = []
        console = machine.dir.stdout

        async def stop_started() -> None:
            for vm in started:
                await vm.stop(STOP_GRACE)

        # journaled before qemu exists: crash recovery finds it by its console path (see releasers)
        machine.cleanup.push(f"qemu of {vmid}", stop_started, kind="qemu", data={"console": str(console)})
        clone = vmid in self._clones
        self._clones.discard(vmid)
        uid, cgroup = self._confined.pop(vmid)
        start_vm = functools.partial(
            launch,
            self.spec,
            console=console,
            netns=network.netns_path,
            tap=tap_name(vmid),
            started=started,
            runas=uid,
            cgroups=cgroup,
            console_cap=CONSOLE_MAX_BYTES,
        )
        vm = await (self._clone(machine, start_vm, started) if clone else start_vm())
        machine.dir.write_pid(vm.pid)
        identity = agent_api.GuestIdentity(
            metadata=machine.metadata,
            network=agent_api.GuestNetwork(address=network.address, prefixlen=32, gateway=network.gateway),
            time_ns=time.time_ns(),
            entropy=base64.b64encode(secrets.token_bytes(64)).decode(),
        )
        await vm.send_identity(identity)
        machine.dir.note(f"qemu pid {vm.pid} ({'restored' if clone else 'booted'}), identity sent")
        return vm

    async def _clone(
        self, machine: MachineContext, start_vm: Callable[..., Awaitable[QemuVm]], started: list[QemuVm]
    ) -> QemuVm:
        """A clone of the template: its qemu starts at once, waiting for a snapshot, so that starting
        qemu (a good part of a restore) overlaps the template's boot when there is one to wait for;
        a cold boot if there is no snapshot after all, or it cannot be restored (and the node says so)."""
        assert self.snapshots is not None
        vm = await start_vm(incoming=True)
        snapshot = await self.snapshots.get()
        if snapshot is not None:
            try:
                await restore(vm, snapshot, machine.dir.stdout)
                return vm
            except VmFailed as exc:
                machine.dir.note(f"restore failed, cold boot: {exc}")
                self.snapshots.forget(str(exc))
        await vm.stop(0)
        started.clear()
        machine.boot_allowance += self.boot_timeout
        return await start_vm()

    async def stop(self, machine: MachineContext, handle: MachineHandle, grace: float) -> None:
        await handle.stop(grace)

    def describe(self, machine: MachineContext) -> dict[str, str]:
        facts = {"driver": self.name, "sandbox": self.kind, "accel": self.spec.accel}
        network = self.nets.get(machine.vmid)
        if network is not None:
            facts |= {"ip": network.address, "netns": network.netns, "hosttap": tap_name(machine.vmid)}
        return facts


def releasers(networks: Networks) -> dict[str, Releaser]:
    """What the next run releases after a crash: the machines' networks, and any qemu still running
    (it dies with the node; this is for a qemu that outlived it all the same)."""

    async def kill_qemu(record: ResourceRecord) -> None:
        console = str(record.data.get("console", ""))
        if not re.search(r"/vm/.+/stdout$", console):
            raise NotOurs(f"{console!r} is not a machine's console")
        await trio.to_thread.run_sync(_kill_by_console, console)

    return {**machine_network.releasers(networks), "qemu": Releaser(kill_qemu)}


def _kill_by_console(console: str) -> None:
    needle = f"path={console},".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and needle in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
