"""Bounded typed mailboxes with an overflow policy, statistics and dead letters.

A :class:`Mailbox` is the queue in front of one actor. It is created by whoever creates the actor's
child spec and outlives every restart of the actor, so an :class:`~actors.ref.ActorRef` to it stays
valid while the actor crashes and comes back; messages sent during a restart wait in the queue. The
mailbox closes when its supervisor stops the actor for good. From then on every send raises
:class:`~actors.errors.ActorStopped` and counts a dead letter, and the messages still queued become
dead letters too; if the supervisor itself is restarted by its parent, it reopens the mailbox.

When the queue is full, the mailbox's :class:`Overflow` policy decides:

- ``BLOCK``: ``send`` waits for room (backpressure); ``send_nowait`` raises ``MailboxFull``.
- ``FAIL``: every send raises ``MailboxFull`` at once; the sender decides.
- ``DROP_NEWEST``: the incoming message is discarded and counted (for best-effort notifications).
- ``DROP_OLDEST``: the oldest queued message is discarded to make room (for telemetry, where only
  the latest state matters).

A discarded or dead-lettered message that carries a :class:`~actors.message.Reply` has its reply
failed at once, so an ``ask`` never waits out its deadline for a message that no one will read.
"""

from __future__ import annotations

import collections
import enum
import math
from typing import Generic, TypeVar

import msgspec
import trio

from .errors import ActorStopped, MailboxFull, MessageDropped
from .message import fail_pending_reply
from .ref import ActorRef

T = TypeVar("T")


class Overflow(enum.Enum):
    """What a full mailbox does with one more message."""

    BLOCK = "block"
    FAIL = "fail"
    DROP_NEWEST = "drop_newest"
    DROP_OLDEST = "drop_oldest"


class MailboxStats(msgspec.Struct, frozen=True):
    """A snapshot of one mailbox's counters."""

    name: str
    capacity: int
    overflow: str
    depth: int
    high_water: int
    enqueued: int
    delivered: int
    dropped: int
    rejected: int
    dead_letters: int
    closed: bool


class DeadLetter(msgspec.Struct, frozen=True):
    """A message that reached no actor: the recipient's name, the message's repr, and why."""

    recipient: str
    message: str
    reason: str


class DeadLetters:
    """A sink for undeliverable messages: a total count and the most recent few, for inspection.

    One sink may be shared by every mailbox of a program (pass it to each :class:`Mailbox`), so that
    ``nex info`` can show them in one place; by default each mailbox has its own.
    """

    def __init__(self, keep: int = 100) -> None:
        self.count = 0
        self.recent: collections.deque[DeadLetter] = collections.deque(maxlen=keep)

    def record(self, recipient: str, message: object, reason: str) -> None:
        self.count += 1
        self.recent.append(DeadLetter(recipient=recipient, message=repr(message), reason=reason))


