"""Deploy throughput: sustained deploys per second, and their latency, with 8, 32 and 128 requesters.

One node (jailed, the default) with a warm pool of 32, on its own nats-server. Each of C concurrent
requesters loops: build a fresh deploy request (a new JWT, the environment sealed; the client's work,
outside the node), send ``$NEX.DEPLOY``, wait for the run response and the ``workload_started`` event,
then stop the workload (``$NEX.STOP`` with a new JWT whose iat is not the deploy's) and wait for the
stop response. Every deploy is followed by the stop that frees its place, so what is measured is the
node's steady state (deploys, refills, stops and teardowns at once), not its pool draining. Every
requester deploys the same small static binary (built here with ``gcc -static``, uploaded once: the
node checks it once and serves it from its artifact cache), which runs until it is stopped.

Each level runs WARMUP seconds unmeasured, then BENCH_SECONDS measured (default 20):

- deploys/s: successful run responses received in the measured window, per second;
- latency (p50, p99) of the deploys sent in the window: DEPLOY → run response, and DEPLOY →
  ``workload_started`` as a client sees it; and STOP → stop response;
- refusals and failures of the deploys sent in the window, by reason (numbers shown as N): the node
  refuses beyond its backlog ("Node is busy: N deploys in progress"), a deploy may wait for a machine
  and give up, a request may go unanswered;
- where the CPU went in the window (% of one core): the node's main process, its internal nats-server,
  its machines (zygote, jails, agents, workloads), the control nats-server, the requesters, the
  kernel's threads, the rest of the host (other work on a shared machine), and the host in all;
- the ready machines in the pool and the depth of the node's main mailboxes (workloads, pool,
  handshakes, control API), sampled twice a second with ``$NEX.INFO``; its actors' restarts.

Then the requesters finish the cycle they are in and start no other; the bench waits until every
started workload has its ``workload_stopped`` and the pool is full again (what is missing is recorded).

Beside each level, in the same run and just before it (the node idle, its pool full), the limits: NATS
request round trips per second from C concurrent requesters on one connection (the requesters' own)
against a plain echo responder on the same server, and fork+exec+wait of a static binary per second,
one at a time. Deploys/s is reported as a ratio to each.

The node runs on a CNI network, subnet and uid range of its own, so that its 32 warm machines and up to
128 running workloads do not compete for addresses with other nodes on this host (every node with the
default config shares fcnet's 192.168.127.0/24).

Prints a table and writes ``bench/results/deploy_throughput.json``. Run as root for namespaces,
cgroups and the fence.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nats
from common import NodeProcess, echo_server, percentile, static_binary
from deploy_latency import WORKLOAD, node_id
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from rich.console import Console
from rich.table import Table

from nex import ids
from nex.api import control, subjects
from nex.client import Artifact, NexClient, NexError, RequesterKeys
from nex.crypto import PREFIX_ACCOUNT, XKey, create_signing_key
from nex.net import fence, netns
from nex.net.ipam import DEFAULT_ROOT
from nex.node.host import node_stem
from nex.workload import request as workload_request

LEVELS = (8, 32, 128)
POOL = 32
SECONDS = float(os.environ.get("BENCH_SECONDS", "20"))
WARMUP = float(os.environ.get("BENCH_WARMUP", "3"))
LIMIT_SECONDS = float(os.environ.get("BENCH_LIMIT_SECONDS", "3"))
DRAIN_TIMEOUT = 30.0
REQUEST_TIMEOUT = 60.0  # beyond the node's own: 10 s to take a machine, 30 s for the agent
EVENT_TIMEOUT = 30.0
REFUSED_PAUSE = 0.05  # a refused requester waits this long before it tries again
NETWORK = "nexbench-throughput"
CONFIG = {
    "machine_pool_size": POOL,
    "cni": {"network_name": NETWORK, "subnet": "10.231.1.0/24"},
    "sandbox": {"uid_base": 0x7101_0000},
}
RETURNS = "int main(void) { return 0; }\n"
MAILBOXES = ("workloads", "pool", "handshakes", "control-api")  # the node's actors whose queues are sampled
VMID = re.compile(r"\b[0-9a-v]{20}\b")  # a machine's id (an xid)


@dataclass
class Cycle:
    """One requester's deploy, and what became of it."""

    sent: float
    replied: float | None = None  # a successful run response
    started: float | None = None  # workload_started, as the client saw it
    stop_sent: float | None = None
    stopped: float | None = None  # a successful stop response
    failure: str = ""  # the refusal or failure of the deploy, as the node (or the client) put it
    problems: list[str] = field(default_factory=list)  # after a successful deploy


