"""Nodes on a real three-server NATS cluster: each node connected to a different server, listed, placed
by auction, moved to another server when its own dies, put in lame duck by tag.

The cluster is three nats-server processes with routes and JetStream (:mod:`.cluster_fixture`);
the nodes are ``nex up`` processes, the requests the ``nex`` CLI's, the workload the static echo
service (built by the tests with gcc -static).
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import pytest

from nex.api import control, subjects
from nex.crypto import XKey
from nex.workload import records

from .cluster_fixture import NatsCluster
from .support import Bus, EventLog, NodeProcess, run_cli
from .test_workloads import GATEWAY, echo_env, echo_request, needs_namespaces
from .workloads import Binaries

pytestmark = pytest.mark.integration

ZONES = ("a", "b", "c")


@pytest.fixture
def cluster(home: Path) -> Iterator[NatsCluster]:
    servers = NatsCluster(home).start()
    try:
        yield servers
    finally:
        servers.stop()


def start_nodes(home: Path, cluster: NatsCluster, bus: Bus, **settings: object) -> dict[str, NodeProcess]:
    """One node per server, tagged zone=a, b, c; each lets its workloads reach every server (a workload
    moved to another node keeps its environment, and with it its server)."""
    return {zone: zone_node(home, cluster, zone, **settings).start(bus) for zone in ZONES}


def zone_node(home: Path, cluster: NatsCluster, zone: str, **settings: object) -> NodeProcess:
    """The node of ``zone`` (on the state directory it always has: a second one is the same node again)."""
    server = cluster.servers[ZONES.index(zone)]
    config = home / f"{zone}.json"
    config.write_text(json.dumps({"machine_pool_size": 1, **settings}))
    openings = [arg for other in cluster.servers for arg in ("--allow", f"{GATEWAY}:{other.port}")]
    return NodeProcess(home, "--config", str(config), "--tag", f"zone={zone}", *openings, server=server.url, name=zone)


def gather(bus: Bus, subject: str, payload: bytes, expect: int, window: float) -> list[bytes]:
    """Scatter/gather as nex's clients do: every reply within ``window`` seconds (or ``expect`` of them)."""

    async def ask() -> list[bytes]:
        inbox = bus.nc.new_inbox()
        sub = await bus.nc.subscribe(inbox)
        replies: list[bytes] = []
        try:
            await bus.nc.publish(subject, payload, reply=inbox)
            deadline = time.monotonic() + window
            while len(replies) < expect and (left := deadline - time.monotonic()) > 0:
                with contextlib.suppress(nats.errors.TimeoutError):
                    replies.append((await sub.next_msg(timeout=left)).data)
            if len(replies) == expect:  # one more would be one too many: listen a moment longer
                with contextlib.suppress(nats.errors.TimeoutError):
                    replies.append((await sub.next_msg(timeout=0.5)).data)
        finally:
            await sub.unsubscribe()
        return replies

    return bus.run(ask(), window + 5)


def bids(bus: Bus, request: control.AuctionRequest | bytes, expect: int, window: float = 2.0) -> set[str]:
    """The nodes that bid in an auction (all within ``window`` seconds; ``expect``: how many should)."""
    found: set[str] = set()
    body = request if isinstance(request, bytes) else msgspec.json.encode(request)
    for data in gather(bus, subjects.AUCTION, body, expect=max(expect, 1), window=window):
        envelope = json.loads(data)
        assert envelope["type"] == control.AUCTION_RESPONSE
        assert "error" not in envelope, envelope
        found.add(envelope["data"]["node_id"])
    return found


