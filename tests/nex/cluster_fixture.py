"""A real NATS cluster for the cluster tests: three nats-server processes on loopback ports, joined by
routes, with JetStream clustered over them (as an operator's cluster would be), each also listening
on every address so that workloads in machines reach it at their gateway.

Each server knows the others by its ``-routes``; a client connected to one learns the others from
the servers' INFO (``connect_urls``), which is how a node whose server dies finds another.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import nats

from nex.bus.server import free_port, nats_server_binary

from .support import Bus, NatsServerProc, wait_for_port

CLUSTER_NAME = "nexc"
READY_TIMEOUT = 30.0


class ClusterServer(NatsServerProc):
    """One server of the cluster: its client port on every address, its route port on loopback."""

    def __init__(self, work_dir: Path, index: int, route_ports: list[int]) -> None:
        super().__init__(work_dir, host="0.0.0.0")
        self.index = index
        self.route_ports = route_ports

    @property
    def name(self) -> str:
        return f"n{self.index}"

    def start(self) -> ClusterServer:
        store = self.work_dir / f"js-{self.port}"
        routes = ",".join(f"nats://127.0.0.1:{p}" for i, p in enumerate(self.route_ports) if i != self.index)
        argv = [
            str(nats_server_binary()),
            *("-a", self.host, "-p", str(self.port), "-n", self.name),
            *("-js", "-sd", str(store)),
            *("--cluster_name", CLUSTER_NAME, "--cluster", f"nats://127.0.0.1:{self.route_ports[self.index]}"),
            *("--routes", routes),
        ]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, timeout=10)
        return self

    def kill(self) -> None:
        """Gone at once, as a crashed server is (its store stays for a restart)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class NatsCluster:
    def __init__(self, work_dir: Path, size: int = 3) -> None:
        route_ports = [free_port("127.0.0.1") for _ in range(size)]
        self.servers = [ClusterServer(work_dir, i, route_ports) for i in range(size)]

    def start(self) -> NatsCluster:
        for server in self.servers:
            server.start()
        self.wait_formed()
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
            shutil.rmtree(server.work_dir / f"js-{server.port}", ignore_errors=True)

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    def wait_formed(self) -> None:
        """Until every server routes to all the others and JetStream has a meta leader (answers an
        account info request through each server)."""
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            with contextlib.suppress(nats.errors.Error, TimeoutError, OSError, ValueError):
                if self._formed():
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the NATS cluster did not form within {READY_TIMEOUT:g}s")
            time.sleep(0.1)  # servers say nothing when they have joined: polled, with a deadline

    def _formed(self) -> bool:
        for server in self.servers:
            probe = Bus(server.url)
            try:
                info = json.loads(probe.request("$JS.API.INFO", b"", timeout=2))
                if "error" in info:  # no meta leader yet
                    return False
                if len(probe.nc.discovered_servers) < len(self.servers) - 1:  # its routes to the others
                    return False
            finally:
                probe.close()
        return True
