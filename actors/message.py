"""Messages and one-shot replies.

Every message an actor receives is a frozen :class:`Message` (a ``msgspec.Struct`` tagged with the
field ``kind``), and an actor's inbox type is a union of them, dispatched with ``match``::

    class Inc(Message):
        by: int = 1

    class Get(Message):
        reply: Reply[int]

    CounterMsg = Inc | Get

In-process messages travel as Struct instances, never encoded; the ``kind`` tag is what lets the same
union be decoded from JSON at a NATS boundary with ``msgspec.json.Decoder(CounterMsg)``.

A request that wants an answer carries a :class:`Reply`: a one-shot slot the handler fills with
``reply.send(value)`` (or ``reply.fail(error)``) and the asker awaits through ``ActorRef.ask``. If the
message is dropped, dead-lettered or its handler crashes, the runtime fails the reply for the handler,
so an asker never waits out its whole deadline for an answer that cannot come.
"""

from __future__ import annotations

import math
from typing import Generic, TypeVar, dataclass_transform

import msgspec
import trio

from .errors import AskTimeout, ReplyAlreadySent

R = TypeVar("R")


@dataclass_transform(frozen_default=True, kw_only_default=True, field_specifiers=(msgspec.field,))
class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag=True):
    """Base of every actor message: frozen, keyword-only, tagged ``{"kind": "<ClassName>"}``.

    Subclasses inherit all three; ``dataclass_transform`` tells type checkers so, so a subclass
    needs no ``frozen=True`` of its own.
    """


class Reply(Generic[R]):
    """A one-shot answer to a request: exactly one of :meth:`send` or :meth:`fail`, once.

    Not thread-safe: replies travel between Trio tasks of one run.
    """

    __slots__ = ("_abandoned", "_done", "_error", "_value")

    def __init__(self) -> None:
        self._done = trio.Event()
        self._value: R | None = None
        self._error: BaseException | None = None
        self._abandoned = False

    @property
    def answered(self) -> bool:
        """True once a value or an error has been delivered."""
        return self._done.is_set()

    @property
    def abandoned(self) -> bool:
        """True once the asker stopped waiting (its ask timed out or was cancelled) unanswered.

        A handler holding a reply for later checks this before it commits something to the asker
        (a pool handing out a machine, say): an answer to an abandoned reply goes nowhere.
        """
        return self._abandoned

    def abandon(self) -> None:
        """Mark the reply as no longer awaited (``ActorRef.ask`` does, on timeout or cancellation)."""
        if not self._done.is_set():
            self._abandoned = True

    def send(self, value: R) -> None:
        """Deliver the answer. Raises :class:`ReplyAlreadySent` if already answered."""
        self._settle()
        self._value = value
        self._done.set()

    def fail(self, error: BaseException) -> None:
        """Deliver an error to the asker, who will see it raised from ``ask``."""
        self._settle()
        self._error = error
        self._done.set()

    def fail_if_pending(self, error: BaseException) -> None:
        """Fail the reply unless it was already answered (used by the runtime on drops and crashes)."""
        if not self.answered:
            self.fail(error)

    async def wait(self, timeout: float = math.inf) -> R:
        """Wait for the answer; raise the delivered error, or :class:`AskTimeout` after ``timeout``."""
        with trio.move_on_after(timeout):
            await self._done.wait()
        if not self._done.is_set():
            raise AskTimeout(f"no reply within {timeout:g}s")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]  # set together with _done

    def _settle(self) -> None:
        if self._done.is_set():
            raise ReplyAlreadySent("this reply was already answered")


def fail_pending_reply(message: object, error: BaseException) -> None:
    """If ``message`` carries an unanswered :class:`Reply` in a ``reply`` field, fail it with ``error``."""
    reply = getattr(message, "reply", None)
    if isinstance(reply, Reply):
        reply.fail_if_pending(error)
