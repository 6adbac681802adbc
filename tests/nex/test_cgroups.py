"""nex.sandbox.cgroups: a machine's cgroup, and the kernel enforcing its limits on real processes.

Two kinds of tests:

- integration tests, on this host's real cgroups (v1 here, v2 elsewhere), as root: each makes cgroups
  named ``nx`` + 10 random hex digits, starts real Python children that join them, shows each limit biting
  (OOM kill, EAGAIN on fork, CPU quota) through the module's own counters, and removes what it made;
- unit tests of the cgroup v2 *file protocol* against a directory tree shaped like a cgroup2 mount,
  because this host's controllers are all bound to v1 and its cgroup2 mount has none: they check which
  file gets which value, in which order, and what happens on the kernel's refusals. They test no kernel.

Waits are on processes (``wait`` with a timeout, a pidfd) or on files polled against a deadline.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from nex.sandbox import cgroups
from nex.sandbox.cgroups import CgroupError, Hierarchy, Limits, cpu_usage_ns, join, oom_kills, pids_limit_hits

integration = pytest.mark.integration

MIB = 1 << 20

#: the prelude of every child: join the cgroup directories given as arguments, before anything else
JOIN = "import sys\nfrom nex.sandbox import cgroups\ncgroups.join(sys.argv[1:])\n"


def machine_name() -> str:
    return "nx" + secrets.token_hex(5)


def python(code: str, *args: object) -> subprocess.Popen[str]:
    """A Python child running ``code`` with ``args`` as its argv[1:]."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(proc: subprocess.Popen[str]) -> None:
    """Whatever happened in the test: the child is dead and reaped."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)


def wait_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``check`` (a file read) until it holds, failing with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        time.sleep(0.005)


def procs(paths: Sequence[Path]) -> set[int]:
    """Every pid in any of the machine's directories."""
    found: set[int] = set()
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            found.update(int(p) for p in (path / "cgroup.procs").read_text().split())
    return found


def exited(pidfd: int, timeout: float) -> bool:
    """Whether the process behind ``pidfd`` has exited within ``timeout`` (a pidfd polls readable then)."""
    return bool(select.select([pidfd], [], [], timeout)[0])


def settings(host: Hierarchy, paths: Sequence[Path]) -> dict[str, str]:
    """The limits as the kernel reports them, read from the files of this host's cgroup version."""

    def find(file: str) -> str:
        for path in paths:
            if (path / file).exists():
                return (path / file).read_text().strip()
        raise AssertionError(f"no {file} in {paths}")

    if host.version == 2:
        quota, period = find("cpu.max").split()
        swap = find("memory.swap.max") if (paths[0] / "memory.swap.max").exists() else "absent"
        return {"memory": find("memory.max"), "swap": swap, "quota": quota, "period": period, "pids": find("pids.max")}
    memsw = next(
        (p / "memory.memsw.limit_in_bytes" for p in paths if (p / "memory.memsw.limit_in_bytes").exists()), None
    )
    return {
        "memory": find("memory.limit_in_bytes"),
        "swap": "absent" if memsw is None else str(int(memsw.read_text()) - int(find("memory.limit_in_bytes"))),
        "quota": find("cpu.cfs_quota_us"),
        "period": find("cpu.cfs_period_us"),
        "pids": find("pids.max"),
    }


def ours_on_host(host: Hierarchy, name: str) -> list[Path]:
    return [p for p in host.paths(name, cpuset="cpuset" in dict(host.mounts)) if p.exists()]


# ------------------------------------------------------------------------------- integration: fixtures --


@pytest.fixture
def host() -> Hierarchy:
    if os.geteuid() != 0:
        pytest.skip("making cgroups needs root")
    try:
        return Hierarchy.detect()
    except CgroupError as exc:
        pytest.skip(f"no usable cgroup hierarchy on this host: {exc}")


@pytest.fixture
def names(host: Hierarchy) -> Iterator[Callable[[], str]]:
    """New machine names; after the test, the check that none of them left a directory behind (the tests
    remove their own in a ``finally``; a leftover is removed here too, and fails the test)."""
    made: list[str] = []

    def new() -> str:
        made.append(machine_name())
        return made[-1]

    yield new
    leftovers = [p for name in made for p in ours_on_host(host, name)]
    for name in made:
        host.remove(name)
    assert not leftovers, f"cgroups left behind: {leftovers}"


