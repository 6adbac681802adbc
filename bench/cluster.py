"""A cluster of nodes: placement by auction against a direct deploy, and workloads moved off a node.

Three nats-server processes on loopback ports, joined by routes, with JetStream clustered over them
(as an operator's cluster would be), and three nodes (jailed, the default; a warm pool of 4 each,
tagged zone=a, b, c), each connected to a different server. The client is on server 0. The workload
is a small static binary (built here with ``gcc -static``, uploaded once: each node checks it in an
unmeasured first deploy and serves it from its artifact cache after that) that runs until stopped.

1. Placement. DEPLOYS rounds (env BENCH_DEPLOYS, default 30), each with

   - an auction and a deploy, as ``nex run`` without ``--node`` does: from the start of the auction
     (``$NEX.AUCTION``, bids gathered until 50 ms pass without one, within the client's window of
     0.75 s) through picking the winner (least
     loaded, ties at random), building the request for it (the JWT signed, the environment sealed
     to the winner's xkey), ``$NEX.DEPLOY``, to the run response and to ``workload_started`` as
     the client sees it;
   - a direct deploy: the same request to a known node (the three in turn), from building the
     request to the run response and to ``workload_started``;

   each deploy followed by a stop, and every node's pool full again before the next, so that every
   deploy finds warm machines and every auction nodes with equal loads (so the winners should spread
   evenly over the three: the counts are reported).

   Beside them, in the same run, the limits: one NATS request round trip across the cluster (the
   client on server 0, a plain nats-py responder on server 2), and the auction's own gather window
   (the client's constant, the time of a bare auction, and when the bids arrive within it). Reported:
   auction+deploy p50 / direct p50, and their difference against the window.

2. Moving workloads off a node (recorded as not available, with why, without failing the run, when
   the nodes do not do it, e.g. without a shared workload key):

   - lame duck: two essential workloads deployed to node c, then ``$NEX.LAMEDUCK`` to it; the time
     until ``workload_started`` of each, by name, from another node (within MIGRATE_WAIT), until
     node c stops its copies, and until it exits (and its exit code);
   - death: two essential workloads deployed to node b, which is then SIGKILLed; the time until
     ``workload_started`` of each from another node (within DEATH_WAIT), how many times each was
     started (once is right), and what the events said. This needs the cluster's shared workload key
     (a key of the node config holding an xkey seed, looked up in :class:`nex.config.NodeConfig`):
     without one the nodes cannot open each other's workloads, and it is not measured. With it, the
     nodes send heartbeats every second (else every hour, as in the other benches), and a config key
     for the time after which a silent node is taken for dead, if there is one, is set to DEATH_AFTER_MS.
     Node b is then started again on its state directory (which cleans up what its death left), and
     whether it ran its essential workloads again (a second copy) is recorded.

Everything is stopped however the run ends (nodes with SIGTERM, then SIGKILL after a timeout; the
servers; the temporary directory), and what the nodes left on the host (namespaces, links, cgroups,
fence tables, leases, processes) is checked and reported. The nodes share a CNI network, subnet and
uid range of their own.

Prints tables and writes ``bench/results/cluster.json``. The issue sets no latency target for a
cluster: the numbers are reported against the limits above, not judged. Run as root for namespaces,
cgroups and the fence.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import msgspec
import nats
import nats.errors
from common import NEX, NodeProcess, echo_responder, nats_cluster, percentile, static_binary
from deploy_latency import WORKLOAD, node_id
from deploy_throughput import forget_network, leftovers
from nats.aio.client import Client
from nats.aio.msg import Msg
from rich.console import Console
from rich.table import Table

from nex.api import control, subjects
from nex.client import AUCTION_SETTLE, DISCOVERY_WINDOW, Artifact, NexClient, NexError, RequesterKeys
from nex.config import NodeConfig
from nex.crypto import PREFIX_ACCOUNT, XKey, create_signing_key
from nex.net import netns
from nex.workload import request as workload_request
from nex.workload.placement import pick
from nex.workload.target import goarch

DEPLOYS = int(os.environ.get("BENCH_DEPLOYS", "30"))
POOL = 4
ZONES = ("a", "b", "c")
LAME = "c"  # the node put in lame duck
DEAD = "b"  # the node SIGKILLed
MIGRATE_WAIT = 30.0  # seconds after lame duck for the essential workloads to start elsewhere
DEATH_WAIT = 60.0  # seconds after SIGKILL for them to start elsewhere
DEATH_AFTER_MS = 5_000  # a silent node's time to be taken for dead, if the config has such a key
RTT_ROUNDS = 200
AUCTIONS = 10  # bare auctions timed for the limits
NETWORK = "nexbench-cluster"
CONFIG: dict[str, object] = {
    "machine_pool_size": POOL,
    "cni": {"network_name": NETWORK, "subnet": "10.231.2.0/24"},
    "sandbox": {"uid_base": 0x7102_0000},
}
KEY_FIELD = re.compile(r"(workload|cluster|shared)[\w.]*(key|seed)$")
DEATH_FIELD = re.compile(r"(dead|death|lost|missing|detect|presum|absent|silen|expir)\w*_ms$")


class ClusterNode(NodeProcess):
    """``nex up`` as :class:`NodeProcess` runs it, with a heartbeat interval of choice."""

    def __init__(self, state_dir: Path, server: str, heartbeat: str, *args: str) -> None:
        self.state_dir = state_dir
        self.lines = queue.Queue()
        self.log = []
        self.started = time.perf_counter()
        argv = [NEX, "up", "--state-dir", str(state_dir), "--internal-port", "0", "--server", server]
        argv += ["--heartbeat-interval", heartbeat, *args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()


def config_fields(struct: type = NodeConfig, prefix: str = "") -> dict[str, object]:
    """Every key of the node config (dotted), with its default."""
    found: dict[str, object] = {}
    for field in msgspec.inspect.type_info(struct).fields:  # type: ignore[union-attr]
        path = prefix + field.encode_name
        if isinstance(field.type, msgspec.inspect.StructType):
            found |= config_fields(field.type.cls, path + ".")
        elif field.default is not msgspec.NODEFAULT:
            found[path] = field.default
        else:
            found[path] = None if field.default_factory is msgspec.NODEFAULT else field.default_factory()
    return found


def put(config: dict[str, object], dotted: str, value: object) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        config = config.setdefault(part, {})  # type: ignore[assignment]
    config[last] = value


@dataclass(frozen=True)
class Seen:
    """An event as the client received it."""

    at: float
    type: str
    source: str  # the node that published it
    id: str
    name: str
    message: str


class Events:
    """Every event on ``$NEX.events.>``, in order of arrival; waits for one that matches."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self._changed = asyncio.Event()

    async def on_event(self, msg: Msg) -> None:
        with contextlib.suppress(msgspec.DecodeError, AttributeError, TypeError):
            event = msgspec.json.decode(msg.data)
            data = event.get("data") or {}
            self.seen.append(
                Seen(
                    at=time.perf_counter(),
                    type=str(event.get("type", "")),
                    source=str(event.get("source", "")),
                    id=str(data.get("id", "")),
                    name=str(data.get("workload_name", "")),
                    message=str(data.get("message", "")),
                )
            )
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def first(self, match: Callable[[Seen], bool], since: int, timeout: float) -> Seen | None:
        """The first event from index ``since`` on that ``match``es, waiting up to ``timeout`` s."""
        deadline = time.perf_counter() + timeout
        while True:
            for seen in self.seen[since:]:
                if match(seen):
                    return seen
            since = len(self.seen)
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)


