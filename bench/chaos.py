"""Chaos: a real node under load while its parts are killed, and the promises it must keep meanwhile.

For ``CHAOS_SECONDS`` (60 by default, or ``--seconds``) a real ``nex up`` (warm pool of 4, jailed, on
a real nats-server with JetStream, ``--allow`` opening that server to the workloads at the gateway)
runs this, all at once:

- clients (4) deploy small static workloads (``gcc -static``) and stop them, in a loop: most run until
  SIGTERM, some hold a NATS connection to the control server (and so exit 3 when it goes away), some
  exit at once with 0 or 1, and a few are shell scripts the node must refuse;
- deploys cancelled half way: sent on a connection that is closed at once, or abandoned by a client
  that stops waiting for the reply (the node may well start those workloads: they are tracked by
  their events and stopped at the end like the others);
- a machine's agent is killed (SIGKILL) every 1 to 2.5 s, idle or running a workload;
- the node's internal nats-server is killed (SIGKILL; the node restarts it), about every 10 s;
- the control nats-server is stopped (SIGTERM or SIGKILL, in turn) and started again on the same port
  and store directory (the node and the clients reconnect), about every 20 s;
- the node is pinged every 0.5 s.

Then every workload still running is stopped, the node is stopped with SIGTERM, and these invariants
are checked (a breach is a *violation*, reported with the node's log lines about it):

- every deploy sent, and not cancelled, gets exactly one reply: a success followed by a
  ``workload_started`` event for its id, or an error with a reason. A request sent while the control
  server was down (or up to ``SLACK`` seconds before it went down), which NATS cannot deliver or
  whose reply it lost, is counted as *not delivered*, not as a violation; the same holds for stops;
- every workload that started (by its reply or its event) ends in ``workload_stopped``;
- the node answers PING throughout, except while the control server is down: a *window* runs from
  the stop of the control server to the first ping answered after it is back (at most
  ``RECONNECT_GRACE`` seconds after it is back: longer is a violation);
- one fault, one restart: each kill of the internal nats-server costs the node's root supervisor one
  restart, no more (it gives up, and the node exits 1, after 5 within 30 s); a node that dies during
  the run breaks this and the rest;
- after the node exits (with 0): none of its processes, network namespaces, links, IP leases, cgroups,
  nftables tables or mounts is left (the leak check of tests/nex/conftest.py, scoped to this run's
  directory), nor its servers' files (agents' credentials), machine directories or journal records.

Prints a table and writes ``bench/results/chaos.json``; exits 1 when an invariant was broken.
``run_chaos(seconds, work_dir)`` is the same run for a test (tests/nex/test_chaos.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from rich.console import Console
from rich.table import Table

from nex.api import control
from nex.bus.server import free_port, nats_server_binary
from nex.client import NexClient, NexError, RequesterKeys
from nex.crypto import PREFIX_ACCOUNT, XKey, create_signing_key
from nex.net import netns
from nex.workload import request as workload_request

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
NEX_BIN = shutil.which("nex") or str(Path(sys.executable).parent / "nex")
GATEWAY = "192.168.127.1"  # where workloads in their machines' namespaces reach the host
NAMESPACE = "default"

POOL = 4
CLIENTS = 4
LIVE_PER_CLIENT = 3  # workloads a client keeps running at once
PING_EVERY = 0.5
PING_TIMEOUT = 2.0
DEPLOY_TIMEOUT = 40.0  # the node bounds a deploy: a machine within 10 s, the agent within 30 s
STOP_TIMEOUT = 30.0  # the stop grace (5 s) and the machine's teardown
RECONNECT_GRACE = 10.0  # for the node to answer again once the control server is back
SLACK = 10.0  # a request unanswered that was sent this long before a window began: not delivered
GIVE_UP = 5.0  # after the node answers again, for the reply to a request a restart may have lost
EVENT_MARGIN = 2.0  # an event published this close to a window may be lost (the listener reconnects too)
FINAL_TIMEOUT = 30.0  # for the last workloads' workload_stopped events
INTERNAL_EVERY = 10.0  # about this many seconds between kills of the internal nats-server (at least one)
CONTROL_EVERY = 20.0  # and between restarts of the control nats-server (at least one)
CANCEL_RATE = 0.12  # of a client's turns: a deploy cancelled half way

WORKLOAD = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void done(int sig) { (void)sig; _exit(0); }

int main(void) {
    signal(SIGTERM, done);
    const char *mode = getenv("CHAOS_MODE");
    if (mode == NULL) mode = "sleep";
    if (strncmp(mode, "exit", 4) == 0) {
        printf("chaos: exiting with %s\n", mode + 4);
        return atoi(mode + 4);
    }
    if (strcmp(mode, "nats") == 0) {  /* hold a NATS connection; exit 3 when the server goes away */
        const char *host = getenv("CHAOS_HOST"), *port = getenv("CHAOS_PORT");
        struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port ? atoi(port) : 4222)};
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (host == NULL || inet_pton(AF_INET, host, &addr.sin_addr) != 1 || fd < 0 ||
            connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
            perror("chaos: connect");
            return 3;
        }
        static const char hello[] = "CONNECT {\"verbose\":false,\"name\":\"chaos\"}\r\nPING\r\n";
        if (write(fd, hello, sizeof hello - 1) < 0) return 3;
        printf("chaos: connected to %s:%s\n", host, port);
        fflush(stdout);
        static char buf[4096];
        for (;;) {
            ssize_t n = read(fd, buf, sizeof buf);
            if (n <= 0) {
                fprintf(stderr, "chaos: the server went away\n");
                return 3;
            }
            if (memmem(buf, (size_t)n, "PING\r\n", 6) != NULL && write(fd, "PONG\r\n", 6) < 0) return 3;
        }
    }
    printf("chaos: sleeping until SIGTERM\n");
    fflush(stdout);
    for (;;) pause();
}
"""

