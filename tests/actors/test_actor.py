"""The actor base: typed dispatch, dead letters, crashes under supervision, stop, registry."""

from __future__ import annotations

import textwrap

import pytest
import trio
import trio.testing
from trio.testing import MockClock

import actors
from actors import (
    Actor,
    ActorCrashed,
    ActorStopped,
    Mailbox,
    Message,
    NameTaken,
    Registry,
    Reply,
    Restart,
    Supervisor,
    actor_spec,
)


class Inc(Message):
    by: int = 1


class Get(Message):
    reply: Reply[int]


class Boom(Message):
    pass


class Halt(Message):
    pass


class Stranger(Message):
    pass


CounterMsg = Inc | Get | Boom | Halt


class Counter(Actor[CounterMsg]):
    starts = 0

    def __init__(self) -> None:
        self.n = 0

    async def on_start(self) -> None:
        Counter.starts += 1

    async def handle(self, message: CounterMsg) -> None:
        match message:
            case Inc(by=by):
                self.n += by
            case Get(reply=reply):
                reply.send(self.n)
            case Boom():
                raise RuntimeError("boom")
            case Halt():
                self.stop()
            case _:
                self.unhandled(message)


async def get(ref: actors.ActorRef[CounterMsg]) -> int:
    return await ref.ask(lambda r: Get(reply=r), timeout=5)


@pytest.fixture
def counter_box() -> Mailbox[CounterMsg]:
    Counter.starts = 0
    return Mailbox[CounterMsg](8, name="counter")


async def test_inbox_types_come_from_the_declared_union() -> None:
    assert Counter.inbox_types == (Inc, Get, Boom, Halt)


async def test_a_message_of_an_unknown_kind_is_a_dead_letter_not_a_crash(
    counter_box: Mailbox[CounterMsg], autojump_clock: MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(Counter().run, counter_box)
        await ref.send(Stranger())  # type: ignore[arg-type]  # exactly what the type checker forbids
        await ref.send(Inc(by=3))
        assert await get(ref) == 3
        assert counter_box.stats().dead_letters == 1
        assert "does not accept Stranger" in counter_box.dead_letters.recent[0].reason
        nursery.cancel_scope.cancel()


async def test_a_crash_fails_the_pending_ask_and_the_supervisor_restarts_on_the_same_mailbox(
    counter_box: Mailbox[CounterMsg], autojump_clock: MockClock
) -> None:
    sup = Supervisor("s", [actor_spec(Counter, counter_box)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        ref = counter_box.ref
        await ref.send(Inc(by=5))
        assert await get(ref) == 5
        reply: Reply[int] = Reply()
        await ref.send(Boom())
        await ref.send(Get(reply=reply))  # queued behind the crash: survives the restart
        assert await reply.wait(5) == 0, "a restarted actor starts from fresh state"
        assert Counter.starts == 2
        assert [c.restarts for c in sup.tree().children] == [1]
        nursery.cancel_scope.cancel()


async def test_ask_on_a_message_whose_handler_crashes(
    counter_box: Mailbox[CounterMsg], autojump_clock: MockClock
) -> None:
    class Fragile(Actor[Get]):
        async def handle(self, message: Get) -> None:
            raise ValueError("cannot count")

    box = Mailbox[Get](4, name="fragile")
    sup = Supervisor("s", [actor_spec(Fragile, box)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        with pytest.raises(ActorCrashed) as info:
            await box.ref.ask(lambda r: Get(reply=r), timeout=5)
        assert isinstance(info.value.__cause__, ValueError)
        assert trio.current_time() == 0
        nursery.cancel_scope.cancel()


async def test_stop_is_a_normal_exit_and_closes_a_transient_actor_for_good(
    counter_box: Mailbox[CounterMsg], autojump_clock: MockClock
) -> None:
    sup = Supervisor("s", [actor_spec(Counter, counter_box, restart=Restart.TRANSIENT)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await counter_box.ref.send(Halt())
        await trio.testing.wait_all_tasks_blocked()
        assert not counter_box.ref.alive
        with pytest.raises(ActorStopped):
            await counter_box.ref.send(Inc())
        assert sup.which_children() == []
        nursery.cancel_scope.cancel()


async def test_stop_from_another_task_ends_the_wait_for_messages(counter_box: Mailbox[CounterMsg]) -> None:
    actor = Counter()
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run, counter_box)
        actor.stop()
    assert counter_box.stats().delivered == 0


async def test_a_background_task_crash_is_the_actors_crash(autojump_clock: MockClock) -> None:
    class Ticker(Actor[Inc]):
        async def on_start(self) -> None:
            self.nursery.start_soon(self.tick)

        async def tick(self) -> None:
            await trio.sleep(1)
            raise OSError("lost the device")

        async def handle(self, message: Inc) -> None:
            pass

    with pytest.raises(OSError, match="lost the device") as info:  # the crash itself, not a group
        await Ticker().run(Mailbox[Inc](name="ticker"))
    assert trio.current_time() == 1
    seen: set[int] = set()
    error: BaseException | None = info.value
    while error is not None:  # the unwrapped error must not chain back to its own group
        assert id(error) not in seen, "cycle in the exception chain"
        seen.add(id(error))
        error = error.__cause__ or error.__context__


async def test_messages_sharing_a_kind_tag_are_refused_at_class_definition() -> None:
    class A(Message, tag="same"):
        pass

    class B(Message, tag="same"):
        pass

    with pytest.raises(TypeError, match="share the kind tag 'same'"):

        class Confused(Actor[A | B]):
            pass


async def test_registry_follows_the_actor_through_restarts(
    counter_box: Mailbox[CounterMsg], autojump_clock: MockClock
) -> None:
    registry = Registry()
    sup = Supervisor("s", [actor_spec(Counter, counter_box, registry=registry)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        assert registry.lookup("counter") == counter_box.ref
        with pytest.raises(NameTaken):
            registry.register("counter", Mailbox[Inc](name="impostor").ref)
        await counter_box.ref.send(Boom())
        with trio.fail_after(5):
            ref = await registry.wait_for("counter")
        assert ref == counter_box.ref
        nursery.cancel_scope.cancel()
    assert registry.lookup("counter") is None


async def test_wait_for_waits_until_the_name_appears() -> None:
    registry = Registry()
    box = Mailbox[Inc](name="late")
    found: list[object] = []

    async def waiter() -> None:
        found.append(await registry.wait_for("late"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert found == []
        with registry.registered("late", box.ref):
            await trio.testing.wait_all_tasks_blocked()
    assert found == [box.ref]
    assert registry.names() == []


def test_the_package_docstring_example_runs() -> None:
    """The supervision tree shown in ``actors/__init__.py`` is real code; run it."""
    doc = actors.__doc__ or ""
    code = textwrap.dedent(doc.split("::\n", 1)[1].split("\nModules:")[0])
    assert "Supervisor(" in code
    exec(compile(code, "actors/__init__.py docstring", "exec"), {"__name__": "docstring_example"})
