"""Running the one workload of an agent (nex's ``native`` provider).

On ``deploy`` the agent takes the artifact from its machine's object store (``NEXCACHE_{vmid}``,
key ``workload``; received as the node writes it, see :mod:`.store_watch`), checks its size and
sha256 against the request, and has it started, jailed, with the request's argv and environment
(keys upper-cased and nothing inherited, as nex does), in a PID namespace of its own so that whatever
it starts ends with it; it dies with the agent (its init is forked and jailed as the artifact arrives,
see :mod:`.launchpad`). It then confirms, reports ``workload_started``, streams stdout (level info)
and stderr (level error) line by line on ``agentint.{vmid}.logs``, and reports ``workload_stopped``
with the exit code when it ends (after its last line), saying so when the kernel killed it for
exceeding the machine's memory.

Its output goes out no faster than its machine's :class:`~nex.api.agent.LogBudget` (lines and bytes
a second, with a burst), stdout and stderr together: one log message per line costs the node, whose
work is not limited by any machine's cgroup, and one workload printing a million short lines a second
starved every other machine of the node. The budget is kept by backpressure, not by dropping: when
it is spent the agent stops reading the workload's pipes until it is back, the pipes fill, and the
workload blocks on its own writes. Every line arrives, in order, just later. A line longer than
:data:`LINE_LIMIT` goes out in pieces of at most that many bytes, and the agent says so in its own log
(at the first such line, and how many there were once the workload has ended), as it says how long
the output was held back. A line that cannot be passed on (its publish fails) is lost alone: the
agent says why, and how many were lost, and reads on, so that the workload never blocks on a pipe
that nobody reads any more.

On ``undeploy`` it sends the workload SIGTERM, waits up to ``grace`` seconds, then SIGKILL, and
answers once the workload is gone. The grace covers the output still held back too: what has not
gone out by then is dropped (the agent says how much), so that a stop never waits on the budget.
Either way, once the workload has ended the agent's job is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from collections.abc import Callable

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from nex.api import agent as api
from nex.sandbox import cgroups

from .launchpad import Launchpad, Workload
from .output import LogGate, describe, pump
from .store_watch import StoreWatch

LINE_LIMIT = 64 << 10
"""The longest piece of a line that goes out as one log message (longer lines go out in pieces). The
message is JSON, in which a byte can take 6 (``\\u0001``): 64 KiB stays well within the 1 MiB a NATS
message holds by default, as on the control server the node relays each line to."""
UNDEPLOY_GRACE = 5.0
JAIL_AHEAD_DELAY = 1.0
"""Seconds after the handshake before a warm machine forks its workload's init and builds its jail:
then a deploy finds it built (on the deploy's path it cost a few ms), yet the pool's fill, when many
machines start at once, does not pay for it. A deploy that comes sooner forks as its artifact arrives."""
EXIT_DRAIN = 10.0  # seconds the output still held back by the budget may take after the workload ended
FETCH_TIMEOUT = 10.0  # the node asks only once the artifact is stored: it is here, or something broke

_encoder = msgspec.json.Encoder()


class Runner:
    def __init__(
        self,
        nc: Client,
        vmid: str,
        finished: asyncio.Event,
        log: Callable[[str], None],
        jail: api.Jail | None = None,
        workdir: str = ".",
        log_budget: api.LogBudget | None = None,
    ) -> None:
        """``log_budget``: how fast the workload's output may go out (None: the defaults of
        :class:`~nex.api.agent.LogBudget`, the same with or without a jail)."""
        self.nc = nc
        self.vmid = vmid
        self.jail = jail
        self.workdir = workdir
        self.log_budget = api.LogBudget() if log_budget is None else log_budget
        self.gate = LogGate(self.log_budget)
        self._oom_kills = 0  # the machine's count when the workload started
        self._pids_refused = 0  # likewise, of forks refused at its pids limit
        self.finished = finished
        self.log = log
        self.launchpad: Launchpad | None = None  # forked as the artifact arrives; at deploy if missing
        self.process: Workload | None = None
        self.request: api.AgentDeployRequest | None = None
        self.ended = asyncio.Event()
        self._pumps: list[asyncio.Future[None]] = []
        self._long_lines = 0  # lines of the workload's output longer than LINE_LIMIT
        self._waiter: asyncio.Future[None] | None = None
        self.watch: StoreWatch | None = None
        self._watching: asyncio.Future[None] | None = None

    async def on_deploy(self, msg: Msg) -> None:
        if self.process is not None:
            await self._answer(msg, False, "this agent already runs a workload")
            return
        try:
            request = msgspec.json.decode(msg.data, type=api.AgentDeployRequest)
            artifact = await self._fetch(request)
            launchpad, self.launchpad = self.launchpad or self._new_launchpad(), None
            self._oom_kills = self._count_oom_kills()
            self._pids_refused = self._count_pids_refused()
            self.process = await launchpad.launch(
                artifact,
                request.argv,
                {key.upper(): value for key, value in request.environment.items()},
                limit=LINE_LIMIT,
            )
        except Exception as exc:
            await self._answer(msg, False, str(exc) or type(exc).__name__)
            return
        self.request = request
        await self._answer(msg, True)
        await self._event(api.WorkloadStatus(workload_name=request.workload_name), "workload_started")
        alone = "" if launchpad.contained else " (no PID namespace: what it starts may outlive it)"
        self._say(f"workload {request.workload_name} started: init pid {self.process.pid}{alone}")
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        self._pumps = [
            asyncio.ensure_future(self._pump(self.process.stdout, api.LEVEL_INFO)),
            asyncio.ensure_future(self._pump(self.process.stderr, api.LEVEL_ERROR)),
        ]
        self._waiter = asyncio.ensure_future(self._wait_exit())  # referenced: asyncio keeps only weak ones

    async def on_undeploy(self, msg: Msg) -> None:
        grace = UNDEPLOY_GRACE
        if msg.data.strip():
            with contextlib.suppress(msgspec.DecodeError):
                grace = msgspec.json.decode(msg.data, type=api.UndeployRequest).grace_ms / 1000
        await self.terminate(grace)
        await msg.respond(b"")
        self._say("undeployed")
        self.finished.set()

    async def terminate(self, grace: float) -> None:
        """Stop the workload (SIGTERM, ``grace`` seconds, SIGKILL) and wait until it is reported ended."""
        process = self.process
        if process is None or self.ended.is_set():
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(asyncio.shield(self.ended.wait()), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            self.gate.cut()  # what the budget still holds back would keep the stop waiting: dropped
            await self.ended.wait()

    def close(self) -> None:
        """The agent is leaving: let an unused launchpad go."""
        if self.launchpad is not None:
            self.launchpad.close()
            self.launchpad = None

    def prepare(self) -> None:
        """Get ready for a deploy once the machine is ready: watch the store (in the background; a
        deploy waits for it)."""
        self._watching = asyncio.ensure_future(self._start_watching())
        if self.jail is not None:  # its init builds the jail while the machine waits warm
            asyncio.get_running_loop().call_later(JAIL_AHEAD_DELAY, self._fork_launchpad)

    def _fork_launchpad(self) -> None:
        """Fork the launchpad (its init builds the workload's jail): once the machine has been warm
        for :data:`JAIL_AHEAD_DELAY` (jailed machines), or when the artifact starts arriving, while
        the node finishes writing it, rather than at the deploy (on its path). Only while the agent
        has one thread (nats-py starts none; forking a threaded process is not safe); else the
        deploy forks."""
        if self.launchpad is None and self.process is None and threading.active_count() == 1:
            self.launchpad = self._new_launchpad()

    def _new_launchpad(self) -> Launchpad:
        return Launchpad(self.jail, self.workdir)

    def _count_pids_refused(self) -> int:
        """The forks this machine's cgroup refused at its pids limit (0 without)."""
        if self.jail is None or not self.jail.cgroup:
            return 0
        try:
            return cgroups.pids_limit_hits(self.jail.cgroup)
        except OSError:
            return 0

    def _count_oom_kills(self) -> int:
        """The kernel's count of processes it killed for memory in this machine's cgroup (0 without)."""
        if self.jail is None or not self.jail.cgroup:
            return 0
        try:
            return cgroups.oom_kills(self.jail.cgroup)
        except OSError:
            return 0

    async def _start_watching(self) -> None:
        """Receive the machine's object store as it is written (see :mod:`.store_watch`).

        Without the store (a node that does not make one up front), the artifact is fetched on deploy.
        """
        watch = StoreWatch(self.nc, api.bucket(self.vmid), on_chunk=self._fork_launchpad)
        try:
            await watch.start()
        except Exception as exc:
            self._say(f"not watching the artifact store ({type(exc).__name__}): fetching on deploy")
            return
        self.watch = watch

    async def _fetch(self, request: api.AgentDeployRequest) -> bytes:
        if self._watching is not None:
            await self._watching
        if self.watch is not None:
            data = await self.watch.read(api.ARTIFACT_KEY, FETCH_TIMEOUT)
        else:
            store = await self.nc.jetstream().object_store(api.bucket(self.vmid))
            data = (await store.get(api.ARTIFACT_KEY)).data or b""
        if len(data) != request.total_bytes:
            raise ValueError(f"the artifact has {len(data)} bytes, the request says {request.total_bytes}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != request.hash:
            raise ValueError(f"the artifact's sha256 is {digest}, the request says {request.hash}")
        return data

    async def _pump(self, stream: asyncio.StreamReader, level: int) -> None:
        assert self.request is not None
        name = self.request.workload_name

        what = "stderr" if level == api.LEVEL_ERROR else "stdout"

        async def emit(text: str) -> None:
            await self.nc.publish(
                api.logs(self.vmid), _encoder.encode(api.LogEntry(source=name, level=level, text=text))
            )

        def on_split() -> None:
            self._long_lines += 1
            if self._long_lines == 1:
                self._say(
                    f"workload {name} wrote a line longer than {LINE_LIMIT >> 10} KiB on its {what}: "
                    f"such lines go out in pieces of {LINE_LIMIT >> 10} KiB"
                )

        def on_error(exc: Exception) -> None:
            if self.gate.failed_lines == 1:
                self._say(f"a line of workload {name}'s {what} could not be passed on, it is lost: {_why(exc)}")

        try:
            await pump(stream, LINE_LIMIT, self.gate, emit, on_split=on_split, on_error=on_error)
        except Exception as exc:  # reading failed: say so, and keep the pipe from filling if it still can
            self._say(f"workload {name}'s {what} could not be read on ({_why(exc)}): the rest of it is dropped")
            with contextlib.suppress(Exception):
                await self.gate.discard(stream)

    def _report_output(self, name: str) -> None:
        """Say, once, whether the budget held the workload's output back, and what a stop dropped."""
        gate = self.gate
        if self._long_lines:
            self._say(
                f"workload {name} wrote {_lines(self._long_lines)} longer than {LINE_LIMIT >> 10} KiB, "
                f"which went out in pieces of {LINE_LIMIT >> 10} KiB"
            )
        if gate.failed_lines:
            self._say(
                f"{_lines(gate.failed_lines)} ({gate.failed_bytes} bytes) of workload {name}'s output "
                "could not be passed on, and are lost"
            )
        if gate.held_back > 0:
            self._say(
                f"workload {name} wrote faster than its log budget of {describe(self.log_budget)}: "
                f"its output was held back for {gate.held_back:.1f} s in all"
            )
        if gate.dropped_lines:
            self._say(
                f"workload {name} ended (or was stopped) before {gate.dropped_lines} lines "
                f"({gate.dropped_bytes} bytes) of its output could go out within its log budget: they were dropped"
            )

    async def _wait_exit(self) -> None:
        assert self.process is not None
        assert self.request is not None
        code = await self.process.wait()
        # every line out before the end, within EXIT_DRAIN: a workload that printed far past its
        # budget and exited must not hold its workload_stopped back for minutes
        _, pending = await asyncio.wait(self._pumps, timeout=EXIT_DRAIN)
        if pending:
            self.gate.cut()
            await asyncio.wait(pending)
        for task in self._pumps:  # a pump says what went wrong itself: this is only in case it could not
            if not task.cancelled() and (exc := task.exception()) is not None:
                self._say(f"the output of workload {self.request.workload_name} failed: {_why(exc)}")
        self._report_output(self.request.workload_name)
        message = f"exited with code {code}" if code >= 0 else f"killed by signal {-code}"
        if code == -9 and self._count_oom_kills() > self._oom_kills:
            assert self.jail is not None
            message = f"killed by the kernel: out of memory (the machine has {self.jail.memory_mib} MiB)"
        if (refused := self._count_pids_refused() - self._pids_refused) > 0:
            message += f"; its pids limit refused {refused} forks"
        await self._event(
            api.WorkloadStatus(workload_name=self.request.workload_name, code=code, message=message), "workload_stopped"
        )
        with contextlib.suppress(Exception):
            await self.nc.flush(2)
        self._say(f"workload {self.request.workload_name} {message}")
        self.ended.set()
        self.finished.set()

    async def _event(self, status: api.WorkloadStatus, event_type: str) -> None:
        await self.nc.publish(api.events(self.vmid, event_type), _encoder.encode(status))

    async def _answer(self, msg: Msg, accepted: bool, message: str | None = None) -> None:
        if not accepted:
            self._say(f"deploy refused: {message}")
        await msg.respond(_encoder.encode(api.DeployResponse(accepted=accepted, message=message)))

    def _say(self, text: str) -> None:
        self.log(text)


def _why(exc: BaseException) -> str:
    """An exception as the agent's log says it: its type, and its message when it has one."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _lines(count: int) -> str:
    return f"{count} line" if count == 1 else f"{count} lines"
