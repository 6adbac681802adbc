"""Supervisors following Erlang/OTP, on Trio.

A supervisor starts its children in order, watches them, restarts them by its :class:`Strategy` and
their :class:`Restart` type, and gives up (escalates) when restarts come faster than its intensity
allows. When it stops, for any reason, it stops its children in reverse start order, each within its
own shutdown deadline.

How this maps onto Trio:

- Each child runs in its own :class:`trio.CancelScope`, which only its supervisor cancels. While the
  child starts the scope is not shielded, so cancelling whoever started it unwinds the start at once;
  from ``started()`` on it is shielded, so an outer cancellation reaches the supervisor alone, which
  then stops the children one by one, last started first.
- The child runner catches ``Exception`` (never ``BaseException``): a crash becomes a report to the
  supervisor instead of cancelling the siblings, which is what a bare nursery would do.
- A crash before ``started()`` is a failed start: at the supervisor's own start it fails that start
  (children already started are stopped, :class:`~actors.errors.StartFailed` is raised); during a
  restart it counts as one more restart.
- Exceeding the intensity raises :class:`~actors.errors.TooManyRestarts` from the supervisor once its
  children are stopped. Its parent sees a crashed child: that is OTP escalation.
- Trio cannot kill a task. A child that overruns its shutdown deadline is reported (logged, listed in
  ``overruns``, shown as ``stopping`` in the tree). When the supervisor stops, it moves on to the
  next child (its own exit waits for the late one); when it stops children to restart them, it
  escalates with :class:`~actors.errors.ShutdownOverrun` rather than start a second run beside the
  first. Bounding the release of external resources is the job of :mod:`actors.cleanup`.
- When a supervisor stops, it closes its actors' mailboxes; when it runs again (its parent restarted
  it) it reopens them, and each actor spec builds a fresh instance.

Synopsis::

    sup = Supervisor("root", [actor_spec(Counter, counter), sub.child_spec()],
                     strategy=Strategy.ONE_FOR_ONE, intensity=3, period=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import msgspec
import trio

from .errors import (
    ActorError,
    DuplicateChild,
    Shutdown,
    ShutdownOverrun,
    StartFailed,
    SupervisorNotRunning,
    TooManyRestarts,
)
from .intensity import RestartIntensity
from .spec import ChildSpec, Restart, Strategy
from .tree import ChildState, TreeNode

log = logging.getLogger("actors.supervisor")


@runtime_checkable
class HasTree(Protocol):
    """A started child that can describe its own subtree (supervisors do)."""

    def tree(self) -> TreeNode: ...


class _Child:
    """One child slot: the spec, plus the state of its current run."""

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.generation = 0
        self.restarts = 0
        self.state = ChildState.STARTING
        self.value: object = None
        self._new_run()

    def _new_run(self) -> None:
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.started = False
        self.abandoned = False
        self.terminating = False

    def next_run(self) -> None:
        self.generation += 1
        self._new_run()


class _Exit(NamedTuple):
    child: _Child
    generation: int
    error: Exception | None


class _ChildStatus:
    """Wraps the ``task_status`` handed to a child: shields its scope once it has started.

    If whoever awaits the start was cancelled meanwhile, trio does not move the child into the
    supervisor's nursery (see trio's ``TaskStatus.started``) but leaves it to unwind where it is. The
    child must then stay unshielded, or that cancellation could never reach it and the start would
    wait forever.
    """

    def __init__(self, nursery: trio.Nursery, child: _Child, inner: trio.TaskStatus[object]) -> None:
        self._nursery = nursery
        self._child = child
        self._inner = inner

    def started(self, value: object = None) -> None:
        self._inner.started(value)
        if trio.lowlevel.current_task().parent_nursery is not self._nursery:
            self._child.abandoned = True  # the start was cancelled: unwind, do not report
            return
        self._child.scope.shield = True
        self._child.started = True


class SupervisorBase:
    """What both supervisors share: running, watching, restarting and stopping children."""

    kind = "supervisor"

    def __init__(self, name: str, *, intensity: int = 3, period: float = 5.0) -> None:
        self.name = name
        self.intensity = intensity
        self.period = period
        self.overruns: list[str] = []
        self._children: list[_Child] = []
        self._state = ChildState.STOPPED
        self._nursery: trio.Nursery | None = None
        self._exits_in: trio.MemorySendChannel[_Exit] | None = None

    # -- public ------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._state is ChildState.RUNNING

    def child_spec(self, *, id: str | None = None, restart: Restart = Restart.PERMANENT) -> ChildSpec:
        """This supervisor as a child of another one (waits for its children however long they take)."""
        return ChildSpec(id=id or self.name, start=self.run, restart=restart, shutdown=None, kind=self.kind)

    def which_children(self) -> list[tuple[str, ChildState]]:
        """Ids and states of the current children, in start order."""
        return [(child.spec.id, child.state) for child in self._children]

    def tree(self) -> TreeNode:
        """A snapshot of this supervisor and everything below it."""
        return TreeNode(
            name=self.name,
            kind=self.kind,
            state=self._state.value,
            children=[_describe(child) for child in self._children],
        )

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the children, supervise them until cancelled or escalating, then stop them."""
        restarts = RestartIntensity(self.intensity, self.period)
        self._children = []
        self.overruns = []
        self._state = ChildState.STARTING
        exits_in, exits = trio.open_memory_channel[_Exit](math.inf)
        self._exits_in = exits_in
        failure: ActorError | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    try:
                        await self._start_initial()
                        self._state = ChildState.RUNNING
                        task_status.started(self)
                        async for exit_ in exits:
                            await self._on_exit(exit_, restarts)
                    except ActorError as exc:  # our own decision to give up: raised once all is stopped
                        failure = exc
                finally:
                    self._state = ChildState.STOPPING
                    with trio.CancelScope(shield=True):
                        await self._shutdown_children()
                    self._state = ChildState.FAILED if failure else ChildState.STOPPED
        finally:
            for child in self._children:  # every run has ended now, late ones included
                _close_mailbox(child)
        if failure is not None:
            raise failure

    # -- for subclasses ----------------------------------------------------------------------------

    async def _start_initial(self) -> None:
        """Start the children known in advance, in order (none for a dynamic supervisor)."""

    async def _shutdown_children(self) -> None:
        """Stop every child for good: in reverse start order, one at a time (OTP)."""
        await self._terminate(reversed(self._children), final=True)

    async def _restart(self, child: _Child, restarts: RestartIntensity) -> None:
        """Apply the strategy for ``child``, which must be restarted. One-for-one by default."""
        await self._restart_one(child, restarts)

    async def _start(self, spec: ChildSpec, *, at: int | None = None) -> _Child:
        """Start one new child and wait until it has started; raise what its start raised."""
        if self._nursery is None or self._state not in (ChildState.STARTING, ChildState.RUNNING):
            raise SupervisorNotRunning(f"supervisor {self.name!r} is not running")
        if any(child.spec.id == spec.id for child in self._children):
            raise DuplicateChild(f"supervisor {self.name!r} already has a child {spec.id!r}")
        child = _Child(spec)
        self._children.insert(len(self._children) if at is None else at, child)
        _reopen_mailbox(child)
        try:
            child.value = await self._nursery.start(self._run_child, child)
        except BaseException:
            self._children.remove(child)
            child.state = ChildState.FAILED
            raise
        child.state = ChildState.RUNNING
        log.debug("%s: started %s", self.name, spec.id)
        return child

    async def _terminate(self, children: Iterable[_Child], *, final: bool) -> None:
        """Stop ``children`` one at a time in the given order, each within its shutdown deadline.

        ``final``: the children will not run again, so their mailboxes are closed and temporary
        children are forgotten as well.
        """
        for child in list(children):
            if child.state in (ChildState.STOPPED, ChildState.FAILED) and child.done.is_set():
                if final:
                    _close_mailbox(child)
                continue
            child.terminating = True
            child.state = ChildState.STOPPING
            child.scope.cancel()
            deadline = math.inf if child.spec.shutdown is None else child.spec.shutdown
            with trio.move_on_after(deadline):
                await child.done.wait()
            if not child.done.is_set():
                if child.spec.id not in self.overruns:
                    self.overruns.append(child.spec.id)
                log.error(
                    "%s: child %s overran its %gs shutdown deadline; moving on",
                    self.name,
                    child.spec.id,
                    deadline,
                )
                continue
            child.state = ChildState.STOPPED
            if final:
                _close_mailbox(child)

    def _forget(self, child: _Child) -> None:
        if child in self._children:
            self._children.remove(child)
        _close_mailbox(child)

    # -- internals ---------------------------------------------------------------------------------

    async def _run_child(self, child: _Child, *, task_status: trio.TaskStatus[object]) -> None:
        assert self._nursery is not None
        generation = child.generation
        error: Exception | None = None
        try:
            with child.scope:
                await child.spec.start(task_status=_ChildStatus(self._nursery, child, task_status))
            if not child.started and not child.abandoned:
                if child.scope.cancelled_caught:
                    raise SupervisorNotRunning(f"supervisor {self.name!r} stopped while {child.spec.id} started")
                raise RuntimeError(f"child {child.spec.id!r} returned without calling task_status.started()")
        except Exception as exc:
            if not child.started:
                raise  # a failed start: nursery.start re-raises it in the supervisor
            error = exc
        finally:
            child.done.set()
        if child.started and self._exits_in is not None:
            self._exits_in.send_nowait(_Exit(child, generation, error))

    async def _on_exit(self, exit_: _Exit, restarts: RestartIntensity) -> None:
        child = exit_.child
        if exit_.generation != child.generation or child.terminating or child not in self._children:
            return  # stopped on purpose, or a stale report of an earlier run
        error = exit_.error
        if isinstance(error, Shutdown):
            log.warning("%s: child %s ended: %s", self.name, child.spec.id, error)
        elif error is not None:
            log.error("%s: child %s crashed: %r", self.name, child.spec.id, error, exc_info=error)
        abnormal = error is not None and not isinstance(error, Shutdown)  # OTP: {shutdown, _} is normal
        restart = child.spec.restart is Restart.PERMANENT or (child.spec.restart is Restart.TRANSIENT and abnormal)
        if not restart:
            child.state = ChildState.FAILED if error is not None else ChildState.STOPPED
            log.info("%s: child %s ended (%s, not restarted)", self.name, child.spec.id, child.spec.restart.value)
            self._forget(child)
            return
        self._count_restart(child, error, restarts)
        await self._restart(child, restarts)

    def _count_restart(self, child: _Child, error: BaseException | None, restarts: RestartIntensity) -> None:
        child.state = ChildState.RESTARTING
        if not restarts.record(trio.current_time()):
            child.state = ChildState.FAILED
            reason = repr(error) if error is not None else f"{child.spec.id} exited"
            raise TooManyRestarts(self.name, self.intensity, self.period, reason) from error

    async def _restart_one(self, child: _Child, restarts: RestartIntensity) -> None:
        """Run ``child`` again; a failed start counts as one more restart (until the intensity gives up)."""
        await self._restart_group([child], restarts)

    async def _restart_group(self, group: list[_Child], restarts: RestartIntensity) -> None:
        """Start ``group`` again, in order. If a member fails to start, the members already started
        are stopped again and the whole group is retried, each failure counting as a restart (OTP
        retries the whole group too: a half-started group is not what the strategy promises)."""
        assert self._nursery is not None
        while True:
            started: list[_Child] = []
            try:
                for member in group:
                    member.next_run()
                    member.restarts += 1
                    member.state = ChildState.RESTARTING
                    member.value = await self._nursery.start(self._run_child, member)
                    member.state = ChildState.RUNNING
                    started.append(member)
                    log.info("%s: restarted %s (restart %d)", self.name, member.spec.id, member.restarts)
                return
            except Exception as exc:
                failed = group[len(started)]
                log.error("%s: restart of %s failed: %r", self.name, failed.spec.id, exc)
                await self._stop_for_restart(list(reversed(started)))
                self._count_restart(failed, exc, restarts)

    async def _stop_for_restart(self, children: list[_Child]) -> None:
        """Stop ``children`` (in the order given) so that they can be started again; escalate with
        :class:`ShutdownOverrun` if one of them is still running after its deadline."""
        await self._terminate(children, final=False)
        stuck = [c.spec.id for c in children if not c.done.is_set()]
        if stuck:
            raise ShutdownOverrun(self.name, stuck)