# ---------------------------------------------------------------------------------- integration: tests --


@integration
def test_create_writes_the_template_and_remove_leaves_nothing(host: Hierarchy, names: Callable[[], str]) -> None:
    name = names()
    paths = host.create(name, Limits(memory_bytes=256 * MIB, cpus=2, pids_max=100))
    try:
        assert paths == host.paths(name)
        assert all(p.is_dir() for p in paths)
        found = settings(host, paths)
        assert found["memory"] == str(256 * MIB)
        assert found["swap"] in ("0", "absent")  # memory + swap = memory (v1), swap.max = 0 (v2)
        assert (found["quota"], found["period"]) == ("200000", "100000")
        assert found["pids"] == "100"
        assert (oom_kills(paths), pids_limit_hits(paths), cpu_usage_ns(paths)) == (0, 0, 0)
    finally:
        host.remove(name)
    assert not ours_on_host(host, name)
    host.remove(name)  # idempotent


@integration
def test_going_over_the_memory_limit_is_an_oom_kill(host: Hierarchy, names: Callable[[], str]) -> None:
    name = names()
    paths = host.create(name, Limits(memory_bytes=64 * MIB, cpus=1, pids_max=16))
    proc = python(JOIN + "blocks = [b'\\x01' * (1 << 20) for _ in range(512)]\nprint('survived 512 MiB')", *paths)
    try:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, (out, err)
        assert oom_kills(paths) == 1
    finally:
        stop(proc)
        host.remove(name)


@integration
def test_forking_beyond_pids_max_fails_with_eagain(host: Hierarchy, names: Callable[[], str]) -> None:
    """The child forks until the kernel refuses; its children wait on a pipe and exit with it."""
    fork_until_refused = JOIN + (
        "import errno, os\n"
        "r, w = os.pipe()\n"
        "n = 0\n"
        "while n < 1000:\n"  # a bound in case the limit did not hold: never a fork bomb on the host
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError as exc:\n"
        "        print(errno.errorcode[exc.errno], n)\n"
        "        break\n"
        "    if pid == 0:\n"
        "        os.close(w)\n"
        "        os.read(r, 1)\n"
        "        os._exit(0)\n"
        "    n += 1\n"
        "else:\n"
        "    print('no limit', n)\n"
        "os.close(w)\n"
        "for _ in range(n):\n"
        "    os.wait()\n"
    )
    name = names()
    paths = host.create(name, Limits(memory_bytes=256 * MIB, cpus=1, pids_max=8))
    proc = python(fork_until_refused, *paths)
    try:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.split() == ["EAGAIN", "7"]  # the child itself is the 8th
        assert pids_limit_hits(paths) >= 1
    finally:
        stop(proc)
        host.remove(name)


#: two threads hashing 1 MiB buffers (hashlib lets go of the GIL: together they can use two CPUs). The
#: child joins the cgroup given as arguments, if any, lets the threads run 0.2 s (past the first period,
#: whose quota is fresh), then prints the wall time of a 1 s window, its own CPU time in it, and the
#: cgroup's CPU time in it by cpu_usage_ns (0 without a cgroup)
BURN = """
import hashlib, resource, sys, threading, time
from nex.sandbox import cgroups
paths = sys.argv[1:]
if paths:
    cgroups.join(paths)
data = b"x" * (1 << 20)
done = threading.Event()
def burn():
    while not done.is_set():
        hashlib.sha256(data).digest()
threads = [threading.Thread(target=burn) for _ in range(2)]
for t in threads:
    t.start()
def sample():
    own = resource.getrusage(resource.RUSAGE_SELF)
    return time.monotonic(), own.ru_utime + own.ru_stime, cgroups.cpu_usage_ns(paths) / 1e9 if paths else 0.0
time.sleep(0.2)
before = sample()
time.sleep(1.0)
after = sample()
done.set()
for t in threads:
    t.join()
print(*(b - a for a, b in zip(before, after)))
"""


