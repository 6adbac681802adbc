"""The per-machine cgroup: the kernel's enforcement of a machine's template (memory, CPUs, pids, cpuset).

The node creates one cgroup per machine, named by the caller (``nx`` + 10 lowercase hex digits), before
the machine's agent starts; the agent moves itself into it with :func:`join` before it forks anything, so
every process of the machine, the workload included, is inside and charged there. What is enforced:

- **memory**: ``memory_bytes`` for everything the machine's processes use, page cache and the tmpfs
  pages they write included (the kernel charges those to the writer's cgroup). Where the kernel
  accounts swap, swap is capped too, so that the limit cannot be escaped by swapping: cgroup v1 sets
  ``memory.memsw.limit_in_bytes`` (memory + swap) to the same value, cgroup v2 ``memory.swap.max`` to 0.
  Going over the limit gets the largest process of the machine OOM-killed (see :func:`oom_kills`);
- **CPU**: a CFS bandwidth quota of ``cpus`` CPUs per 100 ms period (v1 ``cpu.cfs_quota_us``, v2
  ``cpu.max``): the machine's threads together get at most that much CPU time per period;
- **pids**: at most ``pids_max`` tasks (processes and threads); a fork beyond fails with ``EAGAIN``
  (see :func:`pids_limit_hits`);
- **cpuset** (optional): the CPUs the machine may run on.

Both cgroup versions are handled, because this node runs on hosts of both kinds: most current
distributions run cgroup v2 alone (systemd's unified hierarchy), others, and this project's test machine,
the controllers as v1 hierarchies, each mounted on its own (or a few together, as ``cpu,cpuacct``).
:meth:`Hierarchy.detect` reads the mount table once per node and picks v2 when its mount offers memory,
cpu and pids, v1 otherwise; everything after that works on the paths found then.

The differences that matter, and how each is handled:

- v1 has one directory per hierarchy (memory, cpu, cpuacct, pids, and cpuset when a cpuset is asked or
  when cpuset shares a mount with one of those); v2 has one directory in all. :meth:`Hierarchy.paths`
  lists them; :func:`join` writes to each.
- v2 delegates a controller to children only when the parent lists it in ``cgroup.subtree_control``,
  and refuses to enable one in a cgroup that holds processes (the "no internal processes" rule, except
  at the root); :meth:`Hierarchy.create` enables what is missing and turns the refusal into an error
  telling the operator to choose a parent without processes.
- a v1 cpuset cgroup starts with empty ``cpuset.cpus`` and ``cpuset.mems``, and no task can join it
  until both are set: they are copied from the parent (the CPUs unless a cpuset was asked).
- v2 kills a whole cgroup at once with ``cgroup.kill`` and says when it is empty in ``cgroup.events``;
  v1 has neither, so every pid in ``cgroup.procs`` is SIGKILLed, again and again until none is left (a
  process may fork while it is being killed).

Names and parents reach the filesystem only after validation (``^nx[0-9a-f]{10}$``, no ``..``): crash
recovery calls :meth:`Hierarchy.remove` with names read back from a journal on disk, and a journal
entry must never make the node kill processes or remove cgroups that are not its own machines'.

All calls block (the node makes them from a worker thread). :meth:`Hierarchy.create` is on every
machine's start, so it does the least it can: no mount table read (a :class:`Hierarchy` is detected
once), string paths and ``os.open``/``os.write`` rather than :mod:`pathlib` helpers, and only the writes
that change something (a new v1 cgroup's CFS period is already the kernel's default of 100 ms): the
kernel's own ``mkdir`` and writes are most of its cost.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

#: the CFS bandwidth period: 100 ms, the kernel's default, so that a quota of N CPUs is N × 100 ms
PERIOD_US = 100_000

#: the controllers a machine's cgroup cannot do without, in either version
REQUIRED = ("memory", "cpu", "pids")

_NAME = re.compile(r"nx[0-9a-f]{10}")
_CPU_LIST = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")
_ESCAPE = re.compile(r"\\([0-7]{3})")
_V1_ORDER = ("memory", "cpu", "cpuacct", "pids", "cpuset")  # the hierarchies a machine may use, in order
_V2_ORDER = ("memory", "cpu", "pids", "cpuset")

# Seams for the unit tests of the v2 file protocol, which run on a plain directory tree: there, making
# a cgroup must also make the interface files the kernel would. Nothing else replaces these.
_mkdir = os.mkdir
_rmdir = os.rmdir


class CgroupError(Exception):
    """A cgroup could not be detected, created, joined, read or removed; the message says which file
    or directory, the kernel's reason, and what the operator can do about it."""


