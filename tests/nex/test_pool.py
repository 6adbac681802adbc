"""The warm pool on a real host: namespaces, veths, leases, agents, handshakes, failures and teardown.

These need root (network namespaces and links); without it they skip and say why.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import nats
import nats.errors
import pytest

from nex import ids
from nex.api import control
from nex.net import netns
from nex.net.ipam import DEFAULT_ROOT as LEASES

from .support import (
    STARTED,
    Bus,
    NatsServerProc,
    NodeProcess,
    agents_of,
    environment,
    icmp_echo,
    internal_url,
    nkey_seed_in_memory,
    processes_mentioning,
    wait_for_pool,
    wait_gone,
    without_launchpads,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not netns.has_capabilities(), reason="needs CAP_NET_ADMIN and CAP_SYS_ADMIN (run as root)"),
]


def leases_of(vmids: set[str]) -> dict[str, str]:
    found = {}
    for path in (LEASES / "fcnet").glob("*"):
        if path.name[0].isdigit():
            owner = path.read_bytes().decode().split("\r\n")[0]
            if owner in vmids:
                found[path.name] = owner
    return found


def assert_machine_gone(vmid: str) -> None:
    assert ids.short(vmid) not in netns.namespaces("nx"), f"netns of {vmid} left"
    assert ids.host_link(vmid) not in netns.links("nx"), f"veth of {vmid} left"
    assert leases_of({vmid}) == {}, f"lease of {vmid} left"


def test_a_pool_of_4_fills_with_namespaced_handshaken_machines(
    home: Path, nats_server: NatsServerProc, bus: Bus
) -> None:
    node = NodeProcess(home, "--pool-size", "4", server=nats_server.url).start(bus)  # started = pool full
    info = node.info(bus)
    assert len(info.pool) == 4
    assert {m.state for m in info.pool} == {"ready"}
    vmids = {m.id for m in info.pool}
    assert node.log().count("Received agent handshake") == 4
    assert {ids.short(v) for v in vmids} <= set(netns.namespaces("nx")), "one nx netns per machine"
    assert {ids.host_link(v) for v in vmids} <= set(netns.links("nx")), "one host veth per machine"
    addresses = {m.ip for m in info.pool}
    assert len(addresses) == 4
    assert all(a.startswith("192.168.127.") for a in addresses)
    assert leases_of(vmids) == {m.ip: m.id for m in info.pool}
    for address in addresses:
        assert icmp_echo(address), f"{address} does not answer from the host"
    assert set(agents_of(node)) == vmids, "one agent process per machine, each knowing its vmid"
    folder = node.state_dir / "vm" / "system"
    (machine_dir,) = list(folder.glob(f"*/{next(iter(vmids))}"))
    assert {p.name for p in machine_dir.iterdir()} >= {"driver.json", "metadata.json", "pid", "stdout", "stderr", "log"}
    assert node.stop() == 0
    for vmid in vmids:
        assert_machine_gone(vmid)


def test_a_killed_agent_gets_its_machine_torn_down_and_replaced(
    home: Path, nats_server: NatsServerProc, bus: Bus
) -> None:
    node = NodeProcess(home, "--pool-size", "2", server=nats_server.url).start(bus)
    before = {m.id for m in node.info(bus).pool}
    victim = sorted(before)[0]
    os.kill(agents_of(node)[victim], signal.SIGKILL)

    def replaced(info: control.InfoResponse) -> bool:
        ready = [m for m in info.pool if m.state == "ready"]
        return victim not in {m.id for m in info.pool} and len(ready) == 2

    info = wait_for_pool(node, bus, replaced, what="replacement of the killed machine")
    replacement = ({m.id for m in info.pool} - before).pop()
    assert replacement != victim
    assert_machine_gone(victim)
    assert "Machine left the pool" in node.log()
    assert node.stop() == 0


def test_a_hung_agent_is_found_by_its_pings_and_its_machine_replaced(
    home: Path, nats_server: NatsServerProc, bus: Bus
) -> None:
    config = home / "ping.json"
    config.write_text(json.dumps({"agent_ping_interval_ms": 100, "agent_ping_timeout_ms": 100}))
    node = NodeProcess(home, "--pool-size", "2", "--config", str(config), server=nats_server.url).start(bus)
    before = {m.id for m in node.info(bus).pool}
    victim, healthy = sorted(before)
    agent = agents_of(node)[victim]
    os.kill(agent, signal.SIGSTOP)  # alive, and silent: only its pings can tell

    def replaced(info: control.InfoResponse) -> bool:
        ready = [m for m in info.pool if m.state == "ready"]
        return victim not in {m.id for m in info.pool} and len(ready) == 2

    info = wait_for_pool(node, bus, replaced, what="replacement of the machine whose agent hung")
    assert healthy in {m.id for m in info.pool}, "an agent that answers is never dropped"
    assert f"lost contact with the agent of machine {victim}: 3 pings unanswered" in node.log()
    node.wait_log(f"machines: child {victim} ended: lost contact")  # logged once its teardown is done
    assert wait_gone([agent], timeout=0) == [], "the hung agent is killed with its machine"
    assert_machine_gone(victim)
    assert node.stop() == 0


def test_first_handshake_timeout_stops_the_node_with_a_clear_error(home: Path, nats_server: NatsServerProc) -> None:
    node = NodeProcess(home, "--handshake-timeout", "1ms", server=nats_server.url).start()
    assert node.wait() == 1
    log = node.log()
    assert "First handshake failed, shutting down to avoid inconsistent behavior" in log
    assert "first handshake failed" in log
    assert "agent_handshake_timeout_ms" in log
    assert "reach the internal NATS server" in log


def test_a_later_handshake_timeout_tears_that_machine_down_and_retries(
    home: Path, nats_server: NatsServerProc, bus: Bus
) -> None:
    node = NodeProcess(home, "--handshake-timeout", "1s", server=nats_server.url).start(bus)
    (first,) = [m.id for m in node.info(bus).pool]
    agent_pids = set(agents_of(node).values())
    ours = without_launchpads(processes_mentioning(str(node.state_dir)), agent_pids)
    (zygote,) = [pid for pid, cmd in ours.items() if "nex.vm.zygote" in cmd and pid not in agent_pids]
    os.kill(zygote, signal.SIGSTOP)  # a stuck launcher: the replacement cannot start its agent
    try:
        os.kill(agents_of(node)[first], signal.SIGKILL)
        wait_for_pool(node, bus, lambda i: "Machine failed to start; retrying" in node.log(), what="a failed start")
    finally:
        os.kill(zygote, signal.SIGCONT)
    info = wait_for_pool(node, bus, lambda i: [m.state for m in i.pool] == ["ready"] and i.pool[0].id != first)
    assert "was not even started within 1000 ms" in node.log()
    assert info.pool[0].id != first
    assert node.stop() == 0


def test_agents_cannot_use_each_others_subjects(home: Path, nats_server: NatsServerProc, bus: Bus) -> None:
    config = home / "spawn.json"
    config.write_text('{"agent_launcher": "spawn"}')  # an agent of its own, not a fork sharing the zygote's memory
    node = NodeProcess(home, "--pool-size", "2", "--config", str(config), server=nats_server.url).start(bus)
    (a, pid_a), (b, _) = sorted(agents_of(node).items())
    assert not any(value.startswith("SU") for value in environment(pid_a).values()), "a seed in an environment"
    seed_a = nkey_seed_in_memory(pid_a)  # what an attacker who took agent A over would have
    url = internal_url(node)
    assert url.startswith("nats://192.168.127.1:"), "the internal server listens on the gateway only"
    errors: list[str] = []

    async def record(exc: Exception) -> None:
        errors.append(str(exc))

    async def as_agent_a() -> bool:
        nc = await nats.connect(url, nkeys_seed_str=seed_a, inbox_prefix=f"_INBOX_{a}", error_cb=record)
        await nc.subscribe(f"agentint.{a}.ping")  # its own: allowed
        await nc.subscribe(f"agentint.{b}.deploy")  # someone else's: refused by the server
        await nc.publish(f"agentint.{b}.handshake", b"{}")  # speaking for B: refused
        await nc.publish(f"agentint.{a}.events.test", b"{}")  # its own: allowed
        await nc.flush()
        try:
            await nc.request(f"agentint.{b}.ping", b"", timeout=1)
            reached_b = True
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            reached_b = False
        await nc.close()
        return reached_b

    assert not asyncio.run(as_agent_a()), "agent A could ping agent B"
    joined = " ".join(errors).lower()
    assert f'subscription to "agentint.{b}.deploy"' in joined, errors
    assert f'publish to "agentint.{b}.handshake"' in joined, errors
    assert f"agentint.{a}" not in joined, f"its own subjects must be allowed: {errors}"
    assert node.stop() == 0


def test_the_zygote_starts_from_a_minimal_environment(home: Path, nats_server: NatsServerProc, bus: Bus) -> None:
    """Not the operator's: nothing of it reaches the agents (nor, through them, a workload)."""
    node = NodeProcess(home, server=nats_server.url)
    node.argv = ["env", "NEX_TEST_OPERATOR_SECRET=s3cret", *node.argv]
    node.start(bus)
    agent_pids = set(agents_of(node).values())
    ours = without_launchpads(processes_mentioning(str(node.state_dir)), agent_pids)
    (zygote,) = [pid for pid, cmd in ours.items() if "nex.vm.zygote" in cmd and pid not in agent_pids]
    assert node.proc is not None
    assert environment(node.proc.pid)["NEX_TEST_OPERATOR_SECRET"] == "s3cret"
    assert set(environment(zygote)) <= {"PATH", "LANG", "PYTHONPATH"}, environment(zygote)
    assert node.stop() == 0


