"""A private asyncio event loop in one thread, and the crossings between it and Trio.

nats-py is asyncio through and through. Rather than mix event loops in one thread (trio-asyncio,
which breaks pyroute2's sync API and leans on asyncio's loop policies), the node runs one asyncio
loop in a dedicated thread and crosses over:

- Trio → asyncio, waiting: :meth:`AsyncioThread.run` runs a coroutine on the loop and returns its
  result to Trio. A cancelled caller never leaves work behind on the loop (see :meth:`~AsyncioThread.run`).
- Trio → asyncio, fire-and-forget: :class:`Outbox`, bounded; :meth:`AsyncioThread.call_soon` for a
  plain callable.
- asyncio → Trio: :class:`TrioInbox`, bounded, handed over in batches through
  ``trio.lowlevel.TrioToken.run_sync_soon``.

Bounds and overflow. An awaiting caller (``run``) is its own backpressure: a Trio task has at most
one call in flight. The two queues are there for senders that cannot wait, and both drop the newest
item when full, count it and say so in the log (first drop, then the 10th, 100th, 1000th and every
10 000th), as NATS drops messages for a slow consumer rather than slow down the sender.

Use it as an async context manager, ``async with open_asyncio_thread() as aio``: the loop stops and
its thread is joined on exit, after every task still on the loop has been cancelled.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

import trio

from nex import affinity, logs

log = logs.get("nex.bus")
T = TypeVar("T")

#: seconds a cancelled :meth:`AsyncioThread.run` waits, shielded, for the loop to finish its side
CANCEL_GRACE = 5.0


class AsyncioThread:
    """One asyncio loop running in its own thread."""

    def __init__(self, name: str = "nex-asyncio", *, cpu: int | None = None) -> None:
        self.name = name
        self.cpu = cpu
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._ready = threading.Event()

    def _main(self) -> None:
        if self.cpu is not None:
            affinity.pin_current_thread(self.cpu)
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def stop(self) -> None:
        """Stop the loop and join the thread (blocks briefly; idempotent)."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()

    async def run(
        self,
        fn: Callable[..., Coroutine[Any, Any, T]],
        *args: Any,
        undo: Callable[[T], Coroutine[Any, Any, object]] | None = None,
        grace: float = CANCEL_GRACE,
    ) -> T:
        """Run ``fn(*args)`` on the loop and return its result (or raise its error) in Trio.

        When the Trio caller is cancelled, its ``Cancelled`` propagates only once the loop is done
        with the call, so that nothing it started goes on behind the caller's back:

        - without ``undo``, the asyncio task is cancelled and waited for;
        - with ``undo``, the task is left to finish (its effects are known only from its result, and
          nats-py's operations are not safe to interrupt half-way), then ``undo(result)`` runs on the
          loop: a subscription made after all is unsubscribed, a connection is closed.

        That wait is shielded and bounded by ``grace`` seconds; a call still running after it is
        logged and left to the loop, which still undoes it when it ends.
        """
        coro = fn(*args)
        if not asyncio.iscoroutine(coro):
            raise TypeError(f"{_name(fn)} did not return a coroutine")
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        call = _Call(coro, undo, _waker(token, done))
        self.loop.call_soon_threadsafe(call.start)
        try:
            await done.wait()
        except trio.Cancelled:
            await self._abandon(call, token, _name(fn), grace)
            raise
        return call.outcome()

    async def _abandon(self, call: _Call[Any], token: trio.lowlevel.TrioToken, what: str, grace: float) -> None:
        """Until the loop has stopped (or finished and undone) ``call``, shielded, for ``grace`` at most."""
        settled = trio.Event()
        try:
            self.loop.call_soon_threadsafe(call.abandon, _waker(token, settled))
        except RuntimeError:  # the loop is closed: nothing of the call can still run
            return
        with trio.move_on_after(grace, shield=True) as scope:
            await settled.wait()
        if scope.cancelled_caught:
            log.warning("A cancelled NATS operation did not finish in time", op=what, grace=grace)

    def call_soon(self, fn: Callable[..., object], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)


class _Call(Generic[T]):
    """One :meth:`AsyncioThread.run`. Its fields are touched on the loop thread only, except that Trio
    reads :attr:`task` once ``wake`` has told it the task ended (which orders the two)."""

    def __init__(
        self,
        coro: Coroutine[Any, Any, T],
        undo: Callable[[T], Coroutine[Any, Any, object]] | None,
        wake: Callable[[], None],
    ) -> None:
        self.coro = coro
        self.undo = undo
        self.wake = wake
        self.task: asyncio.Task[T] | None = None
        self.settled: Callable[[], None] | None = None  # set once the Trio caller has given up

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.coro)
        self.task.add_done_callback(self._ended)

    def _ended(self, _: object) -> None:
        self.wake()
        if self.settled is not None:
            self._settle()

    def abandon(self, settled: Callable[[], None]) -> None:
        """The caller was cancelled: stop (or let finish, then undo) the task, then call ``settled``."""
        assert self.task is not None, "start() is scheduled before abandon()"
        self.settled = settled
        if self.task.done():
            self._settle()
        elif self.undo is None:
            self.task.cancel()  # _ended settles

    def _settle(self) -> None:
        task, settled = self.task, self.settled
        assert task is not None
        assert settled is not None
        if task.cancelled() or task.exception() is not None or self.undo is None:
            settled()
            return
        undoing = asyncio.ensure_future(self.undo(task.result()))

        def undone(_: asyncio.Future[object]) -> None:
            _log_failure("undo of a cancelled operation")(undoing)
            settled()

        undoing.add_done_callback(undone)

    def outcome(self) -> T:
        assert self.task is not None
        if self.task.cancelled():  # by the loop shutting down, not by the caller
            raise concurrent.futures.CancelledError("the asyncio side of the call was cancelled")
        return self.task.result()


