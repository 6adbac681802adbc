"""References to actors: the only way to talk to one.

An :class:`ActorRef` names a mailbox, not an actor instance: it stays valid across restarts of the
actor behind it, and fails with :class:`~actors.errors.ActorStopped` once that actor is gone for good.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar

import trio

from .message import Reply

if TYPE_CHECKING:
    from .mailbox import Mailbox, MailboxStats

T = TypeVar("T")
R = TypeVar("R")


class ActorRef(Generic[T]):
    """A handle for sending messages of type ``T`` to one actor."""

    __slots__ = ("_mailbox",)

    def __init__(self, mailbox: Mailbox[T]) -> None:
        self._mailbox = mailbox

    @property
    def name(self) -> str:
        return self._mailbox.name

    @property
    def alive(self) -> bool:
        """False once the actor is gone for good (its mailbox is closed)."""
        return not self._mailbox.closed

    async def send(self, message: T) -> None:
        """Send, waiting for room if the mailbox is full and blocks (backpressure).

        Raises:
            ActorStopped: the actor is gone; the message is counted as a dead letter.
            MailboxFull: the mailbox's policy is ``FAIL`` and it is full.
        """
        await self._mailbox.send(message)

    def send_nowait(self, message: T) -> None:
        """Send without waiting. Raises ``MailboxFull`` instead of blocking, ``ActorStopped`` if gone."""
        self._mailbox.send_nowait(message)

    async def ask(self, build: Callable[[Reply[R]], T], *, timeout: float = math.inf) -> R:
        """Send a request built around a fresh one-shot :class:`Reply` and wait for the answer.

        ``build`` receives the reply slot and returns the message, so the request type stays a plain
        frozen Struct: ``await ref.ask(lambda r: Get(reply=r), timeout=1)``. The timeout covers both
        waiting for room in the mailbox and waiting for the answer.

        Raises:
            AskTimeout: no answer within ``timeout`` (also a ``trio.TooSlowError``).
            ActorStopped: the actor stopped before answering.
            ActorCrashed: the actor raised while handling this request.
            MessageDropped: the mailbox discarded the request (drop policies).
            Exception: whatever the handler passed to ``reply.fail``.

        On a timeout or a cancellation the reply is marked :attr:`~actors.message.Reply.abandoned`.
        """
        reply: Reply[R] = Reply()
        deadline = trio.current_time() + timeout
        try:
            with trio.move_on_at(deadline):
                await self._mailbox.send(build(reply))
            return await reply.wait(max(0.0, deadline - trio.current_time()))
        finally:
            reply.abandon()  # no-op once answered; else the handler can see nobody waits any more

    def stats(self) -> MailboxStats:
        return self._mailbox.stats()

    def __repr__(self) -> str:
        state = "alive" if self.alive else "stopped"
        return f"<ActorRef {self.name} {state}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorRef) and other._mailbox is self._mailbox

    def __hash__(self) -> int:
        return id(self._mailbox)