class Events:
    """The node's workload events, as they arrive: when each workload started and stopped."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, float]] = collections.defaultdict(dict)  # type -> vmid -> when
        self.waiting: dict[tuple[str, str], asyncio.Event] = {}

    def event(self, kind: str, vmid: str) -> asyncio.Event:
        return self.waiting.setdefault((kind, vmid), asyncio.Event())

    async def on_event(self, msg: Msg) -> None:
        at = time.perf_counter()
        data = msgspec.json.decode(msg.data)
        kind, vmid = data.get("type", ""), (data.get("data") or {}).get("id", "")
        self.seen[kind].setdefault(vmid, at)
        self.event(kind, vmid).set()

    async def wait(self, kind: str, vmid: str, timeout: float) -> float | None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.event(kind, vmid).wait(), timeout)
        return self.seen[kind].get(vmid)


def shape(reason: str) -> str:
    """A reason with its ids and hashes as ID and its numbers as N, so that equal reasons count together."""
    return re.sub(r"\d+(\.\d+)?", "N", re.sub(r"\b(?=\w*\d)\w{16,}\b", "ID", reason))


class Requesters:
    """C requesters deploying and stopping in a loop on one NATS connection."""

    def __init__(self, nc: Client, node: control.PingResponse, artifact: Artifact, events: Events) -> None:
        self.nc = nc
        self.client = NexClient(nc, timeout=REQUEST_TIMEOUT, namespace="default")
        self.node = node
        self.artifact = artifact
        self.events = events
        self.keys = RequesterKeys(create_signing_key(PREFIX_ACCOUNT), XKey.generate())
        self.cycles: list[Cycle] = []
        self.examples: dict[str, dict[str, str]] = {}  # by a failure's shape: its first request and reply

    async def run(self, concurrency: int, until: float) -> None:
        await asyncio.gather(*(self._loop(until) for _ in range(concurrency)))

    async def _loop(self, until: float) -> None:
        while time.perf_counter() < until:
            cycle = await self._cycle()
            if cycle.failure:
                await asyncio.sleep(REFUSED_PAUSE)

    async def _cycle(self) -> Cycle:
        deploy = workload_request.Deploy(
            location=self.artifact.location, name="bench", hash=self.artifact.hash, node_id=self.node.node_id,
            node_xkey=self.node.target_xkey, environment={"MODE": "bench"},
        )  # fmt: skip
        now = int(time.time())  # the stop's JWT must not share the deploy's iat (nex's replay rule)
        body = workload_request.deploy_request(deploy, self.keys.issuer, self.keys.xkey, issued_at=now - 1)
        cycle = Cycle(sent=time.perf_counter())
        self.cycles.append(cycle)
        try:
            response = await self.client.deploy(self.node, body)
        except NexError as exc:
            cycle.failure = str(exc)
            subject = subjects.deploy("default", self.node.node_id)
            self._example(cycle.failure, subject, body, str(exc))
            return cycle
        cycle.replied = time.perf_counter()
        cycle.started = await self.events.wait("workload_started", response.id, EVENT_TIMEOUT)
        if cycle.started is None:
            cycle.problems.append(f"no workload_started within {EVENT_TIMEOUT:g}s")
        stop = workload_request.stop_request(response.id, "bench", self.node.node_id, self.keys.issuer, issued_at=now)
        subject = subjects.stop("default", self.node.node_id)
        cycle.stop_sent = time.perf_counter()
        try:
            reply = await self.nc.request(subject, stop, timeout=REQUEST_TIMEOUT)
        except NatsError as exc:
            cycle.problems.append(f"stop: {type(exc).__name__} {exc}")
            self._example(cycle.problems[-1], subject, stop, f"{type(exc).__name__} {exc}")
            return cycle
        envelope = msgspec.json.decode(reply.data, type=control.ReceivedEnvelope)
        if envelope.error:
            cycle.problems.append(f"stop refused: {envelope.error}")
            self._example(cycle.problems[-1], subject, stop, reply.data.decode(errors="replace"))
        else:
            cycle.stopped = time.perf_counter()
        return cycle

    def _example(self, what: str, subject: str, request: bytes, reply: str) -> None:
        example = {"subject": subject, "request": request.decode(errors="replace"), "reply": reply}
        self.examples.setdefault(shape(what), example)


def host_busy() -> tuple[float, float]:
    """All CPUs' (busy, total) time so far, in clock ticks."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return sum(values) - idle, sum(values)