#: the node's root supervisor ("node") counting a restart: a child crashed or ended abnormally, or its
#: restart failed (actors/supervisor.py's log lines)
ROOT_RESTART = re.compile(r"^\S+ \w+ node: (child \S+ crashed|child \S+ ended: |restart of \S+ failed)")

#: what a client deploys, and how often; "refused" is a shell script, which the node must refuse
KINDS = {"sleep": 50, "nats": 15, "exit0": 12, "exit1": 8, "refused": 5}
LONG = {"sleep", "nats"}  # run until stopped (or until their machine or server goes)


class ChaosError(Exception):
    """The run could not be carried out (not a finding about the node)."""


# -- records -----------------------------------------------------------------------------------------


@dataclass(eq=False)
class Request:
    """One deploy or stop request and what became of it."""

    verb: str  # deploy | stop
    name: str
    client: int
    sent: float  # monotonic
    wall: float
    kind: str = ""
    cancelled: str = ""  # "" | closed (its connection closed at once) | abandoned (nobody waits)
    replied: float | None = None
    replies: int = 0
    outcome: str = "pending"  # ok | refused | no_responders | timeout, then classified
    error: str = ""
    vmid: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Window:
    """The control server down: from its stop to the node's first answer to a ping once it is back."""

    how: str
    start: float
    wall: float
    up: float | None = None
    end: float | None = None

    def until(self) -> float:
        return self.end if self.end is not None else (self.up or self.start) + RECONNECT_GRACE

    def covers(self, t0: float, t1: float) -> bool:
        return t0 <= self.until() and t1 >= self.start


@dataclass
class Ping:
    sent: float
    latency: float | None
    error: str = ""


@dataclass
class Violation:
    kind: str
    detail: str
    evidence: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = "".join(f"\n    | {line}" for line in self.evidence)
        return f"[{self.kind}] {self.detail}{lines}"


@dataclass
class ChaosReport:
    seconds: float
    elapsed: float
    seed: int
    pool_size: int
    clients: int
    cpus: int | None
    namespaced: bool
    counts: dict[str, int]
    refusals: dict[str, int]
    deploy_reply_ms: dict[str, float]
    slowest_deploys: list[str]
    ping_ms: dict[str, float]
    windows: list[dict[str, Any]]
    node_exit: int | None
    leaks: dict[str, list[str]]
    node_errors: dict[str, int]
    violations: list[Violation]
    node_log: str

    @property
    def ok(self) -> bool:
        return not self.violations

    def total(self, prefix: str) -> int:
        """The sum of the counts whose name starts with ``prefix``."""
        return sum(n for name, n in self.counts.items() if name.startswith(prefix))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the components ----------------------------------------------------------------------------------


class ControlServer:
    """The operator's nats-server: on every address (workloads reach it at the gateway), JetStream on;
    restarted on the same port and store directory."""

    def __init__(self, work: Path) -> None:
        self.port = free_port("127.0.0.1")
        self.store = work / "control-js"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        argv = [str(nats_server_binary()), "-a", "0.0.0.0", "-p", str(self.port), "-js", "-sd", str(self.store)]
        self.proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:  # until it greets clients (its INFO line)
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                try:
                    if (await asyncio.wait_for(reader.read(4), 1)).startswith(b"INFO"):
                        return
                except TimeoutError:
                    pass
                finally:
                    writer.close()
            if self.proc.returncode is not None or time.monotonic() > deadline:
                raise ChaosError(f"the control nats-server did not start on port {self.port}")
            await asyncio.sleep(0.02)

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)
            await asyncio.wait_for(self.proc.wait(), 15)
        self.proc = None