@dataclass(frozen=True)
class Limits:
    """What a machine's cgroup enforces: its template, in the kernel's units.

    Attributes:
        memory_bytes: memory of all the machine's processes together (``memsize_mib`` × 2**20).
        cpus: CPUs' worth of time per period (``vcpu_count``), enforced as a quota, not a pinning.
        pids_max: processes and threads, the agent included.
        cpuset: CPUs the machine may run on, in the kernel's list format (``"0-1"``, ``"0,2"``); ``""``
            leaves the parent's.
    """

    memory_bytes: int
    cpus: int
    pids_max: int
    cpuset: str = ""

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0:
            raise ValueError(f"memory_bytes must be positive, not {self.memory_bytes}")
        if self.cpus <= 0:
            raise ValueError(f"cpus must be positive, not {self.cpus}")
        if self.pids_max <= 0:
            raise ValueError(f"pids_max must be positive, not {self.pids_max}")
        if self.cpuset and not _CPU_LIST.fullmatch(self.cpuset):
            raise ValueError(f"cpuset must be a CPU list such as '0-1' or '0,2', not {self.cpuset!r}")


class _Exists(Exception):
    """The machine's cgroup exists already (left by a node that crashed): :meth:`Hierarchy.create`
    removes it and makes it afresh."""


@dataclass(frozen=True)
class Hierarchy:
    """Where this host's cgroup controllers are mounted, found once per node by :meth:`detect`.

    Attributes:
        version: 1 for controllers mounted as v1 hierarchies, 2 for the unified hierarchy.
        mounts: (controller, mount point) for every controller this module uses that the host offers:
            v1: the mount of each controller's hierarchy (several controllers may share one);
            v2: every controller listed in the cgroup2 mount's ``cgroup.controllers``, all at that mount.

    A ``parent`` given to the methods below is a path relative to each hierarchy's mount point (the
    root of the hierarchy as this process sees it; ``""`` is that root), such as ``"nex"``.
    """

    version: Literal[1, 2]
    mounts: tuple[tuple[str, Path], ...]

    @classmethod
    def detect(cls, mountinfo: str | None = None) -> Hierarchy:
        """Find the cgroup hierarchies this node can use, from ``mountinfo`` (``/proc/self/mountinfo``'s
        format; by default that file).

        cgroup v2 is chosen when a cgroup2 mount offers memory, cpu and pids in its
        ``cgroup.controllers``; otherwise cgroup v1 when those three are mounted as v1 hierarchies,
        read-write. cpuacct (v1, for :func:`cpu_usage_ns`) and cpuset are used when present.

        Raises:
            CgroupError: neither version offers what a machine needs; the message lists what was found.
        """
        if mountinfo is None:
            try:
                mountinfo = Path("/proc/self/mountinfo").read_text()
            except OSError as exc:
                raise CgroupError(f"cannot read /proc/self/mountinfo: {exc.strerror}; is /proc mounted?") from exc
        v1: dict[str, Path] = {}
        v1_read_only: dict[str, Path] = {}
        unified: list[str] = []  # why each cgroup2 mount will not do
        for line in mountinfo.splitlines():
            before, sep, after = line.partition(" - ")
            fields, super_fields = before.split(), after.split()
            if not sep or len(fields) < 6 or len(super_fields) < 3:
                continue
            fstype, mount_point = super_fields[0], Path(_unescape(fields[4]))
            read_only = "ro" in fields[5].split(",")
            if fstype == "cgroup2":
                if read_only:
                    unified.append(f"cgroup2 at {mount_point} is mounted read-only")
                    continue
                try:
                    offered = set(_read(f"{mount_point}/cgroup.controllers").split())
                except CgroupError as exc:
                    unified.append(str(exc))
                    continue
                if offered.issuperset(REQUIRED):
                    return cls(2, tuple((c, mount_point) for c in _V2_ORDER if c in offered))
                unified.append(
                    f"cgroup2 at {mount_point} offers {', '.join(sorted(offered)) or 'no controllers'}, "
                    f"not all of {', '.join(REQUIRED)}"
                )
            elif fstype == "cgroup":
                for option in super_fields[2].split(","):
                    if option in _V1_ORDER:
                        (v1_read_only if read_only else v1).setdefault(option, mount_point)
        missing = [c for c in REQUIRED if c not in v1]
        if not missing:
            return cls(1, tuple((c, v1[c]) for c in _V1_ORDER if c in v1))
        reasons = []
        for controller in missing:
            if controller in v1_read_only:
                reasons.append(f"the {controller} controller is mounted read-only at {v1_read_only[controller]}")
            else:
                reasons.append(f"no {controller} controller mounted")
        raise CgroupError(
            "no usable cgroup hierarchy: "
            + "; ".join([*unified, *reasons])
            + ". Machines need the memory, cpu and pids controllers, writable, as cgroup v2 or v1 "
            "(a container must be given a writable cgroup mount)."
        )

    def describe(self) -> str:
        """One line for the node's start-up message, e.g. ``cgroup v1 (memory, cpu, cpuacct, pids, cpuset)``."""
        controllers = ", ".join(c for c, _ in self.mounts)
        if self.version == 2:
            return f"cgroup v2 at {self._v2_root} ({controllers})"
        return f"cgroup v1 ({controllers})"

    def paths(self, name: str, parent: str = "", *, cpuset: bool = False) -> list[Path]:
        """Every directory the machine ``name``'s cgroup has: v1, one per hierarchy it uses (the
        cpuset hierarchy only with ``cpuset``, i.e. when its limits asked for a cpuset); v2, one.

        Raises:
            ValueError: ``name`` or ``parent`` is not one of ours (see :meth:`create`).
        """
        base = _relative(parent) + "/" + _checked(name)
        return [Path(root + base) for root in (self._roots_cpuset if cpuset else self._roots)]

    def create(self, name: str, limits: Limits, parent: str = "") -> list[Path]:
        """Make the machine ``name``'s cgroup under ``parent`` with ``limits``; return its directories
        (give them to :func:`join`, in the agent).

        Missing parent directories are made (and, v2, given the controllers) and left in place: other
        machines share them. A cgroup of that name that exists already was left by a node that crashed:
        its processes are killed and it is made afresh, so its limits are exactly ``limits`` and its
        counters (OOM kills, pids limit hits, CPU time) start from zero. If any step fails, whatever
        this call made for the machine is removed before the error is raised.

        Raises:
            ValueError: ``name`` does not match ``^nx[0-9a-f]{10}$`` or ``parent`` contains ``..``.
            CgroupError: a step failed; the message says which and why.
        """
        base = _relative(parent) + "/" + _checked(name)
        if limits.cpuset and "cpuset" not in self._mount_of:
            raise CgroupError(
                f"a cpuset ({limits.cpuset}) was asked but this host's {self.describe()} has no cpuset "
                "controller: leave the cpuset unset or enable the controller"
            )
        make = self._create_v2 if self.version == 2 else self._create_v1
        try:
            return make(base, limits)
        except _Exists:
            pass
        self.remove(name, parent)
        try:
            return make(base, limits)
        except _Exists:
            raise CgroupError(
                f"cgroup {name} reappeared while it was being made afresh: is another node using the same "
                "cgroup parent? Give each node a parent of its own."
            ) from None

    def remove(self, name: str, parent: str = "", timeout: float = 5.0) -> None:
        """Kill every process in the machine ``name``'s cgroup and remove all its directories, within
        ``timeout`` seconds. Idempotent: a cgroup that is not there (or only partly) is fine.

        v2 writes ``cgroup.kill`` and waits for ``cgroup.events`` to say ``populated 0``; v1 SIGKILLs
        every pid in ``cgroup.procs`` until none is left. Child cgroups (which the machine cannot make
        without privileges, but a crashed node's could) are removed first, the same way. A directory
        can stay busy for a moment after its last task was killed; that is retried until the deadline.

        Raises:
            ValueError: ``name`` or ``parent`` is not one of ours.
            CgroupError: something survived ``timeout`` seconds (the message names what), or the caller
                itself is in the cgroup.
        """
        base = _relative(parent) + "/" + _checked(name)
        deadline = time.monotonic() + timeout
        for root in self._roots_cpuset:
            self._remove_tree(root + base, deadline, timeout)

    # ------------------------------------------------------------------------------------------- v1 --

    def _create_v1(self, base: str, limits: Limits) -> list[Path]:
        made: list[str] = []
        try:
            for root in self._roots_cpuset if limits.cpuset else self._roots:
                path = root + base
                self._make_v1(path, root)
                made.append(path)
                if root == self._cpuset_root:
                    self._fill_cpuset_v1(path, limits.cpuset)
            memory = self._mount_str["memory"] + base
            amount = str(limits.memory_bytes)
            _write(memory + "/memory.limit_in_bytes", amount, "set the memory limit")
            # memory + swap, no more than memory: swapping cannot take the machine past its limit. The
            # file exists only where the kernel accounts swap (CONFIG_MEMCG_SWAP and swapaccount).
            _write(memory + "/memory.memsw.limit_in_bytes", amount, "cap memory + swap", optional=True)
            # v1 charges socket buffers only to a memcg whose TCP limit is set (v2 always does): without
            # it, a workload can hold the host's TCP memory in loopback connections it never reads
            _write(memory + "/memory.kmem.tcp.limit_in_bytes", amount, "cap TCP buffers", optional=True)
            # A new cgroup's period is the kernel's default, 100 ms (PERIOD_US): only the quota is written.
            quota = str(limits.cpus * PERIOD_US)
            _write(self._mount_str["cpu"] + base + "/cpu.cfs_quota_us", quota, "set the CPU quota")
            _write(self._mount_str["pids"] + base + "/pids.max", str(limits.pids_max), "set the pids limit")
        except BaseException as exc:
            self._undo(made, exc)
            raise
        return [Path(p) for p in made]

    def _make_v1(self, path: str, root: str) -> None:
        """Make a machine's directory in one hierarchy, and its parents (v1) if they are missing."""
        try:
            _mkdir(path)
        except FileExistsError:
            raise _Exists from None
        except FileNotFoundError:
            if path.count("/") == root.count("/") + 1:
                raise CgroupError(f"cannot make {path}: the hierarchy's mount point {root} is gone") from None
            self._mkparents_v1(path.rpartition("/")[0], root)
            self._make_v1(path, root)
        except OSError as exc:
            raise _error(f"make the cgroup {path}", exc) from exc

    def _mkparents_v1(self, parent: str, root: str) -> None:
        """Make ``parent`` and the directories above it, up to ``root``; in a cpuset hierarchy each is
        given its parent's CPUs and memory nodes (without them no task could ever join below)."""
        above = parent.rpartition("/")[0]
        if not os.path.isdir(above):
            self._mkparents_v1(above, root)
        try:
            _mkdir(parent)
        except FileExistsError:
            return
        except OSError as exc:
            raise _error(f"make the parent cgroup {parent}", exc) from exc
        if root == self._cpuset_root:
            self._fill_cpuset_v1(parent, "")

    @staticmethod
    def _fill_cpuset_v1(path: str, cpus: str) -> None:
        """A v1 cpuset cgroup starts empty and no task can join it: give it ``cpus`` (the parent's when
        empty) and the parent's memory nodes."""
        parent = path.rpartition("/")[0]
        if not cpus:
            cpus = _read(parent + "/cpuset.cpus").strip()
        _write(path + "/cpuset.cpus", cpus, f"set the cpuset (it must lie within {parent}/cpuset.cpus)")
        _write(path + "/cpuset.mems", _read(parent + "/cpuset.mems").strip(), "copy the parent's memory nodes")

    # ------------------------------------------------------------------------------------------- v2 --

    def _create_v2(self, base: str, limits: Limits) -> list[Path]:
        root = self._v2_root_str
        parent = root + base.rpartition("/")[0]
        needed = ("memory", "cpu", "pids", "cpuset") if limits.cpuset else REQUIRED
        self._delegate_v2(parent, needed)
        path = root + base
        try:
            _mkdir(path)
        except FileExistsError:
            raise _Exists from None
        except OSError as exc:
            raise _error(f"make the cgroup {path}", exc) from exc
        try:
            _write(path + "/memory.max", str(limits.memory_bytes), "set the memory limit")
            # No swap at all: a machine's memory cannot grow past memory.max by being swapped out. The
            # file exists only where the kernel accounts swap (CONFIG_MEMCG_SWAP).
            _write(path + "/memory.swap.max", "0", "forbid swap", optional=True)
            _write(path + "/cpu.max", f"{limits.cpus * PERIOD_US} {PERIOD_US}", "set the CPU quota")
            _write(path + "/pids.max", str(limits.pids_max), "set the pids limit")
            if limits.cpuset:
                _write(path + "/cpuset.cpus", limits.cpuset, "set the cpuset")
        except BaseException as exc:
            self._undo([path], exc)
            raise
        return [Path(path)]

    def _delegate_v2(self, parent: str, needed: Sequence[str]) -> None:
        """See that ``parent`` exists and has ``needed`` in its ``cgroup.subtree_control``, making and
        enabling what is missing from the root down (a controller can be enabled only where the level
        above has enabled it). Usually one read: the parent has them already."""
        try:
            if set(_read(parent + "/cgroup.subtree_control").split()).issuperset(needed):
                return
        except CgroupError:
            pass  # a parent not made yet: made below
        path = self._v2_root_str
        self._enable_v2(path, needed, is_root=True)
        below = parent[len(path) + 1 :]
        for part in below.split("/") if below else []:
            path += "/" + part
            try:
                _mkdir(path)
            except FileExistsError:
                pass
            except OSError as exc:
                raise _error(f"make the parent cgroup {path}", exc) from exc
            self._enable_v2(path, needed, is_root=False)

    @staticmethod
    def _enable_v2(path: str, needed: Sequence[str], *, is_root: bool) -> None:
        control = path + "/cgroup.subtree_control"
        missing = [c for c in needed if c not in _read(control).split()]
        if not missing:
            return
        refusal = (
            f"cannot enable {', '.join(missing)} for the machines under {path}: it holds processes, and "
            "cgroup v2 delegates controllers only from cgroups without processes (except the root). "
            "Choose a cgroup parent that holds no processes (e.g. a new child cgroup of this one)"
        )
        # Checked first to say why, rather than leave the operator with the kernel's EBUSY.
        if not is_root and _read(path + "/cgroup.procs").split():
            raise CgroupError(refusal)
        try:
            _write_raw(control, " ".join("+" + c for c in missing))
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise CgroupError(refusal) from exc
            raise _error(
                f"enable {', '.join(missing)} in {control} (each must be listed in {path}/cgroup.controllers)",
                exc,
            ) from exc

    # --------------------------------------------------------------------------------- removal, both --

    def _undo(self, made: Sequence[str], exc: BaseException) -> None:
        """Remove the directories a failed create made (newest first); a failure here is added to the
        error being raised, which stays the one reported."""
        deadline = time.monotonic() + 5.0
        for path in reversed(made):
            try:
                self._remove_tree(path, deadline, 5.0)
            except CgroupError as undo:
                exc.add_note(f"and it could not be undone: {undo}")

    def _remove_tree(self, path: str, deadline: float, timeout: float) -> None:
        """Empty ``path`` of processes, remove its child cgroups, then it, before ``deadline``."""
        delay = 0.0005
        while True:
            if not self._drain(path, deadline, timeout):
                return  # gone
            try:
                _rmdir(path)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    raise _error(f"remove the cgroup {path}", exc) from exc
                children = _children(path)
                for child in children:
                    self._remove_tree(child, deadline, timeout)
                if children:
                    continue
                if time.monotonic() >= deadline:
                    raise CgroupError(
                        f"cannot remove the cgroup {path} within {timeout:g}s: {exc.strerror} "
                        "(a task in it has not finished exiting; try again, or see its tasks file)"
                    ) from exc
                time.sleep(delay)  # a task just killed can keep the cgroup busy for a moment
                delay = min(delay * 2, 0.01)

    def _drain(self, path: str, deadline: float, timeout: float) -> bool:
        """Kill every process in ``path`` (and, v2, below it) and wait until they are gone; False if
        ``path`` does not exist (or stopped existing meanwhile: another remover was quicker)."""
        if self.version == 1:
            return self._drain_by_signals(path, deadline, timeout)
        populated = _populated(path)
        if not populated:
            return populated is not None
        pids = _listed(path)
        if pids is None:
            return False
        _not_caller(path, pids)
        try:
            _write_raw(path + "/cgroup.kill", "1")  # the kernel kills the subtree, forks in flight included
        except FileNotFoundError:
            return self._drain_by_signals(path, deadline, timeout)  # no cgroup.kill before Linux 5.14 (or gone)
        except OSError as exc:
            raise _error(f"write 1 to {path}/cgroup.kill", exc) from exc
        delay = 0.0005
        while populated := _populated(path):
            if time.monotonic() >= deadline:
                raise CgroupError(
                    f"processes in the cgroup {path} survived cgroup.kill for {timeout:g}s "
                    f"(still there: {' '.join(map(str, _listed(path) or [])) or 'in child cgroups'}); "
                    "a task in uninterruptible sleep dies only when its I/O ends"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
        return populated is not None

    @staticmethod
    def _drain_by_signals(path: str, deadline: float, timeout: float) -> bool:
        """SIGKILL every pid in ``path``'s ``cgroup.procs``, again until none is left: one may fork
        between the read and the kill, and its child is in the cgroup too."""
        delay = 0.0005
        while pids := _listed(path):
            _not_caller(path, pids)
            _kill(path, pids)
            if time.monotonic() >= deadline:
                raise CgroupError(
                    f"processes in the cgroup {path} survived SIGKILL for {timeout:g}s "
                    f"(still there: {' '.join(map(str, pids))}); a task in uninterruptible sleep dies only "
                    "when its I/O ends"
                )
            time.sleep(delay)  # SIGKILL is asynchronous: give them a moment to exit
            delay = min(delay * 2, 0.01)
        return pids is not None

    # ------------------------------------------------------------------------------ derived, cached --

    @cached_property
    def _mount_of(self) -> dict[str, Path]:
        return dict(self.mounts)

    @cached_property
    def _mount_str(self) -> dict[str, str]:
        return {c: str(p) for c, p in self.mounts}

    @cached_property
    def _roots(self) -> list[str]:
        """The distinct mounts a machine without a cpuset uses (v1: memory, cpu, cpuacct, pids)."""
        return _unique(str(p) for c, p in self.mounts if c != "cpuset" or self.version == 2)

    @cached_property
    def _roots_cpuset(self) -> list[str]:
        """The distinct mounts a machine may use (also where :meth:`remove` looks)."""
        return _unique(str(p) for _, p in self.mounts)

    @cached_property
    def _cpuset_root(self) -> str | None:
        """v1: the cpuset hierarchy's mount, whose new cgroups must be given CPUs and memory nodes."""
        return self._mount_str.get("cpuset") if self.version == 1 else None

    @cached_property
    def _v2_root(self) -> Path:
        return self.mounts[0][1]

    @cached_property
    def _v2_root_str(self) -> str:
        return str(self._v2_root)


# ---------------------------------------------------------------------------------- the agent's side --


def join(paths: Sequence[Path | str]) -> None:
    """Move the calling process, all its threads, into every one of ``paths`` (those
    :meth:`Hierarchy.create` returned). Call it before forking: children start in their parent's cgroup.

    Raises:
        CgroupError: a directory refused the process; the message says which and why.
    """
    for path in paths:
        _write(f"{path}/cgroup.procs", "0", "join the cgroup")  # "0": the writer's own thread group


# ------------------------------------------------------------------------------------------ counters --


def oom_kills(paths: Iterable[Path | str]) -> int:
    """How many processes the kernel's OOM killer killed in this cgroup for going over its memory
    limit (v1 ``memory.oom_control``, v2 ``memory.events``: ``oom_kill N``)."""
    return _counter(paths, (("memory.oom_control", "oom_kill", 1), ("memory.events", "oom_kill", 1)), "memory")


def pids_limit_hits(paths: Iterable[Path | str]) -> int:
    """How many forks (or clones of threads) this cgroup's pids limit refused (``pids.events``: ``max N``)."""
    return _counter(paths, (("pids.events", "max", 1),), "pids")


def cpu_usage_ns(paths: Iterable[Path | str]) -> int:
    """CPU time the cgroup's tasks used, in nanoseconds (v1 ``cpuacct.usage``, v2 ``cpu.stat``
    ``usage_usec`` × 1000)."""
    return _counter(paths, (("cpuacct.usage", "", 1), ("cpu.stat", "usage_usec", 1000)), "cpuacct (v1) or cpu (v2)")


def _counter(paths: Iterable[Path | str], sources: Sequence[tuple[str, str, int]], controller: str) -> int:
    """The first of ``sources`` (file, key or "" for a file holding one number, scale) found in
    ``paths``: each counter lives in one controller's directory, and only the caller knows the paths."""
    listed = []
    for path in paths:
        listed.append(str(path))
        for file, key, scale in sources:
            try:
                text = _read_raw(f"{path}/{file}")
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _error(f"read {path}/{file}", exc) from exc
            value = _key(text, key) if key else int(text)
            if value is None:
                continue  # v1's cpu.stat has no usage_usec
            return value * scale
    raise CgroupError(
        f"none of {listed} has {' or '.join(s[0] for s in sources)}: is the {controller} controller used?"
    )


# ------------------------------------------------------------------------------------------- helpers --


def _checked(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"not a machine's cgroup name (nx + 10 lowercase hex digits): {name!r}")
    return name


def _relative(parent: str) -> str:
    """``parent`` as ``""`` or ``"/a/b"``, to append to a mount point; never anything that leaves it."""
    if not parent:
        return ""
    if not isinstance(parent, str) or "\0" in parent:
        raise ValueError(f"not a cgroup parent: {parent!r}")
    parts = [p for p in parent.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ValueError(f"a cgroup parent must stay below the hierarchy's root, without '.' or '..': {parent!r}")
    return "".join("/" + p for p in parts)


def _unescape(field: str) -> str:
    r"""mountinfo writes space, tab, newline and backslash in paths as octal escapes (``\040``)."""
    return _ESCAPE.sub(lambda m: chr(int(m[1], 8)), field) if "\\" in field else field


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _read_raw(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


def _read(path: str) -> str:
    try:
        return _read_raw(path)
    except OSError as exc:
        raise _error(f"read {path}", exc) from exc


def _write_raw(path: str, value: str) -> None:
    # O_TRUNC is ignored by cgroupfs (as for the shell's `echo 1 > file`) and costs nothing; it keeps a
    # plain file, such as the tests' stand-in for a cgroup2 tree, holding exactly what was written.
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _write(path: str, value: str, what: str, *, optional: bool = False) -> None:
    """Write ``value`` to the cgroup file ``path`` (one write: the kernel takes it whole or not at all).
    ``optional``: a file the kernel may not have (then nothing is written)."""
    try:
        _write_raw(path, value)
    except FileNotFoundError as exc:
        if optional:
            return
        raise _error(f"{what}: write {value!r} to {path}", exc) from exc
    except OSError as exc:
        raise _error(f"{what}: write {value!r} to {path}", exc) from exc


def _key(text: str, key: str) -> int | None:
    """The number after ``key`` in a flat-keyed cgroup file (``key value`` lines)."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return None


def _listed(path: str) -> list[int] | None:
    """The pids in ``path``'s ``cgroup.procs``; None if ``path`` is gone."""
    try:
        return [int(p) for p in _read_raw(path + "/cgroup.procs").split()]
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _error(f"read {path}/cgroup.procs", exc) from exc


def _populated(path: str) -> int | None:
    """v2: whether ``path`` or a cgroup below it has a process (``cgroup.events``); None if it is gone."""
    try:
        return _key(_read_raw(path + "/cgroup.events"), "populated") or 0  # no key: let rmdir tell
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _error(f"read {path}/cgroup.events", exc) from exc


def _children(path: str) -> list[str]:
    try:
        with os.scandir(path) as entries:
            return [e.path for e in entries if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _not_caller(path: str, pids: Sequence[int]) -> None:
    if os.getpid() in pids:
        raise CgroupError(f"the calling process ({os.getpid()}) is in the cgroup {path}: it cannot remove it")


def _kill(path: str, pids: Sequence[int]) -> None:
    """SIGKILL those of ``pids`` still in ``path``, without killing a stranger that reused a pid: each
    process is held by a pidfd first, then its pid is checked to be still listed. A process that exited
    and was reaped in between cannot be signalled through its pidfd (ESRCH), and the new owner of the
    pid, if listed, is in the cgroup too. Kernels before 5.3 have no pidfds: there the pid is signalled
    as listed, a reuse of it in the instant between the read and the kill being the one risk left."""
    fds: dict[int, int | None] = {}
    try:
        for pid in pids:
            try:
                fds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            except OSError as exc:
                if exc.errno != errno.ENOSYS:
                    raise _error(f"open a pidfd for process {pid} of {path}", exc) from exc
                fds[pid] = None
        listed = set(_listed(path) or ())
        for pid, fd in fds.items():
            if pid in listed:
                with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
                    if fd is None:
                        os.kill(pid, signal.SIGKILL)
                    else:
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        for fd in fds.values():
            if fd is not None:
                os.close(fd)


_HINTS = {
    errno.EACCES: "the node must run as root (or be delegated this cgroup tree)",
    errno.EPERM: "the node must run as root (or be delegated this cgroup tree)",
    errno.EROFS: "the cgroup filesystem is mounted read-only: give the node a writable cgroup mount",
    errno.ENOSPC: "v1 cpuset: the cgroup has no CPUs or memory nodes; otherwise the cgroup count limit "
    "(cgroup.max.descendants) is reached",
    errno.EINVAL: "the kernel rejected the value",
    errno.EBUSY: "the cgroup is busy (it has processes or child cgroups)",
    errno.ENOENT: "the file is missing: is the controller enabled for this cgroup?",
    errno.EOPNOTSUPP: "the cgroup's type does not allow it (v2: threaded or not a leaf)",
}


def _error(what: str, exc: OSError) -> CgroupError:
    hint = _HINTS.get(exc.errno or 0)
    return CgroupError(f"cannot {what}: {exc.strerror}" + (f" ({hint})" if hint else ""))