@dataclass(frozen=True)
class Proc:
    ppid: int
    own: int  # utime + stime, clock ticks
    reaped: int  # own + cutime + cstime: with the children it has waited for
    cmdline: str


def processes() -> dict[int, Proc]:
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        own = int(fields[11]) + int(fields[12])
        found[int(entry.name)] = Proc(int(fields[1]), own, own + int(fields[13]) + int(fields[14]), cmdline)
    return found


class CpuShares:
    """Where the CPU went between two samples: the node's main process, its internal nats-server, its
    machines (zygote, jails, agents, workloads), the control nats-server, this process, the kernel's
    threads (network namespaces are torn down by kworkers), the rest.

    A process of the node's tree that ended in between was waited for by its parent, whose children's
    time then holds all of its time: the part it had used before the first sample is taken off.
    """

    def __init__(self, node_pid: int, server_port: int) -> None:
        self.node_pid = node_pid
        self.server_port = server_port
        self.before = processes()
        self.host_before = host_busy()
        self.started = time.perf_counter()

    def _tree(self, procs: dict[int, Proc]) -> set[int]:
        children: dict[int, list[int]] = collections.defaultdict(list)
        for pid, proc in procs.items():
            children[proc.ppid].append(pid)
        tree, todo = set(), [self.node_pid]
        while todo:
            pid = todo.pop()
            if pid in procs and pid not in tree:
                tree.add(pid)
                todo += children[pid]
        return tree

    def shares(self) -> dict[str, float]:
        """% of one core, by part, since this was made."""
        after, host_after = processes(), host_busy()
        elapsed = time.perf_counter() - self.started
        tick = os.sysconf("SC_CLK_TCK")

        def own(pid: int) -> float:
            if pid not in after:
                return 0.0
            return (after[pid].own - (self.before[pid].own if pid in self.before else 0)) / tick

        tree_now, tree_then = self._tree(after), self._tree(self.before)
        tree = sum(after[p].reaped - (self.before[p].reaped if p in self.before else 0) for p in tree_now)
        tree -= sum(self.before[p].reaped for p in tree_then - tree_now)
        internal = sum(own(p) for p in tree_now if "nats-server" in after[p].cmdline)
        main = own(self.node_pid)
        control_server = sum(
            own(p)
            for p, proc in after.items()
            if "nats-server" in proc.cmdline and f"-p {self.server_port}" in proc.cmdline
        )
        client = own(os.getpid())
        kernel = sum(own(p) for p, proc in after.items() if p == 2 or proc.ppid == 2)
        parts = {
            "node main process": main,
            "node internal nats-server": internal,
            "machines (zygote, jails, agents, workloads)": tree / tick - main - internal,
            "control nats-server": control_server,
            "bench client (requesters)": client,
            "kernel threads (kworkers: netns teardown, …)": kernel,
        }
        busy = (host_after[0] - self.host_before[0]) / tick
        parts["everything else on the host"] = busy - sum(parts.values())
        parts["host, all of it"] = busy
        return {name: 100 * value / elapsed for name, value in parts.items()}


