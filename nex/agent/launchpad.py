"""Starting the workload quickly, jailed, and ending everything it started with it.

A workload must die with its agent, and so must every process it starts (a daemon that double-forks
into a session of its own included): otherwise it outlives its machine, and holds the workload's
output pipes open so its end is never seen. So the workload runs in a PID namespace of its own: the
agent's first child after ``unshare(CLONE_NEWPID)`` is that namespace's *init*, and when init exits
the kernel kills everything left in the namespace before init can be reaped. (The agent's own later
children go back to the agent's namespace.)

The launchpad forks init ahead of the deploy, while the agent is single-threaded (the runner makes
it as the artifact arrives), because a fork of the agent costs 2-5 ms here. Init dies with the agent
(``PR_SET_PDEATHSIG``) and first builds the workload's jail (:mod:`nex.sandbox.jail`: namespaces, a
root of its own, no capabilities, seccomp), so that by the deploy only the artifact is missing. Then it
says so on its status pipe. To run the workload the agent waits for that, then writes the artifact,
argv and environment; init writes the artifact into the jail (through a descriptor it opened while
building it, ``O_EXCL | O_NOFOLLOW``) and starts it with ``posix_spawn`` (vfork and exec) as pid 2:
pid 1's signal rules do not apply to the workload, so SIGTERM ends it as anywhere. Every message on
the status pipe is tagged: ``R`` ready for the command, ``S`` started, ``F`` and the reason when
anything failed (the jail, the exec, anything else); an end without ``S`` is a failure too (init
died), never a start. Init then forwards the agent's polite signals (SIGTERM, SIGINT, SIGHUP,
SIGQUIT, SIGUSR1, SIGUSR2) to the workload, reaps orphans, and when the workload ends writes its wait
status to the exit pipe and exits. A SIGKILL to init ends the whole namespace.

Without a jail (``no_sandbox``) the artifact is written into the agent's working directory, also
with ``O_EXCL | O_NOFOLLOW``. Without the right to make a PID namespace (an agent not running as
root) init runs in the agent's namespace, the workload gets a death signal of its own (a full fork
then), and what it starts is not contained; :attr:`Launchpad.contained` says which. The workload's
exit is watched through a pidfd on init, its output through asyncio pipe readers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from typing import NamedTuple, NoReturn

import msgspec

from nex import linux
from nex.api import agent as api
from nex.sandbox import jail as jails
from nex.sandbox import seccomp

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
"""What init passes on to the workload; SIGKILL needs no passing on (it ends the whole namespace)."""
DEFAULT_SIGNALS = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}
"""Reset for the workload: an ignored signal stays ignored across exec (Python ignores SIGPIPE and
SIGXFSZ; whoever started the node may have ignored others)."""
READY, STARTED, FAILED = b"R", b"S", b"F"
"""The status pipe's tags (see the module docstring)."""


class _Command(msgspec.Struct, array_like=True):
    """What init runs: written on the command pipe as its length (4 bytes), itself, then the
    artifact's ``size`` bytes, which init moves straight into the artifact's file (``splice``): the
    artifact is never copied through Python in init, nor re-encoded in the agent (its copies would all
    count against the machine's memory)."""

    size: int
    argv: list[str]
    env: dict[str, str]


class LaunchFailed(OSError):
    """The workload could not be executed; the message is the reason."""


