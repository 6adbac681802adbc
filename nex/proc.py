"""Child processes that die with the node, however the node dies.

Every process the node starts (nats-server, agents) is spawned through :func:`spawn`, which:

- sets ``PR_SET_PDEATHSIG`` to SIGKILL in the child, so that even a SIGKILL of the node takes the
  child down. The kernel ties that signal to the *thread* that forked the child, so spawn from the
  Trio thread, never from a worker thread (``trio.lowlevel.open_process`` forks in one, whose exit
  would kill the child: that is why this module exists);
- puts the child in its own process group, so a Ctrl-C at the terminal reaches only the node, which
  then stops its children in order (the control server must outlive the ``node_stopped`` event);
- gives the child the node's original CPU set (the node pins its own threads, see :mod:`nex.affinity`);
- enters the machine's network namespace first, when there is one;
- waits for exit on a pidfd, without threads.

No Python runs in the child between fork and exec. The node has more than one thread (nats-py's
asyncio thread, Trio's workers), and a forked child has only a copy of the forking one: Python code
there (``preexec_fn``) may wait forever on a lock another thread held at the fork, which CPython
documents as unsafe. The steps that must run in the child before the program (the death signal, the
CPU set, the namespace: none of which ``subprocess`` nor ``os.posix_spawn`` offers) are done instead
by :data:`_EXEC_SHIM`, a few lines of Python that the child execs first, in a fresh single-threaded
interpreter (``-I -S``: nothing imported but ``os``, ``signal`` and ``ctypes``), and that then execs
the program in the same process. The fork and exec are subprocess's own C code (a vfork now that no
``preexec_fn`` needs a full fork: the call returns in 0.3 ms instead of 3.3), and :func:`spawn`
checks beforehand that the program can be executed, so that a missing one still raises here. The
cost is one interpreter start per spawn: the program runs about 15 ms later (measured on a 2-core VM),
for nats-servers and the zygote at the node's start, and for agents only when they are spawned rather
than forked by the zygote. Forking from a thread that entered the namespace would do without the
shim for ``setns`` alone, not for the death signal, which only the child can set on itself.

The shim arms the death signal, then checks that its parent is still the node (a node that died
before that would never signal it), resets the signals Python ignores at start (SIGPIPE, SIGXFSZ: an
ignored signal stays ignored across exec), and exits 1 if the node is gone, 126 if it cannot enter
the namespace, 125 if it cannot join its cgroup and 127 if the program cannot be executed, saying why on its stderr.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import trio

from nex import affinity, linux

_EXEC_SHIM = f"""
import ctypes, os, signal, sys
parent, netns, cpus, cgroups, *argv = sys.argv[1:]
def fail(code, what):
    os.write(2, f"nex: cannot start {{argv[0]}}: {{what}}\\n".encode(errors="replace"))
    os._exit(code)
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
if libc.prctl({linux.PR_SET_PDEATHSIG}, {int(signal.SIGKILL)}, 0, 0, 0) != 0:
    fail(1, "arming its death signal: " + os.strerror(ctypes.get_errno()))
if os.getppid() not in (int(parent), 0):
    os._exit(1)
os.sched_setaffinity(0, {{int(cpu) for cpu in cpus.split(",")}})
if netns == "new":
    if libc.unshare({linux.CLONE_NEWNET}) != 0:
        fail(126, "making its network namespace: " + os.strerror(ctypes.get_errno()))
elif netns != "-":
    if libc.setns(int(netns), {linux.CLONE_NEWNET}) != 0:
        fail(126, "entering its network namespace: " + os.strerror(ctypes.get_errno()))
    os.close(int(netns))
for procs in cgroups.split(":") if cgroups != "-" else ():
    try:
        with open(procs + "/cgroup.procs", "w") as joined:
            joined.write("0")
    except OSError as exc:
        fail(125, f"joining its cgroup {{procs}}: {{exc.strerror}}")
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
try:
    os.execvp(argv[0], argv)
except OSError as exc:
    fail(127, exc.strerror or str(exc))