def leftovers(node: NodeProcess, network: str) -> dict[str, list[str]]:
    """What the node (stopped) left on the host: its machines' namespaces, links, cgroups, leases and
    processes (machines are known by the ids in its log), its gateway link and its fence table."""
    node.tail(0)  # moves what the reader has queued into node.log
    stem = node_stem(node.state_dir)
    shorts = {ids.short(vmid) for _, line in node.log for vmid in re.findall(r"vmid=(\w+)", line)}
    netns_dir = Path("/run/netns")
    names = set(os.listdir(netns_dir)) if netns_dir.is_dir() else set()
    links = set(os.listdir("/sys/class/net"))
    cgroup = Path("/sys/fs/cgroup")
    lease_dir = DEFAULT_ROOT / network
    leases = [p.name for p in lease_dir.iterdir() if p.name[0].isdigit()] if lease_dir.is_dir() else []
    state = str(node.state_dir)
    return {
        "netns": sorted(shorts & names),
        "links": sorted(link for link in links if link[:12] in shorts or link == f"{stem}g"),
        "cgroups": sorted(str(p) for short in shorts for p in [*cgroup.glob(short), *cgroup.glob(f"*/{short}")]),
        "nft_tables": [f"inet {name}" for name in fence.tables(stem)],
        "leases": sorted(leases),
        "processes": sorted(
            f"{pid} {proc.cmdline[:120]}" for pid, proc in processes().items() if state in proc.cmdline
        ),
    }


def forget_network(network: str) -> None:
    """Remove the bench's lease directory if no lease is left in it (only its lock and last address)."""
    lease_dir = DEFAULT_ROOT / network
    if lease_dir.is_dir() and all(not p.name[0].isdigit() for p in lease_dir.iterdir()):
        shutil.rmtree(lease_dir)


async def echo_rate(nc: Client, concurrency: int, seconds: float) -> float:
    """NATS request round trips per second from ``concurrency`` requesters against the echo responder."""
    done = 0

    async def loop(until: float) -> None:
        nonlocal done
        while time.perf_counter() < until:
            await nc.request("bench.echo", b"x", timeout=5)
            done += 1

    await asyncio.gather(*(loop(time.perf_counter() + 0.5) for _ in range(concurrency)))  # warm-up
    done = 0
    start = time.perf_counter()
    await asyncio.gather(*(loop(start + seconds) for _ in range(concurrency)))
    return done / (time.perf_counter() - start)


def fork_exec_rate(binary: Path, seconds: float) -> float:
    """fork+exec+wait of ``binary`` (which exits at once) per second, one at a time."""
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        pid = os.posix_spawn(str(binary), [str(binary)], {})
        os.waitpid(pid, 0)
        count += 1
    return count / (time.perf_counter() - start)


async def pool_state(client: NexClient, node: str) -> tuple[int, int]:
    """(ready machines in the pool, running workloads) as the node reports them."""
    info = await client.info(node)
    return sum(1 for m in info.pool if m.state == "ready"), len(info.machines)


async def settle(client: NexClient, node: str, events: Events, timeout: float) -> dict[str, object]:
    """Wait until every started workload has stopped and the pool is full; what is still missing."""
    deadline = time.perf_counter() + timeout
    while True:
        unstopped = sorted(set(events.seen["workload_started"]) - set(events.seen["workload_stopped"]))
        ready, running = await pool_state(client, node)
        if (not unstopped and ready >= POOL and running == 0) or time.perf_counter() > deadline:
            return {"unstopped": unstopped, "pool_ready": ready, "running": running}
        await asyncio.sleep(0.1)  # polling the node's own answer; nothing here is timed


