"""Warm-up of the pool: how soon ``nex up`` has N handshaken machines, and how fast one is replaced.

For pool sizes 1, 8, 32 and 250 (a /24's worth of addresses), each with the jail (the default) and
without it (``--no-sandbox``), started REPEATS times in turn (the median is reported), so that the
jail's cost (a cgroup per machine, which its agent joins) is measured beside the same pool without it,
in the same run:

- ready: from starting ``nex up`` to its "Node is ready" line (the node publishes ``node_started``
  once every pool member has handshaken), as an operator would time it;
- per-machine warm-up: ``warmup_ms`` of each machine, from its creation to its agent's handshake;
- per machine: ready divided by the pool's size; per added machine: the growth of ready from the
  previous size, divided by the machines added (the node's fixed start-up cost left out);
- node RSS with the pool up (and, for the record, the agents' and zygote's proportional share), and
  the node's open file descriptors (against its limit);
- stop: from SIGTERM to the node's exit, its pool torn down.

Every node runs on a CNI network, subnet (10.231.2.0/24) and uid range of its own: a pool of 250 needs
250 of the 253 addresses a /24 leaves besides its gateway, which it could not have on fcnet's default
192.168.127.0/24 while any other node on this host (tests running alongside) holds some. A size the
node cannot have is skipped with the reason, checked before (the subnet's addresses) or seen (the node
exits or is not ready in time: its last log lines); the reason is printed and recorded in the JSON.
After each node stops, what it left on the host (namespaces, links, cgroups, leases, fence, processes)
is looked for and recorded.

Replacement: with a pool of 8, an agent is killed (a machine taken) REPLACEMENTS times in turn; the
time from the kill to the replacement's "Adding new VM to warm pool" line.

Beside them, in the same run, the physical limits: fork+exec of a static binary (built here with
``gcc -static``), ``python -c pass``, and one NATS connect plus request from a new asyncio client.

Prints a table and writes ``bench/results/pool_warmup.json``. Targets on 2 cores: pool of 32 ready
≤ 1.0 s (jailed), replacement p50 ≤ 30 ms, node RSS with 32 machines ≤ 120 MiB. Run as root for
namespaces, cgroups and the fence.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats
from common import NodeProcess, echo_server, percentile, static_binary, time_fork_exec
from deploy_throughput import forget_network, leftovers
from rich.console import Console
from rich.table import Table

from nex.net import netns

SIZES = tuple(int(size) for size in os.environ.get("BENCH_SIZES", "1,8,32,250").split(","))
NETWORK = "nexbench-warmup"
SUBNET = "10.231.2.0/24"
CONFIG = {"cni": {"network_name": NETWORK, "subnet": SUBNET}, "sandbox": {"uid_base": 0x7102_0000}}
MODES = {"jail": (), "no_sandbox": ("--no-sandbox",)}
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
REPLACEMENTS = int(os.environ.get("BENCH_REPLACEMENTS", "15"))
TARGETS = {"ready_32_s": 1.0, "replacement_p50_ms": 30.0, "node_rss_32_mib": 120.0}


class Node(NodeProcess):
    """A node of this benchmark: also its machines' warm-up times, its memory and its agents."""

    def warmups(self) -> list[float]:
        return [float(m) for _, line in self.log for m in re.findall(r"warmup_ms=([0-9.]+)", line)]

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def fd_limit(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
        return 0

    def agents(self) -> list[int]:
        """Pids of live agents (a machine being torn down may still have a pid file)."""
        alive = []
        for pid_file in self.state_dir.glob("vm/*/*/*/pid"):
            try:
                pid = int(pid_file.read_text().split()[0])
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, ValueError, IndexError):
                continue
            if state != "Z":
                alive.append(pid)
        return alive

    def helpers_pss_mib(self) -> float:
        """Proportional memory of the zygote and agents (their shared pages counted once)."""
        total = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if str(self.state_dir) not in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    continue
                rollup = (entry / "smaps_rollup").read_text()
            except OSError:
                continue
            if int(entry.name) == self.proc.pid:
                continue
            for line in rollup.splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        return total / 1024


def time_python(n: int = 20) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        samples.append(time.perf_counter() - start)
    return samples


def time_nats_connect_request(url: str, n: int = 30) -> list[float]:
    async def once() -> float:
        start = time.perf_counter()
        nc = await nats.connect(url)
        await nc.request("bench.echo", b"hi", timeout=5)
        elapsed = time.perf_counter() - start
        await nc.close()
        return elapsed

    return [asyncio.run(once()) for _ in range(n)]


def unfit(size: int) -> dict[str, object] | None:
    """Why a pool of ``size`` cannot work on this node's subnet, if it cannot (before trying)."""
    subnet = ipaddress.IPv4Network(SUBNET)
    room = subnet.num_addresses - 3  # the network, the broadcast and the gateway (the node's side)
    if size > room:
        return {"skipped": f"{subnet} leaves {room} addresses for machines, fewer than {size}"}
    return None


