"""Mailboxes: overflow policies, statistics, dead letters; refs: send and ask."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from actors import (
    ActorStopped,
    AskTimeout,
    DeadLetters,
    Mailbox,
    MailboxFull,
    Message,
    MessageDropped,
    Overflow,
    Reply,
)


class Note(Message):
    n: int


class Ask(Message):
    reply: Reply[int]


async def drain(mailbox: Mailbox[Note]) -> list[int]:
    out = []
    while mailbox.stats().depth:
        out.append((await mailbox.receive()).n)
    return out


async def test_block_send_waits_for_room_and_send_nowait_refuses() -> None:
    box = Mailbox[Note](2, Overflow.BLOCK, name="b")
    await box.send(Note(n=1))
    await box.send(Note(n=2))
    with pytest.raises(MailboxFull, match="mailbox 'b' is full"):
        box.ref.send_nowait(Note(n=3))
    sent = trio.Event()

    async def blocked_sender() -> None:
        await box.ref.send(Note(n=3))
        sent.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocked_sender)
        await trio.testing.wait_all_tasks_blocked()
        assert not sent.is_set(), "send must wait while the mailbox is full"
        assert (await box.receive()).n == 1
        await sent.wait()
    assert await drain(box) == [2, 3]
    stats = box.stats()
    assert (stats.rejected, stats.dropped, stats.high_water, stats.enqueued, stats.delivered) == (
        1,
        0,
        2,
        3,
        3,
    )


async def test_fail_policy_raises_on_every_send_when_full() -> None:
    box = Mailbox[Note](1, Overflow.FAIL, name="f")
    await box.send(Note(n=1))
    with pytest.raises(MailboxFull):
        await box.send(Note(n=2))
    with pytest.raises(MailboxFull):
        box.send_nowait(Note(n=3))
    assert await drain(box) == [1]
    assert box.stats().rejected == 2


async def test_drop_newest_keeps_what_was_queued() -> None:
    box = Mailbox[Note](3, Overflow.DROP_NEWEST)
    for i in range(10):
        await box.send(Note(n=i))
    assert await drain(box) == [0, 1, 2]
    assert box.stats().dropped == 7


async def test_drop_oldest_keeps_the_latest() -> None:
    box = Mailbox[Note](3, Overflow.DROP_OLDEST)
    for i in range(10):
        box.send_nowait(Note(n=i))
    assert box.stats().high_water == 3
    assert await drain(box) == [7, 8, 9]
    assert box.stats().dropped == 7


@pytest.mark.parametrize("policy", [Overflow.DROP_NEWEST, Overflow.DROP_OLDEST])
async def test_a_dropped_ask_fails_at_once(policy: Overflow, autojump_clock: trio.testing.MockClock) -> None:
    box = Mailbox[Note | Ask](1, policy)
    if policy is Overflow.DROP_NEWEST:
        await box.send(Note(n=0))
        with pytest.raises(MessageDropped):
            await box.ref.ask(lambda r: Ask(reply=r), timeout=10)
    else:
        reply: Reply[int] = Reply()
        await box.send(Ask(reply=reply))
        await box.send(Note(n=1))  # evicts the ask
        with pytest.raises(MessageDropped):
            await reply.wait(10)
    assert trio.current_time() == 0, "the asker must not wait out its deadline"


async def test_drop_policies_need_room() -> None:
    with pytest.raises(ValueError, match="needs a capacity >= 1"):
        Mailbox[Note](0, Overflow.DROP_OLDEST)
    with pytest.raises(ValueError, match="finite"):
        Mailbox[Note](-1)


async def test_closed_mailbox_dead_letters_queued_and_new_messages() -> None:
    sink = DeadLetters()
    box = Mailbox[Note | Ask](4, name="gone", dead_letters=sink)
    await box.send(Note(n=1))
    reply: Reply[int] = Reply()
    await box.send(Ask(reply=reply))
    box.close()
    with pytest.raises(ActorStopped, match="gone"):
        await reply.wait()
    with pytest.raises(ActorStopped, match="actor 'gone' stopped"):
        await box.ref.send(Note(n=2))
    with pytest.raises(ActorStopped):
        box.ref.send_nowait(Note(n=3))
    assert not box.ref.alive
    assert box.stats().dead_letters == 4
    assert sink.count == 4
    assert [d.reason for d in sink.recent][:2] == ["actor stopped before handling it"] * 2
    assert all(d.recipient == "gone" for d in sink.recent)


async def test_an_ask_blocked_on_a_full_mailbox_learns_when_it_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A sender waiting for room when the actor stops: its message is dead-lettered, its ask fails."""
    box = Mailbox[Note | Ask](1, name="x")
    await box.send(Note(n=1))
    outcome: list[BaseException] = []

    async def asker() -> None:
        try:
            await box.ref.ask(lambda r: Ask(reply=r), timeout=60)
        except ActorStopped as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(asker)
        await trio.testing.wait_all_tasks_blocked()
        box.close()
    assert len(outcome) == 1
    assert trio.current_time() == 0
    assert box.stats().dead_letters == 2  # the queued note and the ask that was waiting for room


async def test_ask_times_out_at_its_deadline(autojump_clock: trio.testing.MockClock) -> None:
    box = Mailbox[Ask](4)
    with pytest.raises(AskTimeout):
        await box.ref.ask(lambda r: Ask(reply=r), timeout=2.5)
    assert trio.current_time() == 2.5


async def test_ask_timeout_covers_waiting_for_room(autojump_clock: trio.testing.MockClock) -> None:
    box = Mailbox[Ask](1)
    await box.send(Ask(reply=Reply()))
    with pytest.raises(trio.TooSlowError):  # AskTimeout is a TooSlowError
        await box.ref.ask(lambda r: Ask(reply=r), timeout=1)
    assert trio.current_time() == 1
    assert box.stats().depth == 1


async def test_reply_is_one_shot() -> None:
    reply: Reply[int] = Reply()
    reply.send(1)
    with pytest.raises(Exception, match="already answered"):
        reply.send(2)
    reply.fail_if_pending(RuntimeError("ignored"))
    assert await reply.wait() == 1
