"""Restart intensity: at most N restarts in any window of T seconds (Erlang/OTP semantics).

OTP's rule, copied exactly: a supervisor keeps the times of its recent restarts. On each new restart
it adds the current time and forgets restarts older than ``now - period``; a restart exactly
``period`` seconds ago still counts. If more than ``intensity`` restarts remain, the supervisor gives
up (terminates its children and itself) and the failure escalates to its parent.

So with ``intensity=1, period=5``: a child crashing every 3 s is restarted once and escalates at its
second crash (two restarts within 5 s); a child crashing every 6 s is restarted forever.

Time comes from the caller (the supervisor passes ``trio.current_time()``), which keeps this class
pure: tests drive it with a virtual clock or plain numbers.
"""

from __future__ import annotations

import collections


class RestartIntensity:
    """A sliding window over restart times. ``intensity=0`` means: never restart."""

    __slots__ = ("_times", "intensity", "period")

    def __init__(self, intensity: int, period: float) -> None:
        if intensity < 0:
            raise ValueError("restart intensity must be >= 0")
        if period <= 0:
            raise ValueError("restart period must be > 0 seconds")
        self.intensity = intensity
        self.period = period
        self._times: collections.deque[float] = collections.deque()

    def record(self, now: float) -> bool:
        """Count a restart at ``now``; return False if that exceeds the intensity.

        ``now`` must not go backwards (it comes from a monotonic clock).
        """
        threshold = now - self.period
        while self._times and self._times[0] < threshold:
            self._times.popleft()
        self._times.append(now)
        return len(self._times) <= self.intensity

    def recent(self) -> int:
        """How many restarts the window held after the last :meth:`record`."""
        return len(self._times)

    def reset(self) -> None:
        self._times.clear()
