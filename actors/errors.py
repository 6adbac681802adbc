"""The runtime's exceptions: small, flat, each named for the condition that raises it."""

from __future__ import annotations

import trio


class ActorError(Exception):
    """Base class of every error the actor runtime raises on purpose."""


class Shutdown(Exception):
    """An actor ending on a condition it understands (OTP's ``{shutdown, Reason}``), not a bug.

    Raise a subclass with a message that says what happened. As in OTP it is a normal exit: a
    transient child that ends with it is not restarted (a permanent one is, as after any exit), and
    its supervisor logs it in one line, without the traceback a crash report carries.
    """


class ActorStopped(ActorError):
    """The actor is gone for good: its mailbox is closed.

    Raised by ``send``/``send_nowait``/``ask`` on a stopped actor (the message is counted as a dead
    letter), and delivered to an ``ask`` whose message was still queued when the actor stopped.
    A restarting actor is *not* stopped: its mailbox survives the restart and keeps queueing.
    """


class MailboxFull(ActorError):
    """The mailbox is full and its overflow policy refuses the message.

    Raised by ``send_nowait`` under the ``BLOCK`` policy and by every send under ``FAIL``.
    """


class MessageDropped(ActorError):
    """An ``ask`` whose request was discarded by a drop-newest or drop-oldest mailbox."""


class ActorCrashed(ActorError):
    """An ``ask`` whose request was being handled when the actor raised.

    The actor's own exception is the ``__cause__``; the supervisor decides what happens next.
    """


class AskTimeout(ActorError, trio.TooSlowError):
    """No reply arrived within the ``ask`` deadline. Also a ``trio.TooSlowError``."""


class ReplyAlreadySent(ActorError):
    """A one-shot reply was answered twice: a bug in the replying actor."""


class TooManyRestarts(ActorError):
    """A supervisor exceeded its restart intensity and shut itself down.

    This is OTP escalation: the supervisor's parent sees it as a crash of that child and applies its
    own strategy; at the root it ends the program.
    """

    def __init__(self, supervisor: str, intensity: int, period: float, last_error: str) -> None:
        super().__init__(
            f"supervisor {supervisor!r} gave up: more than {intensity} restarts within {period:g}s (last: {last_error})"
        )
        self.supervisor = supervisor
        self.intensity = intensity
        self.period = period


class ShutdownOverrun(ActorError):
    """A supervisor gives up because a child it had to stop for a restart is still running.

    Trio cannot kill a task, and starting the child again would give it two live runs on one
    mailbox; the supervisor escalates instead. Its own exit then waits for that run to end.
    """

    def __init__(self, supervisor: str, children: list[str]) -> None:
        super().__init__(
            f"supervisor {supervisor!r} gave up: {', '.join(children)} overran the shutdown deadline "
            "and cannot be started again while its previous run goes on"
        )
        self.supervisor = supervisor
        self.children = children


class StartFailed(ActorError):
    """A child failed before signalling that it had started; the cause is ``__cause__``."""

    def __init__(self, supervisor: str, child: str) -> None:
        super().__init__(f"child {child!r} of supervisor {supervisor!r} failed to start")
        self.supervisor = supervisor
        self.child = child


class TooManyChildren(ActorError):
    """A dynamic supervisor already runs its maximum number of children."""


class DuplicateChild(ActorError):
    """A child with this id is already running under the supervisor."""


class UnknownChild(ActorError):
    """No child with this id runs under the supervisor."""


class SupervisorNotRunning(ActorError):
    """The supervisor is not running, so it cannot start or stop children."""


class NameTaken(ActorError):
    """Another live actor is already registered under this name."""


class CleanupFailed(ActorError):
    """One or more releases of a cleanup stack raised or overran their deadline.

    Every release was still attempted; ``failures`` lists ``(resource, error)`` for those that failed.
    Their journal records are kept on disk so that a later process can finish the job.
    """

    def __init__(self, failures: list[tuple[str, BaseException]]) -> None:
        names = ", ".join(f"{name} ({type(err).__name__}: {err})" for name, err in failures)
        super().__init__(f"{len(failures)} resource(s) could not be released: {names}")
        self.failures = failures
