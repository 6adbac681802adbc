"""The Firecracker driver: each machine is a Firecracker microVM with the agent as its init (KVM hosts).

Per machine, as root: the process driver's network (a lease, a namespace ``nx…``, a veth pair, the
fence: :mod:`.network`), plus a tap ``nx…t`` in the namespace redirected both ways with the veth by
tc (CNI's ``tc-redirect-tap``, :mod:`nex.net.tap`); the guest takes the veth's MAC. Firecracker runs
in the namespace (entered by :func:`nex.proc.spawn`, or by its jailer's ``--netns``), so it opens the
tap by name there. The root filesystem is the guest image's, read-only and shared by every VM (the
guest overlays a tmpfs).

The machine's directory follows flintlock's per-VM layout: ``firecracker.cfg`` (the whole
configuration, written before it is applied), ``firecracker.log``, ``firecracker.metrics``,
``firecracker.pid``, ``firecracker.stdout`` / ``.stderr`` (hard links of the machine's ``stdout`` /
``stderr``: the serial console, where the node looks for a machine's last words), ``metadata.json``
(without the nkey seed) and the API socket ``firecracker.sock``.

Start-up goes through the API socket, in the order of Firecracker's getting-started guide: logger,
metrics, machine-config, boot-source, the root drive, ``eth0``, MMDS config (V2, on ``eth0``), the
MMDS contents, then ``InstanceStart``. The agent's :class:`~nex.api.agent.GuestIdentity` (its
metadata with the nkey seed, its network, the host's clock and fresh entropy) is the MMDS contents,
as nex v0.2 handed its agent the metadata: MMDS answers only this guest (see :mod:`nex.agent.mmds`
for the guest's side). Given a template snapshot (:mod:`.firecracker_template`, kept by
:class:`~nex.vm.snapshots.TemplateSnapshots`), a machine is a clone instead: logger, metrics,
``/snapshot/load`` with its own tap, resumed, then its own MMDS contents (a snapshot holds none); a
clone that cannot be loaded drops the snapshot and cold-boots, and says so.

The root drive is named by its host path, jailed or not: a snapshot holds its drive's path and a
clone reopens it (Firecracker has no drive override), so a jailed machine finds the image at that
same path inside its jail.

Firecracker dies with the node (:mod:`nex.proc`), except under the jailer, which drops its
credentials and with them the parent-death signal: so it is journaled, and crash recovery kills it by
the pid in ``firecracker.pid`` once ``/proc`` confirms it is a Firecracker of that machine.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import secrets
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import trio

from actors import ResourceRecord
from nex import affinity, ids, linux, proc
from nex.api import agent as agent_api
from nex.config import MachineTemplate
from nex.net import netns as netns_mod
from nex.net import tap as taps
from nex.net.netns import MachineNetwork
from nex.net.network import Networks
from nex.sandbox.policy import Sandbox
from nex.vm.firecracker import api
from nex.vm.snapshots import TemplateSnapshots
from nex.vm.state import process_start_time

from . import network as machine_network
from .base import DriverUnavailable, MachineContext, MachineHandle, NotOurs, Releaser

#: Firecracker's usual command line (flintlock's and the getting-started guide's), then what the guest
#: needs: ``nex.identity=mmds`` tells the agent where its identity comes from. Firecracker adds
#: ``root=/dev/vda ro`` itself for a read-only root drive.
BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off quiet nex.identity=mmds"
IFACE = "eth0"
ROOT_DRIVE = "rootfs"
SOCKET_TIMEOUT = 5.0  # for Firecracker's API socket to appear (its spec: ~12 ms, 60 at most)
CTRL_ALT_DEL_GRACE = 0.5  # at most, for Firecracker to take SendCtrlAltDel (it answers at once)
TUNSETOWNER = 0x400454CC
TUNSETGROUP = 0x400454CE


def tap_name(vmid: str) -> str:
    return f"{ids.short(vmid)}t"


@dataclass(frozen=True)
class Snapshot:
    """A template VM's full snapshot: its state and its memory (host paths)."""

    state: Path
    memory: Path

    @staticmethod
    def inside(directory: Path) -> Snapshot:
        """The snapshot kept in ``directory`` (as :mod:`.firecracker_template` writes it)."""
        return Snapshot(state=directory / "state", memory=directory / "memory")


