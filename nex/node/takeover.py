"""Workloads that outlive their node: a node that stops answering has its essential workloads run again
by another node of the cluster.

Every node listens to the others' ``heartbeat`` (and ``node_started``) events. A node silent for
``node_dead_after_ms`` (3 heartbeat intervals by default) whose workload records remain in the
cluster's bucket (:mod:`nex.workload.records`: a node that stops removes its own) is taken for dead.
Each of its records is then settled by exactly one of the live nodes: the one whose delete of the
record, conditional on the revision it read (a JetStream KV compare-and-set), succeeds. No election,
no lock: the bucket's ordering decides, and every other node's delete fails and moves on.

The node that settles a record of an essential workload runs it again on itself, if it can open its
environment: with a ``cluster_workload_key`` every node seals each recorded environment to that
shared key too, and the taker opens it, seals it anew from the shared key to itself and deploys to
itself through its own ``$NEX.DEPLOY`` (every check runs, as for any deploy: the issuer's JWT in the
record is the one the dead node was given). Whatever happens to it, the dead node's copy gets its
``workload_stopped``, from the taker, saying where the workload runs now or why it is lost (no shared
key, not essential, refused). A record that its node did not sign is never acted on.

A node taken for dead that comes back finds its records gone, and does not run those workloads again.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import uuid
from collections.abc import Callable

import msgspec
import nats.errors
import nats.js.errors
import trio
from nats.aio.client import Client

from actors import Actor, ChildSpec, Mailbox, Overflow, actor_spec
from nex import crypto, logs
from nex.api import control, events, subjects
from nex.bus.events import EventPublisher
from nex.bus.link import InboundMsg, LinkError, NatsLink
from nex.state import NodeState
from nex.workload import records
from nex.workload import request as workload_request

log = logs.get("nex.node")

DEPLOY_TIMEOUT = 120.0  # for this node to start a workload it takes over (as a lame duck's move waits)
PING_TIMEOUT = 1.0  # for a node taken for dead to prove it is not
HEARD = (events.HEARTBEAT, events.NODE_STARTED)


class Takeover(Actor[InboundMsg]):
    def __init__(self, state: NodeState, link: NatsLink, publisher: EventPublisher) -> None:
        self.state = state
        self.link = link
        self.publisher = publisher
        self.dead_after = state.config.dead_after()
        # the bucket is read whole at each check: a third of the silence that makes a node dead is
        # soon enough to notice it, and no more often than that
        self.every = max(0.1, self.dead_after / 3)
        seed = state.config.cluster_workload_key
        self.shared = crypto.XKey.from_seed(seed) if seed else None
        self.heard: dict[str, float] = {}  # node id: when it was last heard of (trio time)
        self.since = trio.current_time()  # a node never heard of is given dead_after from here
        self._failing = False

    @staticmethod
    def spec(factory: Callable[[], Takeover]) -> ChildSpec:
        return actor_spec(factory, Mailbox[InboundMsg](1024, Overflow.DROP_OLDEST, name="takeover"))

    async def on_start(self) -> None:
        for kind in HEARD:
            sub = await self.link.subscribe(subjects.event(subjects.SYSTEM_NAMESPACE, kind), self.ref)
            self.cleanup.push(f"subscription {kind}", lambda sub=sub: self.link.unsubscribe(sub), durable=False)  # type: ignore[misc]
        self.nursery.start_soon(self._watch)

    async def handle(self, message: InboundMsg) -> None:
        with contextlib.suppress(msgspec.DecodeError, AttributeError, TypeError):
            source = msgspec.json.decode(message.data).get("source")
            if isinstance(source, str):
                self.heard[source] = trio.current_time()

    async def _watch(self) -> None:
        while True:
            await trio.sleep(self.every)  # a check's cadence: silence is what it looks for
            try:
                await self._settle_the_dead()
            except (LinkError, nats.errors.Error, OSError) as exc:  # the bucket's trouble: next time
                if not self._failing:
                    log.warning("Cannot read the cluster's workload records", bucket=records.BUCKET, error=str(exc))
                self._failing = True
            else:
                self._failing = False

    async def _settle_the_dead(self) -> None:
        if not self._can_take():  # the live nodes that can will settle them
            return
        now = trio.current_time()
        replicas = self.state.config.state_replicas
        for key, value, revision in await self.link.call(lambda nc: all_records(nc, replicas)):
            node = key.split(".", 1)[0]
            if node == self.state.node_id or now - self.heard.get(node, self.since) < self.dead_after:
                continue
            record = records.decode(value)
            if record is None or record.key != key or not self._trusted(record) or revision <= 0:
                continue  # not an instruction anyone may give
            if await self._answers(node):  # its heartbeats were late, or lost: it lives
                self.heard[node] = trio.current_time()
                continue
            if not self._can_take():
                return
            if await self.link.call(lambda nc, key=key, revision=revision: claim(nc, replicas, key, revision)):  # type: ignore[misc]
                await self._take(record)

    def _can_take(self) -> bool:
        """Whether this node would take a workload now (as it would bid for one)."""
        limit = self.state.config.node_limits.max_workloads
        return not self.state.lameduck and not (limit and self.state.running_workloads() >= limit)

    def _trusted(self, record: records.WorkloadRecord) -> bool:
        """A record to act on: signed by the node it names and, with a shared key, written by a node of
        this cluster (any nkey can sign a record; only a member holds the key). Without a shared key,
        only the records of nodes this node has heard from: a stranger's only lead to an event."""
        if not records.signed_by_its_node(record):
            return False
        if self.shared is not None:
            return records.from_the_cluster(record, self.state.config.cluster_workload_key)
        return record.node_id in self.heard

    async def _answers(self, node: str) -> bool:
        """Whether ``node`` answers a ping of its own (silent on the event stream is not dead)."""
        try:
            await self.link.request(subjects.ping(node), b"", timeout=PING_TIMEOUT)
        except LinkError:
            return False
        return True

    async def _take(self, record: records.WorkloadRecord) -> None:
        """Settle ``record`` of a dead node, which this node has claimed: run it here, or say it is lost."""
        silent = f"its node {record.node_id} stopped answering"
        if not record.essential:
            self._stopped(record, f"{silent}; it was not essential: not run again")
            return
        try:
            workload = await self._run_here(record)
        except (_Lost, msgspec.DecodeError) as exc:
            log.warning("A workload of a dead node is lost", name=record.name, node=record.node_id, reason=str(exc))
            self._stopped(record, f"{silent}; lost: {exc}")
            return
        log.info("Took over a workload of a dead node", name=record.name, node=record.node_id, id=workload)
        self._stopped(record, f"{silent}; running again on node {self.state.node_id} as workload {workload}")

    async def _run_here(self, record: records.WorkloadRecord) -> str:
        if self.shared is None:
            raise _Lost("this node has no cluster_workload_key to open its environment with")
        if not record.shared_environment:
            raise _Lost("its node had no cluster_workload_key: no other node can open its environment")
        try:
            plain = self.shared.open(base64.b64decode(record.shared_environment), record.shared_sender)
            environment = {str(k): str(v) for k, v in msgspec.json.decode(plain, type=dict[str, str]).items()}
            request = msgspec.json.decode(bytes(record.deploy_request), type=control.DeployRequest)
        except (crypto.SealError, crypto.InvalidKey, binascii.Error, ValueError, msgspec.DecodeError) as exc:
            raise _Lost(f"its record cannot be opened with this cluster's key: {exc}") from None
        if not request.workload_jwt:
            raise _Lost("its record holds no workload JWT")
        deploy = workload_request.Deploy(
            location=record.location,
            name=record.name,
            hash=record.hash,
            node_id=self.state.node_id,
            node_xkey=self.state.identity.public_xkey,
            environment=environment,
            argv=list(request.argv),
            description=request.description or "",
            essential=True,
            workload_type=request.type or "native",
            jsdomain=request.jsdomain or "",
        )
        body = workload_request.forwarded_request(deploy, request.workload_jwt, str(uuid.uuid4()), self.shared)
        try:
            reply = await self.link.request(
                subjects.deploy(record.namespace, self.state.node_id), body, timeout=DEPLOY_TIMEOUT
            )
            envelope = msgspec.json.decode(reply.data, type=control.ReceivedEnvelope)
        except (LinkError, msgspec.DecodeError) as exc:
            raise _Lost(f"this node could not deploy it: {exc}") from None
        if envelope.error:
            raise _Lost(f"this node refused it: {envelope.error}")
        return msgspec.json.decode(envelope.data, type=control.RunResponse).id

    def _stopped(self, record: records.WorkloadRecord, message: str) -> None:
        data = events.WorkloadEventData(
            workload_name=record.name, code=-1, message=message, id=record.workload_id, namespace=record.namespace
        )
        self.publisher.emit(events.WORKLOAD_STOPPED, data, namespace=record.namespace)


class _Lost(Exception):
    """A dead node's workload cannot run again (the message says why)."""


async def all_records(nc: Client, replicas: int) -> list[tuple[str, bytes, int]]:
    """Every record in the bucket: key, value and revision (one watch)."""
    kv = await records.open_bucket(nc, replicas)
    watcher = await kv.watch(">", ignore_deletes=True)
    found: list[tuple[str, bytes, int]] = []
    try:
        while (entry := await watcher.updates(timeout=records.KV_TIMEOUT)) is not None:  # type: ignore[no-untyped-call]
            if entry.value:
                found.append((entry.key, entry.value, entry.revision or 0))
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    return found


async def claim(nc: Client, replicas: int, key: str, revision: int) -> bool:
    """Delete ``key`` if it is still at ``revision``: True for the one node whose delete went through."""
    kv = await records.open_bucket(nc, replicas)
    try:
        await kv.delete(key, last=revision)
    except nats.js.errors.KeyWrongLastSequenceError:
        return False
    except nats.js.errors.APIError as exc:  # an older server says so with a plain API error
        if "wrong last sequence" in str(exc).lower():
            return False
        raise
    return True