def test_nodes_on_three_servers_are_listed_bid_by_their_tags_and_lame_duck(
    home: Path, cluster: NatsCluster, binaries: Binaries
) -> None:
    needs_namespaces()
    bus = Bus(cluster.servers[0].url)
    try:
        nodes = start_nodes(home, cluster, bus)
        ids = {zone: node.node_id for zone, node in nodes.items()}

        # every node is listed through any one server
        listed = run_cli("ls", "--json", "--expect", "3", "--timeout", "20s", "-s", cluster.servers[2].url)
        assert listed.returncode == 0, listed.stderr
        assert sorted(n["node_id"] for n in json.loads(listed.stdout)) == sorted(ids.values())

        # an auction hears from the nodes that match, and only those
        assert bids(bus, control.AuctionRequest(), expect=3) == set(ids.values())
        assert bids(bus, control.AuctionRequest(tags={"zone": "b"}), expect=2) == {ids["b"]}
        arch = json.loads(listed.stdout)[0]["tags"]["nex.arch"]
        assert bids(bus, control.AuctionRequest(arch=arch, os="linux"), expect=3) == set(ids.values())
        other = "arm64" if arch != "arm64" else "amd64"
        assert bids(bus, control.AuctionRequest(arch=other), expect=1) == set()
        assert bids(bus, control.AuctionRequest(workload_types=["v8"]), expect=1) == set()
        assert bids(bus, control.AuctionRequest(sandboxed=False), expect=1) == set(), "these nodes sandbox"
        assert bids(bus, b"not json", expect=3) == set(ids.values()), "a garbled body asks for nothing"

        # nex run --tag lands on the matching node, and its workload answers through another server
        (home / "bin").mkdir()
        (home / "bin" / "echo").write_bytes(binaries.echo)
        user = {"HOME": str(home / "user")}
        env = echo_env(cluster.servers[1], "echo.zone", "b-")
        run = run_cli(
            "run", str(home / "bin" / "echo"), "--tag", "zone=b",
            *(f"--env={k}={v}" for k, v in env.items()), "--json", "-s", cluster.servers[0].url, env=user,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        started = msgspec.json.decode(run.stdout, type=control.RunResponse)
        assert echo_request(bus, "echo.zone", b"hi") == b"b-hi"
        ps = run_cli("ps", "--json", "-s", cluster.servers[2].url, "--timeout", "2s")
        assert ps.returncode == 0, ps.stderr
        where = {m["id"]: n["node_id"] for n in json.loads(ps.stdout) for m in n["running_machines"]}
        assert where == {started.id: ids["b"]}, "nex ps sees it, on node b, from any server"

        # lame duck by tag: node b (which has a workload, not an essential one: it stays) stops bidding
        duck = run_cli("lameduck", "--tag", "zone=b", "-s", cluster.servers[0].url, "--timeout", "2s")
        assert duck.returncode == 0, duck.stderr
        assert f"Command to enter lame duck mode issued to {ids['b']}" in duck.stdout
        assert ids["a"] not in duck.stdout
        assert bids(bus, control.AuctionRequest(), expect=2) == {ids["a"], ids["c"]}
        refused = run_cli(
            "run", str(home / "bin" / "echo"), "--tag", "zone=b", "-s", cluster.servers[0].url, "--timeout", "2s",
            env=user,
        )  # fmt: skip
        assert refused.returncode == 1
        assert "no node bid" in refused.stderr

        stop = run_cli("stop", started.id, "-s", cluster.servers[0].url, env=user)
        assert stop.returncode == 0, stop.stderr
        assert nodes["b"].wait(60) == 0, "in lame duck with nothing left: it exits"
        for zone in ("a", "c"):
            assert nodes[zone].stop() == 0
    finally:
        bus.close()


def test_a_node_whose_server_dies_moves_to_another_and_still_answers(home: Path, cluster: NatsCluster) -> None:
    bus = Bus(cluster.servers[0].url)
    try:
        nodes = start_nodes(home, cluster, bus)
        ids = {zone: node.node_id for zone, node in nodes.items()}
        cluster.servers[2].kill()  # node c's

        deadline = time.monotonic() + 60
        while True:  # nex ls through server 0 until node c answers again (after its reconnect)
            listed = run_cli("ls", "--json", "--expect", "3", "--timeout", "5s", "-s", cluster.servers[0].url)
            found = {n["node_id"] for n in json.loads(listed.stdout or "[]")}
            if found == set(ids.values()):
                break
            assert time.monotonic() < deadline, f"node c never answered again: {found}\n{nodes['c'].log()}"
        moved = [
            line for line in nodes["c"].log().splitlines() if "Reconnected to NATS" in line and "link=control" in line
        ]
        assert moved, f"node c says where it went:\n{nodes['c'].log()}"
        assert str(cluster.servers[2].port) not in moved[-1], "to another server than the dead one"
        info = run_cli("info", ids["c"], "--json", "-s", cluster.servers[1].url)
        assert info.returncode == 0, info.stderr
        for node in nodes.values():
            assert node.stop() == 0
    finally:
        bus.close()


def test_lame_duck_moves_essential_workloads_to_other_nodes_and_exits(
    home: Path, cluster: NatsCluster, binaries: Binaries
) -> None:
    needs_namespaces()
    bus = Bus(cluster.servers[1].url)
    try:
        nodes = start_nodes(home, cluster, bus, machine_pool_size=2)
        ids = {zone: node.node_id for zone, node in nodes.items()}
        events = bus.collect("$NEX.events.default.*")
        (home / "bin").mkdir()
        (home / "bin" / "echo").write_bytes(binaries.echo)
        user = {"HOME": str(home / "user")}
        first: dict[str, str] = {}
        for name in ("one", "two"):
            env = echo_env(cluster.servers[0], f"echo.{name}", f"{name}-")
            run = run_cli(
                "run", str(home / "bin" / "echo"), "--name", name, "--essential", "--node", ids["a"],
                *(f"--env={k}={v}" for k, v in env.items()), "--json", "-s", cluster.servers[0].url, env=user,
            )  # fmt: skip
            assert run.returncode == 0, run.stderr
            first[name] = msgspec.json.decode(run.stdout, type=control.RunResponse).id
            assert echo_request(bus, f"echo.{name}", b"x") == f"{name}-x".encode()

        logs = bus.collect("$NEX.logs.default.>")
        duck = run_cli("lameduck", ids["a"], "-s", cluster.servers[0].url)
        assert duck.returncode == 0, duck.stderr

        for name in ("one", "two"):
            started = events.wait(
                "default.workload_started",
                timeout=60,
                where=lambda e, name=name: e["data"]["workload_name"] == name and e["source"] != ids["a"],
            )
            assert started["source"] in (ids["b"], ids["c"]), "moved to another node"
            stopped = events.wait(
                "default.workload_stopped", timeout=60, where=lambda e, name=name: e["data"]["id"] == first[name]
            )
            assert stopped["source"] == ids["a"]
            assert (
                stopped["data"]["message"] == f"moved to node {started['source']} as workload {started['data']['id']}"
            )
            assert echo_request(bus, f"echo.{name}", b"y") == f"{name}-y".encode(), "it answers from its new node"
            line = logs.wait(f"{started['source']}.{name}.{started['data']['id']}", timeout=20)
            assert line["text"].startswith("echo:"), "and its logs go on, under its new node"
        assert nodes["a"].wait(60) == 0, "nothing left: the lame duck exits"
        ps = run_cli("ps", "--json", "-s", cluster.servers[2].url, "--timeout", "2s")
        copies = sorted((m["name"], n["node_id"]) for n in json.loads(ps.stdout) for m in n["running_machines"])
        assert [name for name, _ in copies] == ["one", "two"], "one copy of each"
        assert ids["a"] not in [node for _, node in copies]
        for zone in ("b", "c"):
            assert nodes[zone].stop() == 0
    finally:
        bus.close()


def test_a_workload_no_other_node_takes_stays_until_the_deadline_and_the_event_says_why(
    home: Path, cluster: NatsCluster, binaries: Binaries
) -> None:
    needs_namespaces()
    bus = Bus(cluster.servers[0].url)
    try:
        server = cluster.servers[0]
        node = NodeProcess(home, "--allow", f"{GATEWAY}:{server.port}", server=server.url, name="alone").start(bus)
        events = bus.collect("$NEX.events.default.*")
        (home / "bin").mkdir()
        (home / "bin" / "echo").write_bytes(binaries.echo)
        user = {"HOME": str(home / "user")}
        env = echo_env(server, "echo.alone", "")
        run = run_cli(
            "run", str(home / "bin" / "echo"), "--essential", *(f"--env={k}={v}" for k, v in env.items()),
            "--json", "-s", server.url, env=user,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        workload = msgspec.json.decode(run.stdout, type=control.RunResponse).id

        duck = run_cli("lameduck", "--deadline", "3s", "-s", server.url)
        assert duck.returncode == 0, duck.stderr
        assert echo_request(bus, "echo.alone", b"still") == b"still", "it keeps running meanwhile"
        stopped = events.wait("default.workload_stopped", timeout=30, where=lambda e: e["data"]["id"] == workload)
        assert "no other node took it: no other node bid for it" in stopped["data"]["message"]
        assert node.wait(30) == 0
    finally:
        bus.close()


def release(home: Path, cluster: NatsCluster, bus: Bus, killed: set[str], settings: dict[str, Any]) -> None:
    """Start again, and stop, the nodes of ``killed`` zones (a test that failed before it did): a node
    started on a killed one's state directory releases what that one left on the host."""
    for zone in sorted(killed):
        with contextlib.suppress(Exception):
            zone_node(home, cluster, zone, **settings).start(bus).stop()


def drain(events: EventLog, kind: str) -> list[dict[str, Any]]:
    """Every event of ``kind`` received so far and not yet waited for."""
    found = []
    with contextlib.suppress(TimeoutError):
        while True:
            found.append(events.wait(kind, timeout=0.01))
    return found


def test_a_dead_nodes_essential_workload_runs_again_once_on_another_node(
    home: Path, cluster: NatsCluster, binaries: Binaries
) -> None:
    needs_namespaces()
    settings = {"cluster_workload_key": XKey.generate().seed, "heartbeat_interval_ms": 300, "node_dead_after_ms": 1500}
    bus = Bus(cluster.servers[0].url)
    killed: set[str] = set()  # zones whose node was SIGKILLed and not yet started again (which releases)
    try:
        nodes = start_nodes(home, cluster, bus, **settings)
        ids = {node.node_id: zone for zone, node in nodes.items()}
        events = bus.collect("$NEX.events.default.*")
        (home / "bin").mkdir()
        (home / "bin" / "echo").write_bytes(binaries.echo)
        user = {"HOME": str(home / "user")}
        env = echo_env(cluster.servers[0], "echo.keep", "kept-")
        run = run_cli(
            "run", str(home / "bin" / "echo"), "--name", "keep", "--essential", "--node", nodes["b"].node_id,
            *(f"--env={k}={v}" for k, v in env.items()), "--json", "-s", cluster.servers[0].url, env=user,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        workload, host = msgspec.json.decode(run.stdout, type=control.RunResponse).id, "b"
        assert echo_request(bus, "echo.keep", b"0") == b"kept-0"
        events.wait("default.workload_started", timeout=10, where=lambda e: e["data"]["id"] == workload)
        stream = bus.run(bus.nc.jetstream().stream_info(f"KV_{records.BUCKET}"))
        assert stream.config.num_replicas == 3, "the records are replicated as the cluster allows"

        for round_ in (1, 2):  # twice: the second time from the node that took it the first time
            nodes[host].signal(signal.SIGKILL)
            killed.add(host)
            assert nodes[host].wait(10) == -signal.SIGKILL
            dead = workload
            stopped = events.wait(
                "default.workload_stopped", timeout=60, where=lambda e, dead=dead: e["data"]["id"] == dead
            )
            taker = ids[stopped["source"]]
            assert taker != host
            started = events.wait("default.workload_started", timeout=10, source=stopped["source"])
            assert started["data"]["workload_name"] == "keep"
            silent = f"its node {nodes[host].node_id} stopped answering"
            assert (
                stopped["data"]["message"]
                == f"{silent}; running again on node {stopped['source']} as workload {started['data']['id']}"
            )
            assert echo_request(bus, "echo.keep", f"{round_}".encode()) == f"kept-{round_}".encode()
            ps = run_cli("ps", "keep", "--json", "-s", cluster.servers[1].url, "--timeout", "2s")
            copies = [(n["node_id"], m["id"]) for n in json.loads(ps.stdout) for m in n["running_machines"]]
            assert copies == [(stopped["source"], started["data"]["id"])], "exactly one copy runs"
            assert drain(events, "default.workload_started") == [], "started once, by one node"
            assert drain(events, "default.workload_stopped") == [], "and reported once"

            back = zone_node(home, cluster, host, **settings).start(bus)  # releases what the killed one left
            ps = run_cli("ps", "keep", "--json", "-s", cluster.servers[1].url, "--timeout", "3s")  # its recovery too
            copies = [(n["node_id"], m["id"]) for n in json.loads(ps.stdout) for m in n["running_machines"]]
            assert copies == [(stopped["source"], started["data"]["id"])], "its records are gone: it runs nothing"
            assert drain(events, "default.workload_started") == []
            killed.discard(host)
            assert back.stop() == 0
            drain(events, "default.workload_stopped")  # it may say its machine's workload ended: so it did
            workload, host = started["data"]["id"], taker
        for node in nodes.values():
            node.stop()
    finally:
        release(home, cluster, bus, killed, settings)
        bus.close()


def test_without_a_shared_key_a_dead_nodes_workload_is_reported_lost(
    home: Path, cluster: NatsCluster, binaries: Binaries
) -> None:
    needs_namespaces()
    settings = {"heartbeat_interval_ms": 300, "node_dead_after_ms": 1500}
    bus = Bus(cluster.servers[0].url)
    killed: set[str] = set()
    try:
        nodes = start_nodes(home, cluster, bus, **settings)
        events = bus.collect("$NEX.events.default.*")
        (home / "bin").mkdir()
        (home / "bin" / "echo").write_bytes(binaries.echo)
        user = {"HOME": str(home / "user")}
        env = echo_env(cluster.servers[0], "echo.lost", "")
        run = run_cli(
            "run", str(home / "bin" / "echo"), "--essential", "--node", nodes["c"].node_id,
            *(f"--env={k}={v}" for k, v in env.items()), "--json", "-s", cluster.servers[0].url, env=user,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        workload = msgspec.json.decode(run.stdout, type=control.RunResponse).id
        events.wait("default.workload_started", timeout=10, where=lambda e: e["data"]["id"] == workload)
        nodes["c"].signal(signal.SIGKILL)
        killed.add("c")
        nodes["c"].wait(10)
        stopped = events.wait("default.workload_stopped", timeout=60, where=lambda e: e["data"]["id"] == workload)
        assert stopped["source"] in (nodes["a"].node_id, nodes["b"].node_id)
        assert "; lost: " in stopped["data"]["message"]
        assert "cluster_workload_key" in stopped["data"]["message"], "says what would have saved it"
        assert drain(events, "default.workload_started") == [], "no node runs what it cannot open"
        killed.discard("c")
        zone_node(home, cluster, "c", **settings).start(bus).stop()  # releases what the killed one left
        for zone in ("a", "b"):
            assert nodes[zone].stop() == 0
    finally:
        release(home, cluster, bus, killed, settings)
        bus.close()
