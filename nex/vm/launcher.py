"""Starting agent processes: from the pre-imported zygote (fast) or as new processes (the fallback).

Both launchers take a :class:`LaunchSpec` and return an :class:`AgentProcess` that the machine waits
on and signals. The node logs which one it uses.
"""

from __future__ import annotations

import array
import contextlib
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import msgspec
import trio

from actors import ChildSpec, CleanupStack
from nex import logs, proc
from nex.api.agent import MachineMetadata

from . import zygote

log = logs.get("nex.vm")

PIPE_BUF_MIN = 4096  # what a new pipe holds at least (one page, for a user past pipe-user-pages-soft)
STOP_GRACE = 2.0  # seconds an agent has to exit on SIGTERM before SIGKILL
ANSWER_GRACE = 2.0  # seconds a release waits for the zygote's answer to a launch it cut off


class LaunchFailed(Exception):
    """The agent process could not be started."""


@dataclass(frozen=True)
class LaunchSpec:
    metadata: MachineMetadata  # handed over privately: it holds the agent's nkey seed
    stdout: Path
    stderr: Path
    cwd: Path
    netns: Path | None = None

    @property
    def vmid(self) -> str:
        return self.metadata.vmid


#: the only environment an agent or the zygote gets: nothing of the operator's
AGENT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def agent_environment() -> dict[str, str]:
    """:data:`AGENT_ENV`, plus where Python finds nex when the node found it through PYTHONPATH."""
    extra = {name: os.environ[name] for name in ("PYTHONPATH",) if name in os.environ}
    return {**AGENT_ENV, **extra}


class AgentProcess(Protocol):
    pid: int

    async def wait(self) -> int | None:
        """Until the process exits; its exit code when known."""
        ...

    def signal(self, sig: int) -> None: ...

    async def stop(self, grace: float) -> int | None:
        """SIGTERM, ``grace`` seconds, then SIGKILL; shielded."""
        ...


class Launcher(Protocol):
    """Starts agents. ``launch`` registers the agent's release on ``cleanup`` *before* it starts
    anything, so a launch cut off at any point (cancellation, deadline) is still undone in full."""

    @property
    def name(self) -> str: ...

    async def launch(self, spec: LaunchSpec, cleanup: CleanupStack) -> AgentProcess: ...


async def _stop(process: AgentProcess, grace: float) -> int | None:
    codes: list[int | None] = []
    with trio.CancelScope(shield=True):
        process.signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            codes.append(await process.wait())
        if not codes:
            process.signal(signal.SIGKILL)
            codes.append(await process.wait())
    return codes[0]


# -- plain spawn ---------------------------------------------------------------------------------------


class _SpawnedAgent:
    def __init__(self, child: proc.ChildProcess) -> None:
        self.child = child
        self.pid = child.pid

    async def wait(self) -> int | None:
        return await self.child.wait()

    def signal(self, sig: int) -> None:
        self.child.signal(sig)

    async def stop(self, grace: float) -> int | None:
        return await _stop(self, grace)


