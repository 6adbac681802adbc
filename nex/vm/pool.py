"""The warm pool: ``machine_pool_size`` machines started ahead of need, each with a handshaken agent.

The pool keeps the number of its machines (starting or ready) at its size: it starts the missing
ones concurrently, at most ``parallel`` at a time, and starts a replacement as soon as a machine
leaves (its agent died, it was taken for a workload). Machines are children of the ``machines``
dynamic supervisor; the pool hears of their end through :class:`MachineGone`.

A replacement for a machine taken for a workload waits until that workload's deploy has settled (the
taker sends :class:`Settled`), unless no ready machine is left or someone waits for one: a machine's
start (namespace, agent, handshake) costs CPU that the deploy in progress needs more.

Failures back off exponentially (0.1 s doubling to 10 s), so a broken host does not spin. The pool is
started (and the node ready) once the first fill is complete. If the first handshake the node ever
waits for does not come, that is fatal: the pool fails its start with :class:`PoolFailed`, saying what
failed and what to check, and the node exits. A later handshake timeout only costs that machine.
In lame duck the pool stops refilling.

A restart of the pool's actor runs a fresh :class:`Pool` (OTP's clean-state restart) on the node's
:class:`PoolBook`: the record of the machines, which run on under the ``machines`` supervisor and
so outlive the actor, and of the takers still waiting. A machine whose start the old instance had
under way was cancelled with it (and left the book), so the fresh pool finds only ready machines.

The internal NATS server holds each machine's artifact store in memory. When it restarts, the
machines warmed before are useless (their stores are gone with it): :class:`ServerRestarted`
retires them and the pool warms new ones.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec
import trio
from opentelemetry import metrics

from actors import (
    Actor,
    ActorRef,
    ActorStopped,
    ChildSpec,
    DynamicSupervisor,
    Mailbox,
    Message,
    Reply,
    Restart,
    actor_spec,
)
from nex import logs

from .machine import HandshakeTimeout, Machine, MachineDeps, MachineMsg

log = logs.get("nex.vm")

BACKOFF_FIRST = 0.1
BACKOFF_MAX = 10.0
SETTLE_TIMEOUT = 5.0  # a taker that never says it has settled delays replacements no longer than this

# On the OpenTelemetry API's global meter: no-ops unless the node turned metrics on (nex.node.telemetry)
_meter = metrics.get_meter("nex.vm")
WARMUP_TIME = _meter.create_histogram(
    "nex-machine-warmup-time", unit="ms", description="From a machine's start to its agent's handshake"
)
MACHINE_FAILURES = _meter.create_counter("nex-machine-failures", description="Machines that failed to start")
MACHINE_REPLACEMENTS = _meter.create_counter(
    "nex-machine-replacements", description="Machines started to replace one that left the warm pool"
)


class PoolFailed(Exception):
    """The pool cannot fill: its first machine never became ready."""


class MachineGone(Message):
    vmid: str
    reason: str


class Settled(Message):
    """The deploy onto a taken machine has finished, one way or the other: refill now."""

    vmid: str


class Take(Message):
    """Hand over a ready machine for a workload (it leaves the pool, which starts a replacement)."""

    reply: Reply[Taken]


class Taken(msgspec.Struct):
    vmid: str
    ref: ActorRef[MachineMsg]
    ip: str = ""


class ServerRestarted(Message):
    """The internal NATS server started again (its ``generation``-th start): retire what it broke."""

    generation: int


PoolMsg = MachineGone | Take | Settled | ServerRestarted


class LameDuck(Protocol):
    """What the pool needs to know of the node: whether it is in lame duck, and to hear when it is."""

    @property
    def lameduck(self) -> bool: ...

    on_lameduck: list[Callable[[], None]]


class PoolEntry(msgspec.Struct):
    vmid: str
    state: str
    ip: str = ""


class _Member:
    __slots__ = ("generation", "ip", "ref", "since", "state", "vmid")

    def __init__(self, vmid: str, generation: int) -> None:
        self.vmid = vmid
        self.state = "starting"
        self.ip = ""
        self.ref: ActorRef[MachineMsg] | None = None
        self.since = time.monotonic()
        self.generation = generation  # of the internal server its artifact store was made on


@dataclass(eq=False)
class PoolBook:
    """What the pool knows that outlives a restart of its actor (see the module docstring)."""

    members: dict[str, _Member] = field(default_factory=dict)
    waiting: collections.deque[Reply[Taken]] = field(default_factory=collections.deque)
    settling: dict[str, float] = field(default_factory=dict)  # taken, deploy in progress: deadline
    handshakes: int = 0
    failures: int = 0
    starts: int = 0
    not_before: float = 0.0
    generation: int = 1  # of the internal server

    def entries(self) -> list[PoolEntry]:
        return [PoolEntry(vmid=m.vmid, state=m.state, ip=m.ip) for m in self.members.values()]


Progress = Callable[[int, int], None]


class Pool(Actor[PoolMsg]):
    def __init__(
        self,
        node: LameDuck,
        machines: DynamicSupervisor,
        deps: MachineDeps,
        *,
        size: int,
        book: PoolBook | None = None,
        parallel: int = 8,
        progress: Progress | None = None,
    ) -> None:
        self.node = node
        self.machines = machines
        self.deps = deps
        self.size = size
        self.book = book if book is not None else PoolBook()
        self.members = self.book.members
        self.limiter = trio.CapacityLimiter(parallel)
        self.progress = progress
        self._changed = trio.Event()
        self._filled = trio.Event()
        self._fatal: PoolFailed | None = None

    @staticmethod
    def spec(factory: Callable[[], Pool], mailbox: Mailbox[PoolMsg]) -> ChildSpec:
        """Each (re)start runs ``factory()``, a fresh pool on the node's one :class:`PoolBook`."""
        return actor_spec(factory, mailbox, restart=Restart.PERMANENT)

    def entries(self) -> list[PoolEntry]:
        return self.book.entries()

    def ready(self) -> int:
        return sum(1 for m in self.members.values() if m.state == "ready")

    async def on_start(self) -> None:
        self.node.on_lameduck.append(self._notify)
        self.cleanup.push("lame-duck callback", self._unhook, durable=False)
        self.nursery.start_soon(self._keep_full)
        if self.book.handshakes > 0 or self.node.lameduck:
            self._filled.set()  # a restart: the node is ready already, and the book may be full
        await self._filled.wait()
        if self._fatal is not None:
            raise self._fatal
        log.info("Warm pool ready", machines=self.ready(), size=self.size)

    async def _unhook(self) -> None:
        with contextlib.suppress(ValueError):
            self.node.on_lameduck.remove(self._notify)

    async def handle(self, message: PoolMsg) -> None:
        match message:
            case MachineGone(vmid=vmid, reason=reason):
                if self.members.pop(vmid, None) is not None:
                    log.info("Machine left the pool", vmid=vmid, reason=reason)
                    self._notify()
            case Take(reply=reply):
                self.book.waiting.append(reply)
                self._serve_takes()
            case Settled(vmid=vmid):
                if self.book.settling.pop(vmid, None) is not None:
                    self._notify()
            case ServerRestarted(generation=generation):
                self.book.generation = max(self.book.generation, generation)
                stale = [m for m in self.members.values() if m.generation < self.book.generation]
                if stale:
                    log.warning(
                        "The internal NATS server restarted: replacing the machines warmed before",
                        machines=len(stale),
                    )
                for member in stale:
                    if member.state == "ready":
                        self._retire(member)
                    # a machine still starting is retired when it becomes ready

    def _serve_takes(self) -> None:
        """Hand ready machines to waiting takers, oldest taker first; refill behind them."""
        waiting = self.book.waiting
        while waiting:
            reply = waiting[0]
            if reply.answered or reply.abandoned:  # failed already, or its asker gave up
                waiting.popleft()
                continue
            ready = next((m for m in self.members.values() if m.state == "ready" and m.ref is not None), None)
            if ready is None:
                return
            waiting.popleft()
            del self.members[ready.vmid]
            assert ready.ref is not None
            self.book.settling[ready.vmid] = trio.current_time() + SETTLE_TIMEOUT
            reply.send(Taken(vmid=ready.vmid, ref=ready.ref, ip=ready.ip))
            self._notify()

    # -- keeping the pool full -------------------------------------------------------------------

    async def _keep_full(self) -> None:
        while True:
            if self.node.lameduck:
                await self._retire_idle()
            missing = self.size - len(self.members)
            settling = self.book.settling
            if missing > 0 and not self.node.lameduck and self._deploy_in_progress():
                with trio.move_on_at(min(settling.values())):
                    await self._wait_changed()
                for vmid in [v for v, deadline in settling.items() if deadline <= trio.current_time()]:
                    del settling[vmid]
                continue
            if missing > 0 and not self.node.lameduck:
                await trio.sleep_until(self.book.not_before)
                if self.book.handshakes > 0:  # not the first fill: these replace machines that left
                    MACHINE_REPLACEMENTS.add(self.size - len(self.members))
                for _ in range(self.size - len(self.members)):
                    vmid, seed = await self.deps.credentials.take()  # at once, from the stock
                    self.members[vmid] = _Member(vmid, self.book.generation)
                    self.nursery.start_soon(self._start_machine, vmid, seed)
            await self._wait_changed()

    def _deploy_in_progress(self) -> bool:
        """Should replacements wait? Only while a deploy runs and a ready machine is left for the next."""
        return bool(self.book.settling) and not self.book.waiting and self.ready() > 0

    async def _retire_idle(self) -> None:
        """In lame duck no workload will come: stop the idle machines (running workloads go on)."""
        for member in [m for m in self.members.values() if m.state == "ready"]:
            log.info("Lame duck: retiring an idle machine", vmid=member.vmid)
            self._retire(member)

    def _retire(self, member: _Member) -> None:
        """Take a ready machine out of the pool and stop it, in the background (the refill goes on)."""
        del self.members[member.vmid]
        self.nursery.start_soon(self._terminate, member.vmid)
        self._notify()

    async def _terminate(self, vmid: str) -> None:
        with contextlib.suppress(Exception):  # gone already
            await self.machines.terminate_child(vmid)

    async def _start_machine(self, vmid: str, seed: str) -> None:
        try:
            async with self.limiter:
                self.book.starts += 1
                ref = await self.machines.start_child(self._machine_spec(vmid, seed))
        except BaseException as exc:
            # A machine cancelled before its task ran cannot revoke its agent's user; one that ran
            # already has (revoking twice is harmless).
            self.deps.credentials.revoke(vmid)
            self.members.pop(vmid, None)
            if not isinstance(exc, Exception):
                raise
            self._failed(vmid, exc)
            return
        member = self.members.get(vmid)
        if member is None:
            return  # it already left again
        member.state = "ready"
        assert isinstance(ref, ActorRef)
        member.ref = ref
        self.book.handshakes += 1
        self.book.failures = 0
        self.book.not_before = 0.0
        if member.generation < self.book.generation:  # its store was made on a server gone since
            self._retire(member)
            return
        warmup_ms = (time.monotonic() - member.since) * 1000
        WARMUP_TIME.record(warmup_ms)
        log.info("Adding new VM to warm pool", vmid=vmid, ip=member.ip, warmup_ms=f"{warmup_ms:.1f}")
        self._report()
        self._serve_takes()

    def _failed(self, vmid: str, exc: Exception) -> None:
        MACHINE_FAILURES.add(1)
        if isinstance(exc, HandshakeTimeout) and self.book.handshakes == 0:
            self._fatal = PoolFailed(
                f"first handshake failed: {exc}. Check that agents can reach the internal NATS server at "
                f"{self.deps.agent_host}:{self.deps.agent_port} from their network namespace, look for errors "
                f"above, and raise agent_handshake_timeout_ms if machines start slowly on this host"
            )
            log.error("First handshake failed, shutting down to avoid inconsistent behavior", vmid=vmid)
            self._filled.set()
            return
        self.book.failures += 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.book.failures - 1))
        self.book.not_before = trio.current_time() + delay
        log.warning("Machine failed to start; retrying", vmid=vmid, error=str(exc), retry_in=f"{delay:.1f}s")
        self._notify()

    def _machine_spec(self, vmid: str, seed: str) -> ChildSpec:
        mailbox = Mailbox[MachineMsg](16, name=vmid)
        pool_ref = self.ref
        members = self.members
        deps = self.deps

        async def run_machine(*, task_status: trio.TaskStatus[object]) -> None:
            started = False
            reason = "stopped"

            def ready(value: object = None) -> None:
                nonlocal started
                started = True
                machine = members.get(vmid)
                if machine is not None and actor.context is not None:
                    machine.ip = actor.context.address
                task_status.started(value)

            def lost(reason: str) -> None:
                with contextlib.suppress(ActorStopped):
                    pool_ref.send_nowait(MachineGone(vmid=vmid, reason=reason))

            actor = Machine(vmid, seed, deps, on_lost=lost)
            try:
                await actor.run(mailbox, task_status=_Started(ready))
            except BaseException as exc:
                reason = str(exc) or type(exc).__name__
                raise
            finally:
                if started:
                    with contextlib.suppress(ActorStopped):  # the pool is gone too: the node is stopping
                        pool_ref.send_nowait(MachineGone(vmid=vmid, reason=reason))
                    if deps.ended is not None:
                        deps.ended(vmid, reason)

        return ChildSpec(
            id=vmid, start=run_machine, restart=Restart.TEMPORARY, shutdown=10.0, kind="actor", mailbox=mailbox
        )

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.ready(), self.size)
        if not self._filled.is_set() and self.ready() >= self.size:
            self._filled.set()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_changed(self) -> None:
        await self._changed.wait()


def mailbox() -> Mailbox[PoolMsg]:
    """The pool's mailbox, made by the node before the pool so that others can hold its ref."""
    return Mailbox[PoolMsg](1024, name="pool")


class _Started:
    """A task status that runs a callback when the child reports it has started."""

    def __init__(self, callback: Callable[[object], None]) -> None:
        self.callback = callback

    def started(self, value: object = None) -> None:
        self.callback(value)