def summarize(requesters: Requesters, start: float, end: float) -> dict[str, object]:
    window = [c for c in requesters.cycles if start <= c.sent < end]
    ok = [c for c in window if c.replied is not None]
    replies = [c.replied - c.sent for c in ok if c.replied is not None]
    started = [c.started - c.sent for c in ok if c.started is not None]
    gap = [c.started - c.replied for c in ok if c.started is not None and c.replied is not None]
    stops = [c.stopped - c.stop_sent for c in ok if c.stopped is not None and c.stop_sent is not None]
    refusals = collections.Counter(shape(c.failure) for c in window if c.failure)
    problems = collections.Counter(shape(p) for c in window for p in c.problems)
    completed = sum(1 for c in requesters.cycles if c.replied is not None and start <= c.replied < end)

    def ms(samples: list[float], q: float) -> float | None:
        return percentile(samples, q) * 1000 if samples else None

    return {
        "deploys_per_s": completed / (end - start),
        "deploys_sent": len(window),
        "deploys_ok": len(ok),
        "reply_p50_ms": ms(replies, 0.5),
        "reply_p99_ms": ms(replies, 0.99),
        "started_p50_ms": ms(started, 0.5),
        "started_p99_ms": ms(started, 0.99),
        "reply_to_started_p50_ms": ms(gap, 0.5),
        "reply_to_started_p99_ms": ms(gap, 0.99),
        "stop_p50_ms": ms(stops, 0.5),
        "stop_p99_ms": ms(stops, 0.99),
        "refusals": dict(refusals),
        "problems_after_deploy": dict(problems),
        "refusals_whole_level": dict(collections.Counter(shape(c.failure) for c in requesters.cycles if c.failure)),
    }


async def run_levels(url: str, port: int, node: NodeProcess, nid: str, data: bytes, returns: Path) -> dict[str, object]:
    nc = await nats.connect(url)
    events = Events()
    await nc.subscribe("$NEX.events.default.*", cb=events.on_event)
    await nc.flush()
    client = NexClient(nc, timeout=10, namespace="default")
    target = await client.find(nid)
    artifact = await client.upload(data, "bench-throughput")
    levels: dict[str, object] = {}
    try:
        for concurrency in LEVELS:
            await settle(client, nid, events, DRAIN_TIMEOUT)  # the previous level's refill, off the limits
            limits = {
                "nats_requests_per_s": await echo_rate(nc, concurrency, LIMIT_SECONDS),
                "fork_exec_per_s": await asyncio.to_thread(fork_exec_rate, returns, LIMIT_SECONDS / 2),
            }
            requesters = Requesters(nc, target, artifact, events)
            begin = time.perf_counter()
            start, end = begin + WARMUP, begin + WARMUP + SECONDS
            run = asyncio.create_task(requesters.run(concurrency, end))
            await asyncio.sleep(max(0.0, start - time.perf_counter()))
            cpu = CpuShares(node.proc.pid, port)
            ready, mailboxes = [], collections.Counter[str]()
            while time.perf_counter() < end:  # the pool's ready machines and the node's mailboxes, twice a second
                info = await client.info(nid)
                ready.append(sum(1 for m in info.pool if m.state == "ready"))
                for actor in info.actors:
                    if actor.name in MAILBOXES and actor.mailbox:
                        depth = int(actor.mailbox.split("/")[0])
                        mailboxes[actor.name] = max(mailboxes[actor.name], depth)
                await asyncio.sleep(min(0.5, max(0.0, end - time.perf_counter())))
            shares = cpu.shares()
            drain_start = time.perf_counter()
            await run
            drained = await settle(client, nid, events, DRAIN_TIMEOUT)
            level = summarize(requesters, start, end)
            level.update(
                limits=limits,
                cpu_pct_of_one_core=shares,
                pool_ready_samples=ready,
                mailbox_max={name: mailboxes[name] for name in MAILBOXES},
                actor_restarts={a.name: a.restarts for a in (await client.info(nid)).actors if a.restarts},
                measured_wall_clock=[
                    time.strftime("%H:%M:%S", time.localtime(time.time() - (time.perf_counter() - t)))
                    for t in (start, end)
                ],
                drain_s=time.perf_counter() - drain_start,
                after_drain=drained,
                failure_examples=requesters.examples,
            )
            rate = float(level["deploys_per_s"])  # type: ignore[arg-type]
            level["ratio_to_nats_requests"] = rate / limits["nats_requests_per_s"]
            level["ratio_to_fork_exec"] = rate / limits["fork_exec_per_s"]
            levels[str(concurrency)] = level
    finally:
        await nc.close()
    return levels


