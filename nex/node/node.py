"""The node: its life from ``nex up`` to exit, and the supervision tree it runs.

    node (supervisor, one_for_one)
    ├── zygote           the fork server agents are started from (unless agent_launcher is spawn)
    ├── control-server   nats-server on 127.0.0.1:4222, only when nothing answered there
    ├── control-link     the node's connection to the control NATS
    ├── internal-server  nats-server for the agents (port 9222 by default, JetStream)
    ├── credentials      the agents' users on it, made ahead of need
    ├── internal-link    the node's connection to it
    ├── handshakes       answers agents' hellos
    ├── machines         dynamic supervisor: one actor per machine
    ├── pool             keeps machine_pool_size machines warm
    ├── records          the workloads' records in the control NATS's KV bucket
    ├── workloads        deploys, stops, the workloads' logs and events; settles a crashed last run's
    ├── control-api      answers $NEX.* requests
    ├── takeover         runs the essential workloads of nodes that stopped answering
    ├── heartbeat        heartbeat events
    └── lameduck         stops the node once lame duck has nothing left to wait for

Start-up follows that order; each child is started only once the one before it is ready, then
``node_started`` is published. The node then runs until it is asked to stop: SIGINT or SIGTERM, lame
duck done, or the tree giving up. It then publishes ``node_stopped`` and stops the tree in reverse
order; a second signal skips what is left of the graceful part, but the tree is still torn down.
Exit codes: 0 after a requested stop, 1 when the node failed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import trio

from actors import (
    ActorRef,
    ActorStopped,
    ChildSpec,
    CleanupStack,
    DynamicSupervisor,
    Journal,
    MailboxFull,
    StartFailed,
    Supervisor,
    TreeNode,
    sole_exception,
)
from nex import linux, logs
from nex.api import agent as agent_api
from nex.api import control, events
from nex.bus import staging
from nex.bus.aio import AsyncioThread, open_asyncio_thread
from nex.bus.credentials import AgentCredentials
from nex.bus.events import EventPublisher
from nex.bus.link import NatsLink
from nex.bus.server import NatsServer, nats_answers
from nex.config import NodeConfig
from nex.crypto import NodeIdentity
from nex.net import netns
from nex.net.network import Networks
from nex.sandbox import cgroups, support
from nex.sandbox.policy import HostSupport, Sandbox
from nex.state import NodeState
from nex.vm import image as guest_image
from nex.vm import kvm, pool
from nex.vm.drivers import open_driver
from nex.vm.drivers.base import Driver, DriverUnavailable
from nex.vm.handshake import HandshakeBook, Handshakes
from nex.vm.launcher import SpawnLauncher, ZygoteLauncher
from nex.vm.machine import MachineDeps, RunningWorkload
from nex.vm.pool import Pool, PoolBook, ServerRestarted
from nex.vm.qemu.boot import BootImage, ImageError, configured_image, vm_accel
from nex.workload import manager
from nex.workload.records import RecordBook, WorkloadRecords
from nex.workload.records import mailbox as records_mailbox

from .control import ControlApi
from .heartbeat import Heartbeat
from .host import HostObjects, link_group, node_stem
from .lameduck import LameDuckWatcher
from .progress import FillProgress
from .systemd import Notifier
from .takeover import Takeover
from .telemetry import Telemetry, TelemetryError, sample_mailboxes

log = logs.get("nex.node")

DEFAULT_CONTROL_HOST = "127.0.0.1"
DEFAULT_CONTROL_PORT = 4222
_START_HINTS = {
    "control-link": " (check --server or NATS_URL, and that the server is up)",
    "control-server": " (is another program using port 4222? give --server to use an existing NATS)",
    "internal-server": " (is the internal port taken? set --internal-port, or 0 for any free port)",
}


def _orphaned_workloads(vm_root: Path) -> list[RunningWorkload]:
    """The workloads whose machines' directories say they were running (see ``workload.json``)."""
    found = []
    for path in sorted(vm_root.glob("*/*/*/workload.json")):
        try:
            found.append(msgspec.json.decode(path.read_bytes(), type=RunningWorkload))
        except (OSError, msgspec.DecodeError) as exc:
            log.warning("Unreadable record of a workload left by the last run", path=str(path), error=str(exc))
    return found


