"""Supervisors: strategies, restart types, intensity and escalation, ordered shutdown, dynamic children.

Everything runs on Trio's virtual clock, so times are exact and no test sleeps for real.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from actors import (
    ChildSpec,
    ChildState,
    DuplicateChild,
    DynamicSupervisor,
    Restart,
    Shutdown,
    StartFailed,
    Strategy,
    Supervisor,
    TooManyChildren,
    TooManyRestarts,
    UnknownChild,
)

from .harness import Harness


async def start_tree(nursery: trio.Nursery, sup: Supervisor | DynamicSupervisor) -> None:
    await nursery.start(sup.run)


def tail_after(h: Harness, marker: tuple[str, str]) -> list[tuple[str, str]]:
    events = h.events()
    return events[events.index(marker) :]


# -- strategies ------------------------------------------------------------------------------------


async def test_one_for_one_restarts_only_the_crashed_child(autojump_clock: MockClock) -> None:
    h = Harness()
    sup = Supervisor("s", [h.spec("a"), h.spec("b"), h.spec("c")], strategy=Strategy.ONE_FOR_ONE)
    async with trio.open_nursery() as nursery:
        await start_tree(nursery, sup)
        assert h.events() == [("start", "a"), ("start", "b"), ("start", "c")]
        h.crash("b")
        await h.wait_starts("b", 2)
        assert tail_after(h, ("stop", "b")) == [("stop", "b"), ("start", "b")]
        nursery.cancel_scope.cancel()
    assert h.events()[-3:] == [("stop", "c"), ("stop", "b"), ("stop", "a")]


async def test_one_for_all_stops_the_others_in_reverse_then_starts_all_in_order(
    autojump_clock: MockClock,
) -> None:
    h = Harness()
    sup = Supervisor("s", [h.spec("a"), h.spec("b"), h.spec("c")], strategy=Strategy.ONE_FOR_ALL)
    async with trio.open_nursery() as nursery:
        await start_tree(nursery, sup)
        h.crash("b")
        await h.wait_starts("c", 2)
        assert tail_after(h, ("stop", "b")) == [
            ("stop", "b"),
            ("stop", "c"),
            ("stop", "a"),
            ("start", "a"),
            ("start", "b"),
            ("start", "c"),
        ]
        assert [c.restarts for c in sup.tree().children] == [1, 1, 1]
        nursery.cancel_scope.cancel()


async def test_rest_for_one_restarts_the_crashed_child_and_those_started_after_it(
    autojump_clock: MockClock,
) -> None:
    h = Harness()
    sup = Supervisor("s", [h.spec("a"), h.spec("b"), h.spec("c"), h.spec("d")], strategy=Strategy.REST_FOR_ONE)
    async with trio.open_nursery() as nursery:
        await start_tree(nursery, sup)
        h.crash("b")
        await h.wait_starts("d", 2)
        assert tail_after(h, ("stop", "b")) == [
            ("stop", "b"),
            ("stop", "d"),
            ("stop", "c"),
            ("start", "b"),
            ("start", "c"),
            ("start", "d"),
        ]
        assert h.count("start", "a") == 1
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("strategy", [Strategy.ONE_FOR_ALL, Strategy.REST_FOR_ONE])
async def test_a_temporary_sibling_taken_down_by_a_crash_is_not_restarted(
    strategy: Strategy, autojump_clock: MockClock
) -> None:
    h = Harness()
    sup = Supervisor(
        "s",
        [h.spec("a"), h.spec("t", Restart.TEMPORARY), h.spec("tr", Restart.TRANSIENT)],
        strategy=strategy,
    )
    async with trio.open_nursery() as nursery:
        await start_tree(nursery, sup)
        h.crash("a")
        await h.wait_starts("tr", 2)  # a transient sibling is restarted, as in OTP
        assert h.count("start", "t") == 1
        assert [cid for cid, _ in sup.which_children()] == ["a", "tr"]
        nursery.cancel_scope.cancel()


# -- restart types ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("restart", "how", "restarted"),
    [
        (Restart.PERMANENT, "crash", True),
        (Restart.PERMANENT, "exit", True),
        (Restart.TRANSIENT, "crash", True),
        (Restart.TRANSIENT, "exit", False),
        (Restart.TEMPORARY, "crash", False),
        (Restart.TEMPORARY, "exit", False),
    ],
)
async def test_restart_types(restart: Restart, how: str, restarted: bool, autojump_clock: MockClock) -> None:
    h = Harness()
    sup = Supervisor("s", [h.spec("a"), h.spec("x", restart)])
    async with trio.open_nursery() as nursery:
        await start_tree(nursery, sup)
        getattr(h, how)("x")
        await h.wait_for(lambda: h.count("stop", "x") == 1)
        await trio.testing.wait_all_tasks_blocked()
        assert h.count("start", "x") == (2 if restarted else 1)
        ids = [cid for cid, _ in sup.which_children()]
        assert ids == (["a", "x"] if restarted else ["a"])
        assert sup.running
        nursery.cancel_scope.cancel()


# -- intensity and escalation ---------------------------------------------------------------------


async def run_until_escalation(sup: Supervisor, crashes: Sequence[float], h: Harness, child: str) -> float | None:
    """Crash ``child`` at each virtual time in ``crashes``; return when the supervisor escalated."""
    escalated_at: list[float] = []

    async def supervised(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await sup.run(task_status=task_status)
        except TooManyRestarts:
            escalated_at.append(trio.current_time())
            h.note("escalated", sup.name)

    async with trio.open_nursery() as nursery:
        await nursery.start(supervised)
        for i, at in enumerate(crashes):
            await trio.sleep_until(at)
            if escalated_at:
                break
            h.crash(child)
            await h.wait_for(lambda i=i: h.count("start", child) == i + 2 or bool(escalated_at))
        nursery.cancel_scope.cancel()
    return escalated_at[0] if escalated_at else None


async def test_escalates_exactly_at_the_crash_that_exceeds_the_intensity(autojump_clock: MockClock) -> None:
    h = Harness()
    sup = Supervisor("s", [h.spec("a"), h.spec("w")], intensity=2, period=10)
    assert await run_until_escalation(sup, [1, 2, 3, 4], h, "w") == 3
    assert h.count("start", "w") == 3  # started, restarted twice, then the third crash gives up
    # the crashed child, then its sibling, are stopped before the escalation is raised
    assert h.events()[-3:] == [("stop", "w"), ("stop", "a"), ("escalated", "s")]


async def test_never_escalates_when_crashes_fall_outside_the_window(autojump_clock: MockClock) -> None:
    h = Harness()
    sup = Supervisor("s", [h.spec("w")], intensity=1, period=5)
    assert await run_until_escalation(sup, [6.0 * k for k in range(1, 11)], h, "w") is None
    assert h.count("start", "w") == 11


async def test_a_restart_exactly_period_seconds_ago_still_counts(autojump_clock: MockClock) -> None:
    h = Harness()
    sup = Supervisor("s", [h.spec("w")], intensity=1, period=5)
    assert await run_until_escalation(sup, [5, 10], h, "w") == 10


async def test_escalation_reaches_the_parent_which_restarts_the_subtree(autojump_clock: MockClock) -> None:
    h = Harness()
    inner = Supervisor("inner", [h.spec("w")], intensity=0, period=5)
    outer = Supervisor("outer", [h.spec("a"), inner.child_spec()], intensity=5, period=5)
    async with trio.open_nursery() as nursery:
        await start_tree(nursery, outer)
        h.crash("w")  # intensity 0: the inner supervisor gives up at once
        await h.wait_starts("w", 2)
        await trio.testing.wait_all_tasks_blocked()
        assert h.count("start", "a") == 1
        tree = outer.tree()
        assert tree.find("inner") is not None
        assert tree.find("inner").restarts == 1  # type: ignore[union-attr]
        assert tree.find("w").restarts == 0  # type: ignore[union-attr]  # a fresh inner supervisor
        nursery.cancel_scope.cancel()


async def test_a_failed_restart_counts_as_a_restart(autojump_clock: MockClock) -> None:
    h = Harness()
    sup = Supervisor("s", [h.spec("w")], intensity=3, period=10)
    with pytest.RaisesGroup(TooManyRestarts):
        async with trio.open_nursery() as nursery:
            await start_tree(nursery, sup)
            h.fail_start.add("w")
            h.crash("w")
    # one crash and three failed restarts are four restarts in the window: more than 3
    assert (h.count("start", "w"), h.count("start_failed", "w")) == (4, 3)


# -- start failures and shutdown -------------------------------------------------------------------


async def test_initial_start_failure_stops_the_started_children_and_reports_which(
    autojump_clock: MockClock,
) -> None:
    h = Harness()
    h.fail_start.add("b")
    sup = Supervisor("s", [h.spec("a"), h.spec("b"), h.spec("c")])
    with pytest.raises(StartFailed, match="child 'b' of supervisor 's'") as info:
        await sup.run()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert h.events() == [("start", "a"), ("start", "b"), ("start_failed", "b"), ("stop", "a")]


async def test_shutdown_runs_in_reverse_order_each_within_its_deadline(autojump_clock: MockClock) -> None:
    h = Harness()
    h.stop_takes = {"c": 1, "b": 3, "a": 0.5}
    sup = Supervisor("s", [h.spec("a", shutdown=5), h.spec("b", shutdown=2), h.spec("c", shutdown=5)])
    async with trio.open_nursery() as nursery:
        await start_tree(nursery, sup)
        await trio.sleep_until(10)
        nursery.cancel_scope.cancel()
    stops = {child: at for event, child, at in h.log if event == "stop"}
    # c takes 1 s; b overruns its 2 s deadline, so a is cancelled at 13 while b finishes at 14.
    assert stops == {"c": 11, "a": 13.5, "b": 14}
    assert sup.overruns == ["b"]
    assert trio.current_time() == 14


async def test_cancelling_a_start_in_progress_unwinds_it(autojump_clock: MockClock) -> None:
    started_b = trio.Event()
    log: list[str] = []

    async def slow(*, task_status: trio.TaskStatus[None]) -> None:
        started_b.set()
        try:
            await trio.sleep_forever()
        finally:
            log.append("b unwound")

    async def quick(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            log.append("a stopped")

    sup = Supervisor("s", [ChildSpec("a", quick), ChildSpec("b", slow)])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sup.run)
        await started_b.wait()
        nursery.cancel_scope.cancel()
    assert log == ["b unwound", "a stopped"]


def shielded_starter(log: list[str], name: str, *, first_run_ready_at_once: bool = False) -> ChildSpec:
    """A child whose start ends with shielded work (as an atomic acquisition is), then ``started``."""
    runs = [0]

    async def start(*, task_status: trio.TaskStatus[None]) -> None:
        runs[0] += 1
        if not (first_run_ready_at_once and runs[0] == 1):
            with trio.CancelScope(shield=True):
                await trio.sleep(1)
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            log.append(f"{name} stopped (run {runs[0]})")

    return ChildSpec(name, start)


async def test_cancelled_while_a_child_finishes_shielded_start_work(autojump_clock: MockClock) -> None:
    """trio does not adopt a child whose starter was cancelled; it must still unwind (no deadlock)."""
    log: list[str] = []
    sup = Supervisor("s", [shielded_starter(log, "a")])
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.run)
            await trio.sleep(0.5)  # inside the child's shielded start
            nursery.cancel_scope.cancel()
    assert log == ["a stopped (run 1)"]
    assert trio.current_time() == 1


async def test_cancelled_while_a_restart_finishes_shielded_start_work(autojump_clock: MockClock) -> None:
    log: list[str] = []
    crash = trio.Event()

    async def crasher(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        await crash.wait()
        raise RuntimeError("crash")

    sup = Supervisor(
        "s",
        [ChildSpec("c", crasher), shielded_starter(log, "a", first_run_ready_at_once=True)],
        strategy=Strategy.ONE_FOR_ALL,
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            crash.set()  # one_for_all: "a" is stopped and restarted, its restart takes 1 s
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
    assert log == ["a stopped (run 1)", "a stopped (run 2)"]


async def test_a_child_that_returns_without_starting_is_a_start_failure(autojump_clock: MockClock) -> None:
    async def lazy(*, task_status: trio.TaskStatus[None]) -> None:
        return

    with pytest.raises(StartFailed) as info:
        await Supervisor("s", [ChildSpec("lazy", lazy)]).run()
    assert "without calling task_status.started()" in str(info.value.__cause__)


async def test_duplicate_child_ids_are_refused(autojump_clock: MockClock) -> None:
    h = Harness()
    with pytest.raises(ValueError, match=r"duplicate child ids \['a'\]"):
        Supervisor("s", [h.spec("a"), h.spec("a")])


# -- dynamic supervisor -----------------------------------------------------------------------------


async def test_dynamic_supervisor_starts_limits_restarts_and_stops_children(
    autojump_clock: MockClock,
) -> None:
    h = Harness()
    dyn = DynamicSupervisor("machines", max_children=3)
    async with trio.open_nursery() as nursery:
        await start_tree(nursery, dyn)
        assert await dyn.start_child(h.spec("m1")) == "m1"
        await dyn.start_child(h.spec("m2", Restart.TRANSIENT))
        await dyn.start_child(h.spec("m3", Restart.TEMPORARY))
        with pytest.raises(TooManyChildren, match="maximum of 3"):
            await dyn.start_child(h.spec("m4"))
        with pytest.raises(DuplicateChild):
            await dyn.terminate_child("m3") or await dyn.start_child(h.spec("m1"))
        assert len(dyn) == 2
        h.crash("m2")
        await h.wait_starts("m2", 2)
        h.exit("m2")  # transient, normal exit: gone
        await h.wait_for(lambda: h.count("stop", "m2") == 2)
        await trio.testing.wait_all_tasks_blocked()
        assert [cid for cid, _ in dyn.which_children()] == ["m1"]
        with pytest.raises(UnknownChild):
            await dyn.terminate_child("m2")
        await dyn.start_child(h.spec("m5"))
        await dyn.start_child(h.spec("m6"))
        nursery.cancel_scope.cancel()
    assert sorted(h.events()[-3:]) == [("stop", "m1"), ("stop", "m5"), ("stop", "m6")]


async def test_dynamic_supervisor_stops_its_children_in_parallel(autojump_clock: MockClock) -> None:
    """Like OTP's simple_one_for_one: many children, so they all stop at once, each within its deadline."""
    h = Harness()
    h.stop_takes = {f"m{i}": 2.0 for i in range(5)} | {"slow": 30.0}
    dyn = DynamicSupervisor("machines")
    async with trio.open_nursery() as nursery:
        await start_tree(nursery, dyn)
        for i in range(5):
            await dyn.start_child(h.spec(f"m{i}", shutdown=5))
        await dyn.start_child(h.spec("slow", shutdown=3))
        await trio.sleep_until(10)
        nursery.cancel_scope.cancel()
    stops = {child: at for event, child, at in h.log if event == "stop"}
    assert {stops[f"m{i}"] for i in range(5)} == {12.0}, "all stopped together, not one after another"
    assert dyn.overruns == ["slow"]