def node_warnings(node: NodeProcess) -> dict[str, dict[str, object]]:
    """The node's warning and error lines, by level and message (without its fields): how many, the
    first one in full, and every line of the log that names the machine it names (its story)."""
    node.tail(0)  # moves what the reader has queued into node.log
    lines = [line.rstrip("\n") for _, line in node.log]
    found: dict[str, dict[str, object]] = {}
    for line in lines:
        match = re.match(r"\d\d:\d\d:\d\d\.\d{3} (WRN|ERR|CRT) (.*)", line)
        if match is None:
            continue
        message = re.split(r" \w+=", match[2], maxsplit=1)[0]
        key = shape(f"{match[1]} {VMID.sub('VMID', message)}")
        if key in found:
            found[key]["count"] = int(str(found[key]["count"])) + 1
            continue
        vmids = set(VMID.findall(line))
        story = [other for other in lines if vmids and any(vmid in other for vmid in vmids)]
        found[key] = {"count": 1, "example": line, "machine_log": story[:60]}
    return found


def main() -> None:
    console = Console()
    out = Path(__file__).parent / "results" / "deploy_throughput.json"
    out.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        binary = static_binary(work, WORKLOAD, "workload")
        returns = static_binary(work, RETURNS, "returns")
        if binary is None or returns is None:
            raise SystemExit("gcc with a static libc is needed to build the workload")
        data = binary.read_bytes()
        config = work / "node.json"
        config.write_text(json.dumps(CONFIG))
        with echo_server(store=work / "js") as (url, port):
            node = NodeProcess(work / "node", url, "--config", str(config))
            stopped = {}
            try:
                nid = node_id(node)
                levels = asyncio.run(run_levels(url, port, node, nid, data, returns))
            except Exception:
                console.print(node.tail(), markup=False, highlight=False)
                raise
            finally:
                began = time.perf_counter()
                if node.stop():
                    stopped["killed_after_sigterm_timeout"] = True
                stopped |= {"exit_code": node.proc.returncode, "stop_s": time.perf_counter() - began}
            warnings = node_warnings(node)
            left = leftovers(node, NETWORK)
            forget_network(NETWORK)
    results: dict[str, object] = {
        "cpus": os.cpu_count(),
        "namespaced": netns.has_capabilities(),
        "artifact_bytes": len(data),
        "pool_size": POOL,
        "seconds": SECONDS,
        "warmup_s": WARMUP,
        "limit_seconds": LIMIT_SECONDS,
        "levels": levels,
        "node_stop": stopped,
        "node_warnings": warnings,
        "left_behind": left,
    }
    report(console, results)
    out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {out}")