@dataclass
class Bench:
    """What the measurements share: the client on server 0, the nodes, the artifact, the events."""

    nc: Client
    client: NexClient
    keys: RequesterKeys
    events: Events
    ids: dict[str, str]  # zone -> node id
    artifact: Artifact
    auction: control.AuctionRequest

    def zone(self, node: str) -> str:
        return next((zone for zone, nid in self.ids.items() if nid == node), node[:8])

    def body(self, node: control.PingResponse | control.AuctionResponse, name: str, essential: bool, iat: int) -> bytes:
        deploy = workload_request.Deploy(
            location=self.artifact.location, name=name, hash=self.artifact.hash, node_id=node.node_id,
            node_xkey=node.target_xkey, environment={"MODE": "bench"}, essential=essential,
        )  # fmt: skip
        return workload_request.deploy_request(deploy, self.keys.issuer, self.keys.xkey, issued_at=iat)

    async def started(
        self, since: int, timeout: float, *, workload: str = "", name: str = "", not_from: str = ""
    ) -> Seen | None:
        """``workload_started`` of the workload ``workload`` (its id) or named ``name``, from any node
        but ``not_from``."""
        return await self.events.first(
            lambda s: (
                s.type == "workload_started"
                and (not workload or s.id == workload)
                and (not name or s.name == name)
                and s.source != not_from
            ),
            since,
            timeout,
        )

    async def stopped(self, workload: str, since: int, timeout: float) -> Seen | None:
        return await self.events.first(lambda s: s.type == "workload_stopped" and s.id == workload, since, timeout)

    async def pools_full(self, zones: tuple[str, ...] = ZONES, timeout: float = 60) -> None:
        deadline = time.perf_counter() + timeout
        for zone in zones:
            while True:
                info = await self.client.info(self.ids[zone])
                if sum(1 for m in info.pool if m.state == "ready") >= POOL and not info.machines:
                    break
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"node {zone}'s pool did not fill within {timeout:g}s")
                await asyncio.sleep(0.01)  # polling the node's own answer; nothing here is timed

    async def stop(self, workload: str, node: str, name: str, since: int, iat: int | None = None) -> None:
        """Stop a workload and wait for its ``workload_stopped``."""
        body = workload_request.stop_request(workload, name, node, self.keys.issuer, issued_at=iat)
        await self.nc.request(subjects.stop("default", node), body, timeout=30)
        if await self.stopped(workload, since, 30) is None:
            raise RuntimeError(f"no workload_stopped for {workload} on node {self.zone(node)} within 30s")


