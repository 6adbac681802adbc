"""CLI latency: how long each client command takes of its own before its first NATS request.

Each command (``nex ls --expect 1``, ``nex info``, ``nex run`` of a small file, ``nex stop``) runs as a
user runs it, against a stand-in NATS server on loopback that greets each client with ``INFO`` and
notes when the client's first request arrives: its first ``PUB`` (a ping, an auction, a deploy, a
stop) after ``CONNECT``. The stand-in never answers, so each command then waits out a short
``--timeout``; only the time from the process's start (``fork``+``exec`` of the ``nex`` script, taken
just before) to that first ``PUB`` is counted, ROUNDS times each.

Beside them, in the same run: ``python -c pass`` (the interpreter's own start, which no command can
avoid) and a bare nats-py connect-and-publish script (Python plus nats-py's own imports and
handshake). The target: at most 150 ms of the command's own, that is its time to the first request
minus ``python -c pass``, on 2 cores. Prints a table and writes ``bench/results/cli_latency.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "15"))
TARGET_OWN_MS = 150.0
NEX = shutil.which("nex") or str(Path(sys.executable).parent / "nex")
INFO = (
    b'INFO {"server_id":"bench","server_name":"bench","version":"2.10.0","proto":1,"go":"go1.22",'
    b'"host":"127.0.0.1","port":0,"headers":true,"max_payload":1048576,"jetstream":true}\r\n'
)
BARE = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1], connect_timeout=1, max_reconnect_attempts=0)
    await nc.publish("bench", b"x")
    await nc.flush(timeout=0.2)
asyncio.run(main())
"""


class StandIn:
    """A loopback listener that speaks just enough NATS to get a client's first PUB (and PONGs its PINGs)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.first_pub: list[float] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        with conn:
            conn.sendall(INFO)
            seen = b""
            noted = False
            while data := conn.recv(65536):
                seen += data
                if b"PING\r\n" in seen:
                    conn.sendall(b"PONG\r\n")
                    seen = seen.replace(b"PING\r\n", b"")
                if not noted and (b"PUB " in seen or b"HPUB " in seen):
                    self.first_pub.append(time.perf_counter())
                    noted = True

    def close(self) -> None:
        self.sock.close()


def to_first_pub(server: StandIn, argv: list[str], env: dict[str, str]) -> float:
    """Seconds from starting ``argv`` to its first PUB at the stand-in."""
    before = len(server.first_pub)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    proc.wait(timeout=30)
    if len(server.first_pub) == before:
        raise RuntimeError(f"{' '.join(argv)} sent no request")
    return server.first_pub[before] - start


def python_pass() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - start


def main() -> None:
    console = Console()
    out = Path(__file__).parent / "results" / "cli_latency.json"
    out.parent.mkdir(exist_ok=True)
    server = StandIn()
    node = "N" + "A" * 55
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "tiny"
        binary.write_bytes(b"\x7fELF" + b"\0" * 60)
        env = {**os.environ, "HOME": tmp, "NATS_URL": server.url}
        commands = {
            "nex ls --expect 1": [NEX, "ls", "--expect", "1", "--timeout", "0.3s"],
            "nex info NODE": [NEX, "info", node, "--timeout", "0.3s"],
            "nex run FILE --node NODE": [NEX, "run", str(binary), "--node", node, "--timeout", "0.3s"],
            "nex stop ID": [NEX, "stop", "dc7abcdefghijklmnopq", "--timeout", "0.3s"],
        }
        samples: dict[str, list[float]] = {name: [] for name in commands}
        samples["python -c pass"] = []
        samples["nats-py connect + publish"] = []
        for _ in range(ROUNDS):
            samples["python -c pass"].append(python_pass())
            samples["nats-py connect + publish"].append(
                to_first_pub(server, [sys.executable, "-c", BARE, server.url], env)
            )
            for name, argv in commands.items():
                samples[name].append(to_first_pub(server, argv, env))
    server.close()
    floor = statistics.median(samples["python -c pass"])
    results: dict[str, object] = {"cpus": os.cpu_count(), "rounds": ROUNDS, "target_own_ms": TARGET_OWN_MS}
    rows = {}
    for name, series in samples.items():
        median = statistics.median(series)
        rows[name] = {
            "p50_ms": median * 1000,
            "max_ms": max(series) * 1000,
            "own_p50_ms": (median - floor) * 1000,
        }
    results["commands"] = rows
    table = Table(title=f"Time to the first NATS request ({os.cpu_count()} CPUs, {ROUNDS} rounds)")
    for column in ("command", "p50 (ms)", "max (ms)", "own p50 (ms)", "target"):
        table.add_column(column, justify="left" if column == "command" else "right")
    for name, row in rows.items():
        verdict = ""
        if name.startswith("nex "):
            verdict = "meets" if row["own_p50_ms"] <= TARGET_OWN_MS else "MISSES"
        table.add_row(name, f"{row['p50_ms']:.0f}", f"{row['max_ms']:.0f}", f"{row['own_p50_ms']:.0f}", verdict)
    console.print(table)
    console.print(f"own = p50 − python -c pass ({floor * 1000:.0f} ms); target ≤ {TARGET_OWN_MS:.0f} ms")
    out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
