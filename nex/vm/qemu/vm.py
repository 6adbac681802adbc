"""One qemu process: started (booted, or restored from a snapshot), told its identity, stopped.

:func:`launch` starts qemu through :func:`nex.proc.spawn` (it dies with the node), in the machine's
network namespace when it has one, with the monitor and the agent's channel on inherited sockets. A
restore uses ``-incoming defer`` and then ``migrate-incoming`` from a descriptor on the snapshot file,
so that it can wait for qemu's ``MIGRATION`` event rather than poll, and ``cont`` once it completed.

:func:`save_snapshot` is the template's side: once its agent says ready, ``stop``, then ``migrate``
to a descriptor on a new file (``getfd``), then ``quit``.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
from collections.abc import Sequence
from pathlib import Path

import msgspec
import trio

from nex import logs, proc
from nex.api import agent as agent_api

from .command import VmSpec, argv
from .qmp import Qmp, QmpError

log = logs.get("nex.vm")

VM_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
QUIT_GRACE = 1.0  # seconds for qemu to act on ``quit`` before it is killed
MAX_READY_LINE = 4096
UNTHROTTLED = 1 << 40  # bytes per second: no limit a local file could reach


class VmFailed(Exception):
    """qemu could not start the VM, or lost it (the message says which and why)."""


class QemuVm:
    """A running qemu process with its monitor and the host's end of the agent's channel."""

    def __init__(self, child: proc.ChildProcess, qmp: Qmp, channel: socket.socket) -> None:
        self.child = child
        self.pid = child.pid
        self.qmp = qmp
        self.channel = trio.socket.from_stdlib_socket(channel)
        self._buffer = b""

    async def wait(self) -> int | None:
        return await self.child.wait()

    def signal(self, sig: int) -> None:
        self.child.signal(sig)

    async def stop(self, grace: float) -> int | None:
        """``quit`` (the guest is not asked: its workload was undeployed already, and a VM holds no
        state the node keeps), ``grace`` seconds, then SIGKILL; shielded."""
        with trio.CancelScope(shield=True):
            if self.child.returncode is None:  # stopped already (the driver's stop, then the cleanup's)
                with trio.move_on_after(min(grace, QUIT_GRACE)), contextlib.suppress(QmpError, OSError):
                    await self.qmp.execute("quit")
            with trio.move_on_after(grace):
                await self.child.wait()
            self.child.signal(signal.SIGKILL)
            code = await self.child.wait()
            self.close()
        return code

    def close(self) -> None:
        self.qmp.close()
        self.channel.close()

    async def send_identity(self, identity: agent_api.GuestIdentity) -> None:
        await self.channel.send(msgspec.json.encode(identity) + b"\n")

    async def read_ready(self) -> agent_api.GuestReady:
        """The agent's ready line (bound it with a deadline)."""
        while b"\n" not in self._buffer:
            chunk = await self.channel.recv(4096)
            if not chunk:
                raise VmFailed("the VM closed its agent channel before it was ready")
            self._buffer += chunk
            if len(self._buffer) > MAX_READY_LINE:
                raise VmFailed("the VM's agent sent an overlong line")
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            return msgspec.json.decode(line, type=agent_api.GuestReady)
        except msgspec.DecodeError as exc:
            raise VmFailed(f"the VM's agent said {line[:200]!r} instead of ready: {exc}") from None


