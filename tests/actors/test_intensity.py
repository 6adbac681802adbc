"""Restart intensity against a reference model: the pure window, then a real supervisor on virtual time.

The model is the definition itself, computed the slow way: a restart at ``now`` is allowed iff the
restarts in ``[now - period, now]`` (this one included) number at most ``intensity``.
"""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing
from hypothesis import example, given, settings
from hypothesis import strategies as st

from actors import ChildSpec, RestartIntensity, Supervisor, TooManyRestarts

# Quarter seconds: exact in binary floating point, so the model and the window compare alike. Small
# ranges make restarts land exactly on the window's edge often, which is where mistakes hide.
quarters = st.integers(min_value=0, max_value=12).map(lambda q: q / 4)
intensities = st.integers(min_value=0, max_value=4)
periods = st.integers(min_value=1, max_value=12).map(lambda q: q / 4)


def model_allows(history: list[float], now: float, intensity: int, period: float) -> bool:
    in_window = [t for t in [*history, now] if now - t <= period]
    return len(in_window) <= intensity


def model_escalation(crash_times: list[float], intensity: int, period: float) -> int | None:
    """Index of the crash at which a supervisor gives up, or None."""
    for i, now in enumerate(crash_times):
        if not model_allows(crash_times[:i], now, intensity, period):
            return i
    return None


@settings(max_examples=500)
@given(gaps=st.lists(quarters, max_size=40), intensity=intensities, period=periods)
@example(gaps=[0, 5], intensity=1, period=5)  # a restart exactly `period` ago still counts
def test_window_matches_the_model(gaps: list[float], intensity: int, period: float) -> None:
    window = RestartIntensity(intensity, period)
    times = list(itertools.accumulate(gaps))
    for i, now in enumerate(times):
        assert window.record(now) == model_allows(times[:i], now, intensity, period), times[: i + 1]


def test_window_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        RestartIntensity(-1, 5)
    with pytest.raises(ValueError, match="> 0"):
        RestartIntensity(1, 0)


@settings(max_examples=60, deadline=None)
@given(
    lifetimes=st.lists(st.integers(min_value=1, max_value=24).map(lambda q: q / 4), min_size=1, max_size=12),
    intensity=intensities,
    period=periods,
)
def test_supervisor_escalates_where_the_model_says(lifetimes: list[float], intensity: int, period: float) -> None:
    """A child that lives ``lifetimes[k]`` seconds on its k-th run, then crashes."""
    crash_times = list(itertools.accumulate(lifetimes))
    expected = model_escalation(crash_times, intensity, period)
    runs: list[float] = []

    async def child(*, task_status: trio.TaskStatus[None]) -> None:
        k = len(runs)
        runs.append(trio.current_time())
        task_status.started()
        if k >= len(lifetimes):
            await trio.sleep_forever()
        await trio.sleep(lifetimes[k])
        raise RuntimeError(f"crash {k}")

    async def main() -> float | None:
        sup = Supervisor("s", [ChildSpec("c", child)], intensity=intensity, period=period)
        with trio.move_on_after(crash_times[-1] + 1):
            try:
                await sup.run()
            except TooManyRestarts:
                return trio.current_time()
        return None

    escalated_at = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    if expected is None:
        assert escalated_at is None
        assert len(runs) == len(lifetimes) + 1
    else:
        assert escalated_at == crash_times[expected]
        assert len(runs) == expected + 1, "restarted after every crash before the one that gave up"