class Supervisor(SupervisorBase):
    """A supervisor of a fixed list of children, with an OTP strategy.

    Args:
        name: shown in logs, errors and the tree.
        children: started in this order, stopped in the reverse order.
        strategy: see :class:`Strategy` (default one-for-one).
        intensity, period: at most ``intensity`` restarts in any ``period`` seconds, else escalate.
    """

    def __init__(
        self,
        name: str,
        children: Sequence[ChildSpec],
        *,
        strategy: Strategy = Strategy.ONE_FOR_ONE,
        intensity: int = 3,
        period: float = 5.0,
    ) -> None:
        super().__init__(name, intensity=intensity, period=period)
        ids = [spec.id for spec in children]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"supervisor {name!r}: duplicate child ids {duplicates}")
        self.specs = list(children)
        self.strategy = strategy

    async def _start_initial(self) -> None:
        for spec in self.specs:
            try:
                await self._start(spec)
            except Exception as exc:
                raise StartFailed(self.name, spec.id) from exc

    async def _restart(self, child: _Child, restarts: RestartIntensity) -> None:
        if self.strategy is Strategy.ONE_FOR_ONE:
            await self._restart_one(child, restarts)
            return
        index = self._children.index(child)
        group = list(self._children) if self.strategy is Strategy.ONE_FOR_ALL else self._children[index:]
        others = [c for c in group if c is not child]
        await self._stop_for_restart(list(reversed(others)))
        for sibling in others:
            if sibling.spec.restart is Restart.TEMPORARY:
                self._forget(sibling)  # OTP: a temporary child is never restarted
        await self._restart_group([m for m in group if m is child or m.spec.restart is not Restart.TEMPORARY], restarts)


def _reopen_mailbox(child: _Child) -> None:
    if child.spec.mailbox is not None:
        child.spec.mailbox.reopen()  # closed if this supervisor ran before and was restarted


def _close_mailbox(child: _Child) -> None:
    if child.spec.mailbox is not None:
        child.spec.mailbox.close()


def _describe(child: _Child) -> TreeNode:
    state = child.state.value
    if isinstance(child.value, HasTree) and child.state is ChildState.RUNNING:
        return msgspec.structs.replace(child.value.tree(), name=child.spec.id, state=state, restarts=child.restarts)
    mailbox = child.spec.mailbox
    if mailbox is None:
        return TreeNode(name=child.spec.id, kind=child.spec.kind, state=state, restarts=child.restarts)
    stats = mailbox.stats()
    return TreeNode(
        name=child.spec.id,
        kind=child.spec.kind,
        state=state,
        restarts=child.restarts,
        mailbox_depth=stats.depth,
        mailbox_capacity=stats.capacity,
        dropped=stats.dropped,
        dead_letters=stats.dead_letters,
    )
