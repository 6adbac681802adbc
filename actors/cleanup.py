"""Cancellation-safe release of external resources, with an on-disk journal for crash recovery.

Processes, network namespaces, links and address leases live outside the Python process, so Trio's
cancellation cannot undo them. A :class:`CleanupStack` pairs each acquisition with its release and,
however its owner ends (normal exit, crash, cancellation, a second Ctrl-C), releases what was acquired
in reverse order, each release in its own shielded scope bounded by ``release_timeout``. One release
failing or overrunning does not skip the others.

With a :class:`Journal`, a record of each resource is written *before* it is created and removed after
it is released. If the process dies in between (SIGKILL, power loss of the process, a bug), the record
stays on disk and :func:`recover` lets the next process release what was left behind.

Synopsis::

    async with CleanupStack(journal=Journal(state_dir / "journal"), owner="machine-1") as stack:
        ns = await stack.acquire("netns nx1", create_netns, delete_netns, kind="netns", data={"name": "nx1"})
        stack.push("veth nx1h", delete_veth_if_present, kind="link", data={"name": "nx1h"})
        await create_veth()  # if this is cancelled half-way, the idempotent release still runs
        ...
    # here both are released, veth first, whatever happened above

Two ways to register a release:

- :meth:`CleanupStack.acquire` runs ``create`` shielded from cancellation (bounded by
  ``acquire_timeout``) and registers ``release(value)`` once it returns: an acquisition is atomic,
  so a resource is released exactly once if it was acquired and never if it was not. A cancellation
  that arrives meanwhile takes effect at the owner's next checkpoint.
- :meth:`CleanupStack.push` registers an idempotent release *before* the resource is created, for
  operations that can be interrupted after the kernel already made the object.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import msgspec
import trio

from .errors import CleanupFailed

log = logging.getLogger("actors.cleanup")

R = TypeVar("R")
JsonScalar = str | int | float | bool | None


class ResourceRecord(msgspec.Struct, frozen=True):
    """What was (about to be) created, by whom, written before the creation."""

    kind: str
    name: str
    data: dict[str, JsonScalar]
    owner: str
    pid: int
    created: float


class Journal:
    """A directory of resource records, one small JSON file per live resource.

    Files are written atomically (write to a temporary name, then rename), so a reader never sees a
    half-written record. They are plain files so that an operator can read them too.
    """

    _seq = itertools.count()

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def write(self, record: ResourceRecord) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{record.kind}-{record.name}")[:80]
        path = self.directory / f"{time.time_ns()}-{record.pid}-{next(self._seq)}-{stem}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(msgspec.json.encode(record))
        tmp.rename(path)
        return path

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def records(self) -> list[tuple[Path, ResourceRecord]]:
        """Every record on disk, newest first (the order in which to release them).

        A file that cannot be decoded is logged and skipped, never deleted: an operator may need it.
        """
        if not self.directory.is_dir():
            return []
        found: list[tuple[int, Path, ResourceRecord]] = []
        for path in self.directory.glob("*.json"):
            try:
                record = msgspec.json.decode(path.read_bytes(), type=ResourceRecord)
                created_ns = int(path.name.split("-", 1)[0])
            except (OSError, ValueError, msgspec.DecodeError) as exc:
                log.warning("unreadable cleanup record %s: %s", path, exc)
                continue
            found.append((created_ns, path, record))
        found.sort(key=lambda item: item[0], reverse=True)
        return [(path, record) for _, path, record in found]


Releaser = Callable[[ResourceRecord], Awaitable[object]]


async def recover(
    journal: Journal,
    releasers: Mapping[str, Releaser],
    *,
    is_stale: Callable[[ResourceRecord], bool] = lambda record: True,
    release_timeout: float = 5.0,
) -> list[ResourceRecord]:
    """Release what an earlier process left behind, newest first; return what was released.

    ``releasers`` maps a record's ``kind`` to an idempotent release. ``is_stale`` decides whether a
    record belongs to a dead owner (for example, its pid is gone); live owners' records are skipped.
    A record whose kind has no releaser, or whose release fails, stays on disk and is logged.
    """
    released: list[ResourceRecord] = []
    for path, record in journal.records():
        if not is_stale(record):
            continue
        release = releasers.get(record.kind)
        if release is None:
            log.warning("no releaser for leftover %s %s (%s)", record.kind, record.name, path)
            continue
        error = await _release_one(record.name, functools.partial(release, record), release_timeout)
        if error is None:
            journal.remove(path)
            released.append(record)
        else:
            log.error("could not release leftover %s %s: %s", record.kind, record.name, error)
    return released


class _Entry:
    __slots__ = ("name", "path", "release")

    def __init__(self, name: str, release: Callable[[], Awaitable[object]], path: Path | None) -> None:
        self.name = name
        self.release = release
        self.path = path


class CleanupStack:
    """Acquire/release pairs released in reverse order, shielded and bounded, whatever happens.

    Args:
        journal: where to record resources before creating them; ``None`` keeps no records.
        owner: written into each record (an actor name), to tell an operator whose it was.
        release_timeout: the deadline of each release, in seconds. Releases run shielded from
            cancellation, so this bound is what keeps a stuck release from hanging shutdown.
        acquire_timeout: the deadline of each ``create`` in :meth:`acquire`, which also runs shielded.
    """

    def __init__(
        self,
        *,
        journal: Journal | None = None,
        owner: str = "",
        release_timeout: float = 5.0,
        acquire_timeout: float = 30.0,
    ) -> None:
        self.journal = journal
        self.owner = owner
        self.release_timeout = release_timeout
        self.acquire_timeout = acquire_timeout
        self._entries: list[_Entry] = []
        self._closed = False
        self.failures: list[tuple[str, BaseException]] = []

    async def __aenter__(self) -> CleanupStack:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        failures = await self._release_all()
        if not failures:
            return
        if exc is None:
            raise CleanupFailed(failures)
        for name, error in failures:
            exc.add_note(f"while unwinding, {name} could not be released: {error!r}")

    def __len__(self) -> int:
        return len(self._entries)

    async def acquire(
        self,
        name: str,
        create: Callable[[], Awaitable[R]],
        release: Callable[[R], Awaitable[object]],
        *,
        kind: str = "resource",
        data: Mapping[str, JsonScalar] | None = None,
        durable: bool = True,
    ) -> R:
        """Record, run ``create()`` shielded, register ``release(value)``, and return the value.

        ``create`` cannot be interrupted by the owner's cancellation, so keep it short: make the
        object, do not wait on anything else. If it raises, nothing is registered and the record is
        removed (a ``create`` that fails must leave nothing behind). If it overruns
        ``acquire_timeout`` it is cut off, ``trio.TooSlowError`` is raised, and the record stays on
        disk for :func:`recover`, since the resource may exist in part.
        """
        path = self._record(name, kind, data, durable)
        value: R
        finished = False
        with trio.move_on_after(self.acquire_timeout, shield=True):
            try:
                value = await create()
            except Exception:
                if path is not None and self.journal is not None:
                    self.journal.remove(path)
                raise
            finished = True
        if not finished:
            log.error(
                "acquiring %s (owner %s) overran its %gs deadline",
                name,
                self.owner or "?",
                self.acquire_timeout,
            )
            raise trio.TooSlowError(f"acquiring {name} overran its {self.acquire_timeout:g}s deadline")
        self._entries.append(_Entry(name, lambda: release(value), path))
        return value

    def push(
        self,
        name: str,
        release: Callable[[], Awaitable[object]],
        *,
        kind: str = "resource",
        data: Mapping[str, JsonScalar] | None = None,
        durable: bool = True,
    ) -> None:
        """Record and register an idempotent ``release()`` now, before the resource is created.

        ``durable=False``: no journal record, for what cannot outlive this process anyway (state in
        memory, a child that dies with its parent).
        """
        path = self._record(name, kind, data, durable)
        self._entries.append(_Entry(name, release, path))

    async def aclose(self) -> None:
        """Release everything now, in reverse order. Raises :class:`CleanupFailed` if any failed."""
        failures = await self._release_all()
        if failures:
            raise CleanupFailed(failures)

    def _record(self, name: str, kind: str, data: Mapping[str, JsonScalar] | None, durable: bool) -> Path | None:
        if self._closed:
            raise RuntimeError(f"cleanup stack of {self.owner or 'an actor'} is closed; cannot acquire {name}")
        if self.journal is None or not durable:
            return None
        record = ResourceRecord(
            kind=kind,
            name=name,
            data=dict(data or {}),
            owner=self.owner,
            pid=os.getpid(),
            created=time.time(),
        )
        return self.journal.write(record)

    async def _release_all(self) -> list[tuple[str, BaseException]]:
        self._closed = True
        failures: list[tuple[str, BaseException]] = []
        while self._entries:
            entry = self._entries.pop()
            error = await _release_one(entry.name, entry.release, self.release_timeout)
            if error is None:
                if entry.path is not None and self.journal is not None:
                    self.journal.remove(entry.path)
            else:
                log.error("release of %s (owner %s) failed: %r", entry.name, self.owner or "?", error)
                failures.append((entry.name, error))
        self.failures.extend(failures)
        return failures


async def _release_one(name: str, release: Callable[[], Awaitable[object]], timeout: float) -> BaseException | None:
    """Run one release shielded and bounded; return its error (or a TooSlowError) instead of raising."""
    with trio.move_on_after(timeout, shield=True) as scope:
        try:
            await release()
        except Exception as exc:
            return exc
    if scope.cancelled_caught:
        return trio.TooSlowError(f"release of {name} overran its {timeout:g}s deadline")
    return None