def report(console: Console, results: dict[str, object]) -> None:
    network = "own netns per machine" if results["namespaced"] else "loopback"
    size = int(str(results["artifact_bytes"])) / 1024
    levels = results["levels"]
    assert isinstance(levels, dict)
    table = Table(
        title=f"Deploy throughput ({results['cpus']} CPUs, {network}, {size:.0f} KiB static binary, warm pool of "
        f"{results['pool_size']}, {results['seconds']:g} s per level after {results['warmup_s']:g} s warm-up)"
    )
    table.add_column("measurement")
    for concurrency in levels:
        table.add_column(f"{concurrency} requesters", justify="right")

    def row(label: str, key: str, fmt: str = "{:.1f}") -> None:
        values = [levels[c][key] for c in levels]
        table.add_row(label, *("—" if v is None else fmt.format(v) for v in values))

    row("deploys/s (successful run responses)", "deploys_per_s")
    row("deploys sent / succeeded", "deploys_sent", "{}")
    table.add_row("", *(f"{levels[c]['deploys_ok']} ok" for c in levels))
    row("DEPLOY → run response p50 (ms)", "reply_p50_ms")
    row("DEPLOY → run response p99 (ms)", "reply_p99_ms")
    row("DEPLOY → workload_started p50 (ms)", "started_p50_ms")
    row("DEPLOY → workload_started p99 (ms)", "started_p99_ms")
    row("run response → workload_started p50 (ms)", "reply_to_started_p50_ms")
    row("run response → workload_started p99 (ms)", "reply_to_started_p99_ms")
    row("STOP → stop response p50 (ms)", "stop_p50_ms")
    row("STOP → stop response p99 (ms)", "stop_p99_ms")
    table.add_row(
        "ready machines in the pool: min / median / max",
        *(
            f"{min(r)} / {percentile(r, 0.5)} / {max(r)}" if (r := levels[c]["pool_ready_samples"]) else "—"
            for c in levels
        ),
    )
    first = next(iter(levels.values()))
    for part in first["cpu_pct_of_one_core"]:
        table.add_row(f"CPU, % of one core: {part}", *(f"{levels[c]['cpu_pct_of_one_core'][part]:.0f}" for c in levels))
    table.add_row(
        "limit: NATS round trips/s, same concurrency",
        *(f"{levels[c]['limits']['nats_requests_per_s']:.0f}" for c in levels),
    )
    table.add_row(
        "limit: fork+exec/s of a static binary", *(f"{levels[c]['limits']['fork_exec_per_s']:.0f}" for c in levels)
    )
    row("deploys/s ÷ NATS round trips/s", "ratio_to_nats_requests", "{:.4f}")
    row("deploys/s ÷ fork+exec/s", "ratio_to_fork_exec", "{:.4f}")
    reasons = sorted({r for c in levels for r in levels[c]["refusals"]})
    for reason in reasons:
        table.add_row(f"refused: {reason}", *(str(levels[c]["refusals"].get(reason, 0)) for c in levels))
    problems = sorted({p for c in levels for p in levels[c]["problems_after_deploy"]})
    for problem in problems:
        table.add_row(
            f"after deploy: {problem}", *(str(levels[c]["problems_after_deploy"].get(problem, 0)) for c in levels)
        )
    if not reasons:
        table.add_row("refusals", *("0" for _ in levels))
    table.add_row(
        f"max mailbox depth: {' / '.join(MAILBOXES)}",
        *(" / ".join(str(levels[c]["mailbox_max"][name]) for name in MAILBOXES) for c in levels),
    )
    table.add_row("actor restarts", *(str(levels[c]["actor_restarts"] or 0) for c in levels))
    table.add_row(
        "after drain: unstopped / pool ready / running",
        *(
            f"{len(levels[c]['after_drain']['unstopped'])} / {levels[c]['after_drain']['pool_ready']} / "
            f"{levels[c]['after_drain']['running']}"
            for c in levels
        ),
    )
    console.print(table)
    stop = results["node_stop"]
    assert isinstance(stop, dict)
    console.print(f"node stopped with SIGTERM in {stop['stop_s']:.1f} s, exit code {stop['exit_code']}")
    left = results["left_behind"]
    assert isinstance(left, dict)
    found = {kind: names for kind, names in left.items() if names}
    console.print(f"left behind by the node: {found or 'nothing'}", markup=False, highlight=False)
    warnings = results["node_warnings"]
    assert isinstance(warnings, dict)
    for key, entry in warnings.items():
        console.print(f"node log ×{entry['count']}: {key}\n    e.g. {entry['example']}", markup=False, highlight=False)
        for line in entry["machine_log"]:
            console.print(f"      {line}", markup=False, highlight=False)


if __name__ == "__main__":
    main()