@integration
def test_the_cpu_quota_holds_two_busy_threads_to_one_cpu(host: Hierarchy, names: Callable[[], str]) -> None:
    name = names()
    paths = host.create(name, Limits(memory_bytes=256 * MIB, cpus=1, pids_max=16))
    proc = python(BURN, *paths)
    try:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        wall, own, used = map(float, out.split())
        assert used >= own * 0.95  # the cgroup's count covers the child's own
        assert used / wall <= 1.1, f"{used:.3f} s of CPU in {wall:.3f} s with a quota of 1 CPU"
        assert used / wall >= 0.5, f"only {used:.3f} s of CPU in {wall:.3f} s: did the threads run?"
    finally:
        stop(proc)
        host.remove(name)
    if len(os.sched_getaffinity(0)) < 2:
        return  # one CPU: the child could not use more without the cgroup either
    free = python(BURN)
    try:
        out, err = free.communicate(timeout=60)
        assert free.returncode == 0, err
        wall, own, _ = map(float, out.split())
        assert own / wall > 1.3, f"without the cgroup: {own:.3f} s of CPU in {wall:.3f} s"
    finally:
        stop(free)


@integration
def test_remove_kills_every_process_inside(host: Hierarchy, names: Callable[[], str]) -> None:
    name = names()
    paths = host.create(name, Limits(memory_bytes=256 * MIB, cpus=1, pids_max=16))
    proc = python(JOIN + "import os, signal\nos.fork()\nsignal.pause()", *paths)
    pidfds: list[int] = []
    try:
        wait_until(lambda: len(procs(paths)) == 2, "the child and its own child in the cgroup")
        pidfds = [os.pidfd_open(pid) for pid in procs(paths)]
        host.remove(name)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert all(exited(fd, timeout=10) for fd in pidfds)
        assert not ours_on_host(host, name)
    finally:
        for fd in pidfds:
            os.close(fd)
        stop(proc)
        host.remove(name)


@integration
def test_remove_outruns_a_fork_bomb(host: Hierarchy, names: Callable[[], str]) -> None:
    """Every process forks as fast as it can: v1's kill loop must catch children forked while it kills."""
    bomb = JOIN + (
        "import os\n"
        # never a bomb outside a pids-limited cgroup: check it is in one first
        "pids = next(p for p in sys.argv[1:] if os.path.exists(p + '/pids.max'))\n"
        "assert open(pids + '/pids.max').read().strip() == '32'\n"
        "assert str(os.getpid()) in open(pids + '/cgroup.procs').read().split()\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        pass\n"
    )
    name = names()
    paths = host.create(name, Limits(memory_bytes=512 * MIB, cpus=1, pids_max=32))
    proc = python(bomb, *paths)
    try:
        wait_until(lambda: pids_limit_hits(paths) > 0 or proc.poll() is not None, "the bomb hitting pids.max")
        assert proc.poll() is None, proc.communicate()
        host.remove(name, timeout=20)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert not ours_on_host(host, name)
    finally:
        stop(proc)
        host.remove(name, timeout=20)


@integration
def test_remove_takes_child_cgroups_and_their_processes(host: Hierarchy, names: Callable[[], str]) -> None:
    name = names()
    paths = host.create(name, Limits(memory_bytes=256 * MIB, cpus=1, pids_max=16))
    nested = [p / "inner" for p in paths]
    proc: subprocess.Popen[str] | None = None
    try:
        for path in nested:
            path.mkdir()
        if "cpuset.mems" in os.listdir(nested[0]):  # cpuset co-mounted with memory (v1): give it CPUs
            for file in ("cpuset.cpus", "cpuset.mems"):
                (nested[0] / file).write_text((paths[0] / file).read_text())
        proc = python(JOIN + "import signal\nsignal.pause()", *nested)
        wait_until(lambda: proc is not None and proc.pid in procs(nested), "the child in the nested cgroup")
        host.remove(name)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert not ours_on_host(host, name)
    finally:
        if proc is not None:
            stop(proc)
        host.remove(name)


