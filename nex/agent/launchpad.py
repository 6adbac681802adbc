"""Starting the workload without forking the agent on the deploy's path.

A workload must die with its agent, so its process gets ``PR_SET_PDEATHSIG`` between fork and exec.
With Python that means ``preexec_fn``, which rules out ``vfork`` and makes every start a full fork
of the agent (about 2-5 ms here). The launchpad moves that fork earlier: a child forked while the
agent is single-threaded (the runner forks it as the artifact arrives), which sets its death signal,
connects its stdout and stderr to pipes, and blocks reading a command pipe. To run the workload the
agent writes what to run; the child execs it and becomes the workload. Exec failures come back on a
close-on-exec status pipe (end of file: the exec happened), as in CPython's own ``_posixsubprocess``.

The workload's exit is watched through a pidfd, its output through asyncio pipe readers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal

import msgspec

PR_SET_PDEATHSIG = 1


class _Command(msgspec.Struct, array_like=True):
    path: str
    argv: list[str]
    env: dict[str, str]
    cwd: str


class LaunchFailed(OSError):
    """The workload could not be executed; the message is the reason."""


class Workload:
    """The running workload: its pid, its output streams, signals, and its exit code."""

    def __init__(self, pid: int, stdout: asyncio.StreamReader, stderr: asyncio.StreamReader) -> None:
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None
        self._pidfd = os.pidfd_open(pid)
        self._exited = asyncio.Event()
        asyncio.get_running_loop().add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        asyncio.get_running_loop().remove_reader(self._pidfd)
        _, status = os.waitpid(self.pid, 0)
        self.returncode = os.waitstatus_to_exitcode(status)
        os.close(self._pidfd)
        self._pidfd = -1
        self._exited.set()

    def send_signal(self, sig: int) -> None:
        if self._pidfd >= 0:  # a pidfd cannot hit a recycled pid
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode


class Launchpad:
    """One forked child, waiting to become the workload. Make it while the agent has one thread."""

    def __init__(self) -> None:
        command_r, self._command_w = os.pipe2(os.O_CLOEXEC)
        self._status_r, status_w = os.pipe2(os.O_CLOEXEC)
        self._stdout_r, stdout_w = os.pipe2(os.O_CLOEXEC)
        self._stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: never returns (it execs or exits)
            for fd in (self._command_w, self._status_r, self._stdout_r, self._stderr_r):
                os.close(fd)  # the parent's ends: with its own copy of the command pipe's, no end of file
            _become_workload(parent, command_r, status_w, stdout_w, stderr_w)
        self.pid = pid
        for fd in (command_r, status_w, stdout_w, stderr_w):
            os.close(fd)
        self.used = False

    async def launch(self, path: str, argv: list[str], env: dict[str, str], cwd: str, *, limit: int) -> Workload:
        """Exec the workload in the waiting child.

        Raises:
            LaunchFailed: the exec failed (the reason is the child's).
        """
        if self.used:
            raise LaunchFailed("this launchpad has launched already")
        self.used = True
        os.write(self._command_w, msgspec.msgpack.encode(_Command(path, argv, env, cwd)))
        os.close(self._command_w)
        self._command_w = -1
        failure = await _read_to_end(self._status_r)
        if failure:
            self._reap_failed()
            raise LaunchFailed(failure.decode(errors="replace"))
        stdout = await _reader(self._stdout_r, limit)
        stderr = await _reader(self._stderr_r, limit)
        return Workload(self.pid, stdout, stderr)

    def _reap_failed(self) -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        for fd in (self._stdout_r, self._stderr_r):
            os.close(fd)

    def close(self) -> None:
        """Unused: let the child go (it exits at the end of its command pipe) and reap it."""
        if self.used:
            return
        self.used = True
        os.close(self._command_w)
        for fd in (self._status_r, self._stdout_r, self._stderr_r):
            os.close(fd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _become_workload(parent: int, command_r: int, status_w: int, stdout_w: int, stderr_w: int) -> None:
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the agent died before the death signal was armed
            os._exit(1)
        signal.set_wakeup_fd(-1)  # the agent's event loop's, not ours
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        data = _read_all(command_r)
        if not data:
            os._exit(0)  # the agent let it go
        command = msgspec.msgpack.decode(data, type=_Command)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(stdout_w, 1)  # dup2 clears close-on-exec on the copies
        os.dup2(stderr_w, 2)
        os.chdir(command.cwd)
        os.execve(command.path, [command.path, *command.argv], command.env)
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            os.write(status_w, f"cannot run the workload: {exc}".encode())
    finally:
        os._exit(127)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_to_end(fd: int) -> bytes:
    """Everything until end of file, read as it becomes readable; the fd is closed after."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        try:
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        except BlockingIOError:
            return
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return b"".join(chunks)


async def _reader(fd: int, limit: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
    return reader
