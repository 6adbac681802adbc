"""Restarts keep OTP's promises: a restarted subtree works, one run at a time, from a fresh state.

Each test here failed on the runtime before these promises were kept (see issue 10).
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from actors import (
    Actor,
    ActorRef,
    ChildSpec,
    DynamicSupervisor,
    Mailbox,
    Message,
    Overflow,
    Reply,
    Restart,
    Shutdown,
    ShutdownOverrun,
    Strategy,
    Supervisor,
    actor_spec,
)

from .harness import Harness


class Bump(Message):
    reply: Reply[int]


class Hold(Message):
    """Keep the reply unanswered; the test looks at it later."""

    reply: Reply[int]


class Counter(Actor[Bump | Hold]):
    instances = 0

    def __init__(self, held: list[Reply[int]] | None = None) -> None:
        Counter.instances += 1
        self.n = 0
        self.held = held

    async def handle(self, message: Bump | Hold) -> None:
        match message:
            case Bump(reply=reply):
                self.n += 1
                reply.send(self.n)
            case Hold(reply=reply):
                assert self.held is not None
                self.held.append(reply)


async def test_a_restarted_subtree_has_working_mailboxes(autojump_clock: MockClock) -> None:
    """Escalation stops the inner supervisor (closing its actors' mailboxes); the restart reopens them."""
    h = Harness()
    box = Mailbox[Bump | Hold](8, name="counter")
    inner = Supervisor("inner", [actor_spec(Counter, box), h.spec("w")], intensity=0, period=5)
    outer = Supervisor("outer", [inner.child_spec()], intensity=1, period=5)
    ref = box.ref
    async with trio.open_nursery() as nursery:
        await nursery.start(outer.run)
        assert await ref.ask(lambda r: Bump(reply=r), timeout=1) == 1
        h.crash("w")  # intensity 0: the inner supervisor gives up; the outer one restarts it once
        await h.wait_starts("w", 2)
        await trio.testing.wait_all_tasks_blocked()
        assert ref.alive
        assert await ref.ask(lambda r: Bump(reply=r), timeout=1) == 1  # a fresh counter answers
        assert outer.tree().find("inner").restarts == 1  # type: ignore[union-attr]
        assert outer.running
        nursery.cancel_scope.cancel()
    assert not ref.alive  # gone for good once the whole tree has stopped


@pytest.mark.parametrize("strategy", [Strategy.ONE_FOR_ALL, Strategy.REST_FOR_ONE])
async def test_a_child_that_overran_its_shutdown_is_never_started_twice(
    strategy: Strategy, autojump_clock: MockClock
) -> None:
    h = Harness()
    h.stop_takes["b"] = 100  # ignores its 1 s deadline
    sup = Supervisor("s", [h.spec("a"), h.spec("b", shutdown=1)], strategy=strategy, intensity=5)
    with pytest.RaisesGroup(ShutdownOverrun):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            h.crash("a")
    runs = 0
    for event, child in h.events():
        if child == "b":
            runs += {"start": 1, "stop": -1}.get(event, 0)
            assert runs <= 1, f"two live instances of b: {h.events()}"
    assert h.count("start", "b") == 1
    assert sup.overruns == ["b"]


async def test_an_abandoned_ask_is_marked_so(autojump_clock: MockClock) -> None:
    held: list[Reply[int]] = []
    box = Mailbox[Bump | Hold](8, name="counter")
    sup = Supervisor("s", [actor_spec(lambda: Counter(held), box)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        with pytest.raises(trio.TooSlowError):
            await box.ref.ask(lambda r: Hold(reply=r), timeout=1)
        with trio.move_on_after(1):  # cancelled rather than timed out
            await box.ref.ask(lambda r: Hold(reply=r))
        answered: Reply[int] = Reply()
        answered.send(1)
        assert [r.abandoned for r in held] == [True, True]
        assert not answered.abandoned
        held[0].send(5)  # a late answer is not an error: it goes nowhere
        nursery.cancel_scope.cancel()


async def test_a_restart_builds_a_fresh_instance(autojump_clock: MockClock) -> None:
    box = Mailbox[Bump | Hold](8, name="counter")
    sup = Supervisor("s", [actor_spec(Counter, box)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        assert await box.ref.ask(lambda r: Bump(reply=r), timeout=1) == 1
        before = Counter.instances
        box.ref.send_nowait(Hold(reply=Reply()))  # held is None: the handler's assert crashes it
        assert await box.ref.ask(lambda r: Bump(reply=r), timeout=1) == 1  # counting from zero again
        assert Counter.instances == before + 1
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("error", "restarted"), [(Shutdown("done"), False), (RuntimeError("bug"), True)])
async def test_a_transient_child_ending_with_shutdown_is_not_restarted(
    error: Exception, restarted: bool, autojump_clock: MockClock
) -> None:
    """OTP: a transient child is restarted only after an abnormal exit; ``{shutdown, _}`` is normal."""
    runs = 0

    async def child(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal runs
        runs += 1
        task_status.started()
        if runs == 1:
            raise error
        await trio.sleep_forever()

    sup = Supervisor("s", [ChildSpec(id="t", start=child, restart=Restart.TRANSIENT)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.testing.wait_all_tasks_blocked()
        assert runs == (2 if restarted else 1)
        assert [c for c, _ in sup.which_children()] == (["t"] if restarted else [])
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("overflow", [Overflow.DROP_NEWEST, Overflow.DROP_OLDEST, Overflow.FAIL])
async def test_send_is_a_checkpoint_under_every_policy(overflow: Overflow) -> None:
    box = Mailbox[Bump](4, overflow, name="m")
    with trio.CancelScope() as scope:
        scope.cancel()
        await box.send(Bump(reply=Reply()))  # cancelled before it enqueues
    assert scope.cancelled_caught
    assert box.stats().enqueued == 0


async def test_a_failed_group_restart_restarts_the_whole_group(autojump_clock: MockClock) -> None:
    h = Harness()
    sup = Supervisor("s", [h.spec("a"), h.spec("b"), h.spec("c")], strategy=Strategy.ONE_FOR_ALL, intensity=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        h.fail_once.add("b")
        h.crash("c")
        await h.wait_starts("c", 2)
        marker = ("start_failed", "b")
        events = h.events()
        assert events[events.index(marker) :] == [
            marker,
            ("stop", "a"),  # the members started before the failure are stopped again
            ("start", "a"),
            ("start", "b"),
            ("start", "c"),
        ]
        nursery.cancel_scope.cancel()


async def test_refs_reach_the_fresh_instance_after_the_subtree_restarts(autojump_clock: MockClock) -> None:
    """A ref taken before a subtree restart reaches the new instance: refs name mailboxes."""
    box = Mailbox[Bump | Hold](8, name="counter")
    inner = Supervisor("inner", [actor_spec(Counter, box)], intensity=0)
    outer = Supervisor("outer", [inner.child_spec()], intensity=3)
    ref: ActorRef[Bump | Hold] = box.ref
    async with trio.open_nursery() as nursery:
        await nursery.start(outer.run)
        for _ in range(2):
            ref.send_nowait(Hold(reply=Reply()))  # crashes the counter; intensity 0 escalates
            await trio.testing.wait_all_tasks_blocked()  # what was queued behind it died with it
            assert await ref.ask(lambda r: Bump(reply=r), timeout=1) == 1
        nursery.cancel_scope.cancel()


async def test_the_mailbox_of_a_child_that_overran_is_closed_once_it_ends(autojump_clock: MockClock) -> None:
    h = Harness()
    h.stop_takes["slow"] = 100  # ignores its 1 s deadline
    box = Mailbox[Bump | Hold](8, name="slow")
    sup = Supervisor("s", [with_mailbox(h.spec("slow", shutdown=1), box)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        nursery.cancel_scope.cancel()
    assert sup.overruns == ["slow"]
    assert not box.ref.alive  # nobody reads it any more: senders must hear so


async def test_a_cancelled_terminate_child_still_forgets_the_child(autojump_clock: MockClock) -> None:
    h = Harness()
    h.stop_takes["vm1"] = 2
    sup = DynamicSupervisor("machines")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.start_child(h.spec("vm1", restart=Restart.TEMPORARY, shutdown=10))
        with trio.move_on_after(1):  # whoever asked gave up (cancelled) before the child ended
            await sup.terminate_child("vm1")
        await h.wait_for(lambda: h.count("stop", "vm1") == 1)
        assert sup.which_children() == []
        assert len(sup) == 0
        nursery.cancel_scope.cancel()


def with_mailbox(spec: ChildSpec, mailbox: Mailbox[Bump | Hold]) -> ChildSpec:
    """``spec`` with a mailbox for the supervisor to close (the harness's children have none)."""
    return ChildSpec(id=spec.id, start=spec.start, restart=spec.restart, shutdown=spec.shutdown, mailbox=mailbox)
