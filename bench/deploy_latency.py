"""Deploy latency: from sending ``$NEX.DEPLOY`` to receiving ``workload_started``, on a warm pool.

The workload is a 1 MiB static binary (built here with ``gcc -static``, padded to 1 MiB) that runs
until it is stopped. Two nodes run side by side on the same server, one with the jail (the default)
and one without (``--no-sandbox``), and every round deploys to each in turn, so that the jail's cost
is measured against the same deploy without it, under the same load. Two series of DEPLOYS rounds:

- new artifact: before each round (outside the timing) a different artifact is uploaded (8 bytes
  appended to the binary, which an ELF loader ignores), so the node downloads and checks every one;
- same artifact: every round deploys the same one, which the node has verified before and serves
  from its artifact cache (it still looks the object up).

Each round builds a fresh request (signing and sealing are the client's, outside the timing), sends
it, and times

- the run response (the node's answer: every check done, the agent has started the workload), and
- the ``workload_started`` event as a client sees it (what the target is about),

then stops the workload and waits until the pool is full again, so every deploy finds a warm machine.

Beside them, in the same run, the limits of the steps the node cannot avoid: one NATS request
round trip, reading the 1 MiB object from an object store and writing it to another, its sha256,
and fork+exec of a static binary.

Prints a table and writes ``bench/results/deploy_latency.json``. Targets on 2 cores: workload_started
p50 ≤ 25 ms, and the jail adds at most 3 ms to it. Run as root for namespaces, cgroups and the fence.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import msgspec
import nats
from common import NodeProcess, echo_server, percentile, static_binary, time_fork_exec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ObjectStoreConfig
from rich.console import Console
from rich.table import Table

from nex.client import NexClient, RequesterKeys
from nex.crypto import PREFIX_ACCOUNT, XKey, create_signing_key
from nex.net import netns
from nex.workload import request as workload_request

DEPLOYS = int(os.environ.get("BENCH_DEPLOYS", "30"))
POOL = 4
SIZE = 1 << 20
TARGETS = {"started_p50_ms": 25.0, "jail_cost_p50_ms": 3.0}
MODES = {"jail": (), "no_sandbox": ("--no-sandbox",)}
WORKLOAD = """
#include <signal.h>
#include <unistd.h>
static void done(int sig) { (void)sig; _exit(0); }
int main(void) { signal(SIGTERM, done); for (;;) pause(); }
"""
RETURNS = "int main(void) { return 0; }\n"


def one_mib_workload(work: Path) -> Path:
    """The workload, padded so that the file is 1 MiB (within a page)."""
    base = static_binary(work, WORKLOAD, "workload-base")
    if base is None:
        raise SystemExit("gcc with a static libc is needed to build the workload")
    pad = max(1, SIZE - base.stat().st_size)
    binary = static_binary(work, WORKLOAD, "workload", pad=pad)
    assert binary is not None
    return binary


async def wait_pool_full(client: NexClient, node_id: str) -> None:
    while True:
        info = await client.info(node_id)
        if sum(1 for m in info.pool if m.state == "ready") >= POOL:
            return
        await asyncio.sleep(0.01)  # polling the node's own answer; nothing here is timed


async def deploys(url: str, data: bytes, node_ids: dict[str, str], *, fresh: bool) -> dict[str, dict[str, list[float]]]:
    """DEPLOYS rounds, each deploying to every node in turn; ``fresh``: a different artifact each
    time, else the same one. Samples by node (its key in ``node_ids``)."""
    nc = await nats.connect(url)
    client = NexClient(nc, timeout=10, namespace="default")
    keys = RequesterKeys(create_signing_key(PREFIX_ACCOUNT), XKey.generate())
    nodes = {mode: await client.find(node_id) for mode, node_id in node_ids.items()}
    artifact = await client.upload(data, "bench")
    started: dict[str, float] = {}
    events: dict[tuple[str, str], asyncio.Event] = {}

    def event(kind: str, vmid: str) -> asyncio.Event:
        return events.setdefault((kind, vmid), asyncio.Event())

    async def on_event(msg: Msg) -> None:
        data = msgspec.json.decode(msg.data)
        vmid = data["data"]["id"]
        if data["type"] == "workload_started":
            started[vmid] = time.perf_counter()
        event(data["type"], vmid).set()

    await nc.subscribe("$NEX.events.default.*", cb=on_event)
    await nc.flush()
    samples = {mode: {"reply": [], "started": []} for mode in nodes}
    for round_, (mode, node) in enumerate((m, n) for _ in range(DEPLOYS) for m, n in nodes.items()):
        for other in nodes.values():  # the other node's refill must not run during this deploy
            await wait_pool_full(client, other.node_id)
        if fresh:
            artifact = await client.upload(data + round_.to_bytes(8, "little"), "bench")
        deploy = workload_request.Deploy(
            location=artifact.location, name="bench", hash=artifact.hash, node_id=node.node_id,
            node_xkey=node.target_xkey, environment={"MODE": "bench"},
        )  # fmt: skip
        now = int(time.time())  # the stop's JWT must not share the deploy's iat (nex's replay rule)
        body = workload_request.deploy_request(deploy, keys.issuer, keys.xkey, issued_at=now - 1)
        sent = time.perf_counter()
        response = await client.deploy(node, body)
        replied = time.perf_counter()
        await asyncio.wait_for(event("workload_started", response.id).wait(), 30)
        samples[mode]["reply"].append(replied - sent)
        samples[mode]["started"].append(started[response.id] - sent)
        stop = workload_request.stop_request(response.id, "bench", node.node_id, keys.issuer, issued_at=now)
        await nc.request(f"$NEX.STOP.default.{node.node_id}", stop, timeout=30)
        await asyncio.wait_for(event("workload_stopped", response.id).wait(), 30)
    await nc.close()
    return samples


async def store_limits(url: str, data: bytes, n: int = 20) -> dict[str, list[float]]:
    """Reading the artifact from one object store and writing it to another, as the node does."""
    nc: Client = await nats.connect(url)
    js = nc.jetstream()
    source = await js.create_object_store("BENCHSRC", config=ObjectStoreConfig())
    await source.put("artifact", data)
    request, get, put = [], [], []
    for i in range(n):
        start = time.perf_counter()
        await nc.request("bench.echo", b"x", timeout=5)
        request.append(time.perf_counter() - start)
        start = time.perf_counter()
        got = (await source.get("artifact")).data or b""
        get.append(time.perf_counter() - start)
        start = time.perf_counter()
        target = await js.create_object_store(f"BENCHDST{i}", config=ObjectStoreConfig())
        await target.put("artifact", got)
        put.append(time.perf_counter() - start)
        await js.delete_object_store(f"BENCHDST{i}")
    await js.delete_object_store("BENCHSRC")
    await nc.close()
    return {"request": request, "get": get, "put": put}


def node_id(node: NodeProcess) -> str:
    """The node's id, from its "Node is ready" line (once it is ready)."""
    node.wait_line("Node is ready")
    for _, line in reversed(node.log):
        if "Node is ready" in line:
            return line.split("node=", 1)[1].split()[0]
    raise RuntimeError("no node id in the node's log")