async def test_dynamic_supervisor_refuses_children_when_not_running(autojump_clock: MockClock) -> None:
    from actors import SupervisorNotRunning

    with pytest.raises(SupervisorNotRunning):
        await DynamicSupervisor("idle").start_child(Harness().spec("x"))


async def test_tree_shows_states_and_restarts(autojump_clock: MockClock) -> None:
    h = Harness()
    dyn = DynamicSupervisor("pool")
    root = Supervisor("root", [h.spec("link"), dyn.child_spec()])
    async with trio.open_nursery() as nursery:
        await start_tree(nursery, root)
        await dyn.start_child(h.spec("vm1"))
        h.crash("link")
        await h.wait_starts("link", 2)
        await trio.testing.wait_all_tasks_blocked()
        tree = root.tree()
        assert [n.name for n in tree.walk()] == ["root", "link", "pool", "vm1"]
        assert tree.find("pool").kind == "dynamic_supervisor"  # type: ignore[union-attr]
        assert tree.find("link").restarts == 1  # type: ignore[union-attr]
        assert {n.state for n in tree.walk()} == {ChildState.RUNNING.value}
        nursery.cancel_scope.cancel()
    assert root.tree().state == "stopped"


async def test_a_shutdown_is_logged_in_one_line_and_a_crash_with_its_traceback(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    class AgentGone(Shutdown):
        pass

    ends: list[Exception] = [AgentGone("its agent exited"), RuntimeError("a bug")]
    started = trio.Event()
    runs = 0

    async def child(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal runs, started
        runs += 1
        task_status.started()
        started.set()
        if runs <= len(ends):
            await trio.sleep(1)
            raise ends[runs - 1]
        await trio.sleep_forever()

    sup = Supervisor("s", [ChildSpec(id="m", start=child, restart=Restart.PERMANENT)])
    caplog.set_level("INFO", logger="actors.supervisor")
    async with trio.open_nursery() as nursery:
        await start_tree(nursery, sup)
        while runs < 3:
            started = trio.Event()
            await started.wait()
        nursery.cancel_scope.cancel()
    ended = [
        (r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records if "child m" in r.getMessage()
    ]
    assert ended == [
        ("WARNING", "s: child m ended: its agent exited", False),  # restarted all the same (permanent)
        ("ERROR", "s: child m crashed: RuntimeError('a bug')", True),
    ]