@dataclass(frozen=True)
class Jailer:
    """Firecracker's jailer: ``binary``, and the chroot's base (default: the machine's directory,
    so the machine's teardown removes the chroot the jailer leaves behind)."""

    binary: str
    chroot_base: Path | None = None


class FirecrackerDriver:
    name = "firecracker"

    def __init__(
        self,
        networks: Networks,
        sandbox: Sandbox,
        *,
        kernel: Path,
        rootfs: Path,
        initrd: Path | None,
        template: MachineTemplate,
        firecracker: str = "firecracker",
        jailer: Jailer | None = None,
        snapshots: TemplateSnapshots | None = None,
        boot_timeout: float = 10.0,
        boot_args: str = BOOT_ARGS,
    ) -> None:
        if not networks.namespaced:
            raise DriverUnavailable(
                "Firecracker VMs need a network namespace each: run the node as root (CAP_NET_ADMIN)"
            )
        vcpus = template.vcpu_count
        if not (vcpus == 1 or (vcpus % 2 == 0 and 2 <= vcpus <= 32)):
            raise DriverUnavailable(
                f"Firecracker takes 1 or an even number of vCPUs up to 32, not {vcpus} (machine_template.vcpu_count)"
            )
        self.nets = machine_network.MachineNetworks(networks)
        self.sandbox = sandbox
        self.kernel, self.rootfs, self.initrd = kernel, rootfs, initrd
        self.template = template
        self.firecracker = firecracker
        self.jailer = jailer
        self.snapshots = snapshots
        self.boot_timeout = boot_timeout
        self.boot_args = boot_args
        self._vms: dict[str, _Vm] = {}

    # -- prepare -------------------------------------------------------------------------------------

    async def prepare(self, machine: MachineContext) -> None:
        vmid = machine.vmid
        tap = tap_name(vmid)
        facts: dict[str, object] = {"driver": self.name, "sandbox": self.kind, "tap": tap}
        facts |= {"firecracker": self.firecracker, "jailer": self.jailer.binary if self.jailer else ""}
        network = await self.nets.prepare(machine, facts)  # writes driver.json, tap named, before it exists
        # the tap goes with the namespace, whose release is already on machine.cleanup
        mac = await trio.to_thread.run_sync(taps.add_redirected_tap, network.netns_path, network.guest_link, tap)
        machine.dir.note(f"tap {tap} redirected with {network.guest_link}, guest MAC {mac}")
        machine.address = network.address
        uid = self.sandbox.uid_for(network.address)
        jail = self.sandbox.jail(vmid, uid, [])
        if jail is not None:  # the guest has neither the host's cgroups nor its paths to bind
            jail = msgspec.structs.replace(jail, mounts=[], cgroup=[], own_network=False, rootless=False)
        machine.metadata = msgspec.structs.replace(machine.metadata, jail=jail, log_budget=self.sandbox.log_budget())
        saved = await self.snapshots.get() if self.snapshots is not None else None
        snapshot = Snapshot.inside(saved) if saved is not None else None
        machine.boot_allowance = 0.0 if snapshot is not None else self.boot_timeout
        facts["start"] = "snapshot" if snapshot is not None else "cold boot"

        vm = _Vm(machine.dir.path, vmid, network, tap, mac, uid, self.jailer, snapshot=snapshot)
        await trio.to_thread.run_sync(self._lay_out, machine, vm)
        machine.cleanup.push(f"firecracker state of {vmid}", self._forget(vmid), durable=False)
        self._vms[vmid] = vm
        machine.dir.write_json("driver.json", facts | {"guest_mac": mac, "address": network.address})
        machine.dir.write_json("metadata.json", msgspec.structs.replace(machine.metadata, node_nats_nkey=""))

    def _forget(self, vmid: str) -> Callable[[], Awaitable[None]]:
        async def forget() -> None:
            self._vms.pop(vmid, None)

        return forget

    def _lay_out(self, machine: MachineContext, vm: _Vm) -> None:
        """The per-VM files (blocking): the console and log files, the jail's view when jailed, and
        ``firecracker.cfg``, the configuration that :meth:`start` applies (all of it in a cold boot;
        in a clone only its logger and metrics, the rest being the snapshot's)."""
        folder = machine.dir
        for name, existing in (("firecracker.stdout", folder.stdout), ("firecracker.stderr", folder.stderr)):
            os.link(existing, folder.path / name)  # one file, two names: flintlock's and the node's
        for name in ("firecracker.log", "firecracker.metrics"):
            (folder.path / name).touch()  # older Firecrackers need them to exist
        if vm.chroot is not None:
            vm.chroot.mkdir(parents=True)
            os.chown(vm.chroot, vm.uid, vm.uid)  # where the jailed Firecracker makes its socket
            for name in ("firecracker.log", "firecracker.metrics"):
                os.link(folder.path / name, vm.chroot / name)
                os.chown(vm.chroot / name, vm.uid, vm.uid)
            for source, name in self._images(vm):
                target = vm.chroot / name
                target.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(source, target)
        vm.config = self.config(vm)
        folder.write_json("firecracker.cfg", vm.config)

    def _images(self, vm: _Vm) -> list[tuple[Path, str]]:
        """What a jailed machine needs inside its jail: (host path, path in the jail)."""
        images = [(self.kernel, "vmlinux"), (self.rootfs, str(self.rootfs).lstrip("/"))]
        if self.initrd is not None:
            images.append((self.initrd, "initrd"))
        if vm.snapshot is not None:
            images += [(vm.snapshot.state, "snapshot.state"), (vm.snapshot.memory, "snapshot.memory")]
        return images

    def config(self, vm: _Vm) -> api.VmConfig:
        """The machine's whole configuration, with paths as Firecracker sees them."""
        jailed = vm.chroot is not None
        return vm_config(
            kernel="/vmlinux" if jailed else str(self.kernel),
            initrd=None if self.initrd is None else "/initrd" if jailed else str(self.initrd),
            rootfs=self.rootfs,
            template=self.template,
            boot_args=self.boot_args,
            tap=vm.tap,
            mac=vm.mac,
            files=vm.vmm_path,
        )

    @property
    def kind(self) -> str:
        return f"vm (kvm) + {self.sandbox.kind}"

    # -- start ---------------------------------------------------------------------------------------

    async def start(self, machine: MachineContext) -> MachineHandle:
        vmid = machine.vmid
        vm = self._vms[vmid]
        started: list[FirecrackerVm] = []

        async def stop_started() -> None:
            for handle in started:
                await handle.stop(0)

        # journaled before Firecracker exists: crash recovery finds its pid in the pidfile (see releasers)
        pidfile = machine.dir.path / "firecracker.pid"
        machine.cleanup.push(
            f"firecracker of {vmid}", stop_started, kind="firecracker", data={"vmid": vmid, "pidfile": str(pidfile)}
        )
        if self.jailer is not None:
            await trio.to_thread.run_sync(_own_tap, vm.network.netns_path, vm.tap, vm.uid)
        handle, client = await self._launch(machine, vm, started)
        identity = agent_api.GuestIdentity(
            metadata=machine.metadata,
            network=agent_api.GuestNetwork(address=vm.network.address, prefixlen=32, gateway=vm.network.gateway),
            time_ns=time.time_ns(),
            entropy=base64.b64encode(secrets.token_bytes(64)).decode(),
        )
        if vm.snapshot is None:
            await boot(client, vm.config, identity)
        else:
            try:
                await restore(client, vm.config, vm.snapshot_paths(vm.snapshot), vm.tap, identity)
            except api.ApiError as exc:  # a clone's Firecracker cannot boot after a load: a new one
                if self.snapshots is not None:
                    self.snapshots.forget(str(exc))
                if self.jailer is not None:  # a second jailer would not reuse the first's jail: replaced
                    raise
                machine.dir.note(f"restore failed, cold boot: {exc}")
                await stop_started()
                started.clear()
                vm.snapshot = None
                machine.boot_allowance = self.boot_timeout
                handle, client = await self._launch(machine, vm, started)
                await boot(client, vm.config, identity)
        machine.dir.note(f"firecracker {'restored' if vm.snapshot else 'booted'}, identity in MMDS")
        return handle

    async def _launch(
        self, machine: MachineContext, vm: _Vm, started: list[FirecrackerVm]
    ) -> tuple[FirecrackerVm, api.Client]:
        """A new Firecracker for ``vm``, in ``started`` as soon as it exists, once its API answers."""
        vm.socket.unlink(missing_ok=True)  # a Firecracker before it (a failed restore) left its socket
        child = self._spawn(machine, vm)
        client = api.Client(vm.socket)
        handle = FirecrackerVm(child, client)
        started.append(handle)  # no checkpoint since the spawn
        vm.pid = child.pid
        (machine.dir.path / "firecracker.pid").write_text(f"{child.pid} {process_start_time(child.pid)}\n")
        machine.dir.write_pid(child.pid)
        machine.dir.note(f"firecracker pid {child.pid}: {' '.join(child.argv)}")
        await api.wait_for_socket(vm.socket, SOCKET_TIMEOUT, alive=lambda: child.returncode is None)
        return handle, client

    def _spawn(self, machine: MachineContext, vm: _Vm) -> proc.ChildProcess:
        if self.jailer is None:
            # relative to its cwd, the machine's directory: a unix socket's path has at most 107 bytes
            argv = [self.firecracker, "--api-sock", "firecracker.sock", "--id", vm.vmid]
            netns: Path | None = vm.network.netns_path
        else:
            binary = shutil.which(self.firecracker) or self.firecracker  # the jailer copies it: a path
            assert vm.chroot is not None
            argv = [
                *(self.jailer.binary, "--id", vm.vmid, "--exec-file", binary),
                *("--uid", str(vm.uid), "--gid", str(vm.uid)),
                *("--chroot-base-dir", str(vm.chroot_base), "--netns", str(vm.network.netns_path)),
                *("--", "--api-sock", vm.vmm_path("firecracker.sock")),
            ]
            netns = None  # the jailer joins it
        out = os.open(machine.dir.stdout, os.O_WRONLY | os.O_APPEND)
        err = os.open(machine.dir.stderr, os.O_WRONLY | os.O_APPEND)
        try:
            return proc.spawn(argv, cwd=machine.dir.path, stdout=out, stderr=err, netns=netns)
        finally:
            os.close(out)
            os.close(err)

    async def stop(self, machine: MachineContext, handle: MachineHandle, grace: float) -> None:
        await handle.stop(grace)

    def describe(self, machine: MachineContext) -> dict[str, str]:
        facts = {"driver": self.name, "sandbox": self.kind}
        vm = self._vms.get(machine.vmid)
        if vm is not None:
            facts |= {"ip": vm.network.address, "netns": vm.network.netns, "hosttap": vm.tap}
            if vm.pid:
                facts["pid"] = str(vm.pid)
        return facts


