"""Firecracker's template snapshot (see :mod:`nex.vm.snapshots` for the cache around it).

The template is a Firecracker VM configured as every machine is (:func:`.firecracker.vm_config`: the
same vCPUs, memory, root drive path and MMDS) but with ``nex.template=1`` on its kernel command line
and nothing in MMDS. Its agent imports everything, compiles the jail's filter, brings ``eth0`` up on
a link-local address and says :data:`~nex.agent.guest.READY_MARKER` on its console, then asks MMDS
for an identity until one is there. The host reads the console from a pipe; at the marker it pauses
the VM and takes a full snapshot into a directory (``state`` and ``memory``), then kills the
template. Each clone loads it on its own tap, resumes and puts its identity in MMDS, which the
guest, still asking, then reads (:mod:`.firecracker`).

The template runs in a network namespace of its own that dies with it (``proc.spawn(own_netns=True)``),
where Firecracker makes its tap: it never had a network, and nothing of it outlives the process. It
runs unjailed, as root: it runs only the node's own guest image, with no identity and no workload.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import msgspec
import trio

from nex import logs, proc
from nex.api.agent import READY_MARKER, TEMPLATE_ARG
from nex.config import MachineTemplate
from nex.vm.firecracker import api
from nex.vm.snapshots import Made, TemplateFailed, TemplateSnapshots, program_version

from .firecracker import BOOT_ARGS, SOCKET_TIMEOUT, Snapshot, boot, create_snapshot, vm_config

log = logs.get("nex.vm")
SUFFIX = ".fcsnap"
TEMPLATE_TAP = "nxtemplate"  # in the template's own namespace: a clone moves the interface to its tap
TEMPLATE_MAC = "02:00:00:6e:78:01"  # a clone keeps it: the host side never looks at it (tc redirects)
MAX_CONSOLE = 1 << 20  # bytes of the template's console kept in ``template.log``


class FirecrackerTemplate:
    """How to name and make the template snapshot of a Firecracker driver's machines."""

    def __init__(
        self,
        *,
        firecracker: str,
        kernel: Path,
        rootfs: Path,
        initrd: Path | None,
        template: MachineTemplate,
        image_digest: str,
        boot_args: str = BOOT_ARGS,
    ) -> None:
        self.firecracker = firecracker
        self.kernel, self.rootfs, self.initrd = kernel, rootfs, initrd
        self.template = template
        self.image_digest = image_digest
        self.boot_args = f"{boot_args} {TEMPLATE_ARG}"

    def snapshots(self, directory: Path, timeout: float) -> TemplateSnapshots:
        return TemplateSnapshots(directory, key=self.key, make=self.make, suffix=SUFFIX, timeout=timeout)

    def config(self, directory: Path) -> api.VmConfig:
        return vm_config(
            kernel=str(self.kernel),
            initrd=str(self.initrd) if self.initrd is not None else None,
            rootfs=self.rootfs,
            template=self.template,
            boot_args=self.boot_args,
            tap=TEMPLATE_TAP,
            mac=TEMPLATE_MAC,
            files=lambda name: str(directory / name),
        )

    def key(self) -> str:
        """Names the snapshot (blocking): Firecracker's version, the image, and the configuration but
        the paths of the template's own files."""
        shape = msgspec.structs.replace(self.config(Path("/")), logger=None, metrics=None)
        text = "\0".join([program_version(self.firecracker), self.image_digest, api.body(shape).decode()])
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    async def make(self, path: Path) -> Made:
        """Boot the template, wait for its marker, and snapshot it into the new directory ``path``."""
        await trio.to_thread.run_sync(_lay_out, path)
        console = path.parent / "template.log"
        config = self.config(path)
        begun = time.monotonic()
        log.info("Booting the template VM for the pool's snapshot", console=str(console), driver="firecracker")
        read, write = os.pipe()
        try:
            child = proc.spawn(
                [self.firecracker, "--api-sock", "firecracker.sock", "--id", "nex-template"],
                cwd=path,
                stdout=write,
                stderr=write,
                own_netns=True,
            )
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)
        socket = path / "firecracker.sock"
        try:
            async with trio.lowlevel.FdStream(read) as stream, api.Client(socket) as client:
                await api.wait_for_socket(socket, SOCKET_TIMEOUT, alive=lambda: child.returncode is None)
                await boot(client, config, None)
                await _wait_for_marker(stream, console)
                booted = time.monotonic() - begun
                snapshot = Snapshot.inside(path)
                await create_snapshot(client, snapshot.state, snapshot.memory)
        except api.ApiError as exc:
            raise TemplateFailed(f"Firecracker refused the template: {exc}") from None
        finally:
            with trio.CancelScope(shield=True):
                child.signal(signal.SIGKILL)  # paused, or never ready: nothing to ask it
                await child.wait()
        size = await trio.to_thread.run_sync(_finish, path, snapshot)
        return Made(boot_s=booted, size=size)


def _lay_out(path: Path) -> None:
    path.mkdir(mode=0o700)
    for name in ("firecracker.log", "firecracker.metrics"):
        (path / name).touch()  # older Firecrackers need them to exist


def _finish(path: Path, snapshot: Snapshot) -> int:
    """Tidy the saved snapshot; its size."""
    (path / "firecracker.sock").unlink(missing_ok=True)
    for file in (snapshot.state, snapshot.memory):
        # a jailed clone opens them through a hard link in its jail, as its own uid; they hold the
        # template's memory, which has no identity yet, and the state directory stays closed
        file.chmod(0o644)
    return snapshot.state.stat().st_size + snapshot.memory.stat().st_size


async def _wait_for_marker(stream: trio.lowlevel.FdStream, console: Path) -> None:
    """Read the template's console into ``console`` until the guest's ready marker; TemplateFailed
    if the console closes first (Firecracker, or the guest, ended)."""
    seen = b""
    marker = READY_MARKER.encode()
    with console.open("wb") as out:
        while marker not in seen:
            chunk = await stream.receive_some(65536)
            if not chunk:
                tail = seen[-400:].decode(errors="replace")
                raise TemplateFailed(f"the template VM ended before its agent was ready; its console ended: {tail}")
            if out.tell() < MAX_CONSOLE:
                out.write(chunk)
                out.flush()
            seen = (seen + chunk)[-(len(marker) + 65536) :]