def failure(node: Node, exc: Exception, size: int) -> dict[str, object]:
    """Why a node did not come up with its pool, from its exit and its log (errors first)."""
    code = node.proc.poll()
    tail = node.tail(30)
    lines = [text.strip() for _, text in node.log]
    errors = [line for line in lines if " ERR " in line or " CRT " in line]
    warnings = [line for line in lines if " WRN " in line]
    first = (errors or warnings or lines[-1:] or ["(no log)"])[0]
    how = f"the node exited with {code}" if code is not None else f"no 'Node is ready' in {ready_timeout(size):g}s"
    return {"skipped": f"{how}; {first} ({type(exc).__name__})", "log_tail": tail.splitlines()}


def ready_timeout(size: int) -> float:
    return max(60.0, size * 0.5)


def main() -> None:
    console = Console()
    out = Path(__file__).parent / "results" / "pool_warmup.json"
    out.parent.mkdir(exist_ok=True)
    namespaced = netns.has_capabilities()
    results: dict[str, object] = {"cpus": os.cpu_count(), "namespaced": namespaced, "targets": TARGETS}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = work / "node.json"
        config.write_text(json.dumps(CONFIG))
        left: dict[str, dict[str, list[str]]] = {}

        def stop(node: Node, name: str) -> float:
            """Stop ``node`` (SIGTERM, waited for); how long it took. Record what it left behind."""
            began = time.perf_counter()
            if node.stop():
                left.setdefault(name, {})["stop"] = ["no exit within 60 s of SIGTERM: killed"]
            found = {kind: names for kind, names in leftovers(node, NETWORK).items() if names}
            if found:
                left.setdefault(name, {}).update(found)
            return time.perf_counter() - began

        with echo_server() as (url, _):
            sizes: dict[str, object] = {}
            for size in SIZES:
                runs: dict[str, dict[str, list[float]]] = {mode: collections.defaultdict(list) for mode in MODES}
                skipped: dict[str, dict[str, object] | None] = {mode: unfit(size) for mode in MODES}
                for repeat in range(REPEATS):
                    for mode, flags in MODES.items():  # in turn: drift on a shared machine hits both
                        if skipped[mode] is not None:
                            continue
                        name = f"node-{size}-{mode}-{repeat}"
                        node = Node(work / name, url, "--config", str(config), "--pool-size", str(size), *flags)
                        try:
                            ready = node.wait_line("Node is ready", ready_timeout(size))
                            runs[mode]["ready"].append(ready - node.started)
                            runs[mode]["warmups"] += node.warmups()
                            runs[mode]["rss"].append(node.rss_mib())
                            runs[mode]["pss"].append(node.helpers_pss_mib())
                            runs[mode]["fds"].append(node.open_fds())
                            runs[mode]["fd_limit"].append(node.fd_limit())
                        except RuntimeError as exc:
                            skipped[mode] = failure(node, exc, size)
                            console.print(f"pool of {size} ({mode}): {skipped[mode]}", markup=False, highlight=False)
                        finally:
                            runs[mode]["stop"].append(stop(node, name))
                for mode, run in runs.items():
                    reason = skipped[mode]
                    if reason is not None:
                        sizes[f"{size} {mode}"] = {"size": size, **reason}
                        continue
                    sizes[f"{size} {mode}"] = {
                        "size": size,
                        "ready_s": statistics.median(run["ready"]),
                        "ready_runs_s": run["ready"],
                        "per_machine_ms": statistics.median(run["ready"]) * 1000 / size,
                        "warmup_p50_ms": percentile(run["warmups"], 0.5),
                        "warmup_p95_ms": percentile(run["warmups"], 0.95),
                        "node_rss_mib": statistics.median(run["rss"]),
                        "zygote_and_agents_pss_mib": statistics.median(run["pss"]),
                        "node_open_fds": statistics.median(run["fds"]),
                        "node_fd_limit": min(run["fd_limit"]),
                        "stop_s": statistics.median(run["stop"]),
                    }
            for mode in MODES:  # what each machine beyond the previous size cost
                previous: tuple[int, float] | None = None
                for size in SIZES:
                    row = sizes[f"{size} {mode}"]
                    assert isinstance(row, dict)
                    if "ready_s" not in row:
                        continue
                    if previous is not None and size > previous[0]:
                        row["added_machine_ms"] = (row["ready_s"] - previous[1]) * 1000 / (size - previous[0])
                    previous = (size, row["ready_s"])
            results["pools"] = sizes
            node = Node(work / "node-replacement", url, "--config", str(config), "--pool-size", "8")
            replacements = []
            try:
                node.wait_line("Node is ready")
                killed_pids: set[int] = set()
                for _ in range(REPLACEMENTS):
                    victim = next(pid for pid in node.agents() if pid not in killed_pids)
                    killed_pids.add(victim)
                    killed = time.perf_counter()
                    os.kill(victim, signal.SIGKILL)
                    replacements.append(node.wait_line("Adding new VM to warm pool") - killed)
            finally:
                stop(node, "node-replacement")
            results["replacement"] = {
                "pool_size": 8,
                "samples": len(replacements),
                "p50_ms": percentile(replacements, 0.5) * 1000,
                "p95_ms": percentile(replacements, 0.95) * 1000,
            }
            binary = static_binary(work, "int main(void) { return 0; }\n")
            limits: dict[str, float] = {}
            if binary is not None:
                limits["fork_exec_static_p50_ms"] = percentile(time_fork_exec(binary), 0.5) * 1000
            limits["python_c_pass_p50_ms"] = percentile(time_python(), 0.5) * 1000
            limits["nats_connect_request_p50_ms"] = percentile(time_nats_connect_request(url), 0.5) * 1000
            results["limits"] = limits
        results["left_behind"] = left
        forget_network(NETWORK)
    report(console, results)
    out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {out}")