async def launch(
    spec: VmSpec,
    *,
    console: Path,
    netns: Path | None = None,
    tap: str | None = None,
    snapshot: Path | None = None,
    incoming: bool = False,
    started: list[QemuVm] | None = None,
    runas: int | None = None,
    cgroups: Sequence[str] = (),
    console_cap: int | None = None,
) -> QemuVm:
    """Start a VM: a boot, or a restore of ``snapshot`` (running once this returns), or with
    ``incoming`` a qemu that waits to be given one (:func:`restore`); qemu starts in
    ``cgroups`` and runs as uid ``runas`` once it has opened what it needs. ``console_cap`` bounds every
    file qemu writes (``RLIMIT_FSIZE``): the console file, which the guest fills at will, so that a VM
    that writes past it is ended (SIGXFSZ) instead of filling the host's disk; never for a template,
    which writes its snapshot.

    The VM is appended to ``started`` as soon as its process exists, so that a caller's cleanup can
    stop it however this ends (a cancellation, a failed restore).

    Raises:
        VmFailed: qemu could not be started, or refused the snapshot.
    """
    qmp_ours, qmp_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    agent_ours, agent_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    out = os.open(console, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        command = argv(
            spec,
            qmp_fd=qmp_theirs.fileno(),
            agent_fd=agent_theirs.fileno(),
            console=console,
            tap=tap,
            incoming=incoming or snapshot is not None,
            runas=runas,
        )
        child = proc.spawn(
            command,
            env=VM_ENV,
            stdout=out,
            stderr=out,
            netns=netns,
            pass_fds=[qmp_theirs.fileno(), agent_theirs.fileno()],
            cgroups=[Path(path) for path in cgroups],
        )
    except OSError as exc:
        for sock in (qmp_ours, agent_ours):
            sock.close()
        raise VmFailed(f"cannot start {spec.qemu}: {exc}") from None
    finally:
        for sock in (qmp_theirs, agent_theirs):
            sock.close()
        os.close(out)
    if console_cap is not None:  # at once: qemu has written little if anything yet
        resource.prlimit(child.pid, resource.RLIMIT_FSIZE, (console_cap, console_cap))
    vm = QemuVm(child, Qmp(qmp_ours), agent_ours)
    if started is not None:
        started.append(vm)
    try:
        await vm.qmp.handshake()
    except (QmpError, OSError) as exc:  # an error, or qemu gone (its monitor reset or closed)
        raise VmFailed(f"qemu (pid {vm.pid}): {exc}; its output is in {console}") from None
    if snapshot is not None:
        await restore(vm, snapshot, console)
    return vm


async def restore(vm: QemuVm, snapshot: Path, console: Path) -> None:
    """Restore ``snapshot`` into ``vm`` (launched ``incoming``) and let it run.

    Raises:
        VmFailed: qemu refused the snapshot, or is gone (its output is in ``console``).
    """
    try:
        await _restore(vm, snapshot)
    except (QmpError, OSError) as exc:
        raise VmFailed(f"qemu (pid {vm.pid}): {exc}; its output is in {console}") from None


async def _restore(vm: QemuVm, snapshot: Path) -> None:
    fd = os.open(snapshot, os.O_RDONLY | os.O_CLOEXEC)
    try:
        await vm.qmp.execute("getfd", fd=fd, fdname="snapshot")
    finally:
        os.close(fd)
    await vm.qmp.execute("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    await vm.qmp.execute("migrate-incoming", uri="fd:snapshot")
    await _migration_done(vm, "restore")
    await vm.qmp.execute("cont")


async def _migration_done(vm: QemuVm, what: str) -> None:
    while True:
        event = await vm.qmp.wait_event("MIGRATION")
        status = event.get("data", {}).get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise QmpError(f"the {what} {status}")


async def save_snapshot(vm: QemuVm, path: Path) -> int:
    """Save the (ready) VM to a new file ``path``; its size. The caller makes it whole or nothing
    (:class:`~nex.vm.snapshots.TemplateSnapshots` writes under a partial name and renames)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        await vm.qmp.execute("stop")
        await vm.qmp.execute("getfd", fd=fd, fdname="snapshot")
    finally:
        os.close(fd)
    await vm.qmp.execute("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    # a migration is throttled to 128 MiB/s by default (meant for a live one over a network): a
    # stopped VM saved to a local file should go as fast as the disk takes it
    await vm.qmp.execute("migrate-set-parameters", **{"max-bandwidth": UNTHROTTLED})
    await vm.qmp.execute("migrate", uri="fd:snapshot")
    await _migration_done(vm, "snapshot")
    return os.stat(path).st_size
