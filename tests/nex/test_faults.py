"""The node under faults: its internal server killed, the node itself killed, limits raced.

Each test here failed on the node before issue 10: deploys after an internal-server restart answered
"actor crashed handling Deploy: NoStreamResponseError()", a workload that ran when its node was killed
vanished without a ``workload_stopped``, and concurrent deploys overran ``max_workloads``.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import select
import signal
import time
from pathlib import Path

import pytest

from nex.net import netns

from .support import Bus, NatsServerProc, NodeProcess, processes_mentioning
from .workloads import Binaries, Requester, started

pytestmark = pytest.mark.integration

GATEWAY = "192.168.127.1"


def needs_namespaces() -> None:
    if not netns.has_capabilities():
        pytest.skip("needs root: machines in their own namespaces")


def sleeper_env(server: NatsServerProc) -> dict[str, str]:
    """The echo service stays up (it answers on a subject nobody uses) until it is stopped."""
    return {"NATS_URL": f"nats://{GATEWAY}:{server.port}", "ECHO_SUBJECT": "faults.idle"}


def start_node(home: Path, server: NatsServerProc, bus: Bus, *args: str, **config: object) -> NodeProcess:
    path = home / "node.json"
    path.write_text(json.dumps(config))
    reach = ["--allow", f"{GATEWAY}:{server.port}"]
    return NodeProcess(home, "--config", str(path), *reach, *args, server=server.url).start(bus)


def wait_restarted(node: NodeProcess, killed: int, timeout: float = 20) -> None:
    """Until the node has logged the start of a new internal nats-server (its log grows as it goes)."""
    deadline = time.monotonic() + timeout
    conf = str(node.state_dir / "nats" / "internal.conf")
    while True:
        fresh = [pid for pid in processes_mentioning(conf) if pid != killed]
        if fresh and "server=internal url=" in node.log() and f"pid={fresh[0]} " in node.log():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the internal server was not restarted within {timeout}s:\n{node.log()}")
        select.select([], [], [], 0.02)  # a log file is always readable: poll its growth


def wait_pool_replaced(node: NodeProcess, bus: Bus, old: set[str], timeout: float = 20) -> None:
    """Until the pool holds as many ready machines as before, none of them one of ``old``."""
    deadline = time.monotonic() + timeout
    while True:
        pool = node.info(bus).pool
        if not old & {m.id for m in pool} and sum(m.state == "ready" for m in pool) >= len(old):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the machines warmed before the restart are still in the pool: {pool}")
        bus.run(bus.nc.flush())  # one round trip between two looks


def test_deploys_succeed_after_the_internal_server_is_killed(
    home: Path, open_nats_server: NatsServerProc, obus: Bus, binaries: Binaries
) -> None:
    needs_namespaces()
    node = start_node(home, open_nats_server, obus, machine_pool_size=2)
    alice = Requester(obus)
    echo = alice.upload(binaries.echo, "echo")
    target = node.ping(obus)
    internal = processes_mentioning(str(node.state_dir / "nats" / "internal.conf"))
    assert len(internal) == 1, internal

    warmed = {member.id for member in node.info(obus).pool}
    (pid,) = internal
    os.kill(pid, signal.SIGKILL)
    wait_restarted(node, pid)
    wait_pool_replaced(node, obus, warmed)  # their artifact stores died with the server

    # three deploys: the two machines warmed before the restart are replaced, and one more is made
    for n in range(3):
        body = alice.deploy_body(target, echo, f"echo{n}", sleeper_env(open_nats_server))
        response = started(alice.deploy(node.node_id, body))
        assert response.started
    assert node.ping(obus).running_machines == 3
    assert node.stop() == 0


def test_a_workload_running_when_its_node_was_killed_is_reported_stopped_by_the_next_run(
    home: Path, open_nats_server: NatsServerProc, obus: Bus, binaries: Binaries
) -> None:
    needs_namespaces()
    node = start_node(home, open_nats_server, obus, machine_pool_size=1)
    alice = Requester(obus)
    target = node.ping(obus)
    body = alice.deploy_body(target, alice.upload(binaries.echo, "echo"), "echo", sleeper_env(open_nats_server))
    vmid = started(alice.deploy(node.node_id, body)).id
    node.signal(signal.SIGKILL)
    assert node.wait() == -signal.SIGKILL
    events = obus.collect("$NEX.events.default.workload_stopped")

    again = start_node(home, open_nats_server, obus, machine_pool_size=1)

    stopped = events.wait("workload_stopped", source=again.node_id)
    assert stopped["data"]["id"] == vmid
    assert stopped["data"]["workload_name"] == "echo"
    assert stopped["data"]["code"] == -1
    assert stopped["data"]["message"] == "its node stopped unexpectedly"
    assert again.ping(obus).running_machines == 0
    assert again.stop() == 0


def test_concurrent_deploys_cannot_overrun_the_workload_limit(
    home: Path, open_nats_server: NatsServerProc, obus: Bus, binaries: Binaries
) -> None:
    needs_namespaces()
    node = start_node(home, open_nats_server, obus, machine_pool_size=3, node_limits={"max_workloads": 1})
    alice = Requester(obus)
    echo = alice.upload(binaries.echo, "echo")
    target = node.ping(obus)
    bodies = [alice.deploy_body(target, echo, f"echo{n}", sleeper_env(open_nats_server)) for n in range(4)]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda body: alice.deploy(node.node_id, body), bodies))

    accepted = [a for a in answers if a.error is None]
    refused = [a.error for a in answers if a.error is not None]
    assert len(accepted) == 1, answers
    assert refused == ["Node is at maximum workload limit. Deploy request denied"] * 3
    assert node.ping(obus).running_machines == 1
    assert node.stop() == 0