def report(console: Console, results: dict[str, object]) -> None:
    pools = results["pools"]
    assert isinstance(pools, dict)
    network = "own netns per machine" if results["namespaced"] else "loopback"
    table = Table(title=f"Pool warm-up ({results['cpus']} CPUs, {network}, median of {REPEATS})")
    columns = ("pool", "ready (s)", "per machine (ms)", "per added machine (ms)", "warm-up p50 (ms)")
    for column in (*columns, "warm-up p95 (ms)", "node RSS (MiB)", "agents PSS (MiB)", "node fds / limit", "stop (s)"):
        table.add_column(column, justify="right", no_wrap=True)
    for size, row in pools.items():
        if "skipped" in row:
            table.add_row(size, "skipped", "", "", "", "", "", "", "", "")
            continue
        table.add_row(
            size,
            f"{row['ready_s']:.3f}",
            f"{row['per_machine_ms']:.1f}",
            f"{row['added_machine_ms']:.1f}" if "added_machine_ms" in row else "—",
            f"{row['warmup_p50_ms']:.1f}",
            f"{row['warmup_p95_ms']:.1f}",
            f"{row['node_rss_mib']:.1f}",
            f"{row['zygote_and_agents_pss_mib']:.1f}",
            f"{row['node_open_fds']:.0f} / {row['node_fd_limit']}",
            f"{row['stop_s']:.2f}",
        )
    console.print(table)
    replacement = results["replacement"]
    limits = results["limits"]
    assert isinstance(replacement, dict)
    assert isinstance(limits, dict)
    other = Table(title="Replacement, and the limits measured in the same run")
    other.add_column("measurement")
    other.add_column("p50 (ms)", justify="right")
    other.add_column("p95 (ms)", justify="right")
    other.add_row(
        f"replace a killed machine (pool of 8, {replacement['samples']} times)",
        f"{replacement['p50_ms']:.1f}",
        f"{replacement['p95_ms']:.1f}",
    )
    labels = {
        "fork_exec_static_p50_ms": "limit: fork+exec of a static binary",
        "python_c_pass_p50_ms": "limit: python -c pass",
        "nats_connect_request_p50_ms": "limit: new NATS connection + one request",
    }
    for name, value in limits.items():
        other.add_row(labels[name], f"{value:.2f}", "")
    console.print(other)
    for size, row in pools.items():
        if "skipped" in row:
            console.print(f"pool {size} skipped: {row['skipped']}", markup=False, highlight=False)
    for mode in MODES:
        small, large = pools.get(f"32 {mode}", {}), pools.get(f"250 {mode}", {})
        if "ready_s" in small and "ready_s" in large:
            console.print(
                f"{mode}: 250 machines ready in {large['ready_s']:.2f} s, {large['ready_s'] / small['ready_s']:.1f}× "
                f"the time for 32 (250/32 = {250 / 32:.1f}×); {large['per_machine_ms']:.1f} ms per machine "
                f"against {small['per_machine_ms']:.1f}, each of the 218 more {large['added_machine_ms']:.1f} ms"
            )
    left = results["left_behind"]
    console.print(f"left behind by the nodes: {left or 'nothing'}", markup=False, highlight=False)
    checks = [("replacement p50", replacement["p50_ms"], TARGETS["replacement_p50_ms"], "ms")]
    if "ready_s" in pools.get("32 jail", {}) and "ready_s" in pools.get("32 no_sandbox", {}):
        jailed, bare = pools["32 jail"]["ready_s"], pools["32 no_sandbox"]["ready_s"]
        console.print(
            f"the jail's cost, pool of 32: {jailed:.3f} s against {bare:.3f} s without ({jailed / bare:.2f}×)"
        )
        checks += [
            ("pool of 32 ready (jailed)", jailed, TARGETS["ready_32_s"], "s"),
            ("node RSS with 32 machines", pools["32 jail"]["node_rss_mib"], TARGETS["node_rss_32_mib"], "MiB"),
        ]
    for name, value, target, unit in checks:
        verdict = "meets" if value <= target else "MISSES"
        console.print(f"{name}: {value:.3g} {unit} — {verdict} the target of ≤ {target:g} {unit}")


if __name__ == "__main__":
    main()