@integration
def test_create_over_a_leftover_kills_its_processes_and_starts_afresh(
    host: Hierarchy, names: Callable[[], str]
) -> None:
    name = names()
    paths = host.create(name, Limits(memory_bytes=64 * MIB, cpus=1, pids_max=16))
    proc = python(JOIN + "import signal\nsignal.pause()", *paths)
    try:
        wait_until(lambda: proc.pid in procs(paths), "the child in the cgroup")
        again = host.create(name, Limits(memory_bytes=128 * MIB, cpus=2, pids_max=32))  # as after a crash
        assert again == paths
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert procs(again) == set()
        found = settings(host, again)
        assert (found["memory"], found["quota"], found["pids"]) == (str(128 * MIB), "200000", "32")
    finally:
        stop(proc)
        host.remove(name)


@integration
def test_a_cpuset_pins_the_machine_under_a_new_parent(host: Hierarchy, names: Callable[[], str]) -> None:
    """Under a parent that does not exist yet (made on the way); v1 needs CPUs and memory nodes copied
    into each new cpuset cgroup, or no process could join it."""
    if "cpuset" not in dict(host.mounts):
        pytest.skip(f"no cpuset controller here: {host.describe()}")
    parent = f"nextest-{secrets.token_hex(3)}/machines"
    name = names()
    proc: subprocess.Popen[str] | None = None
    try:
        paths = host.create(name, Limits(memory_bytes=256 * MIB, cpus=1, pids_max=16, cpuset="0"), parent)
        assert paths == host.paths(name, parent, cpuset=True)
        proc = python(JOIN + "import os\nprint(sorted(os.sched_getaffinity(0)))", *paths)
        out, err = proc.communicate(timeout=30)
        assert (proc.returncode, out.strip()) == (0, "[0]"), err
        host.remove(name, parent)
        assert not any(p.exists() for p in paths)
    finally:
        if proc is not None:
            stop(proc)
        host.remove(name, parent)
        for root in {p for _, p in host.mounts}:  # the parents are shared, so left for the caller
            for level in (root / parent, (root / parent).parent):
                with contextlib.suppress(FileNotFoundError):
                    level.rmdir()


@integration
def test_a_failed_create_leaves_nothing(host: Hierarchy, names: Callable[[], str]) -> None:
    name = names()
    too_many = 1 << 40  # above PID_MAX_LIMIT: the kernel refuses it, at the last write of create()
    with pytest.raises(CgroupError, match=r"pids\.max"):
        host.create(name, Limits(memory_bytes=64 * MIB, cpus=1, pids_max=too_many))
    assert not ours_on_host(host, name)
    if "cpuset" in dict(host.mounts):
        with pytest.raises(CgroupError, match="cpuset"):
            host.create(name, Limits(memory_bytes=64 * MIB, cpus=1, pids_max=16, cpuset="100000"))
        assert not ours_on_host(host, name)


@integration
def test_names_and_parents_that_are_not_ours_are_refused(host: Hierarchy) -> None:
    before = {p for root in {p for _, p in host.mounts} for p in root.iterdir() if p.is_dir()}
    limits = Limits(memory_bytes=64 * MIB, cpus=1, pids_max=16)
    for name in ("nx123", "NX3FA9C0D2B1", "nx3fa9c0d2b1x", "nx3fa9c0d2b/", "../nx3fa9c0d2", "", "memory"):
        with pytest.raises(ValueError):
            host.create(name, limits)
        with pytest.raises(ValueError):
            host.remove(name)
    for parent in ("..", "../..", "a/../../b", "/..", "./x", "a/./b", "x\0"):
        with pytest.raises(ValueError):
            host.create(machine_name(), limits, parent)
        with pytest.raises(ValueError):
            host.remove(machine_name(), parent)
    assert {p for root in {p for _, p in host.mounts} for p in root.iterdir() if p.is_dir()} == before


@integration
def test_detect_describes_this_host(host: Hierarchy) -> None:
    text = host.describe()
    assert text.startswith(f"cgroup v{host.version} (")
    assert all(c in text for c in ("memory", "cpu", "pids"))


