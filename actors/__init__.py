"""A small actor runtime on Trio: typed mailboxes, supervisors after Erlang/OTP, cleanup stacks.

It knows nothing of NATS, machines or nex. A supervision tree in about twenty lines::

    import trio
    from actors import Actor, Mailbox, Message, Reply, Strategy, Supervisor, actor_spec

    class Inc(Message):
        by: int = 1

    class Get(Message):
        reply: Reply[int]

    class Counter(Actor[Inc | Get]):
        def __init__(self) -> None:
            self.n = 0

        async def handle(self, message: Inc | Get) -> None:
            match message:
                case Inc(by=by):
                    self.n += by
                case Get(reply=reply):
                    reply.send(self.n)

    async def main() -> int:
        counter = Mailbox[Inc | Get](capacity=16, name="counter")
        root = Supervisor("root", [actor_spec(Counter, counter)], strategy=Strategy.ONE_FOR_ONE)
        async with trio.open_nursery() as nursery:
            await nursery.start(root.run)
            await counter.ref.send(Inc(by=2))
            total = await counter.ref.ask(lambda reply: Get(reply=reply), timeout=1)
            nursery.cancel_scope.cancel()  # stops the tree: children in reverse order
        return total

    assert trio.run(main) == 2

Modules: :mod:`~actors.mailbox` (bounded mailboxes, overflow policies, dead letters),
:mod:`~actors.ref` (send, ask), :mod:`~actors.actor` (the actor base), :mod:`~actors.supervisor` and
:mod:`~actors.dynamic` (OTP supervision), :mod:`~actors.intensity` (the restart window),
:mod:`~actors.registry` (names), :mod:`~actors.cleanup` (external resources, crash journal),
:mod:`~actors.tree` (the tree snapshot), :mod:`~actors.testing` (probes, cancellation sweeps).
"""

from .actor import Actor as Actor
from .actor import actor_spec as actor_spec
from .cleanup import CleanupStack as CleanupStack
from .cleanup import Journal as Journal
from .cleanup import ResourceRecord as ResourceRecord
from .cleanup import recover as recover
from .dynamic import DynamicSupervisor as DynamicSupervisor
from .errors import ActorCrashed as ActorCrashed
from .errors import ActorError as ActorError
from .errors import ActorStopped as ActorStopped
from .errors import AskTimeout as AskTimeout
from .errors import CleanupFailed as CleanupFailed
from .errors import DuplicateChild as DuplicateChild
from .errors import MailboxFull as MailboxFull
from .errors import MessageDropped as MessageDropped
from .errors import NameTaken as NameTaken
from .errors import ReplyAlreadySent as ReplyAlreadySent
from .errors import Shutdown as Shutdown
from .errors import ShutdownOverrun as ShutdownOverrun
from .errors import StartFailed as StartFailed
from .errors import SupervisorNotRunning as SupervisorNotRunning
from .errors import TooManyChildren as TooManyChildren
from .errors import TooManyRestarts as TooManyRestarts
from .errors import UnknownChild as UnknownChild
from .intensity import RestartIntensity as RestartIntensity
from .mailbox import DeadLetter as DeadLetter
from .mailbox import DeadLetters as DeadLetters
from .mailbox import Mailbox as Mailbox
from .mailbox import MailboxStats as MailboxStats
from .mailbox import Overflow as Overflow
from .message import Message as Message
from .message import Reply as Reply
from .ref import ActorRef as ActorRef
from .registry import Registry as Registry
from .spec import ChildSpec as ChildSpec
from .spec import Restart as Restart
from .spec import Strategy as Strategy
from .supervisor import Supervisor as Supervisor
from .tree import ChildState as ChildState
from .tree import TreeNode as TreeNode
from .tree import render_tree as render_tree
from .util import sole_exception as sole_exception
