"""What the Trio↔asyncio bridge costs a NATS request, against plain nats-py on asyncio, in one run.

One nats-server and one echo responder (plain nats-py, in its own process) serve every client:

- raw socket: a minimal NATS client on a blocking socket, the floor for a request from Python;
- plain nats-py: the same request from asyncio, no bridge (the baseline);
- bridge: ``NatsLink.request`` from Trio, with the two threads on one core (the node's default);
- bridge, threads apart: the same with ``bus_thread_affinity: none``;
- thread hop: a bare Trio→asyncio→Trio round trip, on one core and apart (the bridge's own floor).

Prints a table and writes ``bench/results/bus_overhead.json``. Target: bridge ≤ 1.5× plain nats-py.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
import trio
from common import echo_server, percentile
from rich.console import Console
from rich.table import Table

from nex.bus.aio import open_asyncio_thread
from nex.bus.link import NatsLink

N = int(os.environ.get("BENCH_N", "3000"))
WARMUP = 300
TARGET = 1.5


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "p50_us": percentile(samples, 0.5) * 1e6,
        "p95_us": percentile(samples, 0.95) * 1e6,
        "mean_us": statistics.fmean(samples) * 1e6,
    }


def raw_socket(port: int) -> list[float]:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.recv(4096)  # INFO
    sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nSUB _INBOX.raw 1\r\nPING\r\n')
    buffer = b""
    while b"PONG" not in buffer:
        buffer += sock.recv(4096)
    expected = b"MSG _INBOX.raw 1 2\r\nhi\r\n"
    samples = []
    for i in range(WARMUP + N):
        start = time.perf_counter()
        sock.sendall(b"PUB bench.echo _INBOX.raw 2\r\nhi\r\n")
        buffer = b""
        while not buffer.endswith(expected):
            buffer += sock.recv(4096)
        if i >= WARMUP:
            samples.append(time.perf_counter() - start)
    sock.close()
    return samples


async def plain_nats_py(url: str) -> list[float]:
    nc = await nats.connect(url)
    samples = []
    for i in range(WARMUP + N):
        start = time.perf_counter()
        await nc.request("bench.echo", b"hi", timeout=5)
        if i >= WARMUP:
            samples.append(time.perf_counter() - start)
    await nc.close()
    return samples


async def bridge(url: str, colocate: bool) -> list[float]:
    samples = []
    async with open_asyncio_thread(colocate=colocate) as aio, trio.open_nursery() as nursery:
        link = NatsLink("bench", [url], aio)
        await nursery.start(link.run)
        for i in range(WARMUP + N):
            start = time.perf_counter()
            await link.request("bench.echo", b"hi", timeout=5)
            if i >= WARMUP:
                samples.append(time.perf_counter() - start)
        nursery.cancel_scope.cancel()
    return samples


async def thread_hop(colocate: bool) -> list[float]:
    async def nothing() -> None:
        return None

    samples = []
    async with open_asyncio_thread(colocate=colocate) as aio:
        for i in range(WARMUP + N):
            start = time.perf_counter()
            await aio.run(nothing)
            if i >= WARMUP:
                samples.append(time.perf_counter() - start)
    return samples


def trio_run(fn: Callable[..., Awaitable[list[float]]], *args: object) -> list[float]:
    return trio.run(fn, *args)


def main() -> None:
    out = Path(__file__).parent / "results" / "bus_overhead.json"
    out.parent.mkdir(exist_ok=True)
    with echo_server() as (url, port):
        results = {
            "raw socket (floor)": raw_socket(port),
            "plain nats-py (asyncio)": asyncio.run(plain_nats_py(url)),
            "bridge, threads on one core": trio_run(bridge, url, True),
            "bridge, threads apart": trio_run(bridge, url, False),
            "thread hop, one core": trio_run(thread_hop, True),
            "thread hop, apart": trio_run(thread_hop, False),
        }
    stats = {name: summary(samples) for name, samples in results.items()}
    baseline = stats["plain nats-py (asyncio)"]["p50_us"]
    ratio = stats["bridge, threads on one core"]["p50_us"] / baseline
    table = Table(title=f"NATS request/reply through the bridge ({N} requests each, {os.cpu_count()} CPUs)")
    for column in ("path", "p50 µs", "p95 µs", "mean µs", "× plain (p50)"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for name, row in stats.items():
        relative = f"{row['p50_us'] / baseline:.2f}" if not name.startswith("thread hop") else "-"
        table.add_row(name, f"{row['p50_us']:.0f}", f"{row['p95_us']:.0f}", f"{row['mean_us']:.0f}", relative)
    console = Console()
    console.print(table)
    verdict = "meets" if ratio <= TARGET else "MISSES"
    console.print(f"bridge / plain nats-py (p50): {ratio:.2f}× — {verdict} the target of ≤ {TARGET}×")
    out.write_text(
        json.dumps({"n": N, "cpus": os.cpu_count(), "ratio_p50": ratio, "target": TARGET, "paths": stats}, indent=2)
    )
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