# --------------------------------------------------------------------------- unit: the v2 file protocol --


class FakeCgroup2:
    """A directory tree shaped like a cgroup2 mount, standing in for the kernel's side of the protocol:
    making a directory makes the interface files of the controllers the parent enables in its
    ``cgroup.subtree_control`` (as the kernel does); removing one is refused while it has processes or
    children. It checks what nex writes where, not what the kernel does with it.

    A write of ``+x -y`` to ``cgroup.subtree_control`` changes the set the kernel then shows (``x z``);
    a plain file cannot do that on its own, so each such write is applied, and logged in
    :attr:`delegations`, when the next directory is made below (nex always writes before it makes one).
    """

    def __init__(self, root: Path, controllers: str = "cpuset cpu io memory hugetlb pids rdma misc") -> None:
        self.root = root
        self.omit: set[str] = set()  # interface files a new cgroup lacks (e.g. memory.swap.max: no swap accounting)
        self.delegations: list[tuple[Path, str]] = []  # (cgroup, what was written to its subtree_control)
        self.enabled: dict[Path, set[str]] = {root: set()}
        root.mkdir(exist_ok=True)
        for file, text in {
            "cgroup.controllers": controllers + "\n",
            "cgroup.subtree_control": "\n",
            "cgroup.procs": "1\n",
            "cpu.stat": "usage_usec 0\n",
        }.items():
            (root / file).write_text(text)

    @property
    def mountinfo(self) -> str:
        return (
            "25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
            f"41 25 0:38 / {self.root} rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"
        )

    def mkdir(self, path: str | Path, mode: int = 0o777) -> None:
        path = Path(path)
        path.mkdir(mode)
        enabled = self.subtree_control(path.parent)
        self.enabled[path] = set()
        files = {
            "cgroup.procs": "",
            "cgroup.events": "populated 0\nfrozen 0\n",
            "cgroup.kill": "",
            "cgroup.controllers": " ".join(sorted(enabled)) + "\n",
            "cgroup.subtree_control": "\n",
            "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n",
        }
        if "memory" in enabled:
            files["memory.max"] = "max\n"
            files["memory.swap.max"] = "max\n"
            files["memory.events"] = "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n"
        if "cpu" in enabled:
            files["cpu.max"] = "max 100000\n"
        if "pids" in enabled:
            files["pids.max"] = "max\n"
            files["pids.events"] = "max 0\n"
        if "cpuset" in enabled:
            files["cpuset.cpus"] = "\n"
            files["cpuset.mems"] = "\n"
        for file, text in files.items():
            if file not in self.omit:
                (path / file).write_text(text)

    def subtree_control(self, cgroup: Path) -> set[str]:
        """The controllers ``cgroup`` enables for its children, after applying a ``+x -y`` write."""
        control = cgroup / "cgroup.subtree_control"
        tokens = control.read_text().split()
        if not any(t[0] in "+-" for t in tokens):
            self.enabled[cgroup] = set(tokens)  # as the kernel shows it (the test wrote it so)
            return self.enabled[cgroup]
        self.delegations.append((cgroup, " ".join(tokens)))
        enabled = self.enabled.setdefault(cgroup, set())
        for token in tokens:
            (enabled.add if token[0] == "+" else enabled.discard)(token[1:])
        control.write_text(" ".join(sorted(enabled)) + "\n")
        return enabled

    def rmdir(self, path: str | Path) -> None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
        if (path / "cgroup.procs").read_text().split() or any(p.is_dir() for p in path.iterdir()):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))
        shutil.rmtree(path)


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCgroup2:
    kernel = FakeCgroup2(tmp_path / "cgroup")
    monkeypatch.setattr(cgroups, "_mkdir", kernel.mkdir)
    monkeypatch.setattr(cgroups, "_rmdir", kernel.rmdir)
    return kernel


def read(path: Path) -> str:
    return path.read_text().strip()