@dataclass
class _Vm:
    """What the driver keeps of one machine between prepare and stop."""

    dir: Path
    vmid: str
    network: MachineNetwork
    tap: str
    mac: str
    uid: int
    jailer: Jailer | None
    config: api.VmConfig | None = None
    pid: int = 0
    snapshot: Snapshot | None = None  # the template's, when the machine starts as a clone

    @property
    def chroot_base(self) -> Path:
        assert self.jailer is not None
        return self.jailer.chroot_base or self.dir / "jail"

    @property
    def chroot(self) -> Path | None:
        """The jail's root: ``<base>/<exec name>/<id>/root`` (the jailer's layout), or None."""
        if self.jailer is None:
            return None
        return self.chroot_base / "firecracker" / self.vmid / "root"

    @property
    def socket(self) -> Path:
        return (self.chroot or self.dir) / "firecracker.sock"

    def vmm_path(self, name: str) -> str:
        """``name`` in the machine's directory as Firecracker sees it (inside its jail, when jailed)."""
        return f"/{name}" if self.chroot is not None else str(self.dir / name)

    def snapshot_paths(self, snapshot: Snapshot) -> Snapshot:
        if self.chroot is None:
            return snapshot
        return Snapshot(state=Path("/snapshot.state"), memory=Path("/snapshot.memory"))