def test_stopping_a_node_with_16_machines_leaves_nothing_behind(
    home: Path, nats_server: NatsServerProc, bus: Bus
) -> None:
    node = NodeProcess(home, "--pool-size", "16", server=nats_server.url).start(bus, timeout=60)
    vmids = {m.id for m in node.info(bus).pool}
    assert len(vmids) == 16
    pids = list(agents_of(node).values())
    assert len(pids) == 16
    assert node.stop() == 0
    assert wait_gone(pids, timeout=5) == []
    for vmid in vmids:
        assert_machine_gone(vmid)
    assert not (node.state_dir / "vm").exists()


def test_without_namespace_capabilities_machines_use_loopback_and_say_so(
    home: Path, nats_server: NatsServerProc, bus: Bus
) -> None:
    node = NodeProcess(home, "--pool-size", "2", server=nats_server.url)
    node.argv = ["setpriv", "--bounding-set", "-net_admin,-sys_admin", "--", *node.argv]
    node.start(bus)
    assert "Machines will share the host's loopback network, and workloads get none: this process lacks" in node.log()
    assert "Sandbox protection missing on this host protection=cgroups" in node.log()
    info = node.info(bus)
    assert [m.state for m in info.pool] == ["ready", "ready"]
    assert all(ids.short(m.id) not in netns.namespaces("nx") for m in info.pool)
    assert node.stop() == 0