def test_v2_create_enables_the_controllers_at_the_root_and_writes_the_limits(fake: FakeCgroup2) -> None:
    """Unit test of the v2 file protocol (a directory tree, not the kernel)."""
    host = Hierarchy.detect(fake.mountinfo)
    assert host.version == 2
    assert host.describe() == f"cgroup v2 at {fake.root} (memory, cpu, pids, cpuset)"
    name = machine_name()
    paths = host.create(name, Limits(memory_bytes=256 * MIB, cpus=2, pids_max=64))
    machine = fake.root / name
    assert paths == [machine] == host.paths(name) == host.paths(name, cpuset=True)
    assert fake.delegations == [(fake.root, "+memory +cpu +pids")]
    assert read(fake.root / "cgroup.subtree_control") == "cpu memory pids"
    assert read(machine / "memory.max") == str(256 * MIB)
    assert read(machine / "memory.swap.max") == "0"
    assert read(machine / "cpu.max") == "200000 100000"
    assert read(machine / "pids.max") == "64"
    assert not (machine / "cpuset.cpus").exists()  # no cpuset asked: the controller is not even enabled

    join(paths)
    assert read(machine / "cgroup.procs") == "0"  # "0": the writing process itself


def test_v2_enables_only_what_is_missing_and_a_cpuset_when_asked(fake: FakeCgroup2) -> None:
    """Unit test of the v2 file protocol (a directory tree, not the kernel)."""
    host = Hierarchy.detect(fake.mountinfo)
    (fake.root / "cgroup.subtree_control").write_text("cpu io memory pids\n")  # as the kernel shows it
    host.create(machine_name(), Limits(memory_bytes=64 * MIB, cpus=1, pids_max=8))
    assert fake.delegations == []  # all there: nothing written

    name = machine_name()
    host.create(name, Limits(memory_bytes=64 * MIB, cpus=1, pids_max=8, cpuset="0-1"))
    assert fake.delegations == [(fake.root, "+cpuset")]
    assert read(fake.root / "cgroup.subtree_control") == "cpu cpuset io memory pids"
    assert read(fake.root / name / "cpuset.cpus") == "0-1"
    assert read(fake.root / name / "memory.max") == str(64 * MIB)


def test_v2_a_new_parent_is_made_and_given_the_controllers_on_the_way_down(fake: FakeCgroup2) -> None:
    """Unit test of the v2 file protocol (a directory tree, not the kernel)."""
    host = Hierarchy.detect(fake.mountinfo)
    name = machine_name()
    paths = host.create(name, Limits(memory_bytes=64 * MIB, cpus=1, pids_max=8), "/nex/machines/")
    assert paths == [fake.root / "nex" / "machines" / name]
    levels = [fake.root, fake.root / "nex", fake.root / "nex" / "machines"]
    assert fake.delegations == [(level, "+memory +cpu +pids") for level in levels]
    assert read(paths[0] / "memory.max") == str(64 * MIB)


def test_v2_a_parent_holding_processes_is_refused_with_the_remedy(fake: FakeCgroup2) -> None:
    """Unit test of the v2 file protocol (a directory tree, not the kernel): the kernel would answer
    EBUSY; nex says why before asking."""
    host = Hierarchy.detect(fake.mountinfo)
    (fake.root / "cgroup.subtree_control").write_text("cpu memory pids\n")
    fake.mkdir(fake.root / "busy")
    (fake.root / "busy" / "cgroup.procs").write_text("4242\n")
    name = machine_name()
    with pytest.raises(CgroupError, match=r"holds processes.*Choose a cgroup parent that holds no processes"):
        host.create(name, Limits(memory_bytes=64 * MIB, cpus=1, pids_max=8), "busy")
    assert not (fake.root / "busy" / name).exists()
    assert read(fake.root / "busy" / "cgroup.subtree_control") == ""  # not even tried
    assert fake.delegations == []


def test_v2_no_swap_accounting_is_no_error(fake: FakeCgroup2) -> None:
    """Unit test of the v2 file protocol (a directory tree, not the kernel): without
    CONFIG_MEMCG_SWAP there is no memory.swap.max, and no swap to cap."""
    fake.omit = {"memory.swap.max"}
    host = Hierarchy.detect(fake.mountinfo)
    [path] = host.create(machine_name(), Limits(memory_bytes=64 * MIB, cpus=1, pids_max=8))
    assert read(path / "memory.max") == str(64 * MIB)
    assert not (path / "memory.swap.max").exists()