# -- the API sequences -----------------------------------------------------------------------------------


def vm_config(
    *,
    kernel: str,
    initrd: str | None,
    rootfs: Path,
    template: MachineTemplate,
    boot_args: str,
    tap: str,
    mac: str,
    files: Callable[[str], str],
) -> api.VmConfig:
    """A whole VM configuration: the kernel and initrd as Firecracker sees them, the root drive by its
    host path (see the module docstring), ``files(name)`` for the logger's and metrics' files."""
    return api.VmConfig(
        logger=api.Logger(log_path=files("firecracker.log"), level="Info", show_level=True),
        metrics=api.Metrics(metrics_path=files("firecracker.metrics")),
        machine_config=api.MachineConfiguration(vcpu_count=template.vcpu_count, mem_size_mib=template.memsize_mib),
        boot_source=api.BootSource(kernel_image_path=kernel, boot_args=boot_args, initrd_path=initrd),
        drives=[
            api.Drive(
                drive_id=ROOT_DRIVE,
                path_on_host=str(rootfs),
                is_root_device=True,
                is_read_only=True,  # shared by every VM: the guest writes to a tmpfs over it
            )
        ],
        network_interfaces=[api.NetworkInterface(iface_id=IFACE, host_dev_name=tap, guest_mac=mac)],
        mmds_config=api.MmdsConfig(version="V2", network_interfaces=[IFACE]),
    )