"""
"""Run as ``python -I -S -c _EXEC_SHIM PARENT NETNS_FD|new|- CPUS CGROUPS|- PROGRAM ARGS...`` (see the
module docstring); CGROUPS: the cgroup directories to join, ``:``-separated."""


def _shim_argv(
    argv: Sequence[str], parent: int, netns_fd: int, cgroups: Sequence[Path] = (), own_netns: bool = False
) -> list[str]:
    cpus = ",".join(str(cpu) for cpu in sorted(affinity.ORIGINAL))
    netns = "new" if own_netns else str(netns_fd) if netns_fd >= 0 else "-"
    joined = ":".join(str(path) for path in cgroups) or "-"
    return [sys.executable, "-I", "-S", "-c", _EXEC_SHIM, str(parent), netns, cpus, joined, *argv]


class ChildProcess:
    """A running child; :meth:`wait` and :meth:`stop` are Trio-friendly."""

    def __init__(self, popen: subprocess.Popen[bytes], argv: Sequence[str]) -> None:
        self._popen = popen
        self.argv = list(argv)
        self.pid = popen.pid
        self._pidfd = os.pidfd_open(popen.pid)

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    @property
    def stdout(self) -> int | None:
        return self._popen.stdout.fileno() if self._popen.stdout else None

    @property
    def stderr(self) -> int | None:
        return self._popen.stderr.fileno() if self._popen.stderr else None

    async def wait(self) -> int:
        """Wait for the child to exit (and reap it); return its exit code (negative: killed by a signal)."""
        while (code := self._popen.poll()) is None:
            await trio.lowlevel.wait_readable(self._pidfd)
        self._close()
        return code

    def signal(self, sig: int) -> None:
        if self._popen.poll() is None:
            self._popen.send_signal(sig)

    async def stop(self, grace: float = 5.0) -> int:
        """SIGTERM, up to ``grace`` seconds to exit, then SIGKILL. Shielded: it finishes when cancelled."""
        with trio.CancelScope(shield=True):
            self.signal(signal.SIGTERM)
            with trio.move_on_after(grace):
                await self.wait()
            self.signal(signal.SIGKILL)  # a no-op if it has exited
            await self.wait()
        code = self._popen.returncode
        assert code is not None
        return code

    def _close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        for stream in (self._popen.stdout, self._popen.stderr):
            if stream is not None:
                stream.close()

    def __repr__(self) -> str:
        return f"<ChildProcess {self.pid} {Path(self.argv[0]).name}>"


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdout: int | None = subprocess.DEVNULL,
    stderr: int | None = subprocess.DEVNULL,
    netns: Path | None = None,
    pass_fds: Sequence[int] = (),
    cgroups: Sequence[Path] = (),
    own_netns: bool = False,
) -> ChildProcess:
    """Start ``argv`` tied to this process's life (see the module docstring). Call from the Trio thread.

    ``netns``: a network namespace (``/run/netns/…``) the child enters before exec.
    ``pass_fds``: descriptors the child keeps (every other one is closed).
    ``cgroups``: cgroup directories the child joins before exec (so all it ever runs is inside).
    ``own_netns``: the child gets a new network namespace of its own, with only a loopback that is
    down, which ends with it (root only; not with ``netns``).

    Raises:
        OSError: the program cannot be found or executed (checked here: the child could only exit).
    """
    environment = dict(env) if env is not None else dict(os.environ)
    program = argv[0]
    if "/" in program:
        found: str | None = os.path.join(cwd, program) if cwd is not None else program
    else:
        found = shutil.which(program, path=environment.get("PATH", os.defpath))
    if found is None or not os.access(found, os.X_OK) or os.path.isdir(found):
        code = errno.ENOENT if found is None or not os.path.exists(found) else errno.EACCES
        raise OSError(code, os.strerror(code), program)
    if own_netns and netns is not None:
        raise ValueError("a child enters a network namespace or makes its own, not both")
    parent = os.getpid()
    netns_fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC) if netns is not None else -1
    try:
        popen = subprocess.Popen(
            _shim_argv(argv, parent, netns_fd, cgroups, own_netns),
            env=environment,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            process_group=0,
            close_fds=True,
            pass_fds=(*pass_fds, netns_fd) if netns_fd >= 0 else tuple(pass_fds),
        )
    finally:
        if netns_fd >= 0:
            os.close(netns_fd)
    return ChildProcess(popen, argv)