def leak_helpers() -> Any:
    """tests/nex/support.py: the leak check the integration tests run after each test, reused."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.nex import support

    return support


def processes_mentioning(text: str) -> dict[int, str]:
    return dict(leak_helpers().processes_mentioning(text))


def live_agents(state_dir: Path) -> dict[str, int]:
    """The node's agents, vmid -> pid, from the machines' pid files (as tests/nex/support.agents_of
    finds them), kept only if the pid is a process of this node (an agent is a fork of its zygote,
    whose command line names the state directory)."""

    @dataclass
    class _Node:
        state_dir: Path

    mine = processes_mentioning(str(state_dir))
    return {vmid: pid for vmid, pid in leak_helpers().agents_of(_Node(state_dir)).items() if pid in mine}


def build_workload(work: Path) -> bytes:
    source = work / "chaos.c"
    source.write_text(WORKLOAD)
    binary = work / "chaos"
    result = subprocess.run(
        ["gcc", "-static", "-O2", "-o", str(binary), str(source)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise ChaosError(f"gcc -static failed (a static libc is needed): {result.stderr.strip()}")
    return binary.read_bytes()


async def _quiet(_: Exception) -> None:
    return None


async def connect(url: str, name: str, **options: Any) -> Client:
    opts: dict[str, Any] = {
        "name": name,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.05,
        "connect_timeout": 2,
        "error_cb": _quiet,
    }
    opts.update(options)
    return await nats.connect(url, **opts)


# -- the run -----------------------------------------------------------------------------------------


class Chaos:
    def __init__(
        self,
        seconds: float,
        work: Path,
        *,
        clients: int,
        pool_size: int,
        seed: int,
        console: Console,
        internal_every: float = INTERNAL_EVERY,
        control_every: float = CONTROL_EVERY,
    ):
        self.internal_every = internal_every
        self.control_every = control_every
        self.seconds = seconds
        self.work = work
        self.state_dir = work / "node"
        self.log_path = work / "node.log"
        self.n_clients = clients
        self.pool_size = pool_size
        self.seed = seed
        self.rng = random.Random(seed)
        self.console = console
        self.server = ControlServer(work)
        self.node: asyncio.subprocess.Process | None = None
        self.node_id = ""
        self.target: control.PingResponse | None = None
        self.keys = [RequesterKeys(create_signing_key(PREFIX_ACCOUNT), XKey.generate()) for _ in range(clients)]
        self.artifacts: dict[str, tuple[str, str]] = {}  # kind of artifact -> (location, sha256)
        self.requests: list[Request] = []
        self.windows: list[Window] = []
        self.pings: list[Ping] = []
        self.counts: Counter[str] = Counter()
        self.started: dict[str, float] = {}  # vmid -> when workload_started arrived
        self.stopped: dict[str, dict[str, Any]] = {}  # vmid -> its workload_stopped data (and "at")
        self.names: dict[str, str] = {}  # vmid -> workload name
        self.replied_ok: dict[str, Request] = {}  # vmid -> the deploy that said it started
        self.events_changed = asyncio.Event()
        self.node_started = asyncio.Event()
        self.deadline = 0.0
        self.t0 = time.monotonic()
        self.wall_offset = time.time() - time.monotonic()
        self.killed_agents: list[tuple[float, str, int, bool]] = []
        self.violations: list[Violation] = []
        self.node_died = False
        self.died_at = float("inf")
        self.over = asyncio.Event()  # the node died: the run ends there
        self.stopping = False  # this run has sent the node SIGTERM
        self.watcher: asyncio.Task[None] | None = None

    # -- set-up ----------------------------------------------------------------------------------

    async def start(self) -> None:
        data = await asyncio.to_thread(build_workload, self.work)
        await self.server.start()
        self.events_nc = await connect(self.server.url, "chaos-events")
        await self.events_nc.subscribe("$NEX.events.>", cb=self._on_event)
        await self.events_nc.flush()
        argv = [NEX_BIN, "up", "--state-dir", str(self.state_dir), "--internal-port", "0"]
        argv += ["--pool-size", str(self.pool_size), "--server", self.server.url]
        argv += ["--allow", f"{GATEWAY}:{self.server.port}"]
        with self.log_path.open("ab") as log:
            self.node = await asyncio.create_subprocess_exec(
                *argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        try:
            await asyncio.wait_for(self._node_up(), 60)
        except TimeoutError:
            raise ChaosError(f"the node did not start within 60 s:\n{self.log_tail()}") from None
        self.watcher = asyncio.create_task(self._watch_node())
        self.control_nc = await connect(self.server.url, "chaos-control")
        self.nex = NexClient(self.control_nc, timeout=5, namespace=NAMESPACE)
        self.target = await self.nex.find(self.node_id)
        for key, blob in (("chaos-a", data), ("chaos-b", data + b"\0" * 8)):  # two artifacts: both cache paths
            artifact = await self.nex.upload(blob, key)
            self.artifacts[key] = (artifact.location, artifact.hash)
        script = await self.nex.upload(b"#!/bin/sh\necho not a static ELF\n", "chaos-script")
        self.artifacts["script"] = (script.location, script.hash)

    async def _node_up(self) -> None:
        assert self.node is not None
        while not self.node_started.is_set():
            if self.node.returncode is not None:
                raise ChaosError(f"the node exited with {self.node.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.node_started.wait(), 0.2)

    async def _on_event(self, msg: Msg) -> None:
        try:
            event = msgspec.json.decode(msg.data)
        except msgspec.DecodeError:
            return
        kind, source, data = event.get("type"), event.get("source"), event.get("data") or {}
        if kind == "node_started" and not self.node_id and self.node is not None:
            self.node_id = source
            self.node_started.set()
            return
        if source != self.node_id or not self.node_id:
            return
        vmid = data.get("id", "")
        if kind == "workload_started":
            self.started.setdefault(vmid, time.monotonic())
            self.names[vmid] = data.get("workload_name", "")
        elif kind == "workload_stopped":
            if vmid in self.stopped:
                self.violations.append(
                    Violation("workload_stopped twice", f"{vmid}: {data}", [str(self.stopped[vmid])])
                )
            self.stopped[vmid] = {**data, "at": time.monotonic()}
            self.names.setdefault(vmid, data.get("workload_name", ""))
        self.events_changed.set()

    # -- load ------------------------------------------------------------------------------------

    async def run(self) -> None:
        self.t0 = time.monotonic()
        self.deadline = self.t0 + self.seconds
        clients = [ChaosClient(self, i) for i in range(self.n_clients)]
        for client in clients:
            await client.connect()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._pinger())
            tasks.create_task(self._kill_agents())
            tasks.create_task(self._kill_internal_server())
            tasks.create_task(self._restart_control_server())
            for client in clients:
                tasks.create_task(client.loop())
        for client in clients:
            await client.close()

    def _schedule(self, every: float, phase: float) -> list[float]:
        """Times (from the start) for a fault that comes about every ``every`` seconds, at least once."""
        n = max(1, round(self.seconds / every))
        return [self.seconds * (k + phase) / n + self.rng.uniform(-0.1, 0.1) * self.seconds / n for k in range(n)]

    async def _pause(self, seconds: float) -> bool:
        """Sleep (pacing the load and the faults); False once the run is over (its end, or the node's death)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.over.wait(), max(0.0, min(seconds, self.deadline - time.monotonic())))
        return time.monotonic() < self.deadline and not self.over.is_set()

    async def _pause_until(self, offset: float) -> bool:
        return await self._pause(self.t0 + offset - time.monotonic())

    async def _watch_node(self) -> None:
        """Until this run stops the node: a node that exits, or starts stopping, unasked is a finding
        (the run ends there). It says so in its log before it stops ("Stopping node reason=…"), which
        is read as it grows."""
        assert self.node is not None
        with self.log_path.open("rb") as log:
            while not self.stopping:
                if self.died():
                    return
                if b"Stopping node" in log.read():
                    self.died(gave_up=True)
                    return
                await asyncio.sleep(0.2)

    def died(self, *, gave_up: bool = False) -> bool:
        """Whether the node has exited, or begun to stop, without being asked to (a violation, recorded once)."""
        assert self.node is not None
        if self.node_died or self.stopping or not (gave_up or self.node.returncode is not None):
            return self.node_died
        self.node_died = True
        self.died_at = time.monotonic()
        self.over.set()
        what = "began to stop" if gave_up else f"exited with {self.node.returncode}"
        self.violations.append(Violation("node died", f"the node {what} unasked", self.log_tail(30).splitlines()))
        return True

    async def _pinger(self) -> None:
        nc = await connect(self.server.url, "chaos-pinger")
        subject = f"$NEX.PING.{self.node_id}"
        try:
            while time.monotonic() < self.deadline and not self.over.is_set():
                sent = time.monotonic()
                try:
                    reply = await nc.request(subject, b"", timeout=PING_TIMEOUT)
                    envelope = msgspec.json.decode(reply.data, type=control.ReceivedEnvelope)
                    if envelope.error:
                        raise ValueError(envelope.error)
                    self.pings.append(Ping(sent, time.monotonic() - sent))
                    for window in self.windows:
                        if window.up is not None and window.end is None and sent >= window.up:
                            window.end = time.monotonic()
                except Exception as exc:
                    self.pings.append(Ping(sent, None, type(exc).__name__ + (f": {exc}" if str(exc) else "")))
                await self._pause(sent + PING_EVERY - time.monotonic())
        finally:
            await nc.close()

    async def _kill_agents(self) -> None:
        while await self._pause(self.rng.uniform(1.0, 2.5)):
            agents = await asyncio.to_thread(live_agents, self.state_dir)
            if not agents:
                continue
            vmid, pid = self.rng.choice(sorted(agents.items()))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                busy = vmid in self.started and vmid not in self.stopped
                self.killed_agents.append((time.monotonic(), vmid, pid, busy))
                self.counts["agents killed (running a workload)" if busy else "agents killed (idle)"] += 1

    async def _kill_internal_server(self) -> None:
        conf = str(self.state_dir / "nats" / "internal.conf")
        for offset in self._schedule(self.internal_every, 0.3):
            if not await self._pause_until(offset):
                return
            for pid in await asyncio.to_thread(processes_mentioning, conf):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    self.counts["internal nats-server killed"] += 1

    async def _restart_control_server(self) -> None:
        for n, offset in enumerate(self._schedule(self.control_every, 0.5)):
            if not await self._pause_until(offset):
                return
            how = "SIGTERM" if n % 2 == 0 else "SIGKILL"
            window = Window(how=how, start=time.monotonic(), wall=time.time())
            self.windows.append(window)
            await self.server.stop(signal.SIGTERM if how == "SIGTERM" else signal.SIGKILL)
            await asyncio.sleep(self.rng.uniform(0.3, 1.5))  # down for a while
            await self.server.start()
            window.up = time.monotonic()
            self.counts[f"control nats-server restarted ({how})"] += 1

    # -- the end ---------------------------------------------------------------------------------

    async def stop_everything(self) -> None:
        """Stop every workload still running (each with its deployer's key), then wait for the
        workload_stopped of every workload that started."""
        deadline = time.monotonic() + FINAL_TIMEOUT
        asked: set[str] = set()
        stopper = ChaosClient(self, -1)
        await stopper.connect()
        try:
            while time.monotonic() < deadline:
                try:
                    info = await self.nex.info(self.node_id)
                except NexError as exc:
                    if self.died():
                        return
                    self.violations.append(Violation("info unanswered", f"INFO after the run: {exc}"))
                    await self._pause(0.5)
                    continue
                running = [(m.id, m.workload.name) for m in info.machines if m.id not in asked]
                if not running:
                    break
                stops = []
                for vmid, name in running:
                    asked.add(vmid)
                    owner = int(name[1:].split("-", 1)[0])
                    stops.append(stopper.stop(vmid, name, owner, final=True))
                await asyncio.gather(*stops)
        finally:
            await stopper.close()
        await self.wait_stopped(deadline)

    def ever_started(self) -> set[str]:
        return set(self.started) | set(self.replied_ok)

    async def wait_stopped(self, deadline: float) -> None:
        """Until every workload that started has its workload_stopped, or the node's log says it
        stopped while the control server was down (its event lost: see :meth:`stop_event_lost`)."""
        while time.monotonic() < deadline:
            self.events_changed.clear()
            missing = self.ever_started() - set(self.stopped)
            if not missing or all(self.stop_event_lost(vmid) for vmid in missing) or self.died():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.events_changed.wait(), min(1.0, max(0.01, deadline - time.monotonic())))

    def stop_event_lost(self, vmid: str) -> bool:
        """Whether the node logged the end of ``vmid`` close to a control-server window, where its
        workload_stopped event could be lost (published while this run's listener was not subscribed)."""
        when = self.logged_at("Workload stopped", f"vmid={vmid}")
        return when is not None and self.in_window(when - EVENT_MARGIN, when + EVENT_MARGIN)

    async def stop_node(self) -> int | None:
        assert self.node is not None
        if self.node.returncode is None:
            if not self.died():  # one that stops of its own accord is waited for
                self.stopping = True
                self.node.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.node.wait(), 30)
            except TimeoutError:
                self.violations.append(Violation("node exit", "the node did not exit within 30 s"))
                self.node.kill()
                await self.node.wait()
        self.stopping = True
        return self.node.returncode

    def in_window(self, t0: float, t1: float) -> bool:
        """Whether [t0, t1] meets a control-server window."""
        return any(w.covers(t0, t1) for w in self.windows)

    def undeliverable(self, sent: float) -> bool:
        """Whether a request sent at ``sent`` and never answered may have been lost by NATS: sent while
        the control server was down, or shortly (``SLACK``) before, its reply then due while it was."""
        return any(w.start - SLACK <= sent <= w.until() for w in self.windows)

    def lost_in_window(self, sent: float) -> bool:
        """Whether an unanswered request sent at ``sent`` is given up: undeliverable, and the node has
        been answering again for ``GIVE_UP`` seconds."""
        now = time.monotonic()
        return any(
            w.start - SLACK <= sent <= w.until() and w.end is not None and now > w.end + GIVE_UP for w in self.windows
        )

    def logged_at(self, *needles: str) -> float | None:
        """When (monotonic) the node logged the first line holding every one of ``needles``."""
        if not self.log_path.exists():
            return None
        for line in self.log_path.read_text(errors="replace").splitlines():
            if all(n in line for n in needles):
                with contextlib.suppress(ValueError):
                    hours, minutes, seconds = line.split(" ", 1)[0].split(":")
                    day = time.localtime(self.wall_offset + self.t0)
                    midnight = time.mktime((day.tm_year, day.tm_mon, day.tm_mday, 0, 0, 0, 0, 0, -1))
                    wall = midnight + int(hours) * 3600 + int(minutes) * 60 + float(seconds)
                    return wall - self.wall_offset
        return None

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def log_lines(self, *needles: str, limit: int = 12) -> list[str]:
        """The node's log lines that mention any of ``needles``."""
        needles = tuple(n for n in needles if n)
        if not needles or not self.log_path.exists():
            return []
        found = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if any(n in ln for n in needles)]
        return found[:limit] if len(found) <= limit else [*found[: limit - 2], "…", found[-1]]

    def log_lines_matching(self, pattern: re.Pattern[str]) -> list[str]:
        if not self.log_path.exists():
            return []
        return [line for line in self.log_path.read_text(errors="replace").splitlines() if pattern.search(line)]

    def clock(self, t: float) -> str:
        """A monotonic time as the node's log prints it (local wall clock)."""
        wall = t + self.wall_offset
        return time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall % 1 * 1000):03d}"