class Mailbox(Generic[T]):
    """A bounded queue of messages of type ``T`` in front of one actor.

    Args:
        capacity: how many messages may wait. ``0`` makes ``send`` a rendezvous with the receiver
            (only with ``BLOCK`` or ``FAIL``).
        overflow: what to do when full (see :class:`Overflow`).
        name: shown in dead letters, errors and the actor tree.
        dead_letters: a shared sink; a private one by default.
    """

    def __init__(
        self,
        capacity: int = 64,
        overflow: Overflow = Overflow.BLOCK,
        *,
        name: str = "mailbox",
        dead_letters: DeadLetters | None = None,
    ) -> None:
        if capacity < 0 or capacity == math.inf:
            raise ValueError("mailbox capacity must be a finite number >= 0")
        if capacity == 0 and overflow in (Overflow.DROP_NEWEST, Overflow.DROP_OLDEST):
            raise ValueError(f"overflow policy {overflow.value} needs a capacity >= 1")
        self.name = name
        self.capacity = capacity
        self.overflow = overflow
        self.dead_letters = dead_letters if dead_letters is not None else DeadLetters()
        self._send, self._receive = trio.open_memory_channel[T](capacity)
        self._closed = False
        self._high_water = 0
        self._enqueued = 0
        self._delivered = 0
        self._dropped = 0
        self._rejected = 0
        self._dead = 0

    # -- the sending side (used through ActorRef) -------------------------------------------------

    @property
    def ref(self) -> ActorRef[T]:
        """A reference through which others send to this mailbox."""
        return ActorRef(self)

    @property
    def closed(self) -> bool:
        return self._closed

    async def send(self, message: T) -> None:
        """Enqueue ``message``, waiting for room under ``BLOCK``; see :class:`Overflow` for the rest.

        Always a checkpoint, as Trio's own sends are: cancelled before it enqueues, it raises
        ``Cancelled`` and sends nothing; once enqueued, it returns.
        """
        if self.overflow is not Overflow.BLOCK:
            await trio.lowlevel.checkpoint_if_cancelled()
            self.send_nowait(message)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        self._refuse_if_closed(message)
        try:
            await self._send.send(message)
        except trio.BrokenResourceError:
            # Closed while we waited for room: the message never got in.
            self._dead_letter(message, "actor stopped while the sender waited for room")
            raise ActorStopped(f"actor {self.name!r} stopped") from None
        self._after_enqueue()

    def send_nowait(self, message: T) -> None:
        """Enqueue ``message`` without waiting; a full mailbox applies its overflow policy."""
        self._refuse_if_closed(message)
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            self._overflow(message)
            return
        self._after_enqueue()

    def _overflow(self, message: T) -> None:
        if self.overflow is Overflow.DROP_NEWEST:
            self._dropped += 1
            fail_pending_reply(message, MessageDropped(f"mailbox {self.name!r} is full (drop newest)"))
            return
        if self.overflow is Overflow.DROP_OLDEST:
            oldest = self._receive.receive_nowait()
            self._dropped += 1
            fail_pending_reply(oldest, MessageDropped(f"mailbox {self.name!r} is full (drop oldest)"))
            self._send.send_nowait(message)
            self._after_enqueue()
            return
        self._rejected += 1
        raise MailboxFull(f"mailbox {self.name!r} is full ({self.capacity} waiting)")

    def _after_enqueue(self) -> None:
        self._enqueued += 1
        depth = self._receive.statistics().current_buffer_used
        self._high_water = max(self._high_water, depth)

    def _refuse_if_closed(self, message: T) -> None:
        if self._closed:
            self._dead_letter(message, "actor stopped")
            raise ActorStopped(f"actor {self.name!r} stopped")

    # -- the receiving side (used by the owning actor) ---------------------------------------------

    async def receive(self) -> T:
        """Wait for the next message. Only the owning actor receives."""
        message = await self._receive.receive()
        self._delivered += 1
        return message

    def dead_letter(self, message: object, reason: str) -> None:
        """Record a message the owner could not handle (for example, one of an unknown kind)."""
        self._dead_letter(message, reason)

    def close(self) -> None:
        """Close for good: queued messages become dead letters, senders get ``ActorStopped``.

        Idempotent. Called by the supervisor when the actor will not be restarted.
        """
        if self._closed:
            return
        self._closed = True
        while True:
            try:
                message = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            self._dead_letter(message, "actor stopped before handling it")
        self._receive.close()  # wakes blocked senders with BrokenResourceError

    def reopen(self) -> None:
        """Open a closed mailbox again, empty, for a new run of its actor.

        A supervisor that stops closes its children's mailboxes, since it cannot know whether its
        parent will restart it; when it is restarted, it reopens them before starting the children,
        so that refs taken before reach the fresh instances (a ref names a mailbox). The counters
        carry on. No-op on an open mailbox.
        """
        if not self._closed:
            return
        self._send, self._receive = trio.open_memory_channel[T](self.capacity)
        self._closed = False

    def _dead_letter(self, message: object, reason: str) -> None:
        self._dead += 1
        self.dead_letters.record(self.name, message, reason)
        fail_pending_reply(message, ActorStopped(f"actor {self.name!r} stopped: {reason}"))

    def stats(self) -> MailboxStats:
        """A snapshot of depth, high-water mark and the drop, rejection and dead-letter counters."""
        return MailboxStats(
            name=self.name,
            capacity=self.capacity,
            overflow=self.overflow.value,
            depth=0 if self._closed else self._receive.statistics().current_buffer_used,
            high_water=self._high_water,
            enqueued=self._enqueued,
            delivered=self._delivered,
            dropped=self._dropped,
            rejected=self._rejected,
            dead_letters=self._dead,
            closed=self._closed,
        )
