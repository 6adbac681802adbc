"""What the benchmarks share: a nats-server with an echo responder in its own process, percentiles."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

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
def echo_server() -> Iterator[tuple[str, int]]:
    """A nats-server on a free port with a plain nats-py process answering ``bench.echo``."""
    port = free_port("127.0.0.1")
    url = f"nats://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(nats_server_binary()), "-a", "127.0.0.1", "-p", str(port)],
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