class ChaosClient:
    """A requester with its own connection, issuer key and xkey; requests get replies on an inbox of
    its own, so every reply is counted (a second reply to one request is a violation)."""

    def __init__(self, chaos: Chaos, index: int) -> None:
        self.chaos = chaos
        self.index = index
        self.keys = chaos.keys[index] if index >= 0 else chaos.keys[0]
        self.rng = random.Random(chaos.seed * 1000 + index)
        self.inbox = f"_CHAOS.{os.getpid()}.{index + 1}"
        self.pending: dict[str, Request] = {}
        self.tokens = 0
        self.live = asyncio.Semaphore(LIVE_PER_CLIENT)
        self.stops: set[asyncio.Task[None]] = set()

    async def connect(self) -> None:
        self.nc = await connect(self.chaos.server.url, f"chaos-client-{self.index}")
        await self.nc.subscribe(f"{self.inbox}.*", cb=self._on_reply)
        await self.nc.flush()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.close()

    async def _on_reply(self, msg: Msg) -> None:
        request = self.pending.get(msg.subject.rsplit(".", 1)[1])
        if request is None:
            return
        request.replies += 1
        if request.replies > 1:
            self.chaos.violations.append(
                Violation("two replies", f"{request.verb} {request.name} got {request.replies} replies")
            )
            return
        request.replied = time.monotonic()
        if msg.headers and msg.headers.get("Status") == "503":
            request.outcome = "no_responders"
        else:
            try:
                envelope = msgspec.json.decode(msg.data, type=control.ReceivedEnvelope)
            except msgspec.DecodeError as exc:
                request.outcome, request.error = "refused", f"undecodable reply: {exc}"
            else:
                if envelope.error is not None:
                    request.outcome, request.error = "refused", envelope.error
                else:
                    request.outcome = "ok"
                    if request.verb == "deploy":
                        request.vmid = msgspec.json.decode(envelope.data, type=control.RunResponse).id
                        self.chaos.replied_ok[request.vmid] = request  # late or abandoned ones too
                        self.chaos.names[request.vmid] = request.name
        request.done.set()

    async def send(self, request: Request, subject: str, body: bytes, timeout: float) -> Request:
        self.tokens += 1
        token = str(self.tokens)
        self.pending[token] = request
        self.chaos.requests.append(request)
        request.sent, request.wall = time.monotonic(), time.time()
        try:
            await self.nc.publish(subject, body, reply=f"{self.inbox}.{token}")
        except nats.errors.Error as exc:
            request.outcome, request.error = "not_sent", str(exc)
            return request
        if request.cancelled:
            return request  # abandoned: nobody waits (a reply is still counted)
        # Until the reply, the timeout, or (for a request a control-server restart may have lost)
        # GIVE_UP seconds after the node answers again; a reply that comes later still counts.
        while not request.done.is_set() and (remaining := request.sent + timeout - time.monotonic()) > 0:
            if self.chaos.lost_in_window(request.sent) or self.chaos.over.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(request.done.wait(), min(remaining, 0.5))
        if not request.done.is_set():
            request.outcome = "timeout"
        return request

    def _deploy_body(self, name: str, kind: str, keys: RequesterKeys) -> bytes:
        chaos = self.chaos
        assert chaos.target is not None
        location, digest = chaos.artifacts["script" if kind == "refused" else self.rng.choice(["chaos-a", "chaos-b"])]
        env = {"CHAOS_MODE": kind, "CHAOS_HOST": GATEWAY, "CHAOS_PORT": str(chaos.server.port)}
        deploy = workload_request.Deploy(
            location=location, name=name, hash=digest, node_id=chaos.node_id,
            node_xkey=chaos.target.target_xkey, environment=env,
        )  # fmt: skip
        # a stop's JWT must not share the deploy's iat (nex's replay rule): the deploy's is a second back
        return workload_request.deploy_request(deploy, keys.issuer, keys.xkey, issued_at=int(time.time()) - 1)

    async def loop(self) -> None:
        n = 0
        try:
            while time.monotonic() < self.chaos.deadline and not self.chaos.over.is_set():
                n += 1
                if self.rng.random() < CANCEL_RATE:
                    await self.cancelled_deploy(n)
                else:
                    await self.deploy(n)
                await self.chaos._pause(self.rng.uniform(0.05, 0.3))  # pacing (load generation)
        finally:
            if self.stops:
                await asyncio.gather(*self.stops)

    async def deploy(self, n: int) -> None:
        chaos = self.chaos
        kind = self.rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        name = f"c{self.index}-{n}-{kind}"
        await self.live.acquire()
        request = Request("deploy", name, self.index, 0.0, 0.0, kind=kind)
        body = self._deploy_body(name, kind, self.keys)
        await self.send(request, f"$NEX.DEPLOY.{NAMESPACE}.{chaos.node_id}", body, DEPLOY_TIMEOUT)
        if request.outcome == "ok" and kind in LONG:
            task = asyncio.create_task(self._hold_then_stop(request))
            self.stops.add(task)
            task.add_done_callback(self.stops.discard)
            return
        self.live.release()

    async def _hold_then_stop(self, deployed: Request) -> None:
        try:
            await self.chaos._pause(self.rng.uniform(0.1, 3.0))  # the workload runs for a while (load generation)
            await self.stop(deployed.vmid, deployed.name, self.index)
        finally:
            self.live.release()

    async def stop(self, vmid: str, name: str, owner: int, *, final: bool = False) -> Request:
        chaos = self.chaos
        keys = chaos.keys[owner]
        body = workload_request.stop_request(vmid, name, chaos.node_id, keys.issuer, issued_at=int(time.time()))
        request = Request("stop", name, owner, 0.0, 0.0, vmid=vmid, kind="final" if final else "")
        return await self.send(request, f"$NEX.STOP.{NAMESPACE}.{chaos.node_id}", body, STOP_TIMEOUT)

    async def cancelled_deploy(self, n: int) -> None:
        """A deploy whose requester does not wait for the reply: its connection closed at once, or it
        simply stops listening. The node may start the workload all the same."""
        chaos = self.chaos
        name = f"c{self.index}-{n}-xsleep"
        body = self._deploy_body(name, "sleep", self.keys)
        subject = f"$NEX.DEPLOY.{NAMESPACE}.{chaos.node_id}"
        if self.rng.random() < 0.5:
            request = Request("deploy", name, self.index, 0.0, 0.0, kind="sleep", cancelled="abandoned")
            await self.send(request, subject, body, 0)
            chaos.counts["deploys cancelled (abandoned)"] += 1
            return
        try:
            nc = await connect(chaos.server.url, f"chaos-cancel-{self.index}", allow_reconnect=False)
        except Exception:
            chaos.counts["deploys cancelled: no connection (server down)"] += 1
            return
        try:
            inbox = nc.new_inbox()
            await nc.subscribe(inbox)
            await nc.publish(subject, body, reply=inbox)
            await nc.flush(1)
            await asyncio.sleep(self.rng.uniform(0, 0.03))  # half way: the node has it, no reply yet
            chaos.counts["deploys cancelled (connection closed)"] += 1
            chaos.requests.append(
                Request("deploy", name, self.index, time.monotonic(), time.time(), "sleep", cancelled="closed")
            )
        except Exception:
            chaos.counts["deploys cancelled: not sent (server down)"] += 1
        finally:
            with contextlib.suppress(Exception):
                await nc.close()