async def boot(client: api.Client, config: api.VmConfig | None, identity: agent_api.GuestIdentity | None) -> None:
    """Configure a fresh Firecracker call by call from ``config``, put the agent's identity in MMDS
    (a template has none yet), and start the guest."""
    assert config is not None
    if config.logger is not None:
        await client.put("/logger", config.logger)
    if config.metrics is not None:
        await client.put("/metrics", config.metrics)
    await client.put("/machine-config", config.machine_config)
    await client.put("/boot-source", config.boot_source)
    for drive in config.drives:
        await client.put(f"/drives/{drive.drive_id}", drive)
    for iface in config.network_interfaces:
        await client.put(f"/network-interfaces/{iface.iface_id}", iface)
    if config.mmds_config is not None:
        await client.put("/mmds/config", config.mmds_config)
    if identity is not None:
        await client.put("/mmds", identity)
    await client.put("/actions", api.InstanceActionInfo(action_type="InstanceStart"))


async def restore(
    client: api.Client,
    config: api.VmConfig | None,
    snapshot: Snapshot,
    tap: str,
    identity: agent_api.GuestIdentity,
) -> None:
    """Make a fresh Firecracker a clone of ``snapshot`` on its own tap, resumed, with its own identity."""
    assert config is not None
    if config.logger is not None:
        await client.put("/logger", config.logger)
    if config.metrics is not None:
        await client.put("/metrics", config.metrics)
    await load_snapshot(client, snapshot.state, snapshot.memory, taps={IFACE: tap}, resume=True)
    await client.put("/mmds", identity)


async def create_snapshot(client: api.Client, snapshot_path: Path | str, mem_path: Path | str) -> None:
    """Pause the VM and take a full snapshot (see :func:`nex.vm.firecracker.api.create_snapshot`)."""
    await api.create_snapshot(client, snapshot_path, mem_path)


async def load_snapshot(
    client: api.Client,
    snapshot_path: Path | str,
    mem_path: Path | str,
    *,
    taps: dict[str, str] | None = None,
    resume: bool = True,
) -> None:
    """Load a snapshot into a fresh Firecracker (see :func:`nex.vm.firecracker.api.load_snapshot`)."""
    await api.load_snapshot(client, snapshot_path, mem_path, taps=taps, resume=resume)


# -- the running VM --------------------------------------------------------------------------------------