class NodeError(Exception):
    """The node cannot start; the message says what to do about it."""


class Node:
    """One node. :meth:`run` returns the process exit code."""

    def __init__(
        self, config: NodeConfig, *, state_dir: Path, server: str | None = None, ephemeral: bool = False
    ) -> None:
        self.config = config
        self.state_dir = state_dir
        self.server = server
        self.ephemeral = ephemeral
        self.root: Supervisor | None = None
        self._graceful: trio.CancelScope | None = None
        self._startup: trio.CancelScope | None = None
        self._state: NodeState | None = None
        self._tree_started = False
        self._networks: Networks | None = None
        self._sandbox: Sandbox | None = None
        self._host: HostObjects | None = None
        self._journal = Journal(state_dir / "journal")
        self._progress = FillProgress()
        self._orphans: list[RunningWorkload] = []
        self._telemetry = Telemetry(config, state_dir)

    async def run(self) -> int:
        """Run until stopped; raise :class:`NodeError` (one error, not a group) if the node cannot start."""
        error: NodeError | None = None
        try:
            return await self._run()
        except BaseExceptionGroup as group:
            inner = sole_exception(group)
            if not isinstance(inner, NodeError):
                raise
            error = inner
        raise error  # outside the except: raised inside, the group would become its context

    async def _run(self) -> int:
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise NodeError(f"cannot create the state directory {self.state_dir}: {exc.strerror}") from None
        linux.set_dumpable(False)  # its keys and its agents' credentials are in its memory
        with _StateDirLock(self.state_dir), _tidy_on_exit(self.state_dir):
            _clear_leftovers(self.state_dir / "nats")
            self._networks = self._plan_networks()
            self._sandbox = self._plan_sandbox(self._networks)
            self._host = HostObjects(self.config, self.state_dir, self._networks, self._sandbox)
            await self._recover()
            identity = NodeIdentity.generate() if self.ephemeral else NodeIdentity.load_or_create(self.state_dir)
            state = NodeState(identity, self.config, sandbox=_sandbox_info(self._sandbox))
            self._state = state
            log.info(
                "Starting nex node",
                node=state.node_id,
                name=state.name,
                version=state.version,
                state_dir=str(self.state_dir),
                identity="ephemeral" if self.ephemeral else "persistent",
            )
            log.info("Use this key as the recipient for encrypted run requests", public_xkey=identity.public_xkey)
            # Watched to the very end: a signal during the teardown must not kill the node half-way (its
            # default action, or trio re-delivering one nobody read), leaving what it had yet to release.
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
                async with trio.open_nursery() as watcher:
                    watcher.start_soon(self._watch_signals, state, signals)
                    try:
                        await self._serve(state)
                    finally:
                        watcher.cancel_scope.cancel()
                        self._telemetry.shutdown()  # after the tree: the last deploys' spans are flushed
            if state.failure is not None:
                log.error("Node stopped after a failure", error=str(state.failure))
                return 1
            log.info("Node stopped", node=state.node_id)
            return 0

    async def _serve(self, state: NodeState) -> None:
        """Start the tree, serve until asked to stop, and tear everything down (host objects last)."""
        colocate = self.config.bus_thread_affinity == "colocate"
        host_objects = CleanupStack(journal=self._journal, owner="node")
        notifier = Notifier()
        notifier.status(f"starting node {state.name}")
        async with host_objects, open_asyncio_thread(colocate=colocate) as aio, trio.open_nursery() as nursery:
            nursery.start_soon(notifier.keep_watchdog_fed)
            if self._networks is not None and self._networks.namespaced:
                nursery.start_soon(trio.to_thread.run_sync, netns.warm_up)
            with trio.CancelScope() as startup:
                self._startup = startup
                if state.stop_requested.is_set():  # a signal came before there was a start to cancel
                    startup.cancel()
                publisher = await self._start_tree(nursery, state, aio, host_objects)
                publisher.emit(
                    events.NODE_STARTED,
                    events.NodeStartedData(version=state.version, id=state.node_id, tags=state.tags()),
                )
                log.info("Node is ready", node=state.node_id, name=state.name)
                notifier.ready(f"ready: node {state.name}, {self.config.machine_pool_size} warm machines")
            self._startup = None
            await state.stop_requested.wait()
            log.info("Stopping node", reason=state.stop_reason)
            notifier.stopping(f"stopping: {state.stop_reason}")
            if not startup.cancelled_caught:
                with trio.CancelScope() as self._graceful, trio.move_on_after(5):
                    await publisher.emit_flushed(
                        events.NODE_STOPPED,
                        events.NodeStoppedData(id=state.node_id, graceful=state.failure is None),
                    )
            nursery.cancel_scope.cancel()

    async def _start_tree(
        self, nursery: trio.Nursery, state: NodeState, aio: AsyncioThread, host_objects: CleanupStack
    ) -> EventPublisher:
        work_dir = self.state_dir / "nats"
        children: list[ChildSpec] = []
        control_url = await self._control_url()
        if control_url is None:
            control_server = NatsServer(
                "control", host=DEFAULT_CONTROL_HOST, port=DEFAULT_CONTROL_PORT, work_dir=work_dir
            )
            control_url = control_server.url
            log.info(
                "No NATS server answered at the default address; starting an embedded one",
                url=control_url,
                store=str(control_server.store_dir),
            )
            children.append(control_server.child_spec())
        networks, sandbox, host = self._networks, self._sandbox, self._host
        assert networks is not None
        assert sandbox is not None
        assert host is not None
        try:
            # agents in namespaces reach it at their gateway, which a link of the node's holds; behind
            # the fence, nothing else of the host is theirs to reach. It requires credentials from all.
            internal_host, internal_port = await host.open(host_objects, self.config.internal_node_port)
        except OSError as exc:
            raise NodeError(f"cannot set up the machines' network: {exc}") from None
        credentials = AgentCredentials(stock=max(4, self.config.machine_pool_size))
        pool_mailbox = pool.mailbox()
        pool_ref = pool_mailbox.ref

        def internal_started(generation: int) -> None:
            if generation > 1:  # its artifact stores are gone with the previous run
                with contextlib.suppress(ActorStopped, MailboxFull):
                    pool_ref.send_nowait(ServerRestarted(generation=generation))

        internal_server = NatsServer(
            "internal",
            host=internal_host,
            port=internal_port,
            work_dir=work_dir,
            max_payload=staging.INTERNAL_MAX_PAYLOAD,
            extra_config=credentials.render,
            on_started=internal_started,
        )
        credentials.attach(internal_server)
        control_link = NatsLink("control", [control_url], aio, client_name=f"nex-node {state.node_id}")
        internal_link = NatsLink(
            "internal",
            [f"nats://{internal_host}:{internal_port}"],
            aio,
            client_name=f"nex-node {state.node_id}",
            reply_spaces=[agent_api.ALL_REPLIES],
            nkeys_seed_str=credentials.node_seed,
        )
        publisher = EventPublisher(control_link, state.node_id)
        launcher: ZygoteLauncher | SpawnLauncher | None = None
        if self.config.machine_driver() == "process":
            launcher = ZygoteLauncher(self.state_dir) if self.config.agent_launcher == "zygote" else SpawnLauncher()
            driver = open_driver(self.config, networks, sandbox, launcher=launcher)
            accel = ""
            state.machines_are(driver.name, driver.kind)
        else:
            driver, accel = await self._open_vm_driver(networks, sandbox)
            state.machines_are(driver.name, driver.kind, accel)
        handshakes = HandshakeBook()
        machines = DynamicSupervisor("machines")
        workload_mailbox = manager.mailbox()
        deps = MachineDeps(
            driver=driver,
            credentials=credentials,
            handshakes=handshakes,
            vm_root=self.state_dir / "vm" / "system" / state.name,
            journal=self._journal,
            agent_host=networks.agent_host,
            agent_port=internal_port,
            handshake_timeout=self.config.agent_handshake_timeout_ms / 1000,
            ping_interval=self.config.agent_ping_interval_ms / 1000,
            ping_timeout=_ping_timeout(self.config, accel),
            internal=internal_link,
            ended=manager.notify_machine_ended(ActorRef(workload_mailbox)),
        )
        pool_book = PoolBook()
        self._progress = progress = FillProgress()
        size = self.config.machine_pool_size
        pool_spec = Pool.spec(
            lambda: Pool(state, machines, deps, size=size, book=pool_book, progress=progress), pool_mailbox
        )
        record_book = RecordBook()
        records = records_mailbox()
        records_spec = WorkloadRecords.spec(
            lambda: WorkloadRecords(state, control_link, record_book, taken=workload_mailbox.ref.send_nowait), records
        )
        workload_book = manager.WorkloadManager.new_book(state)
        workload_book.left_over, self._orphans = self._orphans, []  # settled by the manager (nex.workload.recovery)
        workloads_spec = manager.WorkloadManager.spec(
            lambda: manager.WorkloadManager(
                state, control_link, internal_link, publisher, pool_ref, workload_book, records=records.ref
            ),
            workload_mailbox,
        )

        try:
            self._telemetry.start(state, pool_book, workload_book, [control_link, internal_link])
            nursery.start_soon(sample_mailboxes, self._telemetry, self._tree)
        except TelemetryError as exc:
            raise NodeError(str(exc)) from None

        def pool_view() -> list[control.PoolMember]:
            kind = driver.kind
            return [control.PoolMember(id=e.vmid, state=e.state, ip=e.ip, sandbox=kind) for e in pool_book.entries()]

        def machines_view(namespace: str) -> list[control.MachineSummary]:
            return workload_book.summaries(namespace, driver.kind)

        # The zygote first: it is "started" as soon as its process exists, and its imports then
        # overlap the start of the servers and links.
        children[:0] = [launcher.child_spec()] if isinstance(launcher, ZygoteLauncher) else []
        children += [
            control_link.child_spec(),
            internal_server.child_spec(),
            credentials.child_spec(),
            internal_link.child_spec(),
            Handshakes.spec(internal_link, handshakes.waiting),
            machines.child_spec(),
            pool_spec,
            records_spec,
            workloads_spec,
            ControlApi.spec(lambda: ControlApi(state, control_link, publisher, self._tree, pool_view, machines_view)),
            Takeover.spec(lambda: Takeover(state, control_link, publisher)),
            Heartbeat(state, publisher).child_spec(),
            LameDuckWatcher(state).child_spec(),
        ]
        log.info(
            "Machines",
            driver=driver.name,
            network="own namespace per machine" if networks.namespaced else "host loopback",
            agents=_agents_started_by(launcher),
            pool_size=self.config.machine_pool_size,
        )
        self.root = Supervisor("node", children, intensity=5, period=30)
        try:
            await nursery.start(self._supervise, self.root, state)
        except StartFailed as exc:
            hint = _START_HINTS.get(exc.child, "")
            raise NodeError(f"{exc.child} failed to start: {exc.__cause__}{hint}") from None
        finally:
            self._progress.close()
        self._tree_started = True
        return publisher

    async def _open_vm_driver(self, networks: Networks, sandbox: Sandbox) -> tuple[Driver, str]:
        """The VM driver and its accelerator, over the configured image or the node's own (built now
        if it is not yet)."""
        try:
            image: BootImage | None = configured_image(self.config)
        except ImageError as exc:
            raise NodeError(str(exc)) from None
        if image is None:
            image = await self._guest_image()
        # Firecracker runs on KVM only (preflight refuses it without)
        accel = "kvm" if self.config.machine_driver() == "firecracker" else await vm_accel(self.config, image)
        try:
            driver = open_driver(
                self.config,
                networks,
                sandbox,
                image=image,
                accel=accel,
                tsc_khz=kvm.tcg_tsc_khz(),
                snapshot_root=self.state_dir / "snapshots",
            )
        except DriverUnavailable as exc:
            raise NodeError(str(exc)) from None
        return driver, accel

    async def _guest_image(self) -> BootImage:
        cached = await trio.to_thread.run_sync(guest_image.cached_image, self.state_dir)
        if cached is not None:
            return cached
        log.info(
            "Building the guest image (once; `nex image build` does it ahead of time)", state_dir=str(self.state_dir)
        )
        try:
            return await trio.to_thread.run_sync(
                lambda: guest_image.build_image(self.state_dir, say=lambda text: log.info(text))
            )
        except guest_image.ImageError as exc:
            raise NodeError(f"cannot build the guest image: {exc}") from None

    def _tree(self) -> TreeNode:
        assert self.root is not None
        return self.root.tree()

    def _plan_networks(self) -> Networks:
        namespaced = netns.has_capabilities()
        if not namespaced:
            log.warning(
                "Machines will share the host's loopback network, and workloads get none: this process lacks "
                "CAP_NET_ADMIN and CAP_SYS_ADMIN (run the node as root to give each machine its own network "
                "namespace)"
            )
        return Networks(self.config, namespaced=namespaced, group=link_group(node_stem(self.state_dir)))

    def _plan_sandbox(self, networks: Networks) -> Sandbox:
        """Find out what this host lets the node apply of the jail, and say so (before any thread
        starts: the user-namespace probe forks)."""
        if self.config.no_sandbox:
            log.warning("Workloads are NOT jailed (no_sandbox): each runs as root on this host, unlimited")
            return Sandbox(self.config, HostSupport(False, networks.namespaced, None, None, "off"))
        privileged = support.privileged()
        wanted = self.config.sandbox
        try:
            hierarchy: cgroups.Hierarchy | str = cgroups.Hierarchy.detect() if privileged else "the node is not root"
        except cgroups.CgroupError as exc:
            if wanted.cgroups:  # fails closed: machines without limits only if the operator says so
                raise NodeError(f"{exc} (sandbox.cgroups=false runs machines without limits)") from None
            hierarchy = str(exc)
        host = HostSupport(
            privileged=privileged,
            namespaced=networks.namespaced,
            user_namespaces=support.user_namespaces(wanted.uid_base if privileged else None)
            if wanted.user_namespace
            else None,
            seccomp=support.seccomp_filter() if wanted.seccomp else None,
            cgroups=hierarchy,
        )
        sandbox = Sandbox(self.config, host)
        log.info("Sandbox", jail=", ".join(str(p) for p in sandbox.protections if p.state == "on"))
        for protection in sandbox.protections:
            if protection.state == "off":
                log.warning("Sandbox protection turned off by the config", protection=protection.name)
            elif protection.state == "missing":
                log.warning(
                    "Sandbox protection missing on this host", protection=protection.name, why=protection.detail
                )
        return sandbox

    async def _recover(self) -> None:
        """Release what a node that did not stop cleanly left behind (we hold the state-dir lock)."""
        assert self._host is not None
        self._orphans = _orphaned_workloads(self.state_dir / "vm")  # read before their directories go
        released = await self._host.recover(self._journal)
        if released:
            log.info(
                "Released what a node that did not stop cleanly left behind",
                resources=", ".join(f"{r.kind} {r.name}" for r in released),
            )

    async def _supervise(
        self, root: Supervisor, state: NodeState, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await root.run(task_status=task_status)
        except Exception as exc:
            if not self._tree_started:
                raise  # a failed start: _start_tree reports it
            log.error("The supervision tree gave up", exc)
            state.request_stop("supervision tree gave up", failure=exc)

    async def _control_url(self) -> str | None:
        """The control server's URL; None when the node must start its own."""
        if self.server:
            return self.server  # an explicit server never falls back to an embedded one
        if await nats_answers(DEFAULT_CONTROL_HOST, DEFAULT_CONTROL_PORT):
            return f"nats://{DEFAULT_CONTROL_HOST}:{DEFAULT_CONTROL_PORT}"
        return None

    async def _watch_signals(self, state: NodeState, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not state.stop_requested.is_set():
                state.request_stop(f"received {name}")
                if self._startup is not None:
                    self._startup.cancel()
                continue
            log.warning("Second signal: stopping now (resources are still released)", signal=name)
            if self._graceful is not None:
                self._graceful.cancel()


class _StateDirLock:
    """One node per state directory: an exclusive ``flock`` on ``node.lock`` holding the pid.

    The file is removed on exit, while the lock is still held. So a node that opened the file before
    that and is granted the lock once it is released holds a lock on a file no longer at the path,
    which excludes nobody: after locking, a node checks that its file is still the one at the path
    (same inode) and starts over if not.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "node.lock"
        self._fd = -1

    def __enter__(self) -> _StateDirLock:
        while True:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(self._fd)
                raise NodeError(
                    f"another nex node (pid {holder}) is using {self.path.parent}; "
                    "stop it first, or give this node its own --state-dir"
                ) from None
            try:
                if os.path.samestat(os.fstat(self._fd), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            os.close(self._fd)  # removed by the node that held it: lock the file now at the path
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)  # before the lock goes: see the class's docstring
        os.close(self._fd)


def _clear_leftovers(work_dir: Path) -> None:
    """Remove what a node killed earlier left of its servers' files (we hold the state-dir lock)."""
    if work_dir.exists():
        leftovers = sorted(p.name for p in work_dir.iterdir())
        shutil.rmtree(work_dir, ignore_errors=True)
        if leftovers:
            log.info("Removed files left by a node that did not stop cleanly", path=str(work_dir), files=leftovers)


@contextlib.contextmanager
def _tidy_on_exit(state_dir: Path) -> Iterator[None]:
    """However the node ends, remove the directories its servers and machines emptied."""
    try:
        yield
    finally:
        for leftover in (state_dir / "nats", state_dir / "journal"):
            with contextlib.suppress(OSError):
                leftover.rmdir()
        _remove_empty_dirs(state_dir / "vm")


def _remove_empty_dirs(root: Path) -> None:
    """Remove ``root`` and the directories under it that are (then) empty, deepest first."""
    if not root.is_dir():
        return
    for path in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            path.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()


TCG_PING_TIMEOUT = 3.0
"""At least this long for an emulated VM's agent to answer a ping: TCG translates each code path the
first time it runs, and a clone's first answers take a second or more."""


def _ping_timeout(config: NodeConfig, accel: str) -> float:
    timeout = config.agent_ping_timeout_ms / 1000
    return max(timeout, TCG_PING_TIMEOUT) if accel == "tcg" else timeout


def _agents_started_by(launcher: ZygoteLauncher | SpawnLauncher | None) -> str:
    if launcher is None:
        return "as each VM's init"
    return "zygote (pre-imported fork server)" if isinstance(launcher, ZygoteLauncher) else "new process each"


def _sandbox_info(sandbox: Sandbox) -> control.SandboxInfo:
    return control.SandboxInfo(
        kind=sandbox.kind,
        unsafe=sandbox.unsafe,
        protections=[control.SandboxProtection(p.name, p.state, p.detail) for p in sandbox.protections],
    )
