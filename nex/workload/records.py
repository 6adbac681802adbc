"""The node's workload records: one per running workload, in a JetStream KV bucket on the control NATS.

A node killed outright (SIGKILL, the OOM killer, a power cut) forgets its workloads with its memory.
Its records are what it reads when it is started again on the same state directory, to run its
essential workloads again (see :mod:`.recovery`), and what the other nodes of a cluster can read
about it.

The bucket, :data:`BUCKET`, is shared by every node of a cluster: the first node creates it, with
``state_replicas`` replicas (by default as many as the operator's cluster allows, up to 3: JetStream
refuses more replicas than it has servers, and a single server any), and
the others bind to it. A record's key is ``{node_id}.{workload_id}`` (the workload id is its
machine's vmid), so nodes never write each other's keys and a node reads its own with one filtered
watch. The value is a :class:`WorkloadRecord` as JSON: the ``$NEX.DEPLOY`` body as received, its
environment still sealed to this node's xkey (whoever reads the bucket learns nothing of it), where
the artifact is and its hash, the essential flag, restarts, and when the node accepted the request.

Each record is signed with the node's nkey, and a node reads back only records it signed: a record
is an instruction to run something (see :mod:`.recovery` for why the time of acceptance matters),
and the bucket is writable by anyone the control server lets use its JetStream.

The workload manager tells :class:`WorkloadRecords` what the bucket should hold (:class:`Keep`,
:class:`Forget`) and never waits for it: the actor keeps the latest state per key and writes it in
the background, so a deploy does not wait on JetStream, and a workload that ended before its record
was written is never written at all. A write that fails (no JetStream on the control server, a
disconnection) is tried again later, with backoff; the node says once that it keeps no records, and
once that it keeps them again. A node that stops (any stop it lives through: a signal, lame duck, a
failure) ends its workloads, and removes their records with them: only a node that dies without
stopping leaves records behind.

A removed record leaves a purge marker, which watchers see; it expires after
:data:`PURGE_MARKER_TTL` (on a bucket that allows per-message TTLs, as one created here does), so
the bucket does not grow with every workload that ever ran.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
import nats.errors
import nats.js.errors
import trio
from nats.aio.client import Client
from nats.js.kv import KeyValue

from actors import Actor, ActorRef, ActorStopped, ChildSpec, Mailbox, MailboxFull, Message, Overflow, Reply, actor_spec
from nex import crypto, logs
from nex.bus.errors import reason
from nex.bus.link import NatsLink
from nex.state import NodeState

log = logs.get("nex.workload")

BUCKET = "NEXNODE_WORKLOADS"
AUTO_REPLICAS = (3, 2, 1)  # tried in turn when state_replicas is 0: a cluster refuses more than it has
KV_TIMEOUT = 5.0  # each JetStream request
PURGE_MARKER_TTL = 600.0  # seconds a removed record's purge marker stays
RETRY_FIRST = 1.0  # after a failed write; doubles each time
TAKEN_CHECK = 5.0  # seconds between checks that this node's records are still its own
RETRY_MAX = 60.0
_SIGNED_AS = "nex-workload-record-v1"


class WorkloadRecord(msgspec.Struct, kw_only=True, frozen=True):
    """What the node keeps about one of its workloads (the bucket's value, as JSON)."""

    node_id: str
    workload_id: str  # its machine's vmid
    namespace: str
    name: str
    location: str  # nats://BUCKET/key
    hash: str  # the artifact's sha256, hex
    essential: bool
    restarts: int = 0
    accepted_at: int  # unix seconds: when this node first accepted the deploy request
    started_at: str = ""  # RFC 3339: when this run of it started ("" while a restart is pending)
    restart_pending: bool = False  # it exited and an essential restart is due
    deploy_request: msgspec.Raw  # the $NEX.DEPLOY body as received: its environment still sealed
    # with a cluster_workload_key: the environment sealed from shared_sender (the node's xkey) to it,
    # base64, which any node of the cluster can open to run the workload if this node dies
    shared_environment: str = ""
    shared_sender: str = ""
    signature: str = ""  # by the node's nkey, over :func:`signed_text`
    # HMAC-SHA256 of :func:`signed_text` under the cluster_workload_key (hex): that a node of this
    # cluster wrote it (any nkey can sign a record; only a member knows the key)
    cluster_mac: str = ""

    @property
    def key(self) -> str:
        return record_key(self.node_id, self.workload_id)


def record_key(node_id: str, workload_id: str) -> str:
    return f"{node_id}.{workload_id}"


def signed_text(record: WorkloadRecord) -> bytes:
    """What a record's signature covers: every field but the signature and ``started_at``, in a
    fixed order (so a record written by another version of this node still verifies)."""
    request = hashlib.sha256(bytes(record.deploy_request)).hexdigest()
    fields: list[object] = [
        _SIGNED_AS,
        record.node_id,
        record.workload_id,
        record.namespace,
        record.name,
        record.location,
    ]
    fields += [record.hash, record.essential, record.restarts, record.accepted_at, record.restart_pending, request]
    if record.shared_environment or record.shared_sender:  # (records without verify as before they existed)
        fields += [record.shared_environment, record.shared_sender]
    return msgspec.json.encode(fields)


def sign(record: WorkloadRecord, identity: crypto.NodeIdentity, cluster_key: str = "") -> WorkloadRecord:
    """``record`` signed by the node, and with a cluster_workload_key, its MAC under that key."""
    signature = identity.nkey.sign(signed_text(record))
    mac = cluster_mac(record, cluster_key) if cluster_key else ""
    return msgspec.structs.replace(record, signature=base64.urlsafe_b64encode(signature).decode(), cluster_mac=mac)


def cluster_mac(record: WorkloadRecord, cluster_key: str) -> str:
    secret = hashlib.sha256(b"nex-cluster-record-mac\0" + cluster_key.encode()).digest()
    return hmac.new(secret, signed_text(record), hashlib.sha256).hexdigest()


def from_the_cluster(record: WorkloadRecord, cluster_key: str) -> bool:
    """Whether a node that holds ``cluster_key`` wrote ``record`` as it is."""
    return bool(record.cluster_mac) and hmac.compare_digest(record.cluster_mac, cluster_mac(record, cluster_key))


def signed_by_its_node(record: WorkloadRecord) -> bool:
    """Whether the node the record names signed it, as it is."""
    try:
        signature = base64.urlsafe_b64decode(record.signature)
    except (binascii.Error, ValueError):
        return False
    return crypto.signed_by(record.node_id, crypto.PREFIX_SERVER, signed_text(record), signature)


def decode(data: bytes) -> WorkloadRecord | None:
    """A record from the bucket; None if it is not one."""
    try:
        return msgspec.json.decode(data, type=WorkloadRecord)
    except (msgspec.DecodeError, RecursionError):
        return None


# -- the actor -------------------------------------------------------------------------------------


class Keep(Message):
    """The bucket should hold ``record`` (unsigned: the actor signs it)."""

    record: WorkloadRecord


class Forget(Message):
    """The bucket should not hold a record of the workload ``workload_id`` (whether it ever did or not)."""

    workload_id: str


class PreviousRun(Message):
    """The records of this node's last run, found when the actor first read the bucket: answered once
    with them (and with none after that, or if the bucket could not be read in time)."""

    reply: Reply[list[WorkloadRecord]]


class ClaimOwn(Message):
    """Before a record of the last run is acted on: delete it if it is still as it was read (a KV
    delete conditional on its revision); answered False if another node took it meanwhile (a node
    that took this one for dead: see :mod:`nex.node.takeover`), True otherwise (also when the bucket
    cannot say: the node's own records are its own to act on)."""

    workload_id: str
    reply: Reply[bool]


RecordsMsg = Keep | Forget | PreviousRun | ClaimOwn


class RecordTaken(Message):
    """To the workload manager: the record of the workload ``workload_id`` is gone from the bucket and
    this node did not remove it: another node took this one for dead and runs the workload now (see
    :mod:`nex.node.takeover`), so this copy must end (a network partition, a node stalled too long)."""

    workload_id: str


@dataclass(eq=False)
class RecordBook:
    """What outlives a restart of the records actor."""

    pending: dict[str, WorkloadRecord | None] = field(default_factory=dict)  # key: what to write (None: remove)
    stored: set[str] = field(default_factory=set)  # our keys the bucket holds, as far as we know
    loaded: bool = False  # our keys in the bucket were read (the first time it opened)
    previous: list[WorkloadRecord] = field(default_factory=list)  # the last run's, until handed over
    handed_over: bool = False  # the workload manager took the last run's records
    failing: bool = False  # the node said it keeps no records (and says so when it keeps them again)
    marker_ttl: bool = True  # purge markers expire (a bucket that refuses per-message TTLs gets plain ones)
    revisions: dict[str, int] = field(default_factory=dict)  # the last run's records: revision as read


class WorkloadRecords(Actor[RecordsMsg]):
    def __init__(
        self, state: NodeState, link: NatsLink, book: RecordBook, taken: Callable[[RecordTaken], None] | None = None
    ) -> None:
        self.state = state
        self.link = link
        self.book = book
        self.taken = taken  # told of each workload whose record another node took
        self.node_id = state.node_id
        self._kv: KeyValue | None = None  # nats-py's, bound to the link's current connection
        self._writing: str | None = None  # the key being written
        self._wake = trio.Event()

    @staticmethod
    def spec(factory: Callable[[], WorkloadRecords], mailbox: Mailbox[RecordsMsg]) -> ChildSpec:
        return actor_spec(factory, mailbox)

    async def on_start(self) -> None:
        self.cleanup.push("the records of a stopping node's workloads", self._release, durable=False)
        if not self.book.loaded:  # the first start: the last run's records, before any deploy
            with trio.move_on_after(2 * KV_TIMEOUT):
                await self._try(self._open)
        self.nursery.start_soon(self._writer)
        if self.taken is not None:
            self.nursery.start_soon(self._watch_taken)

    async def handle(self, message: RecordsMsg) -> None:
        match message:
            case Keep(record=record):
                signed = sign(record, self.state.identity, self.state.config.cluster_workload_key)
                self.book.pending[record.key] = signed
                self._wake.set()
            case Forget(workload_id=workload_id):
                key = record_key(self.node_id, workload_id)
                if key in self.book.stored or key == self._writing:
                    self.book.pending[key] = None
                    self._wake.set()
                else:  # never written: nothing to remove
                    self.book.pending.pop(key, None)
            case PreviousRun(reply=reply):
                previous, self.book.previous = self.book.previous, []
                self.book.handed_over = True
                reply.send(previous)
            case ClaimOwn(workload_id=workload_id, reply=reply):
                reply.send(await self._claim_own(record_key(self.node_id, workload_id)))

    async def _claim_own(self, key: str) -> bool:
        revision = self.book.revisions.pop(key, 0)
        if revision <= 0 or self._kv is None:
            return True
        kv = self._kv
        try:
            await self.link.call(lambda nc: kv.delete(key, last=revision))
        except nats.js.errors.KeyWrongLastSequenceError:
            log.info("A record of the last run was taken by another node", key=key)
            self.book.stored.discard(key)
            return False
        except Exception as exc:  # cannot tell: the node's own record, acted on
            log.warning("Could not claim a record of the last run", key=key, error=_why(exc))
            return True
        self.book.stored.discard(key)
        return True

    async def _watch_taken(self) -> None:
        """Every :data:`TAKEN_CHECK` seconds: are the records this node wrote still there? One that is
        gone without this node removing it was taken by a node that took this one for dead."""
        assert self.taken is not None
        while True:
            await trio.sleep(TAKEN_CHECK)  # a check's cadence, not a wait for something
            kv = self._kv
            if kv is None:
                continue
            mine = {key for key in self.book.stored if key not in self.book.pending and key != self._writing}
            if not mine:
                continue
            try:
                present = {key for key, _, _ in await self.link.call(lambda nc, kv=kv: read_own(kv, self.node_id))}  # type: ignore[misc]
            except Exception:  # the bucket's trouble: next time
                continue
            for key in mine - present:
                if key in self.book.stored and key not in self.book.pending and key != self._writing:
                    self.book.stored.discard(key)
                    log.warning("Another node took a workload of this node's over", key=key)
                    self.taken(RecordTaken(workload_id=key.split(".", 1)[1]))

    async def _writer(self) -> None:
        """Write what is pending, in the background; after a failure, try again with backoff."""
        backoff = RETRY_FIRST
        while True:
            if self.book.loaded and not self.book.pending:
                await self._wake.wait()
            self._wake = trio.Event()
            if await self._try(self._write_pending):
                backoff = RETRY_FIRST
                continue
            await trio.sleep(backoff)  # a retry timer: the bucket is not there or not answering
            backoff = min(backoff * 2, RETRY_MAX)

    async def _try(self, operation: Callable[[], Awaitable[object]]) -> bool:
        """Run a bucket operation; a failure is said once (until one succeeds), never raised."""
        try:
            await operation()
        except Exception as exc:  # the bucket's trouble is never the node's: records wait for the next try
            self._kv = None
            if not self.book.failing:
                self.book.failing = True
                log.warning(
                    "Not keeping workload records: a node restarted after a crash cannot redeploy these "
                    "workloads (tried again in the background)",
                    bucket=BUCKET,
                    error=_why(exc),
                )
            return False
        if self.book.failing:
            self.book.failing = False
            log.info("Keeping workload records again", bucket=BUCKET)
        return True

    async def _open(self) -> KeyValue:
        """The bucket, opened (or created) on the link's current connection; our keys read at the first open."""
        if self._kv is None:
            replicas = self.state.config.state_replicas
            self._kv = await self.link.call(lambda nc: open_bucket(nc, replicas))
        kv = self._kv
        if not self.book.loaded:
            found = await self.link.call(lambda nc: read_own(kv, self.node_id))
            self._adopt(found)
        return kv

    def _adopt(self, found: list[tuple[str, bytes, int]]) -> None:
        """Our keys found in the bucket at the first open: the last run's records (until the manager took
        them; the ones not signed by this node are removed) or, once it has, leftovers to remove."""
        book = self.book
        book.loaded = True
        for key, value, revision in found:
            if key in book.stored or key in book.pending:
                continue  # this run's
            record = decode(value)
            if book.handed_over:
                log.info("Removing a workload record the last run left", key=key)
            elif record is None or record.key != key or not signed_by_its_node(record):
                log.warning("Removing a workload record this node did not sign", bucket=BUCKET, key=key)
            else:
                book.previous.append(record)
                book.revisions[key] = revision
                book.stored.add(key)
                continue
            book.stored.add(key)
            book.pending[key] = None
        if book.previous:
            log.info("Found the workload records of this node's last run", count=len(book.previous))

    async def _write_pending(self) -> None:
        kv = await self._open()
        book = self.book
        while book.pending:
            key, record = next(iter(book.pending.items()))
            del book.pending[key]
            self._writing = key
            try:
                await self._write(kv, key, record)
            except nats.errors.MaxPayloadError:  # the request filled a message: its record cannot fit in one
                log.warning("A workload record is too large to keep; the workload is not recorded", key=key)
            except BaseException:
                book.pending.setdefault(key, record)  # unless a newer state came meanwhile
                raise
            finally:
                self._writing = None

    async def _write(self, kv: KeyValue, key: str, record: WorkloadRecord | None) -> None:
        if record is None:
            await self._purge(kv, key)
            self.book.stored.discard(key)
        else:
            value = msgspec.json.encode(record)
            await self.link.call(lambda nc: kv.put(key, value))
            self.book.stored.add(key)

    async def _purge(self, kv: KeyValue, key: str) -> None:
        if self.book.marker_ttl:
            try:
                await self.link.call(lambda nc: kv.purge(key, msg_ttl=PURGE_MARKER_TTL))
                return
            except nats.js.errors.BadRequestError:  # a bucket made elsewhere, without per-message TTLs
                self.book.marker_ttl = False
        await self.link.call(lambda nc: kv.purge(key))

    async def _release(self) -> None:
        """When the node stops (not when this actor restarts): remove every record of ours, since the
        workloads end with the node."""
        if not self.state.stop_requested.is_set():
            return
        keys = self.book.stored | set(self.book.pending)  # a write cut short may have been done
        if not keys:
            return
        try:
            replicas = self.state.config.state_replicas
            kv = self._kv if self._kv is not None else await self.link.call(lambda nc: open_bucket(nc, replicas))
            for key in sorted(keys):
                await self._purge(kv, key)
        except Exception as exc:
            log.warning("Could not remove the records of a stopping node's workloads", bucket=BUCKET, error=_why(exc))
        else:
            self.book.stored.clear()
            self.book.pending.clear()


def mailbox() -> Mailbox[RecordsMsg]:
    return Mailbox[RecordsMsg](4096, Overflow.FAIL, name="records")


def tell(records: ActorRef[RecordsMsg] | None, message: Keep | Forget) -> None:
    """Send ``message`` to the records actor without waiting (never raises: a record is not worth a deploy)."""
    if records is None:
        return
    try:
        records.send_nowait(message)
    except (MailboxFull, ActorStopped) as exc:
        log.warning("A workload record was not updated", message=type(message).__name__, reason=type(exc).__name__)


# -- the bucket (coroutines for the asyncio thread, through NatsLink.call) -------------------------


async def open_bucket(nc: Client, replicas: int) -> KeyValue:
    """The records' bucket, created if it is missing (idempotent: a second node, or a race, finds it),
    with ``replicas`` replicas, or (0) the most of 3, 2, 1 that the cluster accepts."""
    js = nc.jetstream(timeout=KV_TIMEOUT)
    try:
        return await js.key_value(BUCKET)
    except nats.js.errors.BucketNotFoundError:
        pass
    choices = [replicas] if replicas else list(AUTO_REPLICAS)
    for count in choices:
        try:
            return await js.create_key_value(
                bucket=BUCKET, history=1, replicas=count, description="nex nodes' workloads, by node id and workload id"
            )
        except nats.js.errors.APIError:
            with contextlib.suppress(nats.js.errors.BucketNotFoundError):
                return await js.key_value(BUCKET)  # created meanwhile by another node (perhaps otherwise)
            if count == choices[-1]:
                raise
    raise AssertionError("unreachable: the last choice raises")


async def read_own(kv: KeyValue, node_id: str) -> list[tuple[str, bytes, int]]:
    """The node's keys in the bucket, their values and revisions (one watch, filtered by the server)."""
    watcher = await kv.watch(record_key(node_id, ">"), ignore_deletes=True)
    found: list[tuple[str, bytes, int]] = []
    try:
        while (entry := await watcher.updates(timeout=KV_TIMEOUT)) is not None:  # type: ignore[no-untyped-call]
            found.append((entry.key, entry.value or b"", entry.revision or 0))
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    return found


def _why(exc: BaseException) -> str:
    if isinstance(exc, nats.js.errors.ServiceUnavailableError) and exc.err_code is None:
        return "no JetStream on the control server"  # no responders (JetStream's own 503s carry a code)
    return reason(exc)
