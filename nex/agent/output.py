"""A workload's output, at the pace its machine's :class:`~nex.api.agent.LogBudget` allows.

One log message per line costs the node, whose work no machine's cgroup limits: one workload printing
a million short lines a second starved every other machine of its node. So the agent passes a
workload's output on no faster than its budget (lines and bytes a second, with a burst; stdout and
stderr together), by backpressure rather than dropping: when it is spent, the pumps stop reading the
workload's pipes until it is back, the pipes fill, and the workload blocks on its own writes. Every
line arrives, in order, just later; only a stop (or the end of the drain after an exit) cuts what is
still held back, and says how much.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nex.api import agent as api


@dataclass
class _Tokens:
    """One count of a token bucket: ``level`` tokens, refilled at ``rate`` a second up to ``capacity``;
    below 0 it is in debt. ``rate`` 0: this count is not limited."""

    rate: float
    capacity: float
    level: float


class TokenBucket:
    """A :class:`~nex.api.agent.LogBudget` kept as two token buckets, lines and bytes, read on ``clock``.

    :meth:`take` always takes (it never refuses nor drops) and says how long the taker must wait
    before going on: until each count is out of debt again. Taking in debt is what lets a piece larger
    than the burst through at all (a 1 MiB line under a 64 KiB burst waits for 1 MiB of refill), and
    what keeps concurrent takers fair: each waits for its own share of the debt, so two pumps sharing
    a bucket together go no faster than its rate. A wait that overshoots (timers are late) is not lost:
    the tokens refilled meanwhile let the next takers through without waiting.
    """

    def __init__(self, budget: api.LogBudget, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = clock()
        self._counts = (
            _Tokens(budget.lines_per_second, budget.burst_lines, budget.burst_lines),
            _Tokens(budget.bytes_per_second, budget.burst_bytes, budget.burst_bytes),
        )

    def take(self, lines: int, nbytes: int) -> float:
        """Take ``lines`` and ``nbytes`` tokens; the seconds to wait before the output may go out."""
        now = self._clock()
        elapsed, self._last = max(0.0, now - self._last), now
        wait = 0.0
        for tokens, amount in zip(self._counts, (lines, nbytes), strict=True):
            if tokens.rate <= 0:
                continue
            tokens.level = min(tokens.capacity, tokens.level + elapsed * tokens.rate) - amount
            if tokens.level < 0:
                wait = max(wait, -tokens.level / tokens.rate)
        return wait


class LogGate:
    """One workload's output budget, shared by the pumps of its stdout and stderr.

    :meth:`admit` waits, without reading on, until a line may go out. Once :meth:`cut` (a stop that
    ran out of grace), nothing more goes out: the pumps read on to the end of their pipes, quickly,
    counting what they drop (:meth:`discard`). ``held_back`` is how many seconds at least one pump was
    kept waiting.
    """

    def __init__(self, budget: api.LogBudget, clock: Callable[[], float] = time.monotonic) -> None:
        self.bucket = TokenBucket(budget, clock)
        self._clock = clock
        self._cut = asyncio.Event()
        self.held_back = 0.0
        self._held_until = 0.0
        self.dropped_lines = 0
        self.dropped_bytes = 0
        self.failed_lines = 0  # lines (or pieces) that could not be passed on (see pump)
        self.failed_bytes = 0

    def cut(self) -> None:
        """Let nothing more out, and end every wait now."""
        self._cut.set()

    async def admit(self, nbytes: int) -> bool:
        """Wait until one line (or piece) of ``nbytes`` bytes may go out; False if it must be dropped."""
        if not self._cut.is_set():
            wait = self.bucket.take(1, nbytes)
            if wait > 0:
                start = self._clock()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._cut.wait(), wait)
                end = self._clock()
                # Waits end in the order they began (each waits for a debt that includes the one
                # before), so the union of the intervals grows at its end only.
                self.held_back += max(0.0, end - max(start, self._held_until))
                self._held_until = max(self._held_until, end)
            if not self._cut.is_set():
                return True
        self.dropped_lines += 1
        self.dropped_bytes += nbytes
        return False

    async def discard(self, stream: asyncio.StreamReader) -> None:
        """Read ``stream`` to its end in blocks, counting its lines and bytes as dropped."""
        while block := await stream.read(1 << 16):
            self.dropped_lines += block.count(b"\n")
            self.dropped_bytes += len(block)


READ_SIZE = 1 << 16
"""Bytes read from a workload's pipe at a time: the pump never asks for more, whatever its lines' length."""


async def pump(
    stream: asyncio.StreamReader,
    limit: int,
    gate: LogGate,
    emit: Callable[[str], Awaitable[None]],
    *,
    on_split: Callable[[], None] | None = None,
    on_error: Callable[[Exception], None] | None = None,
) -> None:
    """Pass ``stream``'s lines to ``emit`` (without their newline) as ``gate`` admits them, until its end.

    The stream is read in blocks of at most :data:`READ_SIZE` bytes and cut into lines here, so no line
    length is too much for the reader. While the gate holds a line back nothing more is read, so once
    the pipe is full the writer blocks: the backpressure that keeps the budget without losing output.
    A line longer than ``limit`` bytes goes out in pieces of ``limit`` bytes, each admitted as a line
    (``on_split`` is called as the first piece of each such line goes); a UTF-8 character cut between
    two pieces is kept whole, in the second. Undecodable bytes become U+FFFD.

    ``emit`` failing (a publish refused, say) loses that one line, never the pump: the failure is
    counted in ``gate.failed_lines`` and handed to ``on_error`` (raised when there is none), and the
    pump reads on, so that the workload is never left blocked on a pipe that nobody reads.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    buffer = bytearray()
    start = 0  # buffer[start:] is what has not gone out yet
    continued = False  # the line under way has gone out in part already
    while True:
        block = await stream.read(READ_SIZE)
        if block:
            del buffer[:start]
            start = 0
            buffer += block
        while True:
            newline = buffer.find(b"\n", start, start + limit + 1)
            if newline >= 0:
                end, whole = newline + 1, True
            elif len(buffer) - start > limit:
                end, whole = start + limit, False
            elif not block and start < len(buffer):
                end, whole = len(buffer), True  # the end: a last line without its newline
            else:
                break  # a line begun: read on
            chunk = bytes(buffer[start:end])
            start = end
            if not whole and not continued and on_split is not None:
                on_split()
            continued = not whole
            if not await gate.admit(len(chunk)):
                gate.dropped_lines += buffer.count(b"\n", start)
                gate.dropped_bytes += len(buffer) - start
                await gate.discard(stream)
                return
            text = decoder.decode(chunk, final=whole)
            try:
                await emit(text.removesuffix("\n") if whole else text)
            except Exception as exc:
                gate.failed_lines += 1
                gate.failed_bytes += len(chunk)
                if on_error is None:
                    raise
                on_error(exc)
        if not block:
            return


def describe(budget: api.LogBudget) -> str:
    """``1000 lines/s with a burst of 2000, 1 MiB/s with a burst of 2 MiB``; a rate of 0 is left out."""

    def mib(n: float) -> str:
        return f"{n / (1 << 20):g} MiB"

    parts = []
    if budget.lines_per_second:
        parts.append(f"{budget.lines_per_second:g} lines/s with a burst of {budget.burst_lines}")
    if budget.bytes_per_second:
        parts.append(f"{mib(budget.bytes_per_second)}/s with a burst of {mib(budget.burst_bytes)}")
    return ", ".join(parts) or "unlimited"