async def one_deploy(bench: Bench, target: control.PingResponse | None) -> dict[str, object]:
    """One deploy, by auction (``target`` None) or to ``target``, then its stop; its timings in seconds."""
    await bench.pools_full()
    now = int(time.time())  # the stop's JWT must not share the deploy's iat (nex's replay rule)
    since = len(bench.events.seen)
    bids: list[control.AuctionResponse] = []
    start = time.perf_counter()
    if target is None:
        bids = await bench.client.auction(bench.auction)  # NexClient.place: the auction, then pick
        if not bids:
            raise RuntimeError("no node bid in an auction")
        node: control.PingResponse | control.AuctionResponse = pick(bids)
    else:
        node = target
    chosen = time.perf_counter()
    response = await bench.client.deploy(node, bench.body(node, "bench", False, now - 1))
    replied = time.perf_counter()
    seen = await bench.started(since, 30, workload=response.id)
    if seen is None:
        raise RuntimeError(f"no workload_started for {response.id} on node {bench.zone(node.node_id)} within 30s")
    await bench.stop(response.id, node.node_id, "bench", since, iat=now)
    return {
        "node": bench.zone(node.node_id),
        "bids": len(bids),
        "auction": chosen - start,
        "reply": replied - start,
        "started": seen.at - start,
        "after_auction": seen.at - chosen,
    }


def ms(samples: list[float], q: float) -> float:
    return percentile(samples, q) * 1000


def series(rounds: list[dict[str, object]], key: str) -> dict[str, float]:
    samples = [float(r[key]) for r in rounds]  # type: ignore[arg-type]
    return {"p50_ms": ms(samples, 0.5), "p95_ms": ms(samples, 0.95)}


