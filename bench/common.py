"""What the benchmarks share: a nats-server with an echo responder, a node process, static binaries, percentiles."""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from nex.bus.server import free_port, nats_server_binary

RESPONDER = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    async def echo(msg): await msg.respond(msg.data)
    await nc.subscribe("bench.echo", cb=echo)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


@contextlib.contextmanager
def echo_server(store: Path | None = None) -> Iterator[tuple[str, int]]:
    """A nats-server on a free port with a plain nats-py process answering ``bench.echo``.

    With ``store``, the server runs JetStream there (for object stores).
    """
    port = free_port("127.0.0.1")
    url = f"nats://127.0.0.1:{port}"
    jetstream = ["-js", "-sd", str(store)] if store is not None else []
    server = subprocess.Popen(
        [str(nats_server_binary()), "-a", "127.0.0.1", "-p", str(port), *jetstream],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    responder = subprocess.Popen([sys.executable, "-c", RESPONDER, url], stdout=subprocess.PIPE, text=True)
    try:
        assert responder.stdout is not None
        if responder.stdout.readline().strip() != "ready":
            raise RuntimeError("the echo responder did not start")
        yield url, port
    finally:
        responder.kill()
        server.terminate()
        server.wait()


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


NEX = shutil.which("nex") or str(Path(sys.executable).parent / "nex")


class NodeProcess:
    """``nex up`` (state in ``state_dir``, on ``server``) with its log lines timestamped as they arrive."""

    def __init__(self, state_dir: Path, server: str, *args: str) -> None:
        self.state_dir = state_dir
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.log: list[tuple[float, str]] = []
        self.started = time.perf_counter()
        argv = [NEX, "up", "--state-dir", str(state_dir), "--internal-port", "0", "--server", server]
        argv += ["--heartbeat-interval", "1h", *args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put((time.perf_counter(), line))

    def wait_line(self, needle: str, timeout: float = 60) -> float:
        """When the node logged a line containing ``needle`` (the next one from here on)."""
        deadline = time.perf_counter() + timeout
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or (self.proc.poll() is not None and self.lines.empty()):
                raise RuntimeError(f"no {needle!r} from the node; its log:\n" + "".join(text for _, text in self.log))
            try:
                at, line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.log.append((at, line))
            if needle in line:
                return at

    def stop(self, timeout: float = 60) -> bool:
        """SIGTERM, waited for; SIGKILL after ``timeout`` seconds. True if it had to be killed."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return True
        return False

    def tail(self, lines: int = 40) -> str:
        """The node's last log lines (for a benchmark that failed)."""
        while not self.lines.empty():
            self.log.append(self.lines.get_nowait())
        return "".join(text for _, text in self.log[-lines:])


def static_binary(work: Path, source: str, name: str = "bench-static", pad: int = 0) -> Path | None:
    """``source`` built with ``gcc -static`` in ``work``; None without gcc or a static libc.

    ``pad`` adds that many bytes of data to the binary (to reach a given size).
    """
    path = work / f"{name}.c"
    padding = f"__attribute__((used)) static const char pad[{pad}] = {{1}};\n" if pad else ""
    path.write_text(padding + source)
    binary = work / name
    result = subprocess.run(["gcc", "-static", "-O2", "-o", str(binary), str(path)], capture_output=True, check=False)
    return binary if result.returncode == 0 else None


def time_fork_exec(binary: Path, n: int = 300) -> list[float]:
    """fork+exec+wait of ``binary`` (which must exit at once), ``n`` times."""
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        pid = os.posix_spawn(str(binary), [str(binary)], {})
        os.waitpid(pid, 0)
        samples.append(time.perf_counter() - start)
    return samples


@contextlib.contextmanager
def echo_responder(url: str) -> Iterator[None]:
    """A plain nats-py process answering ``bench.echo`` on the server at ``url`` (any server of a cluster)."""
    responder = subprocess.Popen([sys.executable, "-c", RESPONDER, url], stdout=subprocess.PIPE, text=True)
    try:
        assert responder.stdout is not None
        if responder.stdout.readline().strip() != "ready":
            raise RuntimeError("the echo responder did not start")
        yield
    finally:
        responder.kill()
        responder.wait()


async def _cluster_formed(urls: list[str]) -> bool:
    """Every server routes to all the others and JetStream has a meta leader (answers through each)."""
    import json

    import nats

    async def quiet(error: Exception) -> None:  # a server not listening yet: polled again, not logged
        pass

    for url in urls:
        nc = await nats.connect(url, max_reconnect_attempts=0, connect_timeout=2, allow_reconnect=False, error_cb=quiet)
        try:
            info = json.loads((await nc.request("$JS.API.INFO", b"", timeout=2)).data)
            if "error" in info or len(nc.discovered_servers) < len(urls) - 1:
                return False
        finally:
            await nc.close()
    return True


@contextlib.contextmanager
def nats_cluster(work: Path, size: int = 3, timeout: float = 30) -> Iterator[list[str]]:
    """``size`` nats-servers on loopback ports, joined by routes, with JetStream clustered over them
    (stores under ``work``); their client URLs, in order. Stopped (SIGTERM, then SIGKILL) and their
    stores removed however the block ends."""
    import asyncio

    ports = [free_port("127.0.0.1") for _ in range(size)]
    routes = [free_port("127.0.0.1") for _ in range(size)]
    urls = [f"nats://127.0.0.1:{port}" for port in ports]
    servers: list[subprocess.Popen[bytes]] = []
    try:
        for i, port in enumerate(ports):
            others = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(routes) if j != i)
            argv = [
                str(nats_server_binary()),
                *("-a", "127.0.0.1", "-p", str(port), "-n", f"bench{i}"),
                *("-js", "-sd", str(work / f"js-{i}")),
                *("--cluster_name", "nexbench", "--cluster", f"nats://127.0.0.1:{routes[i]}", "--routes", others),
            ]
            servers.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(Exception):
                if asyncio.run(_cluster_formed(urls)):
                    break
            if time.monotonic() > deadline or any(s.poll() is not None for s in servers):
                raise RuntimeError(f"the NATS cluster did not form within {timeout:g}s")
            time.sleep(0.1)  # servers say nothing when they have joined: polled, with a deadline
        yield urls
    finally:
        for server in servers:
            if server.poll() is None:
                server.terminate()
        for server in servers:
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        for i in range(size):
            shutil.rmtree(work / f"js-{i}", ignore_errors=True)
