"""The actor: a Trio task that owns its state, a typed mailbox, a nursery and a cleanup stack.

Subclass :class:`Actor` with the union of messages it accepts and implement :meth:`Actor.handle` with
``match``::

    class Counter(Actor[Inc | Get]):
        def __init__(self) -> None:
            self.n = 0

        async def handle(self, message: Inc | Get) -> None:
            match message:
                case Inc(by=by):
                    self.n += by
                case Get(reply=reply):
                    reply.send(self.n)

One run of an actor:

1. :meth:`Actor.on_start` acquires what the actor needs, through ``self.cleanup`` for anything outside
   the process, and may start background tasks in ``self.nursery``. If it raises, everything acquired
   so far is released and the start fails (the supervisor sees a failed start).
2. The actor signals ``started`` (its ref is the started value) and registers its name, if given a
   registry.
3. Messages are handled one at a time, in order. A message whose type is not in the inbox union is a
   dead letter, not a crash. An exception from ``handle`` (or from a background task) is a crash:
   the actor ends and its supervisor decides; a pending ``ask`` gets :class:`~actors.errors.ActorCrashed`.
4. :meth:`Actor.stop` ends the loop after the current message: a normal exit.
5. However it ends, background tasks are cancelled first, then the cleanup stack releases everything
   in reverse order, shielded from cancellation and bounded in time.

Create the actor's :class:`~actors.mailbox.Mailbox` once and build its child spec with
:func:`actor_spec`; each restart runs a fresh instance from the factory on the same mailbox.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

import trio

from .cleanup import CleanupStack, Journal
from .errors import ActorCrashed, ActorStopped
from .mailbox import Mailbox
from .message import fail_pending_reply
from .ref import ActorRef
from .registry import Registry
from .spec import ChildSpec, Restart
from .util import sole_exception

T = TypeVar("T")


class Actor(Generic[T]):
    """Base class of actors receiving messages of type ``T`` (a union of :class:`~actors.Message`)."""

    #: The message classes of the inbox union, derived from ``Actor[...]`` when subclassing.
    inbox_types: ClassVar[tuple[type, ...]] = ()
    #: Where the cleanup stack records resources before creating them (``None``: no records).
    journal: Journal | None = None
    #: Deadline of each release in the cleanup stack, in seconds.
    release_timeout: float = 5.0

    mailbox: Mailbox[T]
    nursery: trio.Nursery
    cleanup: CleanupStack

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in getattr(cls, "__orig_bases__", ()):
            if typing.get_origin(base) is Actor:
                (inbox,) = typing.get_args(base)
                if not isinstance(inbox, TypeVar):
                    cls.inbox_types = _union_members(inbox)
                    _check_unique_tags(cls.__name__, cls.inbox_types)

    @property
    def name(self) -> str:
        return self.mailbox.name

    @property
    def ref(self) -> ActorRef[T]:
        return self.mailbox.ref

    async def on_start(self) -> None:
        """Prepare before ``started``: acquire via ``self.cleanup``, start tasks in ``self.nursery``."""

    async def handle(self, message: T) -> None:
        """Handle one message. Raise to crash; call :meth:`unhandled` for a kind you do not expect."""
        raise NotImplementedError(f"{type(self).__name__}.handle")

    def unhandled(self, message: object) -> None:
        """Send ``message`` to dead letters: the ``case _:`` of a ``match`` in :meth:`handle`."""
        self.mailbox.dead_letter(message, f"{type(self).__name__} does not handle {type(message).__name__}")

    def stop(self) -> None:
        """End the actor after the message being handled (a normal exit, not a crash)."""
        self._stopping = True
        scope = getattr(self, "_receive_scope", None)
        if scope is not None:
            scope.cancel()

    async def run(
        self,
        mailbox: Mailbox[T],
        *,
        registry: Registry | None = None,
        task_status: trio.TaskStatus[ActorRef[T]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run this actor on ``mailbox`` until it stops, crashes or is cancelled (see the module doc)."""
        self.mailbox = mailbox
        self._stopping = False
        self._receive_scope: trio.CancelScope | None = None
        crash: BaseException | None = None
        async with CleanupStack(
            journal=self.journal, owner=mailbox.name, release_timeout=self.release_timeout
        ) as cleanup:
            self.cleanup = cleanup
            try:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    await self.on_start()
                    if registry is not None:
                        registry.register(mailbox.name, mailbox.ref)
                    try:
                        task_status.started(mailbox.ref)
                        await self._loop()
                    finally:
                        if registry is not None:
                            registry.unregister(mailbox.name, mailbox.ref)
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                crash = sole_exception(group)
                if crash is group:
                    raise
            if crash is not None:
                # Raised outside the ``except``: raised inside, it would get the group as its
                # __context__, a cycle (the group holds it) that sends traceback walkers (pytest
                # 9.2's, for one) into an endless loop.
                raise crash

    async def _loop(self) -> None:
        while not self._stopping:
            # stop() from another task cancels only this wait; a receive is atomic under
            # cancellation, so no message is lost by it.
            with trio.CancelScope() as scope:
                self._receive_scope = scope
                message = await self.mailbox.receive()
            self._receive_scope = None
            if scope.cancelled_caught:
                break
            await self._dispatch(message)

    async def _dispatch(self, message: T) -> None:
        if self.inbox_types and not isinstance(message, self.inbox_types):
            self.mailbox.dead_letter(message, f"{type(self).__name__} does not accept {type(message).__name__}")
            return
        try:
            await self.handle(message)
        except Exception as exc:
            crashed = ActorCrashed(f"actor {self.name!r} crashed handling {type(message).__name__}: {exc!r}")
            crashed.__cause__ = exc
            fail_pending_reply(message, crashed)
            raise
        except BaseException:
            fail_pending_reply(message, ActorStopped(f"actor {self.name!r} was cancelled"))
            raise


def actor_spec(
    factory: Callable[[], Actor[T]],
    mailbox: Mailbox[T],
    *,
    restart: Restart = Restart.PERMANENT,
    shutdown: float | None = 5.0,
    registry: Registry | None = None,
) -> ChildSpec:
    """A child spec running a fresh ``factory()`` actor on ``mailbox`` at each (re)start.

    The child's id is the mailbox's name; its started value is the mailbox's :class:`ActorRef`.
    """

    async def start(*, task_status: trio.TaskStatus[ActorRef[T]]) -> None:
        await factory().run(mailbox, registry=registry, task_status=task_status)

    return ChildSpec(id=mailbox.name, start=start, restart=restart, shutdown=shutdown, kind="actor", mailbox=mailbox)


def _union_members(inbox: object) -> tuple[type, ...]:
    is_union = typing.get_origin(inbox) in (typing.Union, types.UnionType)
    members = typing.get_args(inbox) if is_union else (inbox,)
    return tuple(m for m in members if isinstance(m, type))


def _check_unique_tags(actor: str, members: tuple[type, ...]) -> None:
    seen: dict[object, str] = {}
    for member in members:
        config = getattr(member, "__struct_config__", None)
        tag = getattr(config, "tag", None)
        if tag is None:
            continue
        if tag in seen:
            raise TypeError(f"{actor}: messages {seen[tag]} and {member.__name__} share the kind tag {tag!r}")
        seen[tag] = member.__name__
