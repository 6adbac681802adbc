"""Helpers for testing actors: a probe that records messages, and a cancellation sweep.

:class:`Probe` is an inbox a test owns (Akka's ``TestProbe``): hand its ``ref`` to the code under test
and ``await probe.expect(Kind)``.

:func:`cancel_at_each_checkpoint` drives a scenario once for every point at which Trio could cancel
it: run *k* cancels the scenario right after the *k*-th task step, for k = 1, 2, ... until a run
completes uncancelled. No code under test needs to be instrumented; it uses a
:class:`trio.abc.Instrument`. Use it with a virtual clock so the runs are deterministic.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Iterable
from typing import Generic, TypeVar

import trio

from .mailbox import Mailbox
from .ref import ActorRef

T = TypeVar("T")
M = TypeVar("M")


class Probe(Generic[T]):
    """A mailbox whose messages a test reads directly."""

    def __init__(self, name: str = "probe", capacity: int = 1000) -> None:
        self.mailbox: Mailbox[T] = Mailbox(capacity, name=name)

    @property
    def ref(self) -> ActorRef[T]:
        return self.mailbox.ref

    async def receive(self, timeout: float = 5.0) -> T:
        with trio.fail_after(timeout):
            return await self.mailbox.receive()

    async def expect(self, kind: type[M], timeout: float = 5.0) -> M:
        """The next message, which must be a ``kind`` (else ``AssertionError``)."""
        message = await self.receive(timeout)
        assert isinstance(message, kind), f"expected {kind.__name__}, got {message!r}"
        return message

    def pending(self) -> int:
        return self.mailbox.stats().depth


class _CancelAfterStep(trio.abc.Instrument):
    def __init__(self, scope: trio.CancelScope, step: int) -> None:
        self.scope = scope
        self.step = step
        self.steps = 0
        self.fired = False

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1
        if self.steps == self.step and not self.fired:
            self.fired = True
            self.scope.cancel()


async def cancel_at_each_checkpoint(
    scenario: Callable[[], Awaitable[object]],
    check: Callable[[int], Awaitable[object] | object],
    *,
    max_runs: int = 10_000,
    steps: Iterable[int] | None = None,
) -> int:
    """Run ``scenario`` cancelled after step 1, 2, ... and call ``check(k)`` after each run.

    Returns how many cancelled runs there were (the number of checkpoints swept). The last run is the
    one that finished before its cancellation point; ``check`` sees it too. ``steps`` (increasing)
    samples the steps instead, for a scenario too slow to run once per step.
    """
    sampled = steps if steps is not None else itertools.count(1)
    for runs, step in enumerate(itertools.islice(sampled, max_runs)):
        with trio.CancelScope() as scope:
            instrument = _CancelAfterStep(scope, step)
            trio.lowlevel.add_instrument(instrument)
            try:
                await scenario()
            finally:
                trio.lowlevel.remove_instrument(instrument)
        result = check(step)
        if isinstance(result, Awaitable):
            await result
        if not instrument.fired:
            return runs
    raise AssertionError(f"scenario still cancellable after {max_runs} runs")


__all__ = ["Probe", "cancel_at_each_checkpoint"]