class SpawnLauncher:
    """``python -m nex.agent`` per machine: no shared state, but a full Python start each time.

    The metadata goes through a pipe the agent inherits (``--metadata-fd``), written before the
    start: it is small, far below a pipe's 64 KiB.
    """

    name = "spawn"

    async def launch(self, spec: LaunchSpec, cleanup: CleanupStack) -> AgentProcess:
        metadata = msgspec.json.encode(spec.metadata)
        if len(metadata) > PIPE_BUF_MIN:  # written before the agent reads: it must fit in the pipe
            raise LaunchFailed(f"the metadata of {spec.vmid} is too large for a pipe ({len(metadata)} bytes)")
        out = os.open(spec.stdout, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        err = os.open(spec.stderr, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        meta_r, meta_w = os.pipe2(os.O_CLOEXEC)
        try:
            os.write(meta_w, metadata)
        finally:
            os.close(meta_w)
        try:
            child = proc.spawn(
                [sys.executable, "-m", "nex.agent", "--metadata-fd", str(meta_r), "--machine", str(spec.cwd)],
                env=agent_environment(),
                cwd=spec.cwd,
                stdout=out,
                stderr=err,
                netns=spec.netns,
                pass_fds=[meta_r],
            )
        except OSError as exc:
            raise LaunchFailed(f"cannot start the agent for {spec.vmid}: {exc}") from None
        finally:
            for fd in (out, err, meta_r):
                os.close(fd)
        agent = _SpawnedAgent(child)  # no checkpoint since the spawn: nothing can interrupt us here
        cleanup.push(f"agent {agent.pid}", lambda: agent.stop(grace=STOP_GRACE), durable=False)
        return agent


# -- the zygote ----------------------------------------------------------------------------------------


class ZygoteDied(Exception):
    """The zygote process exited (its supervisor restarts it)."""


@dataclass
class _ZygoteAgent:
    pid: int
    pidfd: int
    exited: trio.Event = field(default_factory=trio.Event)
    code: int | None = None

    async def wait(self) -> int | None:
        if self.pidfd >= 0:
            await trio.lowlevel.wait_readable(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1
        with trio.move_on_after(1.0):  # the zygote's exit report follows the exit itself closely
            await self.exited.wait()
        return self.code

    def signal(self, sig: int) -> None:
        if self.pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, sig)

    async def stop(self, grace: float) -> int | None:
        return await _stop(self, grace)


class ZygoteLauncher:
    """Forks agents from a pre-imported zygote process; supervised as the ``zygote`` child.

    Forking is only safe from a single-threaded process, so the zygote reports its thread count
    when it is ready. If it has more than one thread, or cannot start at all, this launcher falls
    back to :class:`SpawnLauncher` for the rest of the node's life and logs why.
    """

    def __init__(self, node_dir: Path | None = None) -> None:
        self.node_dir = node_dir
        self.fallback: SpawnLauncher | None = None
        self.pid: int | None = None
        self._sock: trio.socket.SocketType | None = None
        self._ids = 0
        self._pending: dict[int, tuple[trio.Event, list[object]]] = {}
        self._agents: dict[int, _ZygoteAgent] = {}  # pid -> agent, until the zygote reports its exit
        self._started: dict[int, _ZygoteAgent] = {}  # agents handed to a machine, until they exit
        self._send_lock = trio.Lock()
        self._served = False
        self.ready = trio.Event()

    @property
    def name(self) -> str:
        return "spawn (zygote unavailable)" if self.fallback is not None else "zygote"

    def child_spec(self) -> ChildSpec:
        return ChildSpec(id="zygote", start=self.run, shutdown=5.0, kind="process")

    async def run(self, *, task_status: trio.TaskStatus[ZygoteLauncher] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the zygote and serve it; started as soon as its process exists.

        Its imports (~0.1 s) thus overlap the rest of the node's start-up; :meth:`launch` waits
        until it is ready. If it cannot serve safely, launches are served by spawning instead (and
        the node says so).
        """
        if self.fallback is not None:
            task_status.started(self)
            await trio.sleep_forever()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # the node's directory on the command line tells an operator (and ps) whose zygote it is
            node = ["--node", str(self.node_dir)] if self.node_dir is not None else []
            child = proc.spawn(
                [sys.executable, "-m", "nex.vm.zygote", str(theirs.fileno()), *node],
                env=agent_environment(),
                pass_fds=[theirs.fileno()],
                stderr=None,  # its own errors go to the node's stderr
            )
        finally:
            theirs.close()
        self.pid = child.pid
        sock = trio.socket.from_stdlib_socket(ours)
        task_status.started(self)
        try:
            try:
                with trio.fail_after(30):
                    first = await self._receive(sock)
                if not isinstance(first, zygote.Ready):
                    raise LaunchFailed(f"the zygote said {first!r} instead of ready")
                if first.threads != 1:
                    raise LaunchFailed(f"the zygote has {first.threads} threads: forking it would not be safe")
            except (LaunchFailed, ZygoteDied, OSError, trio.TooSlowError) as exc:
                if self._served:
                    raise  # it worked before: a crash for the supervisor to restart
                log.warning("Agents will be started as new processes: the zygote is not usable", reason=str(exc))
                self.fallback = SpawnLauncher()
                self.ready.set()
                with trio.CancelScope(shield=True):
                    sock.close()
                    await child.stop(grace=5.0)
                self.pid = None
                await trio.sleep_forever()
            self._sock = sock
            self._served = True
            self.ready.set()
            while True:
                self._dispatch(await self._receive(sock))
        finally:
            self._sock = None
            if self.fallback is None:
                self.ready = trio.Event()
            for event, box in self._pending.values():
                box.append(ZygoteDied("the zygote exited"))
                event.set()
            with trio.CancelScope(shield=True):
                sock.close()  # the zygote sees EOF and exits; its children die with it
                await child.stop(grace=5.0)
            self.pid = None

    async def _receive(self, sock: trio.socket.SocketType) -> zygote.FromZygote:
        data, ancdata, _, _ = await sock.recvmsg(1 << 16, socket.CMSG_SPACE(4))
        if not data:
            raise ZygoteDied("the zygote closed its socket")
        message: zygote.FromZygote = msgspec.json.decode(data, type=zygote.FromZygote)
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS and isinstance(message, zygote.Spawned):
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
                self._agents[message.pid] = _ZygoteAgent(pid=message.pid, pidfd=fds[0])
        return message

    def _dispatch(self, message: zygote.FromZygote) -> None:
        if isinstance(message, zygote.Exited):
            self._started.pop(message.pid, None)
            agent = self._agents.pop(message.pid, None)
            if agent is not None:
                agent.code = message.code
                agent.exited.set()
        elif isinstance(message, (zygote.Spawned, zygote.SpawnFailed)):
            waiting = self._pending.get(message.id)
            if waiting is not None:
                waiting[1].append(message)
                waiting[0].set()
            elif isinstance(message, zygote.Spawned):
                # Nobody waits for this agent any more (its machine gave up on a slow launch): it
                # must not live on unowned.
                orphan = self._agents.pop(message.pid, None)
                if orphan is not None:
                    orphan.signal(signal.SIGKILL)
                    log.warning("Killed an agent started after its machine gave up on it", pid=message.pid)

    async def launch(self, spec: LaunchSpec, cleanup: CleanupStack) -> AgentProcess:
        await self.ready.wait()  # bounded by the caller's deadline
        if self.fallback is not None:
            return await self.fallback.launch(spec, cleanup)
        sock = self._sock
        if sock is None:
            raise LaunchFailed("the zygote is not running")
        self._ids += 1
        request = zygote.Spawn(
            id=self._ids,
            metadata=spec.metadata,
            stdout=str(spec.stdout),
            stderr=str(spec.stderr),
            cwd=str(spec.cwd),
            netns=str(spec.netns) if spec.netns else "",
        )
        done, box = trio.Event(), list[object]()
        self._pending[request.id] = (done, box)

        sent = False

        async def release() -> None:
            # Runs shielded: if the request was sent, wait (briefly) for its answer, then stop
            # whatever it started. A later answer is an orphan, killed on arrival.
            if sent:
                with trio.move_on_after(ANSWER_GRACE):
                    await done.wait()
            self._pending.pop(request.id, None)
            for answer in box:
                if isinstance(answer, zygote.Spawned):
                    # look up, not pop: the zygote's exit report is matched against these tables
                    agent = self._agents.get(answer.pid) or self._started.get(answer.pid)
                    if agent is not None:
                        await agent.stop(grace=STOP_GRACE)

        cleanup.push(f"agent of {spec.vmid}", release, durable=False)
        async with self._send_lock:
            await sock.send(msgspec.json.encode(request))  # atomic under cancellation: sent, or not
            sent = True
        await done.wait()
        (answer,) = box
        if isinstance(answer, zygote.SpawnFailed):
            raise LaunchFailed(f"the zygote could not start the agent for {spec.vmid}: {answer.error}")
        if isinstance(answer, Exception):
            raise LaunchFailed(f"the zygote went away while starting the agent for {spec.vmid}") from answer
        assert isinstance(answer, zygote.Spawned)
        agent = self._agents.get(answer.pid) or _ZygoteAgent(pid=answer.pid, pidfd=-1)
        self._started[answer.pid] = agent
        return agent