class Workload:
    """The running workload: its init's pid, its output streams, signals, and its exit code."""

    def __init__(self, pid: int, exit_r: int, stdout: asyncio.StreamReader, stderr: asyncio.StreamReader) -> None:
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None
        self._exit_r = exit_r
        self._pidfd = os.pidfd_open(pid)
        self._exited = asyncio.Event()
        asyncio.get_running_loop().add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        asyncio.get_running_loop().remove_reader(self._pidfd)
        _, status = os.waitpid(self.pid, 0)
        self.returncode = _exit_code(self._exit_r, status)
        os.close(self._pidfd)
        self._pidfd = -1
        self._exited.set()

    def send_signal(self, sig: int) -> None:
        """Signal the workload (through its init; SIGKILL ends everything it started too)."""
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
    """A workload's init, jailed and waiting to start the workload. Make it while the agent has one
    thread. ``jail`` None: no jail; ``workdir``: the agent's directory (the jail's root is built on it,
    in init's own mount namespace; without a jail the artifact goes there)."""

    def __init__(self, jail: api.Jail | None, workdir: str) -> None:
        if jail is not None and jail.seccomp:
            with contextlib.suppress(seccomp.SeccompUnavailable):  # init says so, at the deploy
                seccomp.program()  # compiled here (once per process): init cannot import in its jail
        command_r, self._command_w = os.pipe2(os.O_CLOEXEC)
        self._status_r, status_w = os.pipe2(os.O_CLOEXEC)
        self._exit_r, exit_w = os.pipe2(os.O_CLOEXEC)
        self._stdout_r, stdout_w = os.pipe2(os.O_CLOEXEC)
        self._stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
        parent = os.getpid()
        with _children_in_a_new_pid_namespace() as self.contained:
            pid = os.fork()
            if pid == 0:  # init: never returns
                pipes = _InitPipes(command_r, status_w, exit_w, stdout_w, stderr_w)
                _run_init(parent, self.contained, pipes, jail, workdir)
        self.pid = pid
        for fd in (command_r, status_w, exit_w, stdout_w, stderr_w):
            os.close(fd)
        self.used = False

    async def launch(self, artifact: bytes, argv: list[str], env: dict[str, str], *, limit: int) -> Workload:
        """Have init write ``artifact`` and start it with ``argv`` and ``env``; return once it runs.

        Raises:
            LaunchFailed: its jail could not be built, or it could not be executed (init's reason).
        """
        if self.used:
            raise LaunchFailed("this launchpad has launched already")
        self.used = True
        os.set_blocking(self._status_r, False)
        try:
            await self._expect(READY, "before it was ready")  # the jail is built: init reads now
            header = msgspec.msgpack.encode(_Command(len(artifact), argv, env))
            with contextlib.suppress(BrokenPipeError):  # init died meanwhile: its status says so
                for part in (len(header).to_bytes(4, "big"), header, artifact):
                    view = memoryview(part)
                    while view:  # a pipe takes 64 KiB at a time, which init takes as they come
                        view = view[os.write(self._command_w, view) :]
            os.close(self._command_w)
            await self._expect(STARTED, "before starting the workload")
        except LaunchFailed:
            self._reap_failed()
            raise
        os.close(self._status_r)
        stdout = await _reader(self._stdout_r, limit)
        stderr = await _reader(self._stderr_r, limit)
        return Workload(self.pid, self._exit_r, stdout, stderr)

    async def _expect(self, tag: bytes, when: str) -> None:
        """The next status message, which must be ``tag``; raise init's reason otherwise."""
        message = await _read_message(self._status_r)
        if message == tag:
            return
        if message.startswith(FAILED):
            raise LaunchFailed((message[1:] + await _read_to_end(self._status_r)).decode(errors="replace"))
        raise LaunchFailed(f"the workload's init ended {when}")

    def _reap_failed(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._command_w)  # init may be blocked reading it
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)  # init exits after reporting the failure
        for fd in (self._status_r, self._exit_r, self._stdout_r, self._stderr_r):
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        """Unused: let init go (it exits at the end of its command pipe) and reap it."""
        if self.used:
            return
        self.used = True
        os.close(self._command_w)
        for fd in (self._status_r, self._exit_r, self._stdout_r, self._stderr_r):
            os.close(fd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


@contextlib.contextmanager
def _children_in_a_new_pid_namespace() -> Iterator[bool]:
    """Within, the first child forked starts a PID namespace of its own (its init); True if it will.

    ``unshare(CLONE_NEWPID)`` changes where all of this process's later children go, so on the way
    out the process's own namespace is set back for them (``setns``). False without the right
    (CAP_SYS_ADMIN): the child is then forked in this process's namespace.
    """
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if linux.libc.unshare(linux.CLONE_NEWPID) != 0:
            yield False
            return
        try:
            yield True
        finally:
            linux.setns(own, linux.CLONE_NEWPID, "return to the agent's PID namespace")
    finally:
        os.close(own)


def _exit_code(exit_r: int, init_status: int) -> int:
    """The workload's exit code as init reported it, or init's own (killed: the workload was too)."""
    os.set_blocking(exit_r, False)
    try:
        reported = os.read(exit_r, 64)  # written before init exited: here by now, if at all
    except BlockingIOError:
        reported = b""
    finally:
        os.close(exit_r)
    status = int(reported) if reported else init_status
    return os.waitstatus_to_exitcode(status)


class _InitPipes(NamedTuple):
    """Init's ends: commands in; exec failure, exit status and the workload's output out."""

    command: int
    status: int
    exit: int
    stdout: int
    stderr: int


def _run_init(parent: int, contained: bool, pipes: _InitPipes, jail: api.Jail | None, workdir: str) -> None:
    """Init of the workload's namespace: jail, start the workload, pass signals on, report its end."""
    try:
        # Killed with the agent. In a namespace of our own the parent reads as 0: an agent that
        # died before this is noticed by the end of the command pipe.
        linux.die_with_parent(parent)
        _close_fds_except(set(pipes))  # the agent's sockets above all: its exit must close them
        _fresh_process_state()
        workload = 0

        def forward(sig: int, _frame: object) -> None:
            if workload:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(workload, sig)

        signal.set_wakeup_fd(-1)  # the agent's event loop's, not ours
        for sig in FORWARDED:
            signal.signal(sig, forward)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())  # the workload inherits the mask
        # out of its machine's memory, the kernel kills the workload first, not its agent
        with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as adj:
            adj.write("1000")
        built = None
        if jail is not None:
            try:
                built = jails.build(jail, workdir)
            except jails.JailError as exc:
                _fail(pipes, f"the workload's jail could not be built: {exc.strerror}")
        os.write(pipes.status, READY)
        length = _read_exactly(pipes.command, 4)
        if not length:
            os._exit(0)  # the agent let it go
        try:
            header = _read_exactly(pipes.command, int.from_bytes(length, "big"))
            command = msgspec.msgpack.decode(header, type=_Command)
            path, cwd = _place_artifact(pipes.command, command.size, built, workdir)
            workload = _spawn(path, command, cwd, contained, pipes)
        except Exception as exc:  # not only OSError: a NUL in argv is a ValueError; any failure is said
            _fail(pipes, f"cannot run the workload: {exc}")
        os.write(pipes.status, STARTED)
        for fd in (pipes.command, pipes.status, pipes.stdout, pipes.stderr):
            os.close(fd)
        while True:
            pid, status = os.waitpid(-1, 0)  # orphans of the namespace are ours to reap too
            if pid == workload:
                os.write(pipes.exit, str(status).encode())
                break
    except BaseException:
        pass
    finally:
        os._exit(0)


