"""The node's workloads: deploy, stop, workload ping, their logs and events, and essential restarts.

A deploy (``$NEX.DEPLOY.{ns}.{node}``) is checked in full before any machine is taken, in nex's order
and with nex's wording where nex has one (the checks are in :mod:`.checks`): lame duck, node limits,
the request, its type, the sealed environment (and the sender's xkey), the workload JWT (signature,
standard claims, name, hash claim) and its issuer, then the artifact: looked up in the control NATS
object store, downloaded unless the node verified it before (:mod:`.cache`), its sha256 compared with
the JWT's hash claim (nex never did), and checked to be a static ELF for this machine. Only then
is a ready machine taken from the pool and the workload handed to that machine's agent; the machine
recorded is the one whose agent accepted. Every request gets exactly one reply.

The agents' ``workload_started`` / ``workload_stopped`` reports become CloudEvents on
``$NEX.events.{ns}.{type}``, and their output becomes ``{text, level, id}`` on
``$NEX.logs.{ns}.{node}.{workload}.{vmid}`` (the documented token order; levels ``INFO`` for stdout
and ``ERROR`` for stderr). A workload ends when its agent reports so or its machine ends, whichever
comes first; ``workload_stopped`` is published once, then the machine is gone (machines are never
reused). An essential workload that exits non-zero is deployed again on a fresh machine, after
``essential_backoff_ms``, then twice that each time (at most 30 s), at most ``essential_restart_limit``
times (a workload that ran for a minute before failing starts counting again); never in lame duck.

Limits hold under concurrency: a deploy reserves its workload slot before its first await and its
artifact's bytes as soon as their size is known, so requests in flight count against
``max_workloads`` and ``max_total_bytes``; at most :data:`DEPLOY_WORKERS` deploys run at once and at
most :data:`DEPLOY_BACKLOG` more wait, beyond which a deploy is refused at once ("node is busy").
A deploy that fails because of its machine (:class:`~nex.vm.machine.MachineFailed`, or the machine's
actor gone) is tried once more on a fresh machine before the requester hears of it.

Each running workload has a record in the control NATS's KV bucket (:mod:`.records`): kept once its
agent accepted it, removed when it ends, kept while an essential restart is due (with its restarts
counted) and replaced by the record of the run that follows. A node started again after a crash, on
the same state directory, settles what its last run left as :mod:`.recovery` says: essential
workloads are deployed again from their records, through the same path and checks as any deploy
(:meth:`WorkloadManager._redeploy`), and every workload that was running gets its ``workload_stopped``.

A restart of the manager's actor runs a fresh :class:`WorkloadManager` on the node's
:class:`WorkloadBook`, which holds what must outlive it: the running workloads, the essential
restarts that are due, and what is left to settle of the node's last run.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import msgspec
import trio
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace

from actors import (
    Actor,
    ActorCrashed,
    ActorError,
    ActorRef,
    ActorStopped,
    ChildSpec,
    Mailbox,
    MailboxFull,
    Message,
    Overflow,
    Reply,
    actor_spec,
)
from nex import crypto, logs, sysinfo
from nex.api import agent as agent_api
from nex.api import control, events, gojson, subjects
from nex.bus.events import EventPublisher
from nex.bus.link import InboundMsg, LinkError, NatsLink
from nex.state import NodeState
from nex.vm.machine import Deploy, MachineFailed, MachineMsg, RunningWorkload, Undeploy, WorkloadRejected
from nex.vm.pool import PoolMsg, Settled, Take, Taken

from . import checks, migrate, recovery, store
from .artifact import ArtifactError, Location, check_hash
from .cache import ArtifactCache
from .checks import Refused
from .elf import NotRunnable, check_static_executable
from .records import ClaimOwn, Forget, Keep, PreviousRun, RecordsMsg, RecordTaken, WorkloadRecord, tell

log = logs.get("nex.workload")

NATIVE_TYPES = ("native", "elf")
TAKE_TIMEOUT = 10.0
DEPLOY_TIMEOUT = 30.0
STOP_SLACK = 10.0  # beyond the workload's grace: the agent's answer and the machine's teardown
REPORT_GRACE = 1.0
REPLY_GRACE = 2.0  # for the one reply of a deploy cut short
RESTART_MAX = 30.0
RESTART_RESET = 60.0  # an essential workload that ran this long before failing gets its restarts back
DEPLOY_WORKERS = 8  # deploys running at once (checks, download, hand-over)
DEPLOY_BACKLOG = 248  # deploys waiting for a worker; more are refused at once
NODE_STOP_GRACE = 2.0  # seconds a workload has to exit when its node stops (its actor's release takes 5)
MOVE_RETRY = 2.0  # seconds between a lame duck's attempts to move a workload no other node took
RECORDS_TIMEOUT = 15.0  # for the records actor to hand over the last run's records

# On the OpenTelemetry API's global meter and tracer: no-ops unless the node turned them on
# (nex.node.telemetry). A deploy is a span, "deploy", with one child per stage: checks, artifact,
# machine (taking one from the pool), staging and agent (in the machine's actor), started.
_meter = metrics.get_meter("nex.workload")
_tracer = trace.get_tracer("nex.workload")
DEPLOY_LATENCY = _meter.create_histogram(
    "nex-deploy-latency", unit="ms", description="From a deploy request's arrival to its reply, by outcome"
)
DEPLOY_REFUSALS = _meter.create_counter(
    "nex-deploy-refusals",
    description="Deploys refused, by reason: the stage that refused it (busy, lameduck, limits, checks, "
    "artifact, machine, agent)",
)
ESSENTIAL_RESTARTS = _meter.create_counter("nex-essential-restarts", description="Restarts of essential workloads")
SANDBOX_KILLS = _meter.create_counter(
    "nex-sandbox-kills",
    description="Workloads the kernel stopped at a limit of their machine, by reason: oom (killed), "
    "pids (forks refused)",
)
_STAGE: contextvars.ContextVar[str] = contextvars.ContextVar("nex_deploy_stage", default="checks")


@contextlib.contextmanager
def _stage(name: str) -> Iterator[None]:
    """One stage of a deploy: its span, and what a refusal in it is counted as."""
    _STAGE.set(name)
    with _tracer.start_as_current_span(name):
        yield


class MachineEnded(Message):
    vmid: str
    reason: str


class WorkloadSpec(msgspec.Struct):
    """A checked workload, ready to run (kept to run it again if it is essential)."""

    name: str
    namespace: str
    issuer: str
    subject: str  # the deploy JWT's sub (a request id from nex v0.2.7 clients, the name from v0.2.2's)
    jti: str
    iat: int
    hash: str
    artifact: bytes
    environment: dict[str, str]
    argv: list[str]
    description: str
    essential: bool
    restarts: int = 0
    request: bytes = b""  # the $NEX.DEPLOY body as received (its environment sealed): for its record
    location: str = ""
    accepted_at: int = 0  # unix seconds: when the node first accepted the request
    previous: str = ""  # the workload id of the run this one replaces (whose record it takes over)


WorkloadMsg = InboundMsg | MachineEnded | RecordTaken


@dataclass(eq=False)
class Workload:
    spec: WorkloadSpec
    vmid: str
    ref: ActorRef[MachineMsg]
    ip: str = ""
    started: float = field(default_factory=time.monotonic)
    stopping: bool = False
    deploying: bool = True  # its deploy is in flight (counted by the deploy's reservation meanwhile)
    finished: bool = False
    exit_code: int | None = None
    exit_message: str = ""
    reported: trio.Event = field(default_factory=trio.Event)
    stop_tokens: set[str] = field(default_factory=set)
    moving: bool = False  # lame duck: being moved to another node
    moved_to: str = ""  # "node N… as workload W": where it runs now (this copy is being stopped)
    unmoved: str = ""  # why the last attempt to move it failed
    maybe_elsewhere: bool = False  # a move that timed out: it may run on that node, so no other attempt

    @property
    def uptime(self) -> str:
        return sysinfo.format_uptime(time.monotonic() - self.started)


class Reservation:
    """One deploy's claim on the node's limits, held from its first check to its end."""

    def __init__(self, book: WorkloadBook) -> None:
        self.book = book
        self.bytes = 0
        book.reserved_slots += 1

    def add_bytes(self, size: int) -> None:
        self.bytes += size
        self.book.reserved_bytes += size

    def release(self) -> None:
        self.book.reserved_slots -= 1
        self.book.reserved_bytes -= self.bytes
        self.bytes = 0


@dataclass(eq=False)
class WorkloadBook:
    """What the workload manager knows that outlives a restart of its actor."""

    cache: ArtifactCache
    workloads: dict[str, Workload] = field(default_factory=dict)  # by vmid
    reserved_slots: int = 0  # deploys in flight
    reserved_bytes: int = 0  # their artifacts' sizes, once known
    restarts_due: dict[int, tuple[float, WorkloadSpec]] = field(default_factory=dict)  # token: (when, spec)
    next_token: int = 0
    left_over: list[RunningWorkload] = field(default_factory=list)  # the machines of a crashed last run said these ran
    recovery: list[recovery.Leftover] | None = None  # what is left to settle of the last run (None: not looked yet)

    def running(self) -> int:
        """Workloads whose deploy is done (those in flight hold a reservation instead)."""
        return sum(1 for w in self.workloads.values() if not w.deploying)

    def running_bytes(self) -> int:
        return sum(len(w.spec.artifact) for w in self.workloads.values() if not w.deploying)

    def summaries(self, namespace: str, sandbox: str) -> list[control.MachineSummary]:
        """``machines`` of ``$NEX.INFO.{ns}.{node}``: this namespace's workloads."""
        return [
            control.MachineSummary(
                id=w.vmid,
                healthy=True,
                uptime=w.uptime,
                namespace=w.spec.namespace,
                ip=w.ip,
                sandbox=sandbox,
                workload=control.WorkloadSummary(
                    name=w.spec.name, description=w.spec.description, runtime=w.uptime, type="native", hash=w.spec.hash
                ),
            )
            for w in self.workloads.values()
            if w.spec.namespace.lower() == namespace.lower()
        ]