def test_the_zygote_falls_back_to_spawn_when_forking_would_be_unsafe(
    home: Path, nats_server: NatsServerProc, bus: Bus
) -> None:
    site = home / "site"
    site.mkdir()
    # What an APM agent's sitecustomize does: start a thread in every Python process.
    (site / "sitecustomize.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    node = NodeProcess(home, "--pool-size", "2", server=nats_server.url)
    events = bus.collect("$NEX.events.system.node_started")
    with node.log_path.open("ab") as log:
        node.proc = subprocess.Popen(node.argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    STARTED.append(node)
    node.node_id = events.wait("node_started", timeout=60)["source"]
    assert "Agents will be started as new processes: the zygote is not usable" in node.log()
    assert "threads: forking it would not be safe" in node.log()
    assert [m.state for m in node.info(bus).pool] == ["ready", "ready"]
    agents = without_launchpads(processes_mentioning(str(node.state_dir)), set(agents_of(node).values()))
    assert sum("-m nex.agent --metadata-fd" in cmd for cmd in agents.values()) == 2, agents
    started = time.monotonic()
    assert node.stop() == 0
    assert time.monotonic() - started < 30


def test_a_node_killed_outright_has_its_leftovers_released_by_the_next_start(
    home: Path, nats_server: NatsServerProc, bus: Bus
) -> None:
    node = NodeProcess(home, "--pool-size", "2", server=nats_server.url).start(bus)
    vmids = {m.id for m in node.info(bus).pool}
    node.signal(signal.SIGKILL)
    node.wait()
    assert {ids.short(v) for v in vmids} <= set(netns.namespaces("nx")), "SIGKILL leaves the kernel objects"
    assert set(leases_of(vmids).values()) == vmids
    again = NodeProcess(home, "--pool-size", "2", server=nats_server.url).start(bus)
    assert "Released what a node that did not stop cleanly left behind" in again.log()
    for vmid in vmids:
        assert_machine_gone(vmid)
    assert [p for v in vmids for p in (again.state_dir / "vm").glob(f"*/*/{v}")] == []
    assert again.stop() == 0
