"""One machine, owned end to end by one actor: its directory, credentials, sandbox and agent.

Start-up (the actor's ``on_start``): state directory, metadata, credentials on the internal server,
the driver's ``prepare`` (network) and ``start`` (agent), then the agent's handshake within
``agent_handshake_timeout_ms``. Only then is the machine started, and warm. Every step registers its
undo on the actor's cleanup stack before it acts, so however the machine ends (its agent exits, its
handshake times out, the node stops, a cancellation lands anywhere in start-up) everything is
released in reverse order, shielded and bounded.

An agent that exits is the machine's crash (:class:`AgentExited`); machines are never restarted, the
pool makes new ones.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import trio
from opentelemetry import context as otel_context
from opentelemetry import trace

from actors import Actor, ActorRef, Journal, Mailbox, Message, Registry, Reply, Shutdown
from nex import logs
from nex.api import agent as agent_api
from nex.bus import staging
from nex.bus.credentials import AgentCredentials
from nex.bus.link import LinkError, NatsLink, NotConnected

from .drivers.base import Driver, MachineContext, MachineHandle
from .handshake import HandshakeBook
from .state import MachineDir

log = logs.get("nex.vm")
_encoder = msgspec.json.Encoder()
_tracer = trace.get_tracer("nex.vm")  # a no-op unless the node turned traces on (nex.node.telemetry)
UNDEPLOY_SLACK = 5.0  # beyond the workload's grace, for the agent to kill it and answer
ANSWER_GRACE = 1.0  # for a deploy's answer sent just before the agent exited
STORE_DROP_TIMEOUT = 1.0
MACHINE_STOP_GRACE = 2.0  # seconds a machine has to end on its driver's stop before it is killed
PING_MISSES = 3  # unanswered pings in a row before the agent counts as lost


class HandshakeTimeout(Shutdown):
    """The agent did not say hello in time; the message carries the end of its output."""


class AgentExited(Shutdown):
    """The machine's agent process exited."""


class AgentLost(Shutdown):
    """The machine's agent no longer answers its pings (nex: "Lost contact with agent")."""


class MachineInfo(msgspec.Struct):
    vmid: str
    state: str
    ip: str
    pid: int
    driver: str
    since: float
    sandbox: str = ""


class Describe(Message):
    reply: Reply[MachineInfo]


class Deploy(Message):
    """Run a workload: stage its artifact in the machine's store and have the agent start it."""

    request: agent_api.AgentDeployRequest
    artifact: bytes
    reply: Reply[None]
    trace: object = None  # the deployer's OpenTelemetry context: its span is the parent of this one's stages


class Undeploy(Message):
    """Stop the workload (the agent gives it ``grace`` seconds after SIGTERM) and end the machine."""

    grace: float
    reply: Reply[None]


MachineMsg = Describe | Deploy | Undeploy


class WorkloadRejected(Exception):
    """The agent refused the workload; the message is its reason."""


class MachineFailed(Exception):
    """The machine could not take a workload for a reason of its own (its artifact store, its
    agent's link, its state), not because of the workload: the workload may do well on another."""


class RunningWorkload(msgspec.Struct):
    """``workload.json`` in a machine's directory while it runs a workload: what a node restarted
    after a crash needs to tell watchers that the workload stopped."""

    vmid: str
    name: str
    namespace: str


@dataclass(frozen=True)
class MachineDeps:
    """What every machine of a node shares."""

    driver: Driver
    credentials: AgentCredentials
    handshakes: HandshakeBook
    vm_root: Path
    journal: Journal | None
    agent_host: str
    agent_port: int
    handshake_timeout: float
    internal: NatsLink | None = None  # to talk to agents and stage artifacts
    ended: Callable[[str, str], None] | None = None  # (vmid, reason) whenever a machine ends
    deploy_timeout: float = 10.0
    ping_interval: float = 5.0  # between pings of a started machine's agent; 0: no pings
    ping_timeout: float = 0.75