# -- the verdict -------------------------------------------------------------------------------------


def _percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000  # noqa: E731
    return {"p50": pick(0.5), "p95": pick(0.95), "max": ordered[-1] * 1000, "n": len(ordered)}


def _reason(text: str) -> str:
    """An error reply's reason without its ids, so that equal reasons count together."""
    text = re.sub(r"[0-9a-v]{20}", "<vmid>", text)
    text = re.sub(r"\b\d+(\.\d+)?\b", "N", text)
    return text[:160]


def judge(chaos: Chaos, node_exit: int | None, leaks: dict[str, list[str]], elapsed: float) -> ChaosReport:
    counts = chaos.counts
    violations = chaos.violations
    for window in chaos.windows:
        if window.up is None or window.up + RECONNECT_GRACE >= chaos.died_at:
            continue  # the node's death is the finding
        if window.end is None or window.end - window.up > RECONNECT_GRACE:
            violations.append(
                Violation(
                    "no ping after restart",
                    f"the node did not answer PING within {RECONNECT_GRACE:g} s after the control server "
                    f"came back at {chaos.clock(window.up)}",
                    chaos.log_lines("control", "reconnect", "Reconnect", limit=8),
                )
            )

    refusals: Counter[str] = Counter()
    replies = []
    for r in chaos.requests:
        verb = "final stops" if r.kind == "final" else f"{r.verb}s"
        if r.cancelled:
            if r.outcome in ("ok", "refused"):
                counts[f"cancelled deploys answered anyway: {r.outcome}"] += 1
            continue
        counts[f"{verb} sent"] += 1
        if r.replies > 1:
            counts[f"{verb}: extra replies"] += r.replies - 1
        if r.outcome == "ok":
            counts[f"{verb}: success"] += 1
            if r.verb == "deploy" and r.replied is not None:
                replies.append(r.replied - r.sent)
        elif r.outcome == "refused":
            counts[f"{verb}: error reply"] += 1
            refusals[f"{r.verb}: {_reason(r.error)}"] += 1
            if not r.error.strip():
                violations.append(Violation("error without a reason", f"{r.verb} {r.name} got an empty error"))
        elif r.sent + (DEPLOY_TIMEOUT if r.verb == "deploy" else STOP_TIMEOUT) >= chaos.died_at:
            counts[f"{verb}: unanswered (the node died)"] += 1
        elif chaos.undeliverable(r.sent):
            counts[f"{verb}: not delivered (control server restart)"] += 1
        else:
            what = {
                "timeout": f"no reply within {DEPLOY_TIMEOUT if r.verb == 'deploy' else STOP_TIMEOUT:g} s",
                "no_responders": "no responders (the node was not listening)",
            }.get(r.outcome, f"not sent: {r.error}")
            violations.append(
                Violation(
                    f"{r.verb} unanswered",
                    f"{r.verb} {r.name} ({r.vmid or 'no id'}) sent at {chaos.clock(r.sent)}: {what}",
                    chaos.log_lines(r.name, r.vmid),
                )
            )

    # a success reply is followed by workload_started for its id
    for vmid, r in chaos.replied_ok.items():
        if vmid in chaos.started:
            continue
        if chaos.in_window(r.sent - EVENT_MARGIN, (r.replied or r.sent) + EVENT_MARGIN):
            counts["workload_started lost in a control-server window"] += 1
            continue
        stopped = chaos.stopped.get(vmid)
        violations.append(
            Violation(
                "no workload_started",
                f"deploy {r.name} was answered 'started' as {vmid} at {chaos.clock(r.replied or r.sent)}, but no "
                "workload_started came" + (f" (workload_stopped did: {stopped.get('message')!r})" if stopped else ""),
                chaos.log_lines(vmid, r.name),
            )
        )
    started = chaos.ever_started()
    counts["workloads started"] = len(started)
    counts["workloads stopped (events)"] = len(started & set(chaos.stopped))
    counts["workloads ended with their killed agent"] = sum(
        1 for _, vmid, _, busy in chaos.killed_agents if busy and vmid in chaos.stopped
    )
    for vmid in sorted(started - set(chaos.stopped)):
        name = chaos.names.get(vmid, "")
        if chaos.node_died:  # the node's next run reports them stopped; its death is the finding
            counts["workloads running when the node died"] += 1
            continue
        if chaos.stop_event_lost(vmid):
            counts["workload_stopped lost in a control-server window"] += 1
            continue
        violations.append(
            Violation(
                "no workload_stopped",
                f"workload {name} ({vmid}) started but no workload_stopped came by the end",
                chaos.log_lines(vmid, name),
            )
        )
    codes = Counter(
        f"code {d.get('code')}: {_reason(str(d.get('message', '')))}" for v, d in chaos.stopped.items() if v in started
    )
    for label, n in codes.most_common(6):
        counts[f"workload_stopped {label}"[:90]] = n

    counts["pings sent"] = len(chaos.pings)
    failed = [p for p in chaos.pings if p.latency is None and p.sent + PING_TIMEOUT < chaos.died_at]
    inside = [p for p in failed if chaos.in_window(p.sent, p.sent + PING_TIMEOUT)]
    outside = [p for p in failed if p not in inside]
    counts["pings failed during control-server windows"] = len(inside)
    counts["pings failed outside them"] = len(outside)
    violations += [Violation("ping failed", f"PING sent at {chaos.clock(p.sent)} failed: {p.error}") for p in outside]
    # One fault, one restart: the node's root supervisor gives up (and the node exits 1) after 5
    # restarts in 30 s, so a fault that costs it more than one restart brings the node's death closer.
    crashes = chaos.log_lines_matching(ROOT_RESTART)
    kills = counts["internal nats-server killed"]
    counts["restarts by the node's root supervisor"] = len(crashes)
    if len(crashes) > kills:
        violations.append(
            Violation(
                "restarts beyond the faults",
                f"{kills} internal nats-server kill(s) cost the node's root supervisor {len(crashes)} restarts "
                "(it gives up after 5 within 30 s)",
                [line[:240] for line in crashes],
            )
        )
    if node_exit != 0:
        violations.append(
            Violation("node exit", f"the node exited with {node_exit} after SIGTERM", [chaos.log_tail(20)])
        )
    for kind, found in leaks.items():
        violations.append(Violation("leak", f"{kind} left behind: {found}"))
    errors: Counter[str] = Counter()
    if chaos.log_path.exists():
        for line in chaos.log_path.read_text(errors="replace").splitlines():
            parts = line.split(" ", 2)
            if len(parts) == 3 and parts[1] in ("ERR", "CRT"):
                errors[_reason(parts[2].split("=", 1)[0].rsplit(" ", 1)[0])] += 1
    return ChaosReport(
        seconds=chaos.seconds,
        elapsed=elapsed,
        seed=chaos.seed,
        pool_size=chaos.pool_size,
        clients=chaos.n_clients,
        cpus=os.cpu_count(),
        namespaced=netns.has_capabilities(),
        counts=dict(sorted(counts.items())),
        refusals=dict(refusals.most_common()),
        deploy_reply_ms=_percentiles(replies),
        slowest_deploys=[
            f"{r.name} sent {chaos.clock(r.sent)}: {((r.replied or r.sent) - r.sent) * 1000:.0f} ms, {r.outcome}"
            + (f" ({r.vmid})" if r.vmid else f": {r.error[:100]}" if r.error else "")
            for r in sorted(
                (r for r in chaos.requests if r.verb == "deploy" and r.replied is not None and not r.cancelled),
                key=lambda r: (r.replied or 0) - r.sent,
            )[-5:][::-1]
        ],
        ping_ms=_percentiles([p.latency for p in chaos.pings if p.latency is not None]),
        windows=[
            {
                "how": w.how,
                "at": chaos.clock(w.start),
                "down_s": round((w.up or w.start) - w.start, 3),
                "node_answering_after_s": round(w.end - w.up, 3) if w.end and w.up else None,
            }
            for w in chaos.windows
        ],
        node_exit=node_exit,
        leaks=leaks,
        node_errors=dict(errors.most_common(12)),
        violations=violations,
        node_log=str(chaos.log_path),
    )


