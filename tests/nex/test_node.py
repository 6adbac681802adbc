"""A node on real NATS: discovery, info, events, lame duck, signals, crashes of its servers, bad config.

Each test runs ``nex up`` as a process against a real nats-server and talks to it over NATS (or
through the ``nex`` CLI, as an operator would). After each, the leak check in conftest.py makes sure
no node or nats-server of the test is left and no server store remains.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import msgspec
import pytest

from nex.api import control

from .support import (
    NEX,
    SEED_SAMPLE,
    Bus,
    NatsServerProc,
    NodeProcess,
    processes_mentioning,
    run_cli,
    wait_for_port,
    wait_gone,
)

pytestmark = pytest.mark.integration


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def internal_server_pid(node: NodeProcess) -> int:
    servers = dict(processes_mentioning(str(node.state_dir / "nats" / "internal.conf")).items())
    assert len(servers) == 1, servers
    return next(iter(servers))


def test_ls_shows_a_node_with_nex_fields(home: Path, nats_server: NatsServerProc, bus: Bus) -> None:
    node = NodeProcess(home, "--tag", "zone=lab", server=nats_server.url).start(bus)
    result = run_cli("ls", "--json", "--expect", "1", "-s", nats_server.url)
    assert result.returncode == 0, result.stderr
    (entry,) = json.loads(result.stdout)
    assert entry["node_id"] == node.node_id
    assert entry["node_id"].startswith("N")
    assert len(entry["node_id"]) == 56
    assert entry["target_xkey"].startswith("X")
    assert entry["version"]
    assert entry["uptime"].endswith("s")
    assert entry["running_machines"] == 0
    tags = entry["tags"]
    assert tags["nex.os"] == "linux"
    assert tags["nex.arch"] in ("amd64", "arm64")
    assert int(tags["nex.cpucount"]) >= 1
    assert tags["nex.lameduck"] == "false"
    assert tags["zone"] == "lab"
    assert tags["node_name"]
    table = run_cli("ls", "-s", nats_server.url)
    assert "NATS Execution Nodes" in table.stdout
    assert node.node_id in table.stdout
    assert node.stop() == 0


def test_ls_expect_finds_a_node_that_comes_up_while_it_waits(home: Path, nats_server: NatsServerProc, bus: Bus) -> None:
    asked = threading.Event()

    async def on_ping(_msg: object) -> None:
        asked.set()

    bus.run(bus.nc.subscribe("$NEX.PING", cb=on_ping))
    bus.run(bus.nc.flush())
    argv = [NEX, "ls", "--json", "--expect", "1", "--timeout", "30s", "-s", nats_server.url]
    ls = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert asked.wait(20), "nex ls never asked"
        node = NodeProcess(home, server=nats_server.url).start(bus)  # only after the first ask went out
        out, err = ls.communicate(timeout=40)
    finally:
        ls.kill()
    assert ls.returncode == 0, err
    assert [n["node_id"] for n in json.loads(out)] == [node.node_id], "found, and listed once"
    assert node.stop() == 0


def test_two_nodes_on_one_server_are_both_listed(home: Path, nats_server: NatsServerProc, bus: Bus) -> None:
    a = NodeProcess(home, server=nats_server.url, name="a").start(bus)
    b = NodeProcess(home, server=nats_server.url, name="b").start(bus)
    result = run_cli("ls", "--json", "--expect", "2", "--timeout", "10s", "-s", nats_server.url)
    assert result.returncode == 0, result.stderr
    assert sorted(n["node_id"] for n in json.loads(result.stdout)) == sorted([a.node_id, b.node_id])
    ambiguous = run_cli("info", "-s", nats_server.url, "--timeout", "1s")
    assert ambiguous.returncode == 1
    assert "several nodes answered" in ambiguous.stderr
    assert a.node_id in ambiguous.stderr
    assert b.node_id in ambiguous.stderr
    assert a.stop() == 0
    assert b.stop() == 0


def test_info_reports_keys_memory_tags_and_the_actor_tree(home: Path, nats_server: NatsServerProc, bus: Bus) -> None:
    node = NodeProcess(home, server=nats_server.url).start(bus)
    result = run_cli("info", node.node_id[:10], "--json", "-s", nats_server.url)
    assert result.returncode == 0, result.stderr
    info = msgspec.json.decode(result.stdout, type=control.InfoResponse)
    ping = node.ping(bus)
    assert info.public_xkey == ping.target_xkey
    assert info.node_id == node.node_id
    assert info.memory is not None
    assert 0 < info.memory.available <= info.memory.total
    assert info.tags["nex.os"] == "linux"
    assert info.supported_workload_types == ["native"]
    names = [row.name for row in info.actors]
    assert names[0] == "node"
    assert {"control-link", "internal-server", "internal-link", "pool", "control-api", "heartbeat"} <= set(names)
    assert all(row.state == "running" for row in info.actors)
    human = run_cli("info", "-s", nats_server.url)
    assert human.returncode == 0
    assert "NEX Node Information" in human.stdout
    assert "control-api" in human.stdout
    assert node.stop() == 0


def test_events_arrive_on_their_subjects(home: Path, nats_server: NatsServerProc, bus: Bus) -> None:
    events = bus.collect("$NEX.events.system.*")
    node = NodeProcess(home, "--heartbeat-interval", "200ms", server=nats_server.url).start(bus)
    started = events.wait("system.node_started", source=node.node_id)
    assert started["specversion"] == "1.0"
    assert started["type"] == "node_started"
    assert started["datacontenttype"] == "application/json"
    assert started["id"]
    assert started["time"]
    assert started["data"]["id"] == node.node_id
    beat = events.wait("system.heartbeat", source=node.node_id)
    assert beat["data"]["node_id"] == node.node_id
    assert beat["data"]["running_machines"] == 0
    assert beat["data"]["tags"]["nex.lameduck"] == "false"
    events.wait("system.heartbeat", source=node.node_id)  # a second one: it keeps beating
    node.signal(signal.SIGTERM)
    stopped = events.wait("system.node_stopped", source=node.node_id)
    assert stopped["data"] == {"id": node.node_id, "graceful": True}
    assert node.wait() == 0


def test_lame_duck_publishes_its_event_refuses_deploys_and_exits_cleanly(
    home: Path, nats_server: NatsServerProc, bus: Bus
) -> None:
    events = bus.collect("$NEX.events.system.*")
    node = NodeProcess(home, server=nats_server.url).start(bus)
    deploy = msgspec.json.decode(
        bus.request(f"$NEX.DEPLOY.default.{node.node_id}", b"{}"), type=control.ReceivedEnvelope
    )
    assert deploy.type == control.RUN_RESPONSE
    assert "environment" in (deploy.error or ""), "an empty request is refused, naming what is missing"
    result = run_cli("lameduck", "-s", nats_server.url)
    assert result.returncode == 0, result.stderr
    assert f"Command to enter lame duck mode issued to {node.node_id}" in result.stdout
    entered = events.wait("system.node_entered_lameduck", source=node.node_id)
    assert entered["data"] == {"version": entered["data"]["version"], "id": node.node_id}
    events.wait("system.node_stopped", source=node.node_id)
    assert node.wait() == 0
    assert "lame duck: no workloads left" in node.log()


def test_a_bad_lameduck_request_is_refused_and_changes_nothing(
    home: Path, nats_server: NatsServerProc, bus: Bus
) -> None:
    node = NodeProcess(home, server=nats_server.url).start(bus)
    bad = msgspec.json.decode(
        bus.request(f"$NEX.LAMEDUCK.{node.node_id}", b'{"deadline_ms": -1}'), type=control.ReceivedEnvelope
    )
    assert bad.error is not None
    assert "deadline_ms" in bad.error
    assert node.ping(bus).tags["nex.lameduck"] == "false"
    assert node.stop() == 0


def test_sigterm_publishes_node_stopped_and_exits_zero(home: Path, nats_server: NatsServerProc, bus: Bus) -> None:
    events = bus.collect("$NEX.events.system.node_stopped")
    node = NodeProcess(home, server=nats_server.url).start(bus)
    node.signal(signal.SIGTERM)
    assert events.wait("node_stopped", source=node.node_id)["data"]["graceful"] is True
    assert node.wait() == 0
    assert not (node.state_dir / "nats").exists(), "the servers' store is removed on a graceful stop"
    assert not (node.state_dir / "node.lock").exists()


def test_sigint_twice_still_tears_everything_down(home: Path, nats_server: NatsServerProc, bus: Bus) -> None:
    node = NodeProcess(home, server=nats_server.url).start(bus)
    node.signal(signal.SIGINT)
    node.signal(signal.SIGINT)
    assert node.wait() == 0
    assert processes_mentioning(str(node.state_dir)) == {}


def test_a_signal_during_the_teardown_does_not_cut_it_short(home: Path, nats_server: NatsServerProc, bus: Bus) -> None:
    """A node stopping on its own (lame duck, nothing to wait for) gets SIGTERM while it tears down its
    machines: it must finish, not die of the signal's default action and leave them behind."""
    node = NodeProcess(home, "--pool-size", "8", server=nats_server.url).start(bus, timeout=60)
    assert run_cli("lameduck", node.node_id, "-s", nats_server.url).returncode == 0
    node.wait_log("Stopping node")
    node.signal(signal.SIGTERM)
    assert node.wait() == 0
    assert "Node stopped" in node.log()


