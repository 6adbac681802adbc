"""A private asyncio event loop in one thread, and calls across to it from Trio.

nats-py is asyncio through and through. Rather than mix event loops in one thread (trio-asyncio,
which breaks pyroute2's sync API and leans on asyncio's loop policies), the node runs one asyncio
loop in a dedicated thread and crosses over:

- Trio → asyncio: :meth:`AsyncioThread.run` schedules a coroutine on the loop and waits for its
  result; cancelling the Trio caller cancels the asyncio task. :meth:`AsyncioThread.submit` is the
  fire-and-forget form, :meth:`AsyncioThread.call_soon` runs a plain callable on the loop.
- asyncio → Trio: ``trio.lowlevel.TrioToken.run_sync_soon`` (see :mod:`nex.bus.link`).

Use it as an async context manager, ``async with open_asyncio_thread() as aio``: the loop stops and
its thread is joined on exit, after every task still on the loop has been cancelled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import trio

from nex import affinity, logs

log = logs.get("nex.bus")
T = TypeVar("T")


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

    async def run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """Run ``fn(*args)`` on the loop and return its result (or raise its error) in Trio."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: concurrent.futures.Future[T]) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future = asyncio.run_coroutine_threadsafe(fn(*args), self.loop)
        future.add_done_callback(wake)
        try:
            await done.wait()
        except trio.Cancelled:
            future.cancel()
            raise
        return future.result()

    def submit(self, fn: Callable[..., Awaitable[object]], *args: Any, what: str = "") -> None:
        """Start ``fn(*args)`` on the loop without waiting; a failure is logged, not raised."""

        def start() -> None:
            task = asyncio.ensure_future(fn(*args))
            task.add_done_callback(_log_failure(what or getattr(fn, "__name__", "task")))

        self.loop.call_soon_threadsafe(start)

    def call_soon(self, fn: Callable[..., object], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)


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