def test_v2_a_failed_create_removes_what_it_made(fake: FakeCgroup2) -> None:
    """Unit test of the v2 file protocol (a directory tree, not the kernel)."""
    fake.omit = {"pids.max"}
    host = Hierarchy.detect(fake.mountinfo)
    name = machine_name()
    with pytest.raises(CgroupError, match=r"set the pids limit.*pids\.max"):
        host.create(name, Limits(memory_bytes=64 * MIB, cpus=1, pids_max=8))
    assert not (fake.root / name).exists()


def test_v2_remove_kills_through_cgroup_kill_and_waits_for_populated_0(fake: FakeCgroup2) -> None:
    """Unit test of the v2 file protocol (a directory tree, not the kernel): a cgroup that stays
    populated is reported after the timeout, having been sent cgroup.kill; an empty one is removed, with
    its child cgroups, and removing it again is no error."""
    host = Hierarchy.detect(fake.mountinfo)
    name = machine_name()
    [path] = host.create(name, Limits(memory_bytes=64 * MIB, cpus=1, pids_max=8))
    (path / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    (path / "cgroup.procs").write_text("4242\n")
    with pytest.raises(CgroupError, match=r"survived cgroup.kill for 0.05s \(still there: 4242\)"):
        host.remove(name, timeout=0.05)
    assert read(path / "cgroup.kill") == "1"

    (path / "cgroup.events").write_text("populated 0\nfrozen 0\n")
    (path / "cgroup.procs").write_text("")
    fake.mkdir(path / "inner")
    host.remove(name)
    assert not path.exists()
    host.remove(name)


def test_v2_create_over_a_leftover_makes_it_afresh(fake: FakeCgroup2) -> None:
    """Unit test of the v2 file protocol (a directory tree, not the kernel)."""
    host = Hierarchy.detect(fake.mountinfo)
    name = machine_name()
    [path] = host.create(name, Limits(memory_bytes=64 * MIB, cpus=1, pids_max=8))
    (path / "memory.events").write_text("oom_kill 3\n")  # a count from the crashed node's machine
    host.create(name, Limits(memory_bytes=128 * MIB, cpus=1, pids_max=8))
    assert read(path / "memory.max") == str(128 * MIB)
    assert oom_kills([path]) == 0


def test_v2_counters_are_read_from_their_files(fake: FakeCgroup2) -> None:
    """Unit test of the v2 file protocol (a directory tree, not the kernel)."""
    host = Hierarchy.detect(fake.mountinfo)
    paths = host.create(machine_name(), Limits(memory_bytes=64 * MIB, cpus=1, pids_max=8))
    (paths[0] / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 2\noom_kill 2\noom_group_kill 0\n")
    (paths[0] / "pids.events").write_text("max 5\n")
    (paths[0] / "cpu.stat").write_text("usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n")
    assert (oom_kills(paths), pids_limit_hits(paths), cpu_usage_ns(paths)) == (2, 5, 1_234_000)


# ------------------------------------------------------------------------------ unit: detection, names --

V1_MOUNTS = """\
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
"""


def test_detect_prefers_v2_when_it_has_the_controllers(fake: FakeCgroup2) -> None:
    host = Hierarchy.detect(V1_MOUNTS + fake.mountinfo)
    assert host.version == 2


def test_detect_falls_back_to_v1_when_cgroup2_has_no_controllers(tmp_path: Path) -> None:
    FakeCgroup2(tmp_path / "unified", controllers="hugetlb")
    unified = f"41 31 0:38 / {tmp_path}/unified rw,relatime - cgroup2 cgroup2 rw\n"
    host = Hierarchy.detect(unified + V1_MOUNTS)
    assert host.version == 1
    assert host.describe() == "cgroup v1 (memory, cpu, cpuacct, pids, cpuset)"
    name = machine_name()
    assert host.paths(name, "nex") == [  # cpu and cpuacct share a hierarchy: one directory
        Path(f"/sys/fs/cgroup/memory/nex/{name}"),
        Path(f"/sys/fs/cgroup/cpu,cpuacct/nex/{name}"),
        Path(f"/sys/fs/cgroup/pids/nex/{name}"),
    ]
    assert host.paths(name, cpuset=True)[-1] == Path(f"/sys/fs/cgroup/cpuset/{name}")


def test_detect_says_what_is_missing(tmp_path: Path) -> None:
    FakeCgroup2(tmp_path / "unified", controllers="hugetlb")
    unified = f"41 31 0:38 / {tmp_path}/unified rw,relatime - cgroup2 cgroup2 rw\n"
    no_pids = "\n".join(line for line in V1_MOUNTS.splitlines() if "pids" not in line)
    with pytest.raises(CgroupError) as caught:
        Hierarchy.detect(unified + no_pids)
    assert f"cgroup2 at {tmp_path}/unified offers hugetlb, not all of memory, cpu, pids" in str(caught.value)
    assert "no pids controller mounted" in str(caught.value)

    read_only = V1_MOUNTS.replace("/sys/fs/cgroup/memory rw,", "/sys/fs/cgroup/memory ro,")
    with pytest.raises(CgroupError, match="memory controller is mounted read-only at /sys/fs/cgroup/memory"):
        Hierarchy.detect(read_only)
    with pytest.raises(CgroupError, match="no memory controller mounted"):
        Hierarchy.detect("")


def test_detect_reads_escaped_mount_points(tmp_path: Path) -> None:
    FakeCgroup2(tmp_path / "cgroup two")
    escaped = str(tmp_path / "cgroup two").replace(" ", "\\040")
    host = Hierarchy.detect(f"41 31 0:38 / {escaped} rw,relatime - cgroup2 cgroup2 rw\n")
    assert host.mounts[0] == ("memory", tmp_path / "cgroup two")


def test_names_and_parents_that_are_not_ours_never_reach_the_filesystem(fake: FakeCgroup2) -> None:
    host = Hierarchy.detect(fake.mountinfo)
    limits = Limits(memory_bytes=64 * MIB, cpus=1, pids_max=8)
    before = sorted(fake.root.parent.rglob("*"))
    calls: list[Callable[[str], object]] = [lambda n: host.create(n, limits), host.remove, host.paths]
    for name in ("nx123", "NX3FA9C0D2B1", "nx3fa9c0d2b1x", "../nx3fa9c0d2", ""):
        for call in calls:
            with pytest.raises(ValueError, match="not a machine's cgroup name"):
                call(name)
    for parent in ("..", "a/../..", "/../etc", "./x"):
        with pytest.raises(ValueError, match="below the hierarchy's root"):
            host.remove(machine_name(), parent)
    assert sorted(fake.root.parent.rglob("*")) == before
    assert host.paths("nx0123456789", "//nex//") == [fake.root / "nex" / "nx0123456789"]


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="memory_bytes"):
        Limits(memory_bytes=0, cpus=1, pids_max=8)
    with pytest.raises(ValueError, match="cpus"):
        Limits(memory_bytes=MIB, cpus=0, pids_max=8)
    with pytest.raises(ValueError, match="pids_max"):
        Limits(memory_bytes=MIB, cpus=1, pids_max=0)
    with pytest.raises(ValueError, match="cpuset"):
        Limits(memory_bytes=MIB, cpus=1, pids_max=8, cpuset="0-1;echo")


def test_join_names_the_directory_that_refused(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match=f"join the cgroup: write '0' to {tmp_path}/gone/cgroup.procs"):
        join([tmp_path / "gone"])


def test_a_cpuset_on_a_host_without_the_controller_is_refused(tmp_path: Path) -> None:
    FakeCgroup2(tmp_path / "cgroup", controllers="cpu memory pids")
    host = Hierarchy.detect(f"41 31 0:38 / {tmp_path}/cgroup rw,relatime - cgroup2 cgroup2 rw\n")
    with pytest.raises(CgroupError, match="no cpuset controller"):
        host.create(machine_name(), Limits(memory_bytes=MIB, cpus=1, pids_max=8, cpuset="0"))