class Machine(Actor[MachineMsg]):
    """One machine; ``vmid`` and ``seed`` come from :meth:`AgentCredentials.take`."""

    def __init__(self, vmid: str, seed: str, deps: MachineDeps, on_lost: Callable[[str], None] | None = None) -> None:
        self.vmid = vmid
        self.seed = seed
        self.deps = deps
        self.on_lost = on_lost  # told the moment the agent dies, before the (slower) teardown
        self.journal = deps.journal
        self.state = "starting"
        self.since = time.time()
        self.agent: MachineHandle | None = None
        self.context: MachineContext | None = None
        self.workload: agent_api.AgentDeployRequest | None = None
        self.store = False  # its artifact store exists
        self._deploy_settled = trio.Event()  # the deploy's answer is in, whichever it was

    async def run(
        self,
        mailbox: Mailbox[MachineMsg],
        *,
        registry: Registry | None = None,
        task_status: trio.TaskStatus[ActorRef[MachineMsg]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the machine; its agent's user on the internal server goes with it, however it ends.

        Revoked here rather than from the cleanup stack so that a cancellation landing before
        ``on_start`` has pushed anything (the stack is entered at a checkpoint) cannot leave the
        credential behind.
        """
        try:
            await super().run(mailbox, registry=registry, task_status=task_status)
        finally:
            self.deps.credentials.revoke(self.vmid)

    async def on_start(self) -> None:
        deps, vmid = self.deps, self.vmid
        folder = MachineDir(deps.vm_root, vmid)
        self.cleanup.push(
            f"state dir of {vmid}",
            lambda: trio.to_thread.run_sync(folder.remove),
            kind="dir",
            data={"path": str(folder.path)},
        )
        folder.create()
        folder.note("created")
        metadata = agent_api.MachineMetadata(
            vmid=vmid, node_nats_host=deps.agent_host, node_nats_port=deps.agent_port, node_nats_nkey=self.seed
        )
        context = MachineContext(vmid=vmid, dir=folder, cleanup=self.cleanup, metadata=metadata)
        self.context = context
        store_made = trio.Event()  # made while the network and the agent start; needed once ready
        if deps.internal is not None:
            self.nursery.start_soon(self._create_store, deps.internal, store_made)
        else:
            store_made.set()
        await deps.driver.prepare(context)
        hello = deps.handshakes.expect(vmid)
        self.cleanup.push(f"handshake of {vmid}", _forget(deps.handshakes, vmid), durable=False)
        started = trio.current_time()
        # covers the launch too: a stuck launcher is bounded
        deadline = started + deps.handshake_timeout + context.boot_allowance
        with trio.move_on_at(deadline):
            self.agent = await deps.driver.start(context)
        if self.agent is None:
            folder.note("agent not started in time")
            raise HandshakeTimeout(
                f"the agent of machine {vmid} was not even started within "
                f"{(deadline - started) * 1000:.0f} ms (is the agent launcher stuck?)"
            )
        deadline = started + deps.handshake_timeout + context.boot_allowance  # a driver may have had to boot
        handle = self.agent
        self.cleanup.push(  # first in the teardown: the driver's own stop, then what it registered
            f"stop of machine {vmid}",
            lambda: deps.driver.stop(context, handle, MACHINE_STOP_GRACE),
            durable=False,
        )
        facts = deps.driver.describe(context)
        log.info(
            "Machine started",
            vmid=vmid,
            ip=facts.get("ip", ""),
            gateway=deps.agent_host,
            hosttap=facts.get("hosttap", "-"),
            nats_host=deps.agent_host,
            nats_port=deps.agent_port,
        )
        self.nursery.start_soon(self._watch_agent, self.agent)
        with trio.move_on_at(deadline):
            await hello.wait()
            await store_made.wait()
        if not hello.is_set():
            folder.note("no handshake in time")
            raise HandshakeTimeout(
                f"the agent of machine {vmid} did not complete its handshake within "
                f"{(deadline - started) * 1000:.0f} ms; its last output: {_tail(folder)}"
            )
        if not store_made.is_set():
            raise HandshakeTimeout(f"the artifact store of machine {vmid} was not made within the handshake timeout")
        self.state = "ready"
        folder.note(f"handshake after {(trio.current_time() - started) * 1000:.1f} ms")
        if deps.internal is not None and deps.ping_interval > 0:
            self.nursery.start_soon(self._keep_in_touch, deps.internal)

    async def _create_store(self, link: NatsLink, made: trio.Event) -> None:
        """The machine's own artifact store, which its agent watches once the machine is ready."""
        vmid = self.vmid
        self.cleanup.push(f"artifact store of {vmid}", functools.partial(_drop_store, link, vmid), durable=False)
        await link.call(lambda nc: staging.create(nc, vmid))
        self.store = True
        made.set()

    async def handle(self, message: MachineMsg) -> None:
        match message:
            case Describe(reply=reply):
                reply.send(self.info())
            case Deploy(request=request, artifact=artifact, reply=reply, trace=parent):
                token = otel_context.attach(parent) if isinstance(parent, otel_context.Context) else None
                try:
                    await self._deploy(request, artifact, reply)
                finally:
                    if token is not None:
                        otel_context.detach(token)
            case Undeploy(grace=grace, reply=reply):
                await self._undeploy(grace, reply)

    async def _deploy(self, request: agent_api.AgentDeployRequest, artifact: bytes, reply: Reply[None]) -> None:
        link = self.deps.internal
        if link is None or self.state != "ready":
            reply.fail(MachineFailed(f"machine {self.vmid} is {self.state}, not ready for a workload"))
            return
        self.state = "deploying"
        try:
            await self._hand_over(link, request, artifact, reply)
        finally:
            self._deploy_settled.set()

    async def _hand_over(
        self, link: NatsLink, request: agent_api.AgentDeployRequest, artifact: bytes, reply: Reply[None]
    ) -> None:
        """Stage the artifact, ask the agent to run it, and answer ``reply``; stop the machine on failure."""
        vmid = self.vmid
        assert self.context is not None
        folder = self.context.dir
        try:
            if not self.store:
                raise MachineFailed(f"machine {vmid} has no artifact store")
            # written before the agent may start it: after a crash of the node, it says what ran here
            folder.write_json(
                "workload.json", RunningWorkload(vmid=vmid, name=request.workload_name, namespace=request.namespace)
            )
            with _tracer.start_as_current_span("staging"):
                await link.call(lambda nc: staging.stage(nc, vmid, artifact, request.hash))
            with _tracer.start_as_current_span("agent"):
                answer = await link.request(
                    agent_api.deploy(vmid),
                    _encoder.encode(request),
                    timeout=self.deps.deploy_timeout,
                    reply_prefix=agent_api.replies(vmid),
                )
            response = msgspec.json.decode(answer.data, type=agent_api.DeployResponse)
        except Exception as exc:  # the store, the link, the agent's answer: all the machine's
            (folder.path / "workload.json").unlink(missing_ok=True)
            folder.note(f"could not hand the workload over: {exc!r}")
            reply.fail(exc if isinstance(exc, MachineFailed) else MachineFailed(f"machine {vmid}: {exc!r}"))
            self.stop()
            return
        if not response.accepted:
            (folder.path / "workload.json").unlink(missing_ok=True)
            reply.fail(WorkloadRejected(response.message or "no reason given"))
            self.stop()
            return
        self.state = "running"
        self.workload = request
        folder.note(f"running workload {request.workload_name} ({request.namespace})")
        reply.send(None)

    async def _undeploy(self, grace: float, reply: Reply[None]) -> None:
        self.state = "stopping"
        if self.deps.internal is not None:
            body = _encoder.encode(agent_api.UndeployRequest(grace_ms=int(grace * 1000)))
            with contextlib.suppress(LinkError):  # a gone agent is undeployed already
                await self.deps.internal.request(
                    agent_api.undeploy(self.vmid),
                    body,
                    timeout=grace + UNDEPLOY_SLACK,
                    reply_prefix=agent_api.replies(self.vmid),
                )
        reply.send(None)
        self.stop()

    def info(self) -> MachineInfo:
        facts = self.deps.driver.describe(self.context) if self.context is not None else {}
        return MachineInfo(
            vmid=self.vmid,
            state=self.state,
            ip=facts.get("ip", ""),
            pid=self.agent.pid if self.agent else 0,
            driver=self.deps.driver.name,
            since=self.since,
            sandbox=facts.get("sandbox", ""),
        )

    async def _keep_in_touch(self, link: NatsLink) -> None:
        """Ping the agent every ``ping_interval``; after :data:`PING_MISSES` unanswered in a row the
        machine is lost (its crash: torn down, and replaced if it was in the pool).

        An agent can hang while its process lives on, where the pidfd watch sees nothing. nex v0.2.7
        gives up at the first miss; three ride out a busy moment. A node that cannot reach its own
        internal server does not blame its agents.
        """
        vmid = self.vmid
        misses = 0
        while True:
            await trio.sleep(self.deps.ping_interval)
            try:
                await link.request(
                    agent_api.ping(vmid), timeout=self.deps.ping_timeout, reply_prefix=agent_api.replies(vmid)
                )
            except NotConnected:
                continue
            except LinkError as exc:
                misses += 1
                log.warning("Agent did not answer a ping", vmid=vmid, misses=misses, error=str(exc))
                if misses < PING_MISSES:
                    continue
                reason = f"lost contact with the agent of machine {vmid}: {misses} pings unanswered"
                if self.agent is not None:
                    self.agent.signal(signal.SIGKILL)  # hung: a polite stop would only wait out its grace
                if self.on_lost is not None and self.state == "ready":
                    self.on_lost(reason)
                raise AgentLost(reason) from None
            misses = 0

    async def _watch_agent(self, agent: MachineHandle) -> None:
        code = await agent.wait()
        reason = f"the agent of machine {self.vmid} (pid {agent.pid}) exited with code {code}"
        if self.state == "deploying":
            # A workload that ends at once ends its agent too, right after the agent answered the
            # deploy. The exit comes by pidfd, the answer over NATS: let the answer land first, or
            # the deploy of a workload that did run would be reported as failed.
            with trio.move_on_after(ANSWER_GRACE):
                await self._deploy_settled.wait()
        if self.state in ("running", "stopping"):
            self.stop()  # its workload ended and the agent with it: the machine's job is done
            return
        if self.on_lost is not None and self.state == "ready":
            self.on_lost(reason)  # a replacement can start while this machine is torn down
        raise AgentExited(reason)


def _forget(book: HandshakeBook, vmid: str) -> Callable[[], Awaitable[None]]:
    async def forget() -> None:
        book.forget(vmid)

    return forget


async def _drop_store(link: NatsLink, vmid: str) -> None:
    """Delete the machine's artifact store, briefly: it lives in the internal server's memory, so a
    server that is down (or restarted) has lost it already, and a machine's teardown must not wait
    for that server to come back."""
    with trio.move_on_after(STORE_DROP_TIMEOUT), contextlib.suppress(LinkError):
        await link.call(lambda nc: staging.unstage(nc, vmid))


def _tail(folder: MachineDir, lines: int = 5) -> str:
    text = ""
    for path in (folder.stderr, folder.stdout):
        try:
            text += path.read_text(errors="replace")
        except OSError:
            continue
    tail = [line for line in text.strip().splitlines() if line][-lines:]
    return " | ".join(tail) if tail else "(nothing)"
