"""The warm pool's fast path: one template VM per image, saved once, restored by every machine.

The first machine that needs it boots the template VM (no identity, no network), waits for its agent
to say ready (imports done, waiting for an identity), and saves it to a file named by
:meth:`~nex.vm.qemu.command.VmSpec.snapshot_key` (image, qemu version, command line): a change of any
of them names another file, and the stale ones are removed. The file is written whole or not at all.
Restoring a clone then takes a fraction of a second where a cold boot under TCG takes many seconds.

If the template cannot be saved, machines cold-boot for the rest of the node's life, and the node
says so once.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import trio

from nex import logs

from .command import VmSpec
from .qmp import QmpError
from .vm import QemuVm, VmFailed, launch, save_snapshot

log = logs.get("nex.vm")
SUFFIX = ".vmstate"


class Snapshots:
    def __init__(
        self, spec: VmSpec, directory: Path, image_digest: str, boot_timeout: float, runas: int | None = None
    ) -> None:
        self.spec = spec
        self.runas = runas  # the template's qemu's uid
        self.directory = directory
        self.image_digest = image_digest
        self.boot_timeout = boot_timeout
        self.failed = ""  # why machines cold-boot, once the template could not be saved
        self._lock = trio.Lock()
        self._path: Path | None = None

    async def get(self) -> Path | None:
        """The snapshot to restore machines from, made if needed; None: cold-boot (see ``failed``)."""
        async with self._lock:  # one template at a time; the others wait for it
            if self._path is not None and self._path.exists():
                return self._path
            if self.failed:
                return None
            version = await trio.to_thread.run_sync(qemu_version, self.spec.qemu)
            path = self.directory / (self.spec.snapshot_key(version, self.image_digest) + SUFFIX)
            self._remove_stale(keep=path)  # another image's or qemu's, or one a killed node left half-written
            if not path.exists():
                try:
                    await self._make(path)
                except (VmFailed, QmpError, OSError, trio.TooSlowError) as exc:
                    why = "it did not become ready in time" if isinstance(exc, trio.TooSlowError) else str(exc)
                    self.failed = f"the template VM could not be saved: {why}"
                    log.warning("Machines will boot without a snapshot", reason=self.failed)
                    return None
            self._path = path
            return path

    def forget(self, why: str) -> None:
        """A restore from the snapshot failed: drop it (the next machine makes a new one)."""
        if self._path is not None:
            log.warning("Dropped the template snapshot", path=str(self._path), reason=why)
            self._path.unlink(missing_ok=True)
            self._path = None

    async def _make(self, path: Path) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        console = self.directory / "template.log"
        console.unlink(missing_ok=True)
        started: list[QemuVm] = []
        begun = time.monotonic()
        log.info("Booting the template VM for the pool's snapshot", console=str(console), accel=self.spec.accel)
        try:
            with trio.fail_after(self.boot_timeout):
                vm = await launch(self.spec, console=console, started=started, runas=self.runas)
                await vm.read_ready()
            booted = time.monotonic() - begun
            size = await save_snapshot(vm, path)
        finally:
            with trio.CancelScope(shield=True):
                for vm in started:
                    await vm.stop(grace=1.0)
        log.info(
            "Saved the template VM",
            path=str(path),
            boot_s=f"{booted:.2f}",
            save_s=f"{time.monotonic() - begun - booted:.2f}",
            mib=size >> 20,
        )

    def _remove_stale(self, keep: Path) -> None:
        for stale in [*self.directory.glob("*" + SUFFIX), *self.directory.glob("*.partial")]:
            if stale != keep:
                stale.unlink(missing_ok=True)


def qemu_version(qemu: str) -> str:
    """qemu's first ``--version`` line (its snapshots fit only the same version)."""
    try:
        result = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise OSError(f"cannot run {qemu} --version: {exc}") from None
    return result.stdout.splitlines()[0] if result.stdout else ""
