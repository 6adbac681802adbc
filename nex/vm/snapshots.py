"""The warm pool's fast path, for any VM driver: one template snapshot per key, made once, restored by
every machine.

A driver says how to name its template (a key: the image, the hypervisor's version, the VM's shape,
so that a change of any of them names another snapshot) and how to make one (boot a template VM to
"agent ready, no identity yet" and save it). :class:`TemplateSnapshots` does the rest, the same for
every driver: the first machine that needs the snapshot makes it while the others wait on a lock; it
is written under a ``.partial`` name and renamed whole, so a node killed halfway leaves no snapshot
that looks complete; stale and partial ones are removed; a restore that fails drops it (the next
machine makes a new one); and if the template cannot be made, machines cold-boot for the rest of the
node's life and the node says so once.

A snapshot is a file or a directory (Firecracker's are two files), named ``<key><suffix>``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from nex import logs

log = logs.get("nex.vm")
PARTIAL = ".partial"


class TemplateFailed(Exception):
    """The template VM could not be made or saved (the message says why)."""


@dataclass(frozen=True)
class Made:
    """What making a template took: its boot (to "agent ready") and the snapshot's size."""

    boot_s: float
    size: int


class TemplateSnapshots:
    """The template snapshot of one driver under ``directory``.

    ``key`` (blocking: run in a thread) names the snapshot; ``make(path)`` boots a template VM and
    saves it at ``path`` (a file or a directory that does not exist yet), saying what it took, or raising
    :class:`TemplateFailed` or :class:`OSError` when it cannot; ``timeout`` bounds it.
    """

    def __init__(
        self,
        directory: Path,
        *,
        key: Callable[[], str],
        make: Callable[[Path], Awaitable[Made]],
        suffix: str,
        timeout: float,
    ) -> None:
        self.directory = directory
        self.key = key
        self.make = make
        self.suffix = suffix
        self.timeout = timeout
        self.failed = ""  # why machines cold-boot, once the template could not be saved
        self._lock = trio.Lock()
        self._path: Path | None = None

    @property
    def made(self) -> bool:
        """Whether the snapshot is there already (a :meth:`get` returns at once)."""
        return self._path is not None

    async def get(self) -> Path | None:
        """The snapshot to restore machines from, made if needed; None: cold-boot (see ``failed``)."""
        async with self._lock:  # one template at a time; the others wait for it
            if self._path is not None and self._path.exists():
                return self._path
            if self.failed:
                return None
            try:
                path = self.directory / (await trio.to_thread.run_sync(self.key) + self.suffix)
                self.directory.mkdir(parents=True, exist_ok=True)
                self._remove_stale(keep=path)  # another image's or version's, or one a killed node left half-written
                if not path.exists():
                    await self._make(path)
            except (TemplateFailed, OSError, trio.TooSlowError) as exc:
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
            _remove(self._path)
            self._path = None

    async def _make(self, path: Path) -> None:
        partial = path.with_name(path.name + PARTIAL)
        _remove(partial)
        begun = time.monotonic()
        try:
            with trio.fail_after(self.timeout):
                made = await self.make(partial)
            partial.rename(path)
            log.info(
                "Saved the template VM",
                path=str(path),
                boot_s=f"{made.boot_s:.2f}",
                save_s=f"{time.monotonic() - begun - made.boot_s:.2f}",
                mib=made.size >> 20,
            )
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_remove, partial)

    def _remove_stale(self, keep: Path) -> None:
        for stale in [*self.directory.glob("*" + self.suffix), *self.directory.glob("*" + PARTIAL)]:
            if stale != keep:
                _remove(stale)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def program_version(program: str) -> str:
    """``program --version``'s first line (blocking): a snapshot fits only the hypervisor version that
    saved it."""
    try:
        result = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise OSError(f"cannot run {program} --version: {exc}") from None
    return result.stdout.splitlines()[0] if result.stdout else ""