def summary(samples: dict[str, list[float]]) -> dict[str, float]:
    return {
        "reply_p50_ms": percentile(samples["reply"], 0.5) * 1000,
        "reply_p95_ms": percentile(samples["reply"], 0.95) * 1000,
        "started_p50_ms": percentile(samples["started"], 0.5) * 1000,
        "started_p95_ms": percentile(samples["started"], 0.95) * 1000,
    }


def time_sha256(data: bytes, n: int = 50) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    console = Console()
    out = Path(__file__).parent / "results" / "deploy_latency.json"
    out.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        binary = one_mib_workload(work)
        data = binary.read_bytes()
        with echo_server(store=work / "js") as (url, _):
            nodes = {
                mode: NodeProcess(work / mode, url, "--pool-size", str(POOL), *flags) for mode, flags in MODES.items()
            }
            try:
                ids = {mode: node_id(node) for mode, node in nodes.items()}
                fresh = asyncio.run(deploys(url, data, ids, fresh=True))
                same = asyncio.run(deploys(url, data, ids, fresh=False))
            except Exception:
                for node in nodes.values():
                    console.print(node.tail(), markup=False, highlight=False)
                raise
            finally:
                for node in nodes.values():
                    node.stop()
            stores = asyncio.run(store_limits(url, data))
        returns = static_binary(work, RETURNS, "returns")
        assert returns is not None
        limits = {
            "nats_request_p50_ms": percentile(stores["request"], 0.5) * 1000,
            "object_get_1mib_p50_ms": percentile(stores["get"], 0.5) * 1000,
            "object_put_1mib_p50_ms": percentile(stores["put"], 0.5) * 1000,
            "sha256_1mib_p50_ms": percentile(time_sha256(data), 0.5) * 1000,
            "fork_exec_static_p50_ms": percentile(time_fork_exec(returns), 0.5) * 1000,
        }
    results: dict[str, object] = {
        "cpus": os.cpu_count(),
        "namespaced": netns.has_capabilities(),
        "artifact_bytes": len(data),
        "deploys": DEPLOYS,
        "pool_size": POOL,
        "targets": TARGETS,
        "new_artifact": {mode: summary(series) for mode, series in fresh.items()},
        "same_artifact": {mode: summary(series) for mode, series in same.items()},
        "limits": limits,
    }
    results["jail_cost_p50_ms"] = {
        key: results[key]["jail"]["started_p50_ms"] - results[key]["no_sandbox"]["started_p50_ms"]  # type: ignore[index]
        for key in ("new_artifact", "same_artifact")
    }
    report(console, results)
    out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {out}")