async def placement(bench: Bench) -> dict[str, object]:
    """DEPLOYS rounds of an auction+deploy and a direct deploy (to the nodes in turn)."""
    targets = [await bench.client.find(bench.ids[zone]) for zone in ZONES]
    for target in targets:  # unmeasured: each node checks the artifact once, then serves it from its cache
        await one_deploy(bench, target)
    auctioned, direct = [], []
    for i in range(DEPLOYS):
        auctioned.append(await one_deploy(bench, None))
        direct.append(await one_deploy(bench, targets[i % len(targets)]))
    result: dict[str, object] = {
        "auction_and_deploy": {
            "auction": series(auctioned, "auction"),
            "reply": series(auctioned, "reply"),
            "started": series(auctioned, "started"),
            "after_auction_to_started": series(auctioned, "after_auction"),
        },
        "direct": {"reply": series(direct, "reply"), "started": series(direct, "started")},
        "direct_started_by_node": {
            zone: series([r for r in direct if r["node"] == zone], "started")
            for zone in ZONES
            if any(r["node"] == zone for r in direct)
        },
        "spread": {zone: sum(1 for r in auctioned if r["node"] == zone) for zone in ZONES},
        "bids_per_auction": dict(collections.Counter(str(r["bids"]) for r in auctioned)),
    }
    return result


async def limits(bench: Bench, responder_url: str) -> dict[str, float]:
    """The limits, the nodes idle: a NATS round trip across the cluster, and the auction's window."""
    rtt = []
    with echo_responder(responder_url):
        deadline = time.perf_counter() + 10
        while True:  # until the responder's interest has crossed the routes to server 0
            try:
                await bench.nc.request("bench.echo", b"x", timeout=1)
                break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                if time.perf_counter() > deadline:
                    raise
                await asyncio.sleep(0.05)
        for _ in range(20):  # warm-up
            await bench.nc.request("bench.echo", b"x", timeout=5)
        for _ in range(RTT_ROUNDS):
            start = time.perf_counter()
            await bench.nc.request("bench.echo", b"x", timeout=5)
            rtt.append(time.perf_counter() - start)
    calls, first, last, counts = [], [], [], []
    payload = msgspec.json.encode(bench.auction)
    for _ in range(AUCTIONS):
        start = time.perf_counter()
        await bench.client.auction(bench.auction)
        calls.append(time.perf_counter() - start)
        arrivals = await bid_arrivals(bench.nc, payload, DISCOVERY_WINDOW)
        counts.append(len(arrivals))
        if arrivals:
            first.append(arrivals[0])
            last.append(arrivals[-1])
    return {
        "nats_request_across_cluster_p50_ms": ms(rtt, 0.5),
        "nats_request_across_cluster_p95_ms": ms(rtt, 0.95),
        "auction_window_ms": DISCOVERY_WINDOW * 1000,
        "bare_auction_p50_ms": ms(calls, 0.5),
        "first_bid_p50_ms": ms(first, 0.5) if first else float("nan"),
        "last_bid_p50_ms": ms(last, 0.5) if last else float("nan"),
        "last_bid_max_ms": max(last) * 1000 if last else float("nan"),
        "bids_min": min(counts),
    }