class FirecrackerVm:
    """A running Firecracker process and its API connection."""

    def __init__(self, child: proc.ChildProcess, client: api.Client) -> None:
        self.child = child
        self.pid = child.pid
        self.client = client

    async def wait(self) -> int | None:
        return await self.child.wait()

    def signal(self, sig: int) -> None:
        self.child.signal(sig)

    async def stop(self, grace: float) -> int | None:
        """Ctrl-Alt-Del (the guest reboots, and with ``reboot=k`` Firecracker exits), ``grace``
        seconds, then SIGKILL; shielded."""
        with trio.CancelScope(shield=True):
            if grace > 0 and self.child.returncode is None:
                with trio.move_on_after(min(grace, CTRL_ALT_DEL_GRACE)), contextlib.suppress(api.ApiError):
                    await self.client.put("/actions", api.InstanceActionInfo(action_type="SendCtrlAltDel"))
                with trio.move_on_after(grace):
                    await self.child.wait()
            self.child.signal(signal.SIGKILL)  # a no-op if it has exited
            code = await self.child.wait()
            await self.client.aclose()
        return code

    def __repr__(self) -> str:
        return f"<FirecrackerVm pid {self.pid}>"


# -- host helpers ----------------------------------------------------------------------------------------


def _link_or_copy(source: Path, target: Path) -> None:
    """``source`` at ``target`` (in a jail): a hard link, or a copy across file systems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _own_tap(netns_path: Path, tap: str, uid: int) -> None:
    """Give ``tap`` (in the namespace) to ``uid``, so a jailed Firecracker without CAP_NET_ADMIN may
    open it (blocking: a worker thread, moved into the namespace and back)."""
    affinity.unpin_current()
    host_ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        netns_mod.enter(netns_path)
        try:
            fd = taps.open_tap(tap)
            try:
                fcntl.ioctl(fd, TUNSETOWNER, uid)
                fcntl.ioctl(fd, TUNSETGROUP, uid)
            finally:
                os.close(fd)
        finally:
            linux.setns(host_ns, linux.CLONE_NEWNET, "return to the host netns")
    finally:
        os.close(host_ns)


# -- crash recovery --------------------------------------------------------------------------------------

VMID = r"[0-9a-v]{20}"


def releasers(networks: Networks) -> dict[str, Releaser]:
    """What the next run releases after a crash: the machines' networks (their taps go with their
    namespaces), and any Firecracker still running, which only a jailed one can be."""

    async def kill_firecracker(record: ResourceRecord) -> None:
        vmid, pidfile = str(record.data.get("vmid", "")), Path(str(record.data.get("pidfile", "")))
        if pidfile.name != "firecracker.pid" or pidfile.parent.name != vmid:
            raise NotOurs(f"{pidfile} is not the pidfile of machine {vmid}")
        await trio.to_thread.run_sync(kill_if_ours, pidfile, vmid)

    return {**machine_network.releasers(networks), "firecracker": Releaser(kill_firecracker, {"vmid": VMID})}


def kill_if_ours(pidfile: Path, vmid: str, timeout: float = 5.0) -> bool:
    """SIGKILL the Firecracker of machine ``vmid`` named by ``pidfile`` ("<pid> <start time>") and
    wait for it to end (blocking); False if there was none. Raises :class:`NotOurs` if the pid now
    belongs to another process (reused, or not a Firecracker of that machine)."""
    try:
        pid_text, _, start_text = pidfile.read_text().partition(" ")
        pid, start = int(pid_text), int(start_text or 0)
    except (OSError, ValueError):
        return False  # never started, or its directory is gone already
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False  # ended
    if start and process_start_time(pid) != start:
        raise NotOurs(f"pid {pid} was reused since machine {vmid}'s Firecracker had it")
    if not any(b"firecracker" in Path(os.fsdecode(arg)).name.encode() for arg in argv[:1]) or (
        vmid.encode() not in argv
    ):
        raise NotOurs(f"pid {pid} is not a Firecracker of machine {vmid}: {b' '.join(argv)[:200]!r}")
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        os.kill(pid, signal.SIGKILL)
        _wait_readable(pidfd, timeout)  # a pidfd is readable once the process has ended, child or not
    finally:
        os.close(pidfd)
    return True


def _wait_readable(fd: int, timeout: float) -> None:
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if not poller.poll(timeout * 1000):
        raise TimeoutError(f"the process of pidfd {fd} did not end within {timeout:g} s")