def test_sigkill_of_the_node_leaves_no_nats_server(home: Path, nats_server: NatsServerProc, bus: Bus) -> None:
    node = NodeProcess(home, server=nats_server.url).start(bus)
    server_pid = internal_server_pid(node)
    node.signal(signal.SIGKILL)
    assert node.wait() == -signal.SIGKILL
    assert wait_gone([server_pid], timeout=10) == [], "the internal nats-server outlived its node"
    # the next start on the same state dir clears what the killed node could not
    again = NodeProcess(home, server=nats_server.url).start(bus)
    assert "did not stop cleanly" in again.log()
    assert again.stop() == 0


def test_a_killed_internal_server_is_restarted_and_the_node_stays_healthy(
    home: Path, nats_server: NatsServerProc, bus: Bus
) -> None:
    node = NodeProcess(home, server=nats_server.url).start(bus)
    first = internal_server_pid(node)
    os.kill(first, signal.SIGKILL)
    assert wait_gone([first], timeout=10) == []
    deadline = time.monotonic() + 30
    while True:  # each round is a real INFO request: wait until the tree shows the restart
        info = node.info(bus)
        rows = {row.name: row for row in info.actors}
        if rows["internal-server"].restarts == 1 and rows["internal-server"].state == "running":
            break
        assert time.monotonic() < deadline, f"internal server not restarted: {rows['internal-server']}\n{node.log()}"
    assert internal_server_pid(node) != first
    assert rows["internal-link"].state == "running"
    assert node.ping(bus).node_id == node.node_id
    assert node.stop() == 0