def report(console: Console, results: dict[str, object]) -> None:
    network = "own netns per machine" if results["namespaced"] else "loopback"
    size = int(str(results["artifact_bytes"])) / (1 << 20)
    table = Table(
        title=f"Deploy latency ({results['cpus']} CPUs, {network}, {size:.2f} MiB static binary, "
        f"warm pool of {results['pool_size']}, {results['deploys']} deploys)"
    )
    table.add_column("measurement")
    table.add_column("p50 (ms)", justify="right")
    table.add_column("p95 (ms)", justify="right")
    for key, label in (("new_artifact", "new artifact"), ("same_artifact", "same artifact, cached")):
        rows = results[key]
        assert isinstance(rows, dict)
        for mode, row in rows.items():
            name = f"{label}, {mode}"
            table.add_row(f"{name}: DEPLOY → run response", f"{row['reply_p50_ms']:.1f}", f"{row['reply_p95_ms']:.1f}")
            table.add_row(
                f"{name}: DEPLOY → workload_started", f"{row['started_p50_ms']:.1f}", f"{row['started_p95_ms']:.1f}"
            )
    labels = {
        "nats_request_p50_ms": "limit: one NATS request round trip",
        "object_get_1mib_p50_ms": "limit: read 1 MiB from an object store",
        "object_put_1mib_p50_ms": "limit: create a store and write 1 MiB to it",
        "sha256_1mib_p50_ms": "limit: sha256 of 1 MiB",
        "fork_exec_static_p50_ms": "limit: fork+exec of a static binary",
    }
    limits = results["limits"]
    assert isinstance(limits, dict)
    for name, value in limits.items():
        table.add_row(labels[name], f"{value:.2f}", "")
    console.print(table)
    target, budget = TARGETS["started_p50_ms"], TARGETS["jail_cost_p50_ms"]
    costs = results["jail_cost_p50_ms"]
    assert isinstance(costs, dict)
    for key, label in (("new_artifact", "new artifact"), ("same_artifact", "same artifact")):
        rows = results[key]
        assert isinstance(rows, dict)
        value = rows["jail"]["started_p50_ms"]
        verdict = "meets" if value <= target else "MISSES"
        console.print(
            f"{label}: DEPLOY → workload_started p50 {value:.1f} ms jailed — {verdict} the target of ≤ {target:g} ms"
        )
        cost = costs[key]
        verdict = "meets" if cost <= budget else "MISSES"
        console.print(f"{label}: the jail adds {cost:+.1f} ms to the p50 — {verdict} the budget of ≤ {budget:g} ms")


if __name__ == "__main__":
    main()