def leftovers(state_dir: Path, work: Path, check: Any) -> dict[str, list[str]]:
    """What the stopped node left: processes, host objects (the tests' :class:`LeakCheck`), its
    servers' files (the agents' credentials are in their config), machine directories, journal
    records, mounts."""
    support = leak_helpers()
    found: dict[str, list[str]] = {}
    survivors = support.wait_gone(list(support.processes_mentioning(str(state_dir))), timeout=10)
    if survivors:
        left = support.kill_leftovers(str(state_dir))
        found["processes"] = [f"{pid}: {cmd}" for pid, cmd in left.items()]
    files = {
        "nats-server files (credentials)": sorted(str(p) for p in (state_dir / "nats").glob("**/*")),
        "machine directories": sorted(str(p) for p in state_dir.glob("vm/*/*/*")),
        "journal records": sorted(str(p) for p in state_dir.glob("journal/*")),
        "mounts": [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if str(work) in ln],
    }
    found |= {kind: paths for kind, paths in files.items() if paths}
    found |= check.leaks()
    return found


async def _run(chaos: Chaos) -> ChaosReport:
    began = time.monotonic()
    check = leak_helpers().LeakCheck(chaos.work)
    node_exit: int | None = None
    try:
        await chaos.start()
        chaos.console.print(
            f"chaos: node {chaos.node_id[:12]}… up, pool {chaos.pool_size}, {chaos.n_clients} clients, "
            f"{chaos.seconds:g} s, seed {chaos.seed}"
        )
        await chaos.run()
        if not chaos.node_died:
            await chaos.stop_everything()
        node_exit = await chaos.stop_node()
    finally:
        if chaos.node is not None and chaos.node.returncode is None:
            node_exit = await chaos.stop_node()
        for nc in (getattr(chaos, "control_nc", None), getattr(chaos, "events_nc", None)):
            if nc is not None:
                with contextlib.suppress(Exception):
                    await nc.close()
        await chaos.server.stop()
        if chaos.watcher is not None:
            await chaos.watcher  # it ends once the node is stopped
    leaks = await asyncio.to_thread(leftovers, chaos.state_dir, chaos.work, check)
    return judge(chaos, node_exit, leaks, time.monotonic() - began)


