"""The control API: the node's answers on ``$NEX.*`` (reference §1), one actor on the control link.

Every request gets exactly one reply (nex v0.2.2 could send two), an ``io.nats.nex.v1.*`` envelope.
A request that cannot be served gets a failure envelope with a reason; a handler bug is logged and
answered with an internal-error envelope, and the actor carries on: bad input never takes it down.
Deploy, stop and workload ping are the workload manager's (:mod:`nex.workload.manager`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import msgspec

from actors import Actor, ChildSpec, Mailbox, Overflow, TreeNode, actor_spec
from nex import logs, sysinfo
from nex.api import control, events, subjects
from nex.bus.events import EventPublisher
from nex.bus.link import InboundMsg, LinkError, NatsLink
from nex.state import NodeState

log = logs.get("nex.control")

Machines = Callable[[str], list[control.MachineSummary]]

RESPONSE_TYPES = {
    "PING": control.PING_RESPONSE,
    "AUCTION": control.AUCTION_RESPONSE,
    "INFO": control.INFO_RESPONSE,
    "LAMEDUCK": control.LAMEDUCK_RESPONSE,
}
RUNNABLE_TYPES = ("native", "elf")  # of the workload types nex names, those this node runs
JSON_WHITESPACE = b" \t\r\n"  # RFC 8259's; bytes.strip() would take \v and \f too, which JSON does not
MAX_DEADLINE_MS = 2**63 - 1  # a Go int64; msgspec decodes any integer (10**400 would overflow a float)


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

    @staticmethod
    def spec(factory: Callable[[], ControlApi]) -> ChildSpec:
        """Each (re)start runs ``factory()``: what the API answers from lives in the node's state."""
        mailbox = Mailbox[InboundMsg](256, Overflow.FAIL, name="control-api")  # the link counts drops
        return actor_spec(factory, mailbox)

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
            payload_type = RESPONSE_TYPES.get(verb, f"{control.TYPE_PREFIX}.error")
            reply = control.failure(payload_type, f"internal error: {exc}")
        if reply is not None and message.reply:
            try:
                await self.link.respond(message, reply)
            except LinkError as exc:  # not connected, or a reply nats-py refuses (more than max_payload)
                log.warning("Could not send a reply", subject=message.subject, error=str(exc))

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
            case "AUCTION":
                bid = self.bid(message.data)
                return control.success(control.AUCTION_RESPONSE, bid) if bid is not None else None
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
            supported_workload_types=self.workload_types(),
            node_id=self.state.node_id,
            pool=self.pool(),
            actors=flatten(self.tree()),
            sandbox=self.state.sandbox,
        )

    def workload_types(self) -> list[str]:
        return [t for t in self.state.config.workload_types if t in RUNNABLE_TYPES]

    def bid(self, body: bytes) -> control.AuctionResponse | None:
        """The node's bid in an auction (``$NEX.AUCTION``), or None to stay silent, as nex v0.2.7
        does: when the node does not match the request (see :class:`~nex.api.control.AuctionRequest`),
        is in lame duck, or is at its workload limit. A body that is not an auction request asks for
        nothing in particular (nex's rule): every node that can take work bids."""
        request = control.AuctionRequest()
        if body.strip(JSON_WHITESPACE):
            with contextlib.suppress(msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                body.decode()
                request = msgspec.json.decode(body, type=control.AuctionRequest)
        tags = self.state.tags()
        left = None
        if limit := self.state.config.node_limits.max_workloads:
            left = limit - self.state.running_workloads()
        silent = (
            self.state.lameduck
            or (left is not None and left <= 0)
            or (request.arch is not None and request.arch != tags.get("nex.arch"))
            or (request.os is not None and request.os != tags.get("nex.os"))
            or (request.sandboxed is not None and request.sandboxed == self.state.sandbox.unsafe)
            or any(tags.get(key) != value for key, value in (request.tags or {}).items())
            or any(kind not in self.workload_types() for kind in request.workload_types or [])
        )
        if silent:
            return None
        return control.AuctionResponse(
            node_id=self.state.node_id,
            version=self.state.version,
            uptime=self.state.uptime(),
            target_xkey=self.state.identity.public_xkey,
            running_machines=self.state.running_workloads(),
            tags=tags,
            ready_machines=sum(1 for member in self.pool() if member.state == "ready"),
            workloads_left=left,
        )

    def lameduck(self, body: bytes) -> bytes:
        """Enter lame duck. A body, if any, is a :class:`~nex.api.control.LameDuckRequest` in JSON; one
        that is not (not UTF-8, not JSON, nested too deeply, a deadline that is no count of ms) is
        refused, so that a garbled request never stops the node."""

        def refused(why: str) -> bytes:
            return control.failure(control.LAMEDUCK_RESPONSE, f"Invalid lame duck request: {why}")

        request = control.LameDuckRequest()
        if body.strip(JSON_WHITESPACE):
            try:
                body.decode()  # msgspec does not check the strings of the fields it skips
                request = msgspec.json.decode(body, type=control.LameDuckRequest)
            except UnicodeDecodeError:
                return refused("the body is not UTF-8")
            except msgspec.DecodeError as exc:
                return refused(str(exc))
            except RecursionError:  # msgspec recurses per level of nesting
                return refused("JSON is nested too deeply")
        if request.deadline_ms is not None and not 0 <= request.deadline_ms <= MAX_DEADLINE_MS:
            return refused(f"deadline_ms must be between 0 and {MAX_DEADLINE_MS}")
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
