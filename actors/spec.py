"""Child specifications: what a supervisor starts, when it restarts it, and how long it waits to stop it.

The names and defaults mirror Erlang/OTP's child spec (``id``, ``start``, ``restart``, ``shutdown``).
A child is anything with Trio's start protocol: an async callable taking ``task_status`` that calls
``task_status.started(value)`` once it is ready and then runs until it is done. The ``value`` is what
the supervisor hands back to whoever started the child (an actor's ref, a supervisor itself).
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import trio

    from .mailbox import Mailbox


class Restart(enum.Enum):
    """When a supervisor restarts a child that ended (OTP restart types)."""

    PERMANENT = "permanent"  #: always, whether it crashed or returned
    TRANSIENT = "transient"  #: only if it crashed (raised an exception)
    TEMPORARY = "temporary"  #: never, not even when a sibling's crash takes it down


class Strategy(enum.Enum):
    """Which children a supervisor restarts when one of them must be restarted (OTP strategies)."""

    ONE_FOR_ONE = "one_for_one"  #: only that child
    ONE_FOR_ALL = "one_for_all"  #: stop all the others (in reverse order), then start all again
    REST_FOR_ONE = "rest_for_one"  #: stop the children started after it, then restart it and them


class StartFn(Protocol):
    """Trio's start protocol: ``await nursery.start(fn)`` returns what ``fn`` passes to ``started``."""

    def __call__(self, *, task_status: trio.TaskStatus[Any]) -> Awaitable[object]: ...


@dataclass(frozen=True, eq=False)
class ChildSpec:
    """How to run one child.

    Attributes:
        id: unique among the supervisor's children; the name shown in the actor tree.
        start: the child itself (Trio start protocol).
        restart: see :class:`Restart`.
        shutdown: seconds the supervisor waits for the child after cancelling it before it reports an
            overrun and moves on; ``None`` waits as long as it takes (the OTP default for supervisors,
            whose own children are bounded).
        kind: ``"actor"``, ``"supervisor"`` or ``"task"``, for the actor tree.
        mailbox: an actor's mailbox, which outlives its restarts; the supervisor closes it when the
            child is gone for good and shows its depth in the tree.
    """

    id: str
    start: StartFn
    restart: Restart = Restart.PERMANENT
    shutdown: float | None = 5.0
    kind: str = "task"
    mailbox: Mailbox[Any] | None = None