async def bid_arrivals(nc: Client, payload: bytes, window: float) -> list[float]:
    """When each bid of one auction arrived, in seconds from the request."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    arrivals = []
    try:
        start = time.perf_counter()
        await nc.publish(subjects.AUCTION, payload, reply=inbox)
        while (left := start + window - time.perf_counter()) > 0:
            try:
                await sub.next_msg(timeout=left)
            except nats.errors.TimeoutError:
                break
            arrivals.append(time.perf_counter() - start)
    finally:
        await sub.unsubscribe()
    return arrivals


async def deploy_essentials(bench: Bench, zone: str, prefix: str) -> dict[str, str]:
    """Two essential workloads on node ``zone``, started; their ids by name."""
    node = await bench.client.find(bench.ids[zone])
    started = {}
    for i in range(2):
        name = f"{prefix}-{i}"
        since = len(bench.events.seen)
        response = await bench.client.deploy(node, bench.body(node, name, True, int(time.time()) - 1))
        if await bench.started(since, 30, workload=response.id) is None:
            raise RuntimeError(f"no workload_started for {name} on node {zone} within 30s")
        started[name] = response.id
    return started


async def stop_named(bench: Bench, names: set[str]) -> list[str]:
    """Stop every workload of these names that started and has not stopped; what could not be stopped."""
    since = 0
    running: dict[str, Seen] = {}
    for seen in bench.events.seen:
        if seen.name in names and seen.type == "workload_started":
            running[seen.id] = seen
        elif seen.type == "workload_stopped":
            running.pop(seen.id, None)
    problems = []
    for workload, seen in running.items():
        try:
            await bench.client.stop(workload, bench.keys.issuer)
            if await bench.stopped(workload, since, 30) is None:
                problems.append(f"{seen.name} ({workload}): no workload_stopped within 30s")
        except NexError as exc:
            problems.append(f"{seen.name} ({workload}): {exc}")
    return problems


def event_story(bench: Bench, names: set[str], ids: set[str], since: int, start: float) -> list[str]:
    """The events about these workloads from index ``since`` on, as lines (time from ``start``)."""
    return [
        f"+{(s.at - start) * 1000:.0f} ms {s.type} {s.name} on {bench.zone(s.source)}"
        + (f": {s.message}" if s.message else "")
        for s in bench.events.seen[since:]
        if s.name in names or s.id in ids
    ]


async def started_elsewhere(
    bench: Bench, zone: str, original: dict[str, str], since: int, start: float, wait: float, what: str
) -> dict[str, object]:
    """When each of ``original`` (name: workload id, on node ``zone``) started on another node, within
    ``wait`` seconds of ``start`` (what happened then: ``what``); ``not_available`` if one did not."""
    victim = bench.ids[zone]
    moved: dict[str, Seen | None] = {}
    for name in original:
        left = max(0.0, start + wait - time.perf_counter())
        moved[name] = await bench.started(since, left, name=name, not_from=victim)
    result: dict[str, object] = {"node": zone, "workloads": sorted(original)}
    missing = sorted(name for name, seen in moved.items() if seen is None)
    if missing:
        result["not_available"] = (
            f"no workload_started for {', '.join(missing)} from another node within {wait:g}s of {what}"
        )
        return result
    result["to_started_elsewhere_ms"] = {
        name: {"ms": (seen.at - start) * 1000, "node": bench.zone(seen.source)}
        for name, seen in moved.items()
        if seen is not None
    }
    result["all_started_elsewhere_ms"] = max((s.at - start) * 1000 for s in moved.values() if s is not None)
    return result


async def lame_duck(bench: Bench, node: NodeProcess) -> dict[str, object]:
    """Two essential workloads on node LAME, then lame duck: when they run elsewhere, when it exits."""
    victim = bench.ids[LAME]
    original = await deploy_essentials(bench, LAME, "lameduck")
    since = len(bench.events.seen)
    start = time.perf_counter()
    await bench.client.lameduck(victim, deadline=MIGRATE_WAIT + 30)
    result = await started_elsewhere(bench, LAME, original, since, start, MIGRATE_WAIT, f"lame duck on node {LAME}")
    if "not_available" not in result:
        own_stopped: dict[str, float | None] = {}
        for name, workload in original.items():
            seen = await bench.stopped(workload, since, max(0.0, start + MIGRATE_WAIT - time.perf_counter()))
            own_stopped[name] = None if seen is None else (seen.at - start) * 1000
        result["own_copy_stopped_ms"] = own_stopped
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(node.proc.wait, max(0.0, start + MIGRATE_WAIT + 30 - time.perf_counter()))
        result["node_exit_code"] = node.proc.returncode
        if node.proc.returncode is not None:
            result["node_exited_ms"] = (time.perf_counter() - start) * 1000
    result["events"] = event_story(bench, set(original), set(original.values()), since, start)
    result["left_running_problems"] = await stop_named(bench, set(original))
    return result


async def death(bench: Bench, nodes: dict[str, NodeProcess], restart: Callable[[], NodeProcess]) -> dict[str, object]:
    """Two essential workloads on node DEAD, then SIGKILL: when they run elsewhere, how many times."""
    original = await deploy_essentials(bench, DEAD, "death")
    since = len(bench.events.seen)
    start = time.perf_counter()
    nodes[DEAD].proc.kill()
    nodes[DEAD].proc.wait()
    result = await started_elsewhere(bench, DEAD, original, since, start, DEATH_WAIT, f"SIGKILL of node {DEAD}")
    await asyncio.sleep(3)  # a second copy, if any, would start about as soon as the first
    result["times_started_elsewhere"] = {
        name: sum(1 for s in bench.events.seen[since:] if s.type == "workload_started" and s.name == name)
        for name in original
    }
    # node DEAD again on its state directory: it cleans up what its death left, and must not run a second copy
    again = len(bench.events.seen)
    node = restart()
    restarted_id = await asyncio.to_thread(node_id, node)
    await asyncio.sleep(3)
    result["restarted_node_started"] = sorted(
        s.name for s in bench.events.seen[again:] if s.type == "workload_started" and s.source == restarted_id
    )
    result["events"] = event_story(bench, set(original), set(original.values()), since, start)
    result["left_running_problems"] = await stop_named(bench, set(original))
    return result


async def measure(
    urls: list[str],
    data: bytes,
    ids: dict[str, str],
    nodes: dict[str, NodeProcess],
    restart: Callable[[], NodeProcess],
    key_field: str | None,
) -> dict[str, object]:
    nc = await nats.connect(urls[0])
    try:
        events = Events()
        await nc.subscribe("$NEX.events.>", cb=events.on_event)
        await nc.flush()
        client = NexClient(nc, timeout=10, namespace="default")
        keys = RequesterKeys(create_signing_key(PREFIX_ACCOUNT), XKey.generate())
        artifact = await client.upload(data, "bench-cluster")
        auction = control.AuctionRequest(arch=goarch(data), os="linux", workload_types=["native"])  # as nex run asks
        bench = Bench(nc, client, keys, events, ids, artifact, auction)
        results: dict[str, object] = {"placement": await placement(bench)}
        await bench.pools_full()
        results["limits"] = await limits(bench, urls[2])
        results["lame_duck"] = await lame_duck(bench, nodes[LAME])
        if key_field is None:
            results["death"] = {
                "not_available": "the node config has no shared workload key (no key like workload_key or "
                "cluster_key in nex.config.NodeConfig): a dead node's workloads cannot be opened by another"
            }
        else:
            results["death"] = await death(bench, nodes, restart)
        return results
    finally:
        await nc.close()


def stop_node(node: NodeProcess) -> dict[str, object]:
    began = time.perf_counter()
    gone = node.proc.poll() is not None  # it exited on its own (lame duck) or was SIGKILLed
    killed = not gone and node.stop(timeout=30)
    return {
        "exit_code": node.proc.returncode,
        "exited_before_stop": gone,
        "killed_after_sigterm_timeout": killed,
        "stop_s": time.perf_counter() - began,
    }


def _exit_on_sigterm(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)  # so that every finally below runs: nodes, servers, the temp dir


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    console = Console()
    out = Path(__file__).parent / "results" / "cluster.json"
    out.parent.mkdir(exist_ok=True)
    fields = config_fields()
    config = json.loads(json.dumps(CONFIG))
    key_field = next((name for name in fields if KEY_FIELD.search(name)), None)
    death_fields = sorted(name for name in fields if DEATH_FIELD.search(name)) if key_field else []
    if key_field is not None:
        put(config, key_field, XKey.generate().seed)
    for name in death_fields:
        put(config, name, DEATH_AFTER_MS)
    if "state_replicas" in fields:
        config["state_replicas"] = 3  # the records' bucket replicated over the three servers
    heartbeat = "1s" if key_field else "1h"
    every: list[tuple[str, NodeProcess]] = []  # every node process started, in order (a restart is another)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        binary = static_binary(work, WORKLOAD, "workload")
        if binary is None:
            raise SystemExit("gcc with a static libc is needed to build the workload")
        data = binary.read_bytes()
        config_path = work / "node.json"
        config_path.write_text(json.dumps(config))
        stops: dict[str, dict[str, object]] = {}
        with nats_cluster(work) as urls:
            servers = dict(zip(ZONES, urls, strict=True))

            def start(zone: str) -> NodeProcess:
                flags = ("--config", str(config_path), "--tag", f"zone={zone}")
                node = ClusterNode(work / zone, servers[zone], heartbeat, *flags)
                every.append((zone, node))
                return node

            try:
                nodes = {zone: start(zone) for zone in ZONES}
                ids = {zone: node_id(node) for zone, node in nodes.items()}
                measured = asyncio.run(measure(urls, data, ids, nodes, lambda: start(DEAD), key_field))
            except BaseException:
                for zone, node in every:
                    console.print(f"--- node {zone}'s last lines:", markup=False, highlight=False)
                    console.print(node.tail(), markup=False, highlight=False)
                raise
            finally:
                for zone, node in every:
                    stops[f"{zone} (restarted)" if zone in stops else zone] = stop_node(node)
        left: dict[str, list[str]] = collections.defaultdict(list)
        for _, node in every:
            for kind, found in leftovers(node, NETWORK).items():
                left[kind] = sorted(set(left[kind]) | set(found))
        forget_network(NETWORK)
    results: dict[str, object] = {
        "cpus": os.cpu_count(),
        "namespaced": netns.has_capabilities(),
        "artifact_bytes": len(data),
        "deploys": DEPLOYS,
        "pool_size": POOL,
        "targets": None,
        "nodes": {zone: {"node_id": ids[zone], "server": servers[zone]} for zone in ZONES},
        "shared_workload_key": key_field,
        "death_time_keys": dict.fromkeys(death_fields, DEATH_AFTER_MS),
        "heartbeat": heartbeat,
        "state_replicas": config.get("state_replicas"),
        **measured,
        "node_stops": stops,
        "left_behind": dict(left),
    }
    placed = results["placement"]
    assert isinstance(placed, dict)
    auction_started = placed["auction_and_deploy"]["started"]["p50_ms"]
    direct_started = placed["direct"]["started"]["p50_ms"]
    window = DISCOVERY_WINDOW * 1000
    placed["ratio_started_p50"] = auction_started / direct_started
    placed["ratio_reply_p50"] = placed["auction_and_deploy"]["reply"]["p50_ms"] / placed["direct"]["reply"]["p50_ms"]
    placed["difference_started_p50_ms"] = auction_started - direct_started
    placed["difference_beyond_window_ms"] = auction_started - direct_started - window
    report(console, results)
    out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {out}")


def report(console: Console, results: dict[str, object]) -> None:
    network = "own netns per machine" if results["namespaced"] else "loopback"
    placed, limit = results["placement"], results["limits"]
    assert isinstance(placed, dict)
    assert isinstance(limit, dict)
    table = Table(
        title=f"Cluster placement ({results['cpus']} CPUs, {network}, 3 servers, 3 nodes with warm pools of "
        f"{results['pool_size']}, client on server 0, {results['deploys']} rounds)"
    )
    table.add_column("measurement")
    table.add_column("p50 (ms)", justify="right")
    table.add_column("p95 (ms)", justify="right")

    def row(label: str, values: dict[str, float]) -> None:
        table.add_row(label, f"{values['p50_ms']:.1f}", f"{values['p95_ms']:.1f}")

    auctioned, direct = placed["auction_and_deploy"], placed["direct"]
    row("auction: start → winner picked", auctioned["auction"])
    row("auction+deploy: start → run response", auctioned["reply"])
    row("auction+deploy: start → workload_started", auctioned["started"])
    row("  of which: winner → workload_started", auctioned["after_auction_to_started"])
    row("direct: request built → run response", direct["reply"])
    row("direct: request built → workload_started", direct["started"])
    for zone, values in placed["direct_started_by_node"].items():
        row(f"  to node {zone} (server {ZONES.index(zone)})", values)
    table.add_row(
        "limit: NATS request round trip, server 0 → 2",
        f"{limit['nats_request_across_cluster_p50_ms']:.2f}",
        f"{limit['nats_request_across_cluster_p95_ms']:.2f}",
    )
    table.add_row("limit: auction window (the client's constant)", f"{limit['auction_window_ms']:.0f}", "")
    table.add_row("limit: a bare auction (gather, no deploy)", f"{limit['bare_auction_p50_ms']:.1f}", "")
    table.add_row(
        "limit: in it, the first / last bid arrives",
        f"{limit['first_bid_p50_ms']:.1f} / {limit['last_bid_p50_ms']:.1f}",
        "",
    )
    console.print(table)
    console.print(
        f"auction+deploy / direct (workload_started p50): {placed['ratio_started_p50']:.1f}× "
        f"(run response: {placed['ratio_reply_p50']:.1f}×); the difference, "
        f"{placed['difference_started_p50_ms']:.0f} ms, is the auction (it ends {AUCTION_SETTLE * 1000:.0f} ms "
        f"after the last bid, within the {limit['auction_window_ms']:.0f} ms window). No target is set for a "
        "cluster."
    )
    spread = ", ".join(f"node {zone}: {count}" for zone, count in placed["spread"].items())
    bids = ", ".join(f"{n} bids: {count}×" for n, count in sorted(placed["bids_per_auction"].items()))
    console.print(f"auction winners ({results['deploys']} auctions, equal loads): {spread}; {bids}")

    moves = Table(title="Essential workloads moved off a node")
    moves.add_column("measurement")
    moves.add_column("result", justify="right")
    for key, label in (("lame_duck", f"lame duck of node {LAME}"), ("death", f"SIGKILL of node {DEAD}")):
        found = results[key]
        assert isinstance(found, dict)
        if "not_available" in found:
            moves.add_row(f"{label} → running elsewhere", f"not available: {found['not_available']}")
            continue
        for name, moved in found["to_started_elsewhere_ms"].items():
            moves.add_row(f"{label} → {name} started on node {moved['node']}", f"{moved['ms']:.0f} ms")
        moves.add_row(f"{label} → all running elsewhere", f"{found['all_started_elsewhere_ms']:.0f} ms")
        if key == "lame_duck":
            exited = found.get("node_exited_ms")
            moves.add_row(
                f"{label} → node exits (code {found['node_exit_code']})",
                "did not exit" if exited is None else f"{exited:.0f} ms",
            )
        else:
            times = ", ".join(f"{n}: {c}" for n, c in found["times_started_elsewhere"].items())
            moves.add_row(f"{label}: times started elsewhere (1 is right)", times)
            moves.add_row(
                f"{label}: restarted on its state dir, it started",
                ", ".join(found["restarted_node_started"]) or "nothing",
            )
    console.print(moves)
    stops = results["node_stops"]
    assert isinstance(stops, dict)
    console.print(
        "node stops: "
        + ", ".join(
            f"{zone} exit {s['exit_code']}"
            + (" (SIGKILL after the SIGTERM timeout)" if s["killed_after_sigterm_timeout"] else "")
            for zone, s in stops.items()
        )
    )
    left = results["left_behind"]
    assert isinstance(left, dict)
    found = {kind: items for kind, items in left.items() if items}
    console.print(f"left behind by the nodes: {found if found else 'nothing'}")


if __name__ == "__main__":
    main()