def test_a_restarted_control_server_gets_the_node_back(home: Path, nats_server: NatsServerProc, bus: Bus) -> None:
    node = NodeProcess(home, server=nats_server.url).start(bus)
    nats_server.stop()
    nats_server.start()  # same port
    # A ping published before the node has reconnected is lost (no replay in NATS), so wait until
    # the node answers again, then check that the CLI sees it.
    assert node.wait_answering(bus).node_id == node.node_id
    result = run_cli("ls", "--json", "--expect", "1", "--timeout", "15s", "-s", nats_server.url)
    assert [n["node_id"] for n in json.loads(result.stdout)] == [node.node_id], node.log()
    assert "Reconnected to NATS" in node.log()
    assert node.stop() == 0


def test_an_unreachable_explicit_server_is_a_clear_error(home: Path) -> None:
    dead = "nats://127.0.0.1:1"
    node = NodeProcess(home, server=dead).start()
    assert node.wait() == 1
    assert f"cannot connect to NATS at {dead}: connection refused" in node.log()
    assert "embedded" not in node.log(), "an explicit server never falls back"


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"machine_pool_size": 0}, "machine_pool_size must be >= 1 at $.machine_pool_size"),
        ({"machine_pool_size": "two"}, "Expected `int`, got `str` at $.machine_pool_size"),
        ({"cni": {"subnet": "10.0.0.0/33"}}, "at $.cni.subnet"),
        ({"valid_issuers": ["nope"]}, "account public keys (A…) at $.valid_issuers[0]"),
    ],
)
def test_bad_config_exits_2_naming_the_path(home: Path, config: dict[str, object], expected: str) -> None:
    path = home / "bad.json"
    path.write_text(json.dumps(config))
    node = NodeProcess(home, "--config", str(path)).start()
    assert node.wait() == 2
    assert expected in node.log()
    assert not (node.state_dir).exists(), "nothing is started or created for a bad config"


def test_the_seed_sample_config_loads_as_written_and_means_vms(
    home: Path, nats_server: NatsServerProc, bus: Bus
) -> None:
    """nex's sample names a kernel and a rootfs: it asks for VMs, and a node never quietly runs
    processes instead. Its paths are another host's, so the node refuses, naming each and the fix."""
    path = home / "machineconfig.json"
    path.write_text(json.dumps(SEED_SAMPLE))
    node = NodeProcess(home, "--config", str(path), server=nats_server.url)
    node.start()
    assert node.wait() != 0
    log = node.log()
    assert "unknown key" not in log
    assert "the qemu driver cannot work on this host" in log
    assert f"kernel_path {SEED_SAMPLE['kernel_path']} does not exist" in log
    assert "nex image build" in log
    assert not (home / "node").exists(), "a refused start changes nothing"
    # the same file with the process driver named, as an operator without VMs would run it
    node = NodeProcess(home, "--config", str(path), "--driver", "process", server=nats_server.url).start(bus)
    assert "unknown key" not in node.log()
    assert node.stop() == 0


@pytest.mark.skipif(port_in_use(4222), reason="port 4222 is taken on this machine: the embedded default cannot start")
def test_embedded_default_and_sigkill(home: Path) -> None:
    node = NodeProcess(home).start()
    wait_for_port(4222, timeout=30)
    bus = Bus("nats://127.0.0.1:4222")
    try:
        result = run_cli("ls", "--json", "--expect", "1", "--timeout", "10s")
        (entry,) = json.loads(result.stdout)
        assert "starting an embedded one" in node.log()
        servers = processes_mentioning(str(node.state_dir / "nats"))
        assert len(servers) == 2, servers  # the control server and the internal one
    finally:
        bus.close()
    node.signal(signal.SIGKILL)
    node.wait()
    assert wait_gone(list(servers), timeout=10) == [], "a nats-server outlived its node"
    assert entry["node_id"].startswith("N")
    again = NodeProcess(home).start()
    wait_for_port(4222, timeout=30)
    again.signal(signal.SIGTERM)
    assert again.wait() == 0