class TrioInbox(Generic[T]):
    """asyncio → Trio: items posted on the loop thread, handed to ``deliver`` on the Trio thread.

    :meth:`post` appends to a buffer and wakes Trio with one ``run_sync_soon`` for everything that
    arrives until Trio has taken it, so a burst costs one wake-up. At most ``capacity`` items wait; a
    post beyond that is dropped (the sender, nats-py's reader, never waits) and counted in
    :attr:`overflowed`, which the loop thread alone writes.

    The buffer is a ``deque`` (``append`` and ``popleft`` are atomic); ``_wake_pending`` is the one
    flag both threads write: the loop sets it when it schedules a wake-up, Trio clears it *before*
    taking the batch, so an item appended after the batch was taken always gets a wake-up of its own.
    """

    def __init__(self, name: str, deliver: Callable[[T], None], capacity: int) -> None:
        self.name = name
        self.capacity = capacity
        self.overflowed = 0
        self.token: trio.lowlevel.TrioToken | None = None  # set by Trio before anything is posted
        self._deliver = deliver
        self._items: collections.deque[T] = collections.deque()
        self._wake_pending = False

    def post(self, item: T) -> None:
        """Loop thread: queue ``item`` for Trio (or drop it if ``capacity`` items wait already)."""
        if len(self._items) >= self.capacity:
            self.overflowed += 1
            if _worth_logging(self.overflowed):
                log.warning(
                    "Dropping NATS messages: Trio is not taking them as fast as they arrive",
                    link=self.name,
                    capacity=self.capacity,
                    dropped=self.overflowed,
                )
            return
        self._items.append(item)
        if not self._wake_pending and self.token is not None:
            self._wake_pending = True
            with contextlib.suppress(trio.RunFinishedError):
                self.token.run_sync_soon(self._take)

    def _take(self) -> None:
        """Trio thread: hand everything queued to ``deliver``, in order."""
        self._wake_pending = False  # before taking: a later arrival schedules another wake-up
        while self._items:
            self._deliver(self._items.popleft())


class Outbox(Generic[T]):
    """Trio → asyncio, fire-and-forget: items put on the Trio thread, handled by one pump on the loop.

    :meth:`put` never waits: when ``capacity`` items wait already it refuses the item (returns False)
    and the caller counts the drop. One wake-up of the loop covers everything put until the pump
    takes it (the same handshake as :class:`TrioInbox`, mirrored). A single pump task handles items
    one at a time, so they leave in the order they were put.
    """

    def __init__(self, aio: AsyncioThread, capacity: int) -> None:
        self.aio = aio
        self.capacity = capacity
        self._items: collections.deque[T] = collections.deque()
        self._wake_pending = False
        self._ready: asyncio.Event | None = None  # the pump's, on the loop thread

    def put(self, item: T) -> bool:
        """Trio thread: queue ``item``; False if ``capacity`` items wait already."""
        if len(self._items) >= self.capacity:
            return False
        self._items.append(item)
        if not self._wake_pending:
            self._wake_pending = True
            self.aio.call_soon(self._wake)
        return True

    def _wake(self) -> None:
        self._wake_pending = False
        if self._ready is not None:
            self._ready.set()

    async def pump(self, handle: Callable[[T], Awaitable[None]]) -> None:
        """Loop thread, one task: ``handle`` every item as it comes, until cancelled."""
        self._ready = ready = asyncio.Event()
        try:
            while True:
                await self.empty(handle)
                await ready.wait()
                ready.clear()
        finally:
            if self._ready is ready:  # not yet replaced by the pump of a newer connection
                self._ready = None

    async def empty(self, handle: Callable[[T], Awaitable[None]]) -> None:
        """Loop thread: ``handle`` every item waiting now (the pump, and a connection that closes)."""
        while self._items:
            await handle(self._items.popleft())


def _worth_logging(count: int) -> bool:
    return count in (1, 10, 100, 1000) or count % 10_000 == 0


def _waker(token: trio.lowlevel.TrioToken, event: trio.Event) -> Callable[[], None]:
    def wake() -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(event.set)

    return wake


def _name(fn: Callable[..., object]) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or fn)


def _log_failure(what: str) -> Callable[[asyncio.Future[object]], None]:
    def done(task: asyncio.Future[object]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.warning("background NATS operation failed", op=what, error=repr(task.exception()))

    return done


@contextlib.asynccontextmanager
async def open_asyncio_thread(name: str = "nex-asyncio", *, colocate: bool = True) -> AsyncIterator[AsyncioThread]:
    """Start the asyncio thread; with ``colocate``, pin it and the calling (Trio) thread to one CPU.

    See :mod:`nex.affinity` for why (hand-offs between the two threads cost a fifth as much).
    """
    previous = os.sched_getaffinity(0)
    cpu = None
    if colocate:
        cpu = affinity.current_cpu()
        affinity.pin_current_thread(cpu)
    aio = AsyncioThread(name, cpu=cpu)
    try:
        aio.start()
        yield aio
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(aio.stop)
        os.sched_setaffinity(0, previous)