class WorkloadManager(Actor[WorkloadMsg]):
    def __init__(
        self,
        state: NodeState,
        control_link: NatsLink,
        internal_link: NatsLink,
        publisher: EventPublisher,
        pool: ActorRef[PoolMsg],
        book: WorkloadBook,
        records: ActorRef[RecordsMsg] | None = None,
    ) -> None:
        self.state = state
        self.control = control_link
        self.internal = internal_link
        self.publisher = publisher
        self.pool = pool
        self.book = book
        self.records = records
        self.workloads = book.workloads
        self.cache = book.cache
        self._deploy_workers = trio.CapacityLimiter(DEPLOY_WORKERS)
        self._deploys = 0  # running or waiting for a worker

    @staticmethod
    def new_book(state: NodeState) -> WorkloadBook:
        """The node's one book; the node's running-workload count reads it."""
        book = WorkloadBook(cache=ArtifactCache(state.config.artifact_cache_bytes))
        state.running_workloads = lambda: len(book.workloads)
        return book

    @staticmethod
    def spec(factory: Callable[[], WorkloadManager], mailbox: Mailbox[WorkloadMsg]) -> ChildSpec:
        """Each (re)start runs ``factory()``: a fresh manager on the node's :class:`WorkloadBook`."""
        return actor_spec(factory, mailbox)

    async def on_start(self) -> None:
        # released last: when the node stops, its workloads end and are said to, before their machines go
        self.cleanup.push("workloads, if the node stops", self._stop_with_the_node, durable=False)
        for token, (when, spec) in list(self.book.restarts_due.items()):  # a previous run's, cut short
            self.nursery.start_soon(self._after, token, when, spec)
        for workload in list(self.workloads.values()):  # machines that ended while no manager listened
            if not workload.ref.alive and not workload.finished:
                self.nursery.start_soon(self._machine_ended, workload, "its machine ended")
        wanted = [(self.control, s) for s in subjects.workload_subscriptions(self.state.node_id)]
        # One subscription for an agent's logs and events: nats-py dispatches each subscription on its
        # own, so with two the workload_stopped report could overtake the workload's last lines.
        wanted.append((self.internal, agent_api.ALL_AGENT_SUBJECTS))
        for link, subject in wanted:
            sub = await link.subscribe(subject, self.ref)
            self.cleanup.push(f"subscription {subject}", functools.partial(link.unsubscribe, sub), durable=False)
        self.nursery.start_soon(self._recover)
        self.nursery.start_soon(self._move_when_lameduck)

    async def handle(self, message: WorkloadMsg) -> None:
        match message:
            case InboundMsg(subject=subject) if subject.startswith(agent_api.PREFIX):
                self._from_agent(message)
            case InboundMsg(subject=subject):
                verb = subject.split(".")[1] if subject.count(".") >= 1 else ""
                if verb == "DEPLOY":
                    await self._accept_deploy(message)
                    return
                handler = {"STOP": self._stop, "WPING": self._wping}.get(verb)
                if handler is not None:
                    self.nursery.start_soon(handler, message)
            case MachineEnded(vmid=vmid, reason=reason):
                workload = self.workloads.get(vmid)
                if workload is not None and not workload.finished:
                    self.nursery.start_soon(self._machine_ended, workload, reason)
            case RecordTaken(workload_id=vmid):
                workload = self.workloads.get(vmid)
                if workload is not None and not workload.finished and not workload.stopping:
                    workload.moved_to = "another node, which took this one for dead"
                    workload.stopping = True
                    self.nursery.start_soon(self._end_here, workload)

    # -- deploy ----------------------------------------------------------------------------------

    async def _accept_deploy(self, msg: InboundMsg) -> None:
        """Queue a deploy for a worker, or refuse it at once when the backlog is full."""
        if self._deploys >= DEPLOY_WORKERS + DEPLOY_BACKLOG:
            DEPLOY_REFUSALS.add(1, {"reason": "busy"})
            log.warning("Deploy refused: too many deploys in progress", subject=msg.subject, deploys=self._deploys)
            busy = f"Node is busy: {self._deploys} deploys in progress. Try again shortly"
            await self._respond(msg, control.failure(control.RUN_RESPONSE, busy))
            return
        self._deploys += 1
        self.nursery.start_soon(self._deploy, msg)

    async def _deploy(self, msg: InboundMsg) -> None:
        """One deploy, answered exactly once: also when the manager is stopped half way (the node
        stopping, a crash of the actor), with a reply that says so, shielded and bounded."""
        reply = control.failure(control.RUN_RESPONSE, "Failed to deploy workload: the node stopped before it was done")
        arrived = time.monotonic()
        outcome = "stopped"
        try:
            with _tracer.start_as_current_span("deploy", attributes={"nex.subject": msg.subject}):
                async with self._deploy_workers:
                    reply, outcome = await self._deploy_now(msg)
        finally:
            self._deploys -= 1
            with trio.CancelScope(shield=True), trio.move_on_after(REPLY_GRACE):
                await self._respond(msg, reply)
            DEPLOY_LATENCY.record((time.monotonic() - arrived) * 1000, {"outcome": outcome})

    async def _deploy_now(self, msg: InboundMsg) -> tuple[bytes, str]:
        """Check and launch; the reply to send, and the outcome: started, refused or failed."""
        try:
            workload = await self._check_and_launch(msg)
            spec = workload.spec
            trace.get_current_span().set_attributes(
                {"nex.workload.id": workload.vmid, "nex.workload.name": spec.name, "nex.namespace": spec.namespace}
            )
            reply = control.success(
                control.RUN_RESPONSE,
                control.RunResponse(started=True, id=workload.vmid, issuer=spec.issuer, name=spec.name),
            )
            return reply, "started"
        except Refused as exc:
            DEPLOY_REFUSALS.add(1, {"reason": _STAGE.get()})
            log.warning("Deploy refused", subject=msg.subject, reason=str(exc))
            return control.failure(control.RUN_RESPONSE, str(exc)), "refused"
        except Exception as exc:
            log.error("Deploy failed", exc, subject=msg.subject)
            reply = control.failure(control.RUN_RESPONSE, f"Failed to deploy workload: internal error: {exc}")
            return reply, "failed"

    async def _check_and_launch(
        self, msg: InboundMsg, *, accepted_at: int | None = None, replaces: WorkloadRecord | None = None
    ) -> Workload:
        """The deploy path: reserve, check, launch (raises :class:`Refused`, or worse). A redeploy
        names the record of the run it ``replaces``: its restarts carry on, and its record goes."""
        _STAGE.set("limits")
        reservation = self._reserve()
        try:
            with _stage("checks"):
                spec = await self._check(msg, reservation, accepted_at)
            if replaces is not None:
                spec = msgspec.structs.replace(spec, restarts=replaces.restarts, previous=replaces.workload_id)
            return await self._launch(spec)
        finally:
            reservation.release()

    def _reserve(self) -> Reservation:
        """A workload slot for a deploy, claimed before its first await (raises :class:`Refused`)."""
        if self.state.lameduck:
            _STAGE.set("lameduck")
            raise Refused("Node is in lame duck mode. Workload deploy request rejected")
        limit = self.state.config.node_limits.max_workloads
        if limit and self.book.running() + self.book.reserved_slots >= limit:
            raise Refused("Node is at maximum workload limit. Deploy request denied")
        return Reservation(self.book)

    async def _check(self, msg: InboundMsg, reservation: Reservation, accepted_at: int | None = None) -> WorkloadSpec:
        """Every check of a deploy request, in order; raise :class:`Refused` at the first that fails.

        Lame duck and the workload limit come first, in :meth:`_reserve`. ``accepted_at``: the unix
        time the node first accepted this request, for a redeploy (see :meth:`_redeploy`).
        """
        config = self.state.config
        namespace = subjects.namespace_of(msg.subject)
        if namespace is None:
            raise Refused("Invalid subject for workload deployment")
        request = checks.decode(msg.data, control.DeployRequest, "deploy")
        kind = (request.type or "native").lower()
        if kind not in NATIVE_TYPES or not set(NATIVE_TYPES) & set(config.workload_types):
            raise Refused(f"Unsupported workload type on this node: {checks.shown(kind)}")
        environment, sender = checks.open_environment(self.state.identity.xkey, request)
        checks.check_argv(list(request.argv))
        if config.requester_public_keys and sender not in config.requester_public_keys:
            raise Refused(f"the sender's xkey {sender} is not in this node's requester_public_keys")
        claims = checks.check_jwt(request, at=accepted_at)
        issuer = claims.iss
        if config.valid_issuers and issuer not in config.valid_issuers:
            raise Refused(f"invalid workload issuer: {issuer}")
        location = checks.artifact_location(request)
        with _stage("artifact"):
            artifact, digest = await self._artifact(location, request.jsdomain, claims.text("hash"), reservation)
        return WorkloadSpec(
            name=checks.workload_name(claims),
            namespace=namespace,
            issuer=issuer,
            subject=claims.sub,
            jti=claims.jti,
            iat=claims.iat,
            hash=digest,
            artifact=artifact,
            environment=environment,
            argv=list(request.argv),
            description=request.description or "",
            essential=bool(request.essential),
            request=bytes(msg.data),
            location=str(location),
            accepted_at=int(time.time()) if accepted_at is None else accepted_at,
        )

    async def _artifact(
        self, location: Location, jsdomain: str | None, claimed: str, reservation: Reservation
    ) -> tuple[bytes, str]:
        """The artifact's bytes and sha256, checked: size limits, hash claim, static ELF for this machine.

        Looked up first (one request): limits and the writer's digest are checked before any
        download, and bytes verified earlier under the claimed hash are used from the cache. The
        size is reserved against ``max_total_bytes`` as soon as it is known, with no await between
        the check and the reservation.
        """
        limits = self.state.config.node_limits
        try:
            stored = await self.control.call(lambda nc: store.describe(nc, location, jsdomain))
            checks.check_size(stored.size, limits.max_workload_bytes)
            if stored.sha256 and stored.sha256 != claimed.lower():
                raise ArtifactError(f"the artifact's sha256 is {stored.sha256}, but the workload JWT claims {claimed}")
            committed = self.book.running_bytes() + self.book.reserved_bytes
            if limits.max_total_bytes and committed + stored.size > limits.max_total_bytes:
                raise Refused("Workload file size would exceed node total limitations")
            reservation.add_bytes(stored.size)
            cached = self.cache.get(stored.sha256) if stored.sha256 else None
            if cached is not None:
                return cached, stored.sha256
            data = await self.control.call(lambda nc: store.download(nc, stored, jsdomain))
            checks.check_size(len(data), limits.max_workload_bytes)  # it may have changed since
            digest = check_hash(data, claimed)
        except ArtifactError as exc:
            raise Refused(f"Invalid deploy request: {exc}") from None
        except LinkError as exc:
            raise Refused(f"Failed to fetch the workload from {location}: {exc}") from None
        try:
            check_static_executable(data)
        except NotRunnable as exc:
            raise Refused(f"Invalid workload artifact {location}: {exc}") from None
        self.cache.put(digest, data)
        return data, digest

    async def _launch(self, spec: WorkloadSpec) -> Workload:
        """Have a fresh machine's agent run ``spec``; the workload, recorded.

        A failure of the machine (not of the workload) is retried once on another machine.
        """
        try:
            workload = await self._launch_on_a_machine(spec)
        except _MachineTrouble as exc:
            log.warning("Deploy failed because of its machine; trying a fresh one", name=spec.name, error=str(exc))
            try:
                workload = await self._launch_on_a_machine(spec)
            except _MachineTrouble as again:
                raise Refused(f"Failed to deploy workload: {again}") from None
        with _stage("started"):
            self._record(workload)
        return workload

    async def _launch_on_a_machine(self, spec: WorkloadSpec) -> Workload:
        try:
            with _stage("machine"):
                taken: Taken = await self.pool.ask(lambda reply: Take(reply=reply), timeout=TAKE_TIMEOUT)
        except ActorError as exc:
            raise Refused(f"Failed to deploy workload: no machine became ready in {TAKE_TIMEOUT:g}s ({exc})") from None
        workload = Workload(spec=spec, vmid=taken.vmid, ref=taken.ref, ip=taken.ip)
        self.workloads[taken.vmid] = workload  # before the agent starts it: its first logs map here
        request = agent_api.AgentDeployRequest(
            workload_name=spec.name,
            namespace=spec.namespace,
            hash=spec.hash,
            total_bytes=len(spec.artifact),
            argv=spec.argv,
            environment=spec.environment,
            description=spec.description,
            essential=spec.essential,
        )
        done = False
        _STAGE.set("agent")  # its spans (staging, agent) are the machine's: it gets the context
        parent = otel_context.get_current()
        try:
            await taken.ref.ask(
                lambda reply: Deploy(request=request, artifact=spec.artifact, reply=reply, trace=parent),
                timeout=DEPLOY_TIMEOUT,
            )
            done = True
        except (MachineFailed, ActorCrashed, ActorStopped) as exc:
            _STAGE.set("machine")
            raise _MachineTrouble(f"machine {taken.vmid} failed: {exc}") from None
        except (WorkloadRejected, ActorError) as exc:
            raise Refused(f"Failed to deploy workload: workload rejected by agent: {exc}") from None
        finally:
            if done:
                workload.deploying = False
            else:  # failed, timed out or cancelled: nobody will account for what the machine runs
                self.workloads.pop(taken.vmid, None)
                _give_up(taken.ref)
            with contextlib.suppress(ActorStopped, MailboxFull):
                self.pool.send_nowait(Settled(vmid=taken.vmid))  # the pool may refill now
        self.state.workloads_changed()
        log.info(
            "Workload deployed", name=spec.name, namespace=spec.namespace, vmid=workload.vmid, restarts=spec.restarts
        )
        return workload

    # -- stop and ping ---------------------------------------------------------------------------

    async def _stop(self, msg: InboundMsg) -> None:
        try:
            workload = self._check_stop(msg)
        except Refused as exc:
            log.warning("Stop refused", subject=msg.subject, reason=str(exc))
            await self._respond(msg, control.failure(control.STOP_RESPONSE, str(exc)))
            return
        workload.stopping = True
        self._forget(workload.vmid)  # asked to stop, it must not come back if the node dies meanwhile
        spec = workload.spec
        answer = control.StopResponse(stopped=True, id=workload.vmid, issuer=spec.issuer, name=spec.name)
        stopped = control.success(control.STOP_RESPONSE, answer)
        reply = control.failure(control.STOP_RESPONSE, "Failed to stop workload: the node stopped before it was done")
        try:
            with contextlib.suppress(ActorError):  # the machine is gone already: so is its workload
                grace = self.state.config.workload_stop_grace_ms / 1000
                await workload.ref.ask(lambda reply: Undeploy(grace=grace, reply=reply), timeout=grace + STOP_SLACK)
            reply = stopped
        finally:  # one reply, also when the manager is stopped half way
            if workload.finished:  # it ended, even if the node stops meanwhile (a lame duck whose last it was)
                reply = stopped
            with trio.CancelScope(shield=True), trio.move_on_after(REPLY_GRACE):
                await self._respond(msg, reply)

    def _check_stop(self, msg: InboundMsg) -> Workload:
        """The workload a stop request may stop: its deployer's, with a JWT never used before."""
        namespace = subjects.namespace_of(msg.subject)
        if namespace is None:
            raise Refused("Invalid subject for workload stop")
        request = checks.decode(msg.data, control.StopRequest, "stop")
        workload = self.workloads.get(request.workload_id)
        if workload is None or workload.spec.namespace.lower() != namespace.lower():
            raise Refused(f"No such workload {checks.shown(request.workload_id)} in namespace {namespace}")
        if workload.stopping:
            raise Refused(f"Workload {checks.shown(request.workload_id)} is already stopping")
        try:
            claims = crypto.decode_generic_jwt(request.workload_jwt)
        except crypto.JwtError as exc:
            raise Refused(f"Invalid stop request: {exc}") from None
        checks.check_stop(claims, workload.spec, workload.stop_tokens)
        workload.stop_tokens.add(claims.jti)
        return workload

    async def _wping(self, msg: InboundMsg) -> None:
        tokens = msg.subject.split(".")
        namespace = tokens[2] if len(tokens) > 2 else ""
        target = tokens[3] if len(tokens) > 3 else None
        matches = [
            w
            for w in self.workloads.values()
            if (not namespace or w.spec.namespace.lower() == namespace.lower())
            and (target is None or w.vmid == target or w.spec.name.lower() == target.lower())
        ]
        if not matches:
            return  # nex answers only when something matches
        answer = control.WorkloadPingResponse(
            node_id=self.state.node_id,
            target_xkey=self.state.identity.public_xkey,
            version=self.state.version,
            uptime=self.state.uptime(),
            tags=self.state.tags(),
            running_machines=[
                control.WorkloadPingMachine(id=w.vmid, namespace=w.spec.namespace, name=w.spec.name, type="native")
                for w in matches
            ],
        )
        await self._respond(msg, control.success(control.PING_RESPONSE, answer))

    # -- what agents report ----------------------------------------------------------------------

    def _from_agent(self, msg: InboundMsg) -> None:
        tokens = msg.subject.split(".")
        if len(tokens) < 3 or tokens[2] not in ("logs", "events"):
            return  # the rest of the agents' traffic (handshakes, requests, answers) is for others
        workload = self.workloads.get(tokens[1])
        if workload is None:
            return  # a machine without a workload has nothing to say (nex drops these too)
        if tokens[2] == "logs":
            try:
                entry = msgspec.json.decode(msg.data, type=agent_api.LogEntry)
            except msgspec.DecodeError:
                return
            level = "ERROR" if entry.level <= agent_api.LEVEL_ERROR else "INFO"
            subject = subjects.log(workload.spec.namespace, self.state.node_id, workload.spec.name, workload.vmid)
            self.control.publish_nowait(
                subject, msgspec.json.encode(control.RawLog(text=entry.text, level=level, id=workload.vmid))
            )
            return
        if tokens[2] != "events" or len(tokens) < 4:
            return
        try:
            status = msgspec.json.decode(msg.data, type=agent_api.WorkloadStatus)
        except msgspec.DecodeError:
            return
        if tokens[3] == events.WORKLOAD_STARTED:
            self._emit(workload, events.WORKLOAD_STARTED, 0, "")
        elif tokens[3] == events.WORKLOAD_STOPPED:
            workload.exit_code, workload.exit_message = status.code, status.message
            workload.reported.set()
            self._finish(workload)

    async def _machine_ended(self, workload: Workload, reason: str) -> None:
        with trio.move_on_after(REPORT_GRACE):  # the agent's own report is more precise: wait for it a bit
            await workload.reported.wait()
        if workload.exit_code is None:
            workload.exit_code, workload.exit_message = -1, reason
        self._finish(workload)

    def _finish(self, workload: Workload) -> None:
        if workload.finished:
            return
        workload.finished = True
        self.workloads.pop(workload.vmid, None)
        code = workload.exit_code if workload.exit_code is not None else -1
        if workload.moved_to:
            workload.exit_message = f"moved to {workload.moved_to}"
        elif workload.unmoved:
            workload.exit_message = f"{workload.exit_message}; no other node took it: {workload.unmoved}".lstrip("; ")
        if "out of memory" in workload.exit_message:  # the agent's word for the OOM killer's work
            SANDBOX_KILLS.add(1, {"reason": "oom"})
        if "pids limit refused" in workload.exit_message:  # forks refused: stopped at the limit, not killed
            SANDBOX_KILLS.add(1, {"reason": "pids"})
        self._emit(workload, events.WORKLOAD_STOPPED, code, workload.exit_message)
        log.info(
            "Workload stopped", name=workload.spec.name, vmid=workload.vmid, code=code, message=workload.exit_message
        )
        self.state.workloads_changed()
        spec = msgspec.structs.replace(workload.spec, previous=workload.vmid)  # the run a restart replaces
        if spec.essential and not workload.stopping and code != 0 and not self.state.lameduck:
            if time.monotonic() - workload.started >= RESTART_RESET:
                spec = msgspec.structs.replace(spec, restarts=0)  # it ran well for a while: a fresh budget
            self._schedule_restart(spec)
        else:
            self._forget(workload.vmid)

    def _schedule_restart(self, spec: WorkloadSpec) -> None:
        """Restart ``spec`` after its backoff; the record of the run it replaces (``spec.previous``)
        stays meanwhile, saying a restart is due, or goes if there will be none."""
        config = self.state.config
        if spec.restarts >= config.essential_restart_limit:
            log.error(
                "Essential workload keeps failing; not restarting it again", name=spec.name, restarts=spec.restarts
            )
            self._forget(spec.previous)
            return
        delay = min(RESTART_MAX, config.essential_backoff_ms / 1000 * 2**spec.restarts)
        log.warning("Essential workload exited; restarting it", name=spec.name, restart=spec.restarts + 1, in_s=delay)
        again = msgspec.structs.replace(spec, restarts=spec.restarts + 1)
        self._keep(again, spec.previous, started_at="", restart_pending=True)
        token, self.book.next_token = self.book.next_token, self.book.next_token + 1
        when = trio.current_time() + delay
        self.book.restarts_due[token] = (when, again)
        self.nursery.start_soon(self._after, token, when, again)

    async def _after(self, token: int, when: float, spec: WorkloadSpec) -> None:
        """Restart ``spec`` at ``when``; in the actor's nursery, not through its mailbox, which may be
        full of agents' reports. Its record in the book goes once the restart has been made."""
        await trio.sleep_until(when)
        await self._restart(spec)
        self.book.restarts_due.pop(token, None)

    async def _restart(self, spec: WorkloadSpec) -> None:
        if self.state.lameduck:
            log.info("Lame duck: essential workload not restarted", name=spec.name)
            self._forget(spec.previous)
            return
        reservation = Reservation(self.book)  # not refused at the limit: it replaces one that ended
        reservation.add_bytes(len(spec.artifact))
        ESSENTIAL_RESTARTS.add(1)
        try:
            with _tracer.start_as_current_span("essential-restart", attributes={"nex.workload.name": spec.name}):
                await self._launch(spec)
        except Refused as exc:
            log.error("Restart of an essential workload failed", name=spec.name, error=str(exc))
            self._schedule_restart(spec)
        finally:
            reservation.release()

    async def _stop_with_the_node(self) -> None:
        """The node is stopping (not this actor restarting, whose workloads run on): stop every
        workload, at most :data:`NODE_STOP_GRACE` seconds each and all at once, and publish its
        ``workload_stopped`` saying why, so that no watcher waits for a workload that is gone."""
        if not self.state.stop_requested.is_set():
            return
        why = f"its node stopped ({self.state.stop_reason})" if self.state.stop_reason else "its node stopped"
        grace = min(self.state.config.workload_stop_grace_ms / 1000, NODE_STOP_GRACE)

        async def end(workload: Workload) -> None:
            workload.stopping = True
            with contextlib.suppress(ActorError), trio.move_on_after(grace + STOP_SLACK):
                await workload.ref.ask(lambda reply: Undeploy(grace=grace, reply=reply), timeout=grace + STOP_SLACK)
            if workload.exit_code is None:  # the agent's report waits in the mailbox, which no one reads now
                workload.exit_code, workload.exit_message = -1, why
            self._finish(workload)

        async with trio.open_nursery() as nursery:
            for workload in list(self.workloads.values()):
                if not workload.finished and not workload.deploying:
                    nursery.start_soon(end, workload)

    # -- lame duck: moving essential workloads to other nodes ----------------------------------------

    async def _move_when_lameduck(self) -> None:
        """Once the node is in lame duck, move each essential workload to another node (see
        :mod:`.migrate`); the node exits when none is left (:mod:`nex.node.lameduck`)."""
        await self.state.lameduck_entered.wait()
        for workload in list(self.workloads.values()):
            if workload.spec.essential and not (workload.stopping or workload.moving or workload.maybe_elsewhere):
                workload.moving = True
                self.nursery.start_soon(self._move, workload)

    async def _move(self, workload: Workload) -> None:
        """Place ``workload`` on another node, then stop this copy; while no node takes it, try again
        every :data:`MOVE_RETRY` seconds (the lame-duck deadline ends the node, and with it this)."""
        spec = workload.spec
        movable = self._movable(spec)
        if movable is None:
            workload.unmoved = "its deploy request was not kept"
            return
        tags = self.state.tags()
        like_me = control.AuctionRequest(
            arch=tags.get("nex.arch"),
            os=tags.get("nex.os"),
            sandboxed=not self.state.sandbox.unsafe,
            workload_types=[movable.workload_type],
        )
        try:
            while not workload.finished and not workload.stopping:
                try:
                    moved = await migrate.move(
                        self.control, movable, own_node=self.state.node_id, own_xkey=self.state.identity.xkey,
                        auction=like_me,
                    )  # fmt: skip
                except migrate.MoveFailed as exc:
                    if not workload.unmoved or exc.maybe_moved:
                        log.warning("Lame duck: could not move a workload yet", name=spec.name, reason=str(exc))
                    workload.unmoved = str(exc)
                    if exc.maybe_moved:  # not tried again: it may run there (it stays here until the deadline)
                        workload.maybe_elsewhere = True
                        return
                    await trio.sleep(MOVE_RETRY)
                    continue
                break
            else:
                return
        finally:
            workload.moving = False  # a restarted manager takes up what this one did not finish
        workload.moved_to = f"node {moved.node_id} as workload {moved.workload_id}"
        log.info(
            "Lame duck: moved a workload", name=spec.name, vmid=workload.vmid, to=moved.node_id, id=moved.workload_id
        )
        workload.stopping = True
        self._forget(workload.vmid)
        grace = self.state.config.workload_stop_grace_ms / 1000
        with contextlib.suppress(ActorError):  # its machine is gone already: so is this copy
            await workload.ref.ask(lambda reply: Undeploy(grace=grace, reply=reply), timeout=grace + STOP_SLACK)

    async def _end_here(self, workload: Workload) -> None:
        """Stop this node's copy of a workload that runs elsewhere now (no restart, no record)."""
        grace = self.state.config.workload_stop_grace_ms / 1000
        with contextlib.suppress(ActorError):  # its machine is gone already: so is this copy
            await workload.ref.ask(lambda reply: Undeploy(grace=grace, reply=reply), timeout=grace + STOP_SLACK)

    def _movable(self, spec: WorkloadSpec) -> migrate.Movable | None:
        """What moving ``spec`` takes, from its deploy request as received (None if not kept)."""
        if not spec.request:
            return None
        request = msgspec.json.decode(spec.request, type=control.DeployRequest)
        if not request.workload_jwt:
            return None
        return migrate.Movable(
            namespace=spec.namespace,
            name=spec.name,
            hash=spec.hash,
            jwt=request.workload_jwt,
            location=spec.location or request.location_url(),
            workload_type=request.type or "native",
            environment=spec.environment,
            argv=spec.argv,
            description=spec.description,
            essential=spec.essential,
            jsdomain=request.jsdomain or "",
        )

    def _emit(self, workload: Workload, event_type: str, code: int, message: str) -> None:
        data = events.WorkloadEventData(
            workload_name=workload.spec.name,
            code=code,
            message=message,
            id=workload.vmid,
            namespace=workload.spec.namespace,
        )
        self.publisher.emit(event_type, data, namespace=workload.spec.namespace)

    # -- records, and what a crashed last run left -------------------------------------------------

    def _record(self, workload: Workload) -> None:
        """A launched workload's record, in place of the one of the run it replaces (if any); none for
        one that ended already (its end was handled before its launch returned)."""
        spec = workload.spec
        if not workload.finished:
            self._keep(spec, workload.vmid, started_at=events.now_rfc3339())
        self._forget(spec.previous)

    def _keep(self, spec: WorkloadSpec, workload_id: str, *, started_at: str, restart_pending: bool = False) -> None:
        if self.records is None or not spec.request:
            return
        record = WorkloadRecord(
            node_id=self.state.node_id,
            workload_id=workload_id,
            namespace=spec.namespace,
            name=spec.name,
            location=spec.location,
            hash=spec.hash,
            essential=spec.essential,
            restarts=spec.restarts,
            accepted_at=spec.accepted_at,
            started_at=started_at,
            restart_pending=restart_pending,
            deploy_request=msgspec.Raw(spec.request),
            **self._shared_environment(spec),
        )
        tell(self.records, Keep(record=record))

    def _shared_environment(self, spec: WorkloadSpec) -> dict[str, str]:
        """The environment sealed to the cluster's shared workload key, if there is one (see
        :mod:`nex.node.takeover`): what lets another node run the workload should this one die."""
        seed = self.state.config.cluster_workload_key
        if not seed:
            return {}
        cluster = crypto.XKey.from_seed(seed)
        own = self.state.identity.xkey
        sealed = own.seal(gojson.dumps(gojson.go_map(spec.environment)), cluster.public_key)
        return {"shared_environment": base64.b64encode(sealed).decode(), "shared_sender": own.public_key}

    def _forget(self, workload_id: str) -> None:
        if workload_id:
            tell(self.records, Forget(workload_id=workload_id))

    async def _recover(self) -> None:
        """Settle, one by one, what the node's last run left (see :mod:`.recovery`): once per node,
        resumed by a restarted manager. A leftover is taken off the list before it is settled, so
        a crash of the manager half way never deploys one twice."""
        book = self.book
        if book.recovery is None:
            found = recovery.leftovers(book.left_over, await self._previous_records())
            book.recovery, book.left_over = found, []
        while book.recovery:
            await self._settle(book.recovery.pop(0))

    async def _previous_records(self) -> list[WorkloadRecord]:
        if self.records is None:
            return []
        try:
            return await self.records.ask(lambda reply: PreviousRun(reply=reply), timeout=RECORDS_TIMEOUT)
        except ActorError as exc:
            log.warning("The records of the node's last run could not be had", error=str(exc))
            return []

    async def _settle(self, leftover: recovery.Leftover) -> None:
        record = leftover.record
        message = recovery.CRASHED
        if record is not None and not await self._claim_own(record):
            return  # another node took it for dead, runs it, and said so
        if record is not None and leftover.redeploy:
            try:
                workload = await self._redeploy(record)
            except Exception as exc:  # Refused, or the deploy path's own failure: the others still settle
                message = recovery.not_redeployed(str(exc))
                log.error(
                    "Essential workload not deployed again after the node's crash", name=record.name, error=str(exc)
                )
                self._forget(record.workload_id)
            else:
                message = recovery.redeployed(workload.vmid)
                log.info(
                    "Essential workload deployed again after the node's crash",
                    name=record.name,
                    was=record.workload_id,
                    vmid=workload.vmid,
                )
        elif record is not None:
            if not leftover.ran:
                log.info("Removing the record of a workload that was not running", name=record.name, key=record.key)
            self._forget(record.workload_id)
        if leftover.ran:  # watchers of its id learn that it stopped, and what became of it
            log.warning(
                "A workload was running when this node last stopped unexpectedly",
                name=leftover.name,
                namespace=leftover.namespace,
                vmid=leftover.workload_id,
                outcome=message,
            )
            data = events.WorkloadEventData(
                workload_name=leftover.name,
                code=-1,
                message=message,
                id=leftover.workload_id,
                namespace=leftover.namespace,
            )
            self.publisher.emit(events.WORKLOAD_STOPPED, data, namespace=leftover.namespace)

    async def _claim_own(self, record: WorkloadRecord) -> bool:
        """Whether the last run's ``record`` is still this node's to settle (see :class:`ClaimOwn`)."""
        if self.records is None:
            return True
        try:
            return await self.records.ask(
                lambda reply: ClaimOwn(workload_id=record.workload_id, reply=reply), timeout=RECORDS_TIMEOUT
            )
        except ActorError:
            return True

    async def _redeploy(self, record: WorkloadRecord) -> Workload:
        """Deploy again a workload of the node's last run, from its record: the deploy request as the
        node received it, through the deploy path (lame duck, limits, the sealed environment opened
        with the node's xkey, ``requester_public_keys``, the JWT's signature and ``valid_issuers`` as
        configured now, the artifact and its hash), as a deploy from a requester would be.

        One check is judged at another time: the JWT's ``exp`` (and ``nbf``) at the moment the node
        first accepted the request (``accepted_at``), not now. A JWT authorizes a deploy, and that
        deploy was authorized and done: an essential workload is one its deployer asked the node to
        keep running, and its in-process restarts never ask the JWT again, so neither does a node
        that crashed. Judged now, a requester's short-lived JWT would turn a crash of the node into
        the loss of the workload, with nobody left to deploy it again. ``accepted_at`` is the node's
        own word: its records are signed with its nkey, and one it did not sign is never read
        (:mod:`.records`), so nobody who can write to the bucket can push that time back to revive
        an expired JWT. Removing an issuer from ``valid_issuers`` still stops its workloads from
        coming back.
        """
        subject = subjects.deploy(record.namespace, self.state.node_id)
        msg = InboundMsg(subject=subject, data=bytes(record.deploy_request))
        async with self._deploy_workers:
            return await self._check_and_launch(msg, accepted_at=record.accepted_at, replaces=record)

    async def _respond(self, msg: InboundMsg, reply: bytes) -> None:
        try:
            await self.control.respond(msg, reply)
        except LinkError as exc:  # not connected, or a reply nats-py refuses (more than max_payload)
            log.warning("Could not send a reply", subject=msg.subject, error=str(exc))


def _give_up(machine: ActorRef[MachineMsg]) -> None:
    """End a machine whose deploy the manager gave up on (a machine is never reused)."""
    with contextlib.suppress(ActorStopped, MailboxFull):  # gone already, or busy ending
        machine.send_nowait(Undeploy(grace=0, reply=Reply()))


class _MachineTrouble(Exception):
    """A deploy failed because of its machine; another machine may do."""


def notify_machine_ended(manager: ActorRef[WorkloadMsg]) -> Callable[[str, str], None]:
    """The ``ended(vmid, reason)`` callback machines call: tells the manager (never raises)."""

    def ended(vmid: str, reason: str) -> None:
        with contextlib.suppress(ActorStopped, MailboxFull):  # the node is stopping, or reports are piling up
            manager.send_nowait(MachineEnded(vmid=vmid, reason=reason))

    return ended


def mailbox() -> Mailbox[WorkloadMsg]:
    """The manager's mailbox: requests and agent reports; a full one drops (the link counts)."""
    return Mailbox[WorkloadMsg](4096, Overflow.FAIL, name="workloads")