def _fail(pipes: _InitPipes, reason: str) -> NoReturn:
    os.write(pipes.status, FAILED + reason.encode(errors="replace"))
    os._exit(0)


def _fresh_process_state() -> None:
    """What init (and so the workload) must not inherit from the agent or from whoever started the
    node: its standard descriptors (the machine's log files), its umask, its personality."""
    null = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(null, target)
    if null > 2:
        os.close(null)
    os.umask(0o022)
    linux.libc.personality(0)  # PER_LINUX: address-space randomisation on, whatever setarch said


def _place_artifact(source: int, size: int, built: jails.Built | None, workdir: str) -> tuple[str, str]:
    """Move the artifact's ``size`` bytes from ``source`` (the command pipe) to where it runs from; its
    path and the workload's working directory.

    In a jail: through the descriptor the jail opened (nothing of the workload existed then to plant
    a link). Without one: a new file in the agent's own directory, never following a link.
    """
    if built is not None:
        fd, path, cwd = built.artifact_fd, jails.ARTIFACT, jails.WORKDIR
    else:
        path, cwd = os.path.join(workdir, "workload"), workdir
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o755)
    try:
        left = size
        while left:
            moved = os.splice(source, fd, left)
            if not moved:
                raise EOFError(f"the artifact ended {left} bytes short")
            left -= moved
    finally:
        os.close(fd)  # before the exec: a file open for writing cannot be executed (ETXTBSY)
    return path, cwd


def _spawn(path: str, command: _Command, cwd: str, contained: bool, pipes: _InitPipes) -> int:
    """Start the workload: ``posix_spawn`` (vfork and exec, about 0.2 ms from init), or where it needs
    a death signal of its own, outside a namespace of ours, ``Popen`` with ``preexec_fn`` (a fork)."""
    if not contained:
        with open(os.devnull, "rb") as devnull:
            process = subprocess.Popen(
                [path, *command.argv],
                executable=path,
                env=command.env,
                cwd=cwd,
                stdin=devnull,
                stdout=pipes.stdout,
                stderr=pipes.stderr,
                preexec_fn=linux.die_with_parent,  # safe: init has one thread
            )
        process.returncode = 0  # init's loop reaps it; Popen must not (nor warn that it did not)
        return process.pid
    os.chdir(cwd)  # posix_spawn has no chdir of its own; init's directory does not matter
    return os.posix_spawn(
        path,
        [path, *command.argv],
        command.env,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, pipes.stdout, 1),  # init's other descriptors are all close-on-exec
            (os.POSIX_SPAWN_DUP2, pipes.stderr, 2),
        ],
        setsigdef=DEFAULT_SIGNALS,
        setsigmask=(),
    )


def _close_fds_except(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _read_exactly(fd: int, size: int) -> bytes:
    """``size`` bytes from ``fd`` (fewer only at its end)."""
    chunks, left = [], size
    while left and (chunk := os.read(fd, left)):
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


async def _read_message(fd: int) -> bytes:
    """What is in the (non-blocking) pipe once it is readable: a status message, or b"" at its end."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await readable
    finally:
        loop.remove_reader(fd)
    return os.read(fd, 65536)


async def _read_to_end(fd: int) -> bytes:
    """Everything until end of file, read as it becomes readable (the caller closes the fd)."""
    chunks = []
    while chunk := await _read_message(fd):
        chunks.append(chunk)
    return b"".join(chunks)


async def _reader(fd: int, limit: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
    return reader