def run_chaos(
    seconds: float,
    work_dir: Path,
    *,
    clients: int = CLIENTS,
    internal_every: float = INTERNAL_EVERY,
    control_every: float = CONTROL_EVERY,
    pool_size: int = POOL,
    seed: int | None = None,
    console: Console | None = None,
) -> ChaosReport:
    """A chaos run of ``seconds`` seconds with its files in ``work_dir``; the report says what broke."""
    console = console or Console(stderr=True)
    seed = seed if seed is not None else random.randrange(1 << 30)
    chaos = Chaos(
        seconds,
        work_dir,
        clients=clients,
        pool_size=pool_size,
        seed=seed,
        console=console,
        internal_every=internal_every,
        control_every=control_every,
    )
    return asyncio.run(_run(chaos))


# -- output ------------------------------------------------------------------------------------------


def render(console: Console, report: ChaosReport) -> None:
    network = "own netns per machine" if report.namespaced else "loopback"
    table = Table(
        title=f"Chaos: {report.seconds:g} s ({report.elapsed:.1f} s in all), {report.clients} clients, pool of "
        f"{report.pool_size}, {report.cpus} CPUs, {network}, seed {report.seed}"
    )
    table.add_column("what")
    table.add_column("count", justify="right")
    for name, value in report.counts.items():
        table.add_row(name, str(value))
    for reason, n in report.refusals.items():
        table.add_row(f"  error: {reason}", str(n))
    for name, value in report.deploy_reply_ms.items():
        table.add_row(f"deploy reply {name}" + (" (ms)" if name != "n" else ""), f"{value:.0f}")
    for name, value in report.ping_ms.items():
        table.add_row(f"ping {name}" + (" (ms)" if name != "n" else ""), f"{value:.0f}")
    for w in report.windows:
        table.add_row(
            f"control server down at {w['at']} ({w['how']}) for {w['down_s']} s; node answering",
            f"+{w['node_answering_after_s']} s",
        )
    for line in report.slowest_deploys:
        table.add_row(f"slow deploy: {line}", "")
    for message, n in report.node_errors.items():
        table.add_row(f"node log ERR: {message}", str(n))
    table.add_row("node exit code after SIGTERM", str(report.node_exit))
    table.add_row("left behind", ", ".join(report.leaks) or "nothing")
    console.print(table)
    if report.ok:
        console.print("[green]every invariant held[/green]")
    else:
        console.print(f"[red]{len(report.violations)} violation(s):[/red]")
        for violation in report.violations:
            console.print(str(violation), markup=False, highlight=False)
    console.print(f"node log: {report.node_log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("CHAOS_SECONDS", "60")))
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--pool-size", type=int, default=POOL)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (kept anyway after a violation)")
    args = parser.parse_args()
    console = Console()
    out = BENCH / "results" / "chaos.json"
    out.parent.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="nex-chaos-"))
    try:
        report = run_chaos(args.seconds, work, clients=args.clients, pool_size=args.pool_size, seed=args.seed)
        render(console, report)
        out.write_text(json.dumps(report.as_dict(), indent=2))
        console.print(f"wrote {out}")
    except BaseException:
        console.print(f"kept {work} (the node's log is node.log)")
        raise
    if args.keep or not report.ok:
        console.print(f"kept {work} (the node's log is node.log)")
    else:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
