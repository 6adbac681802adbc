"""The control API: the node's answers on ``$NEX.*`` (reference §1), one actor on the control link.

Every request gets exactly one reply (nex v0.2.2 could send two), an ``io.nats.nex.v1.*`` envelope.
A request that cannot be served gets a failure envelope with a reason; a handler bug is logged and
answered with an internal-error envelope, and the actor carries on: bad input never takes it down.
Deploy, stop and workload ping are the workload manager's (:mod:`nex.workload.manager`).
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from actors import Actor, ChildSpec, Mailbox, Overflow, TreeNode, actor_spec
from nex import logs, sysinfo
from nex.api import control, events, subjects
from nex.bus.link import InboundMsg, NatsLink

from .events import EventPublisher
from .state import NodeState

log = logs.get("nex.control")

Machines = Callable[[str], list[control.MachineSummary]]


class ControlApi(Actor[InboundMsg]):
    """Subscribes to the node's ``$NEX.*`` subjects and answers them from :class:`NodeState`."""

    def __init__(
        self,
        state: NodeState,
        link: NatsLink,
        publisher: EventPublisher,
        tree: Callable[[], TreeNode],
        pool: Callable[[], list[control.PoolMember]],
        machines: Machines,
    ) -> None:
        self.state = state
        self.link = link
        self.publisher = publisher
        self.tree = tree
        self.pool = pool
        self.machines = machines

    def child_spec(self) -> ChildSpec:
        """Restarts reuse this actor: what it answers from lives in the node's state, not in it."""
        mailbox = Mailbox[InboundMsg](256, Overflow.FAIL, name="control-api")  # the link counts drops
        return actor_spec(lambda: self, mailbox)

    async def on_start(self) -> None:
        for subject in subjects.control_subscriptions(self.state.node_id):
            sub = await self.link.subscribe(subject, self.ref)
            self.cleanup.push(f"subscription {subject}", lambda sub=sub: self.link.unsubscribe(sub))  # type: ignore[misc]
        log.info("Control API listening", node=self.state.node_id)

    async def handle(self, message: InboundMsg) -> None:
        verb = message.subject.split(".")[1] if "." in message.subject else ""
        try:
            reply = self.answer(verb, message)
        except Exception as exc:
            log.error("Control API handler failed", exc, subject=message.subject)
            reply = control.failure(f"{control.TYPE_PREFIX}.error", f"internal error: {exc}")
        if reply is not None and message.reply:
            await self.link.respond(message, reply)

    def answer(self, verb: str, message: InboundMsg) -> bytes | None:
        match verb:
            case "PING":
                return control.success(control.PING_RESPONSE, self.ping())
            case "INFO":
                namespace = subjects.namespace_of(message.subject)
                if namespace is None:
                    return control.failure(control.INFO_RESPONSE, "Failed to extract namespace for info request")
                return control.success(control.INFO_RESPONSE, self.info(namespace))
            case "LAMEDUCK":
                return self.lameduck(message.data)
        log.warning("Unexpected control subject", subject=message.subject)
        return None

    def ping(self) -> control.PingResponse:
        return control.PingResponse(
            node_id=self.state.node_id,
            version=self.state.version,
            uptime=self.state.uptime(),
            target_xkey=self.state.identity.public_xkey,
            running_machines=self.state.running_workloads(),
            tags=self.state.tags(),
        )

    def info(self, namespace: str) -> control.InfoResponse:
        return control.InfoResponse(
            version=self.state.version,
            uptime=self.state.uptime(),
            public_xkey=self.state.identity.public_xkey,
            tags=self.state.tags(),
            memory=sysinfo.memory(),
            machines=self.machines(namespace),
            supported_workload_types=[t for t in self.state.config.workload_types if t in ("native", "elf")],
            node_id=self.state.node_id,
            pool=self.pool(),
            actors=flatten(self.tree()),
            sandbox=self.state.sandbox,
        )

    def lameduck(self, body: bytes) -> bytes:
        request = control.LameDuckRequest()
        if body.strip():
            try:
                request = msgspec.json.decode(body, type=control.LameDuckRequest)
            except msgspec.DecodeError as exc:
                return control.failure(control.LAMEDUCK_RESPONSE, f"Invalid lame duck request: {exc}")
        if request.deadline_ms is not None and request.deadline_ms < 0:
            return control.failure(control.LAMEDUCK_RESPONSE, "Invalid lame duck request: deadline_ms must be >= 0")
        deadline_ms = request.deadline_ms if request.deadline_ms is not None else self.state.config.lameduck_deadline_ms
        if self.state.enter_lameduck(deadline_ms / 1000):
            log.info("Entering lame duck mode", deadline_ms=deadline_ms, workloads=self.state.running_workloads())
            self.publisher.emit(
                events.NODE_ENTERED_LAMEDUCK, events.LameDuckData(version=self.state.version, id=self.state.node_id)
            )
        return control.success(
            control.LAMEDUCK_RESPONSE, control.LameDuckResponse(node_id=self.state.node_id, success=True)
        )


def flatten(root: TreeNode) -> list[control.ActorSummary]:
    """The actor tree as rows with a depth, for ``nex info``."""
    rows: list[control.ActorSummary] = []

    def visit(node: TreeNode, depth: int) -> None:
        mailbox = f"{node.mailbox_depth}/{node.mailbox_capacity}" if node.mailbox_depth is not None else ""
        rows.append(
            control.ActorSummary(
                name=node.name, kind=node.kind, state=node.state, depth=depth, restarts=node.restarts, mailbox=mailbox
            )
        )
        for child in node.children:
            visit(child, depth + 1)

    visit(root, 0)
    return rows
