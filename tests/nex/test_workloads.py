"""Workloads on a real node: deploy, run, logs, events, stop, refusals, essential restarts, lame duck.

The workload is a real static ELF (tests/nex/workloads/echo.c, built with ``gcc -static``): a NATS
echo service that reads its server's URL from its (sealed) environment. The control server listens
on every address so the workload reaches it from its machine's namespace, at the gateway.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import signal
import time
from pathlib import Path

import msgspec
import nats.errors
import pytest

from nex import crypto
from nex.api import control
from nex.net import netns
from nex.workload import request as workload_request

from .support import Bus, Follower, NatsServerProc, NodeProcess, processes_mentioning, run_cli, workload_pids
from .workloads import Binaries, Requester, started

pytestmark = pytest.mark.integration

GATEWAY = "192.168.127.1"  # the host side of every machine's link (the embedded default subnet)


def needs_namespaces() -> None:
    if not netns.has_capabilities():
        pytest.skip("workloads reach the control server through their namespace's gateway: needs root")


def echo_env(server: NatsServerProc, subject: str, prefix: str = "") -> dict[str, str]:
    return {"NATS_URL": f"nats://{GATEWAY}:{server.port}", "ECHO_SUBJECT": subject, "ECHO_PREFIX": prefix}


def reach(server: NatsServerProc) -> list[str]:
    """The fence's opening that lets workloads talk to the control server, at their gateway."""
    return ["--allow", f"{GATEWAY}:{server.port}"]


def config_file(home: Path, **settings: object) -> str:
    path = home / "node.json"
    path.write_text(json.dumps(settings))
    return str(path)


def pool_ids(node: NodeProcess, bus: Bus) -> set[str]:
    return {member.id for member in node.info(bus).pool}


def wait_pool_ready(node: NodeProcess, bus: Bus, size: int, timeout: float = 20) -> set[str]:
    """The pool's machine ids once ``size`` of them are ready (a taken machine is replaced)."""
    deadline = time.monotonic() + timeout
    while True:
        pool = node.info(bus).pool
        if sum(1 for m in pool if m.state == "ready") >= size:
            return {m.id for m in pool}
        if time.monotonic() > deadline:
            raise AssertionError(f"pool not refilled to {size} within {timeout}s: {pool}")
        bus.run(bus.nc.flush())


def echo_request(bus: Bus, subject: str, payload: bytes, timeout: float = 20) -> bytes:
    """Ask the echo service, retrying while it is still connecting (no responders yet)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return bus.request(subject, payload, timeout=1)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing answered on {subject} within {timeout}s") from None


def test_a_static_echo_service_runs_with_its_sealed_environment_logs_and_stops(
    home: Path, open_nats_server: NatsServerProc, obus: Bus, binaries: Binaries
) -> None:
    needs_namespaces()
    node = NodeProcess(home, "--pool-size", "2", *reach(open_nats_server), server=open_nats_server.url).start(obus)
    events = obus.collect("$NEX.events.default.*")
    logs = obus.collect(f"$NEX.logs.default.{node.node_id}.echo.*")
    (home / "bin").mkdir()
    (home / "bin" / "echo").write_bytes(binaries.echo)
    user = {"HOME": str(home / "user"), "NATS_URL": open_nats_server.url}
    env_args = [f"--env={k}={v}" for k, v in echo_env(open_nats_server, "echo.svc", "sealed-").items()]
    follow_logs = Follower(["logs", "--follow", "--json", "--workload", "echo"], user)
    follow_events = Follower(["events", "--follow"], user)
    follow_logs.until_listening(obus, f"$NEX.logs.default.{node.node_id}.echo.probe", b'{"text":"","level":"","id":""}')
    follow_events.until_listening(
        obus, "$NEX.events.default.probe", b'{"specversion":"1.0","id":"","source":"probe","type":"probe","time":""}'
    )

    run = run_cli("run", str(home / "bin" / "echo"), *env_args, "--json", env=user)

    assert run.returncode == 0, run.stderr
    response = msgspec.json.decode(run.stdout, type=control.RunResponse)
    assert response.started
    assert response.name == "echo"
    keys = home / "user" / ".nex"
    assert (keys / "issuer.nk").read_text().startswith("SA")
    assert (keys / "publisher.xk").read_text().startswith("SX")
    assert oct((keys / "issuer.nk").stat().st_mode & 0o777) == "0o600"
    issuer = crypto.signing_key_from_seed((keys / "issuer.nk").read_text().strip(), crypto.PREFIX_ACCOUNT)
    assert response.issuer == issuer.public_key.decode()
    # the workload answers with the prefix it could only read from its decrypted environment
    assert echo_request(obus, "echo.svc", b"ping") == b"sealed-ping"
    first = logs.wait(f".echo.{response.id}")
    assert first == {"text": "echo: answering on echo.svc", "level": "INFO", "id": response.id}
    assert logs.wait(f".echo.{response.id}") == {"text": "echo: answered 4 bytes", "level": "ERROR", "id": response.id}
    begun = events.wait("default.workload_started", source=node.node_id)
    assert begun["data"]["id"] == response.id
    assert begun["data"]["workload_name"] == "echo"
    # the node accounts for it: ls, info, workload ping; a fresh machine took its place in the pool
    assert node.ping(obus).running_machines == 1
    info = node.info(obus)
    assert [(m.id, m.workload.name, m.namespace) for m in info.machines] == [(response.id, "echo", "default")]
    assert info.machines[0].workload.hash == hashlib.sha256(binaries.echo).hexdigest()
    assert response.id not in wait_pool_ready(node, obus, 2)
    wping = msgspec.json.decode(obus.request(f"$NEX.WPING.default.{response.id}"), type=control.ReceivedEnvelope)
    found = msgspec.json.decode(wping.data, type=control.WorkloadPingResponse)
    assert [(m.id, m.name) for m in found.running_machines] == [(response.id, "echo")]
    listed = run_cli("ls", "--json", env=user)
    assert json.loads(listed.stdout)[0]["running_machines"] == 1

    stop = run_cli("stop", response.id, env=user)

    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.strip() == "✅ Workload 'echo' stopped."
    ended = events.wait("default.workload_stopped", source=node.node_id)
    assert ended["data"]["id"] == response.id
    assert ended["data"]["code"] == 0, ended  # it got SIGTERM and exited cleanly
    assert node.ping(obus).running_machines == 0
    assert node.info(obus).machines == []
    with pytest.raises(nats.errors.NoRespondersError):
        obus.request("echo.svc", b"gone?", timeout=2)
    # what an operator following along saw
    line = json.loads(follow_logs.wait_for(lambda text: response.id in text and "answering" in text))
    assert line["workload_name"] == "echo"
    assert line["node_id"] == node.node_id
    assert line["level"] == "INFO"
    follow_events.wait_for(lambda text: "workload_started" in text and response.id in text)
    follow_events.wait_for(lambda text: "workload_stopped" in text and "code=0" in text)
    assert follow_logs.interrupt() == 0
    assert follow_events.interrupt() == 0
    assert node.stop() == 0


def test_bad_deploys_are_refused_with_their_reason_and_take_no_machine(
    home: Path, open_nats_server: NatsServerProc, obus: Bus, binaries: Binaries
) -> None:
    needs_namespaces()
    alice, mallory = Requester(obus), Requester(obus)
    config = config_file(home, valid_issuers=[alice.issuer], machine_pool_size=2)
    node = NodeProcess(home, "--config", config, *reach(open_nats_server), server=open_nats_server.url).start(obus)
    target = node.ping(obus)
    other_node = msgspec.structs.replace(target, target_xkey=crypto.XKey.generate().public_key)
    echo = alice.upload(binaries.echo, "echo")
    dynamic = alice.upload(binaries.echo_dynamic, "dynamic")
    script = alice.upload(binaries.script, "script")
    lying = type(echo)(location=echo.location, hash=script.hash, size=echo.size)  # the JWT claims another file
    good = alice.deploy_body(target, echo, "echo", echo_env(open_nats_server, "echo.bad"))
    token = json.loads(good)["workload_jwt"]
    header, claims, signature = token.split(".")
    forged = base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)).replace(b'"name":"echo"', b'"name":"evil"')
    forged_claims = base64.urlsafe_b64encode(forged).decode().rstrip("=")
    tampered = good.replace(token.encode(), f"{header}.{forged_claims}.{signature}".encode())
    pool_before = wait_pool_ready(node, obus, 2)

    cases = {
        "dynamically linked": alice.deploy_body(target, dynamic, "dynamic"),
        "not an ELF executable (a script": alice.deploy_body(target, script, "script"),
        f"the artifact's sha256 is {echo.hash}, but the workload JWT claims {script.hash}": alice.deploy_body(
            target, lying, "echo"
        ),
        "signature does not verify": tampered,
        f"invalid workload issuer: {mallory.issuer}": mallory.deploy_body(target, echo, "echo"),
        "Failed to decrypt environment": alice.deploy_body(other_node, echo, "echo", {"A": "b"}),
        "workload name 'no spaces' must match": alice.deploy_body(target, echo, "no spaces"),
        "no object 'missing' in the object store NEXCLIFILES": alice.deploy_body(
            target, type(echo)(location="nats://NEXCLIFILES/missing", hash=echo.hash, size=1), "missing"
        ),
        "no object store NOSUCHBUCKET": alice.deploy_body(
            target, type(echo)(location="nats://NOSUCHBUCKET/echo", hash=echo.hash, size=1), "echo"
        ),
        "Unable to deserialize deploy request": b"{not json",
    }
    replies = obus.collect("_INBOX.refusals.>")
    for number, body in enumerate(cases.values()):
        obus.run(obus.nc.publish(f"$NEX.DEPLOY.default.{node.node_id}", body, reply=f"_INBOX.refusals.{number}"))
    answers: dict[int, list[str]] = {}
    for _ in cases:
        subject, envelope = replies.next()
        answers.setdefault(int(subject.rsplit(".", 1)[1]), []).append(envelope["error"] or "")
    node.info(obus)  # a later request answered on the same connection: any second reply came before it
    late = replies.drain()

    assert not late, f"more than one reply: {late}"
    for number, expected in enumerate(cases):
        (error,) = answers[number]
        assert expected in error, f"case {expected!r} got {error!r}"
    assert pool_ids(node, obus) == pool_before, "a refused deploy must not take a machine"
    assert node.ping(obus).running_machines == 0
    assert node.stop() == 0


def test_stop_needs_the_deploying_issuer_and_a_fresh_jwt(
    home: Path, open_nats_server: NatsServerProc, obus: Bus, binaries: Binaries
) -> None:
    needs_namespaces()
    alice, mallory = Requester(obus), Requester(obus)
    node = NodeProcess(home, *reach(open_nats_server), server=open_nats_server.url).start(obus)
    target = node.ping(obus)
    echo = alice.upload(binaries.echo, "echo")
    now = int(time.time())
    deploy = workload_request.Deploy(
        location=echo.location,
        name="echo",
        hash=echo.hash,
        node_id=target.node_id,
        node_xkey=target.target_xkey,
        environment=echo_env(open_nats_server, "echo.stop"),
    )
    body = workload_request.deploy_request(deploy, alice.keys.issuer, alice.keys.xkey, issued_at=now - 10)
    workload = started(alice.deploy(node.node_id, body))
    assert echo_request(obus, "echo.stop", b"x") == b"x"

    def stop_body(who: Requester, issued_at: int, name: str = "echo") -> bytes:
        return workload_request.stop_request(workload.id, name, node.node_id, who.keys.issuer, issued_at=issued_at)

    refusals = {
        "the issuer that originally started it": stop_body(mallory, now),
        "cloned or captured": stop_body(alice, now - 10),  # the deploy's own iat: a replay of its claims
        "does not match the workload": stop_body(alice, now, name="other"),
        "No such workload 'nope'": stop_body(alice, now).replace(workload.id.encode(), b"nope"),
    }
    for expected, request in refusals.items():
        envelope = alice.stop(node.node_id, request)
        assert expected in (envelope.error or ""), (expected, envelope.error)
    assert echo_request(obus, "echo.stop", b"still") == b"still", "refused stops change nothing"

    accepted = stop_body(alice, now)
    envelope = alice.stop(node.node_id, accepted)
    assert envelope.error is None
    assert msgspec.json.decode(envelope.data, type=control.StopResponse) == control.StopResponse(
        stopped=True, id=workload.id, issuer=alice.issuer, name="echo"
    )
    replayed = alice.stop(node.node_id, accepted)
    assert "No such workload" in (replayed.error or "")
    assert node.stop() == 0


def test_processes_a_workload_leaves_behind_end_with_it(
    home: Path, open_nats_server: NatsServerProc, obus: Bus, binaries: Binaries
) -> None:
    """A daemon (double fork, own session) outlives neither a workload that exits nor one stopped."""
    needs_namespaces()
    alice = Requester(obus)
    node = NodeProcess(home, "--pool-size", "2", *reach(open_nats_server), server=open_nats_server.url).start(obus)
    events = obus.collect("$NEX.events.default.*")
    logs = obus.collect(f"$NEX.logs.default.{node.node_id}.>")
    target = node.ping(obus)
    echo = alice.upload(binaries.echo, "echo")
    exits = started(
        alice.deploy(node.node_id, alice.deploy_body(target, echo, "exits", {"ECHO_DAEMON": "1", "ECHO_EXIT": "0"}))
    )
    serves_env = {"ECHO_DAEMON": "1", **echo_env(open_nats_server, "echo.daemon")}
    serves = started(alice.deploy(node.node_id, alice.deploy_body(target, echo, "serves", serves_env)))
    for workload in (exits, serves):  # the daemon was there (its line and the workload's come in any order)
        lines = [logs.wait(f".{workload.id}")["text"] for _ in range(2)]
        assert any("daemon" in line for line in lines), lines
    assert echo_request(obus, "echo.daemon", b"x") == b"x"

    ended = events.wait("default.workload_stopped", source=node.node_id)
    assert ended["data"]["id"] == exits.id
    assert processes_mentioning(exits.id) == {}, "the daemon of a workload that exited is gone with it"
    later = int(time.time()) + 1  # a stop issued in the deploy's second would look replayed
    stop_body = workload_request.stop_request(serves.id, "serves", node.node_id, alice.keys.issuer, issued_at=later)
    stop = alice.stop(node.node_id, stop_body)
    assert stop.error is None, stop.error
    ended = events.wait("default.workload_stopped", source=node.node_id)
    assert ended["data"]["id"] == serves.id
    assert ended["data"]["code"] == 0, "the workload itself still gets SIGTERM and exits cleanly"
    assert processes_mentioning(serves.id) == {}, "the daemon of a stopped workload is gone with it"
    assert node.stop() == 0


def test_a_workload_that_exits_at_once_is_still_reported_started_then_stopped(
    home: Path, open_nats_server: NatsServerProc, obus: Bus, binaries: Binaries
) -> None:
    """Its agent answers the deploy and exits at once (the order of the two is pinned in
    tests/nex/test_machine_order.py): the deploy succeeds and both events come, every time."""
    needs_namespaces()
    alice = Requester(obus)
    node = NodeProcess(home, "--pool-size", "2", *reach(open_nats_server), server=open_nats_server.url).start(obus)
    events = obus.collect("$NEX.events.default.*")
    target = node.ping(obus)
    echo = alice.upload(binaries.echo, "echo")
    for run in range(3):
        body = alice.deploy_body(target, echo, f"brief{run}", {"ECHO_EXIT": "0"})
        envelope = alice.deploy(node.node_id, body)
        assert envelope.error is None, f"run {run}: {envelope.error}"
        workload = started(envelope)
        assert events.wait("default.workload_started", source=node.node_id)["data"]["id"] == workload.id
        ended = events.wait("default.workload_stopped", source=node.node_id)
        assert (ended["data"]["id"], ended["data"]["code"]) == (workload.id, 0), ended
    assert node.stop() == 0


def test_a_verified_artifact_is_reused_only_while_the_store_still_holds_it(
    home: Path, open_nats_server: NatsServerProc, obus: Bus, binaries: Binaries
) -> None:
    needs_namespaces()
    alice = Requester(obus)
    node = NodeProcess(home, "--pool-size", "2", *reach(open_nats_server), server=open_nats_server.url).start(obus)
    target = node.ping(obus)
    echo = alice.upload(binaries.echo, "echo")
    body = alice.deploy_body(target, echo, "echo", echo_env(open_nats_server, "echo.cache", "1:"))
    first = started(alice.deploy(node.node_id, body))
    assert echo_request(obus, "echo.cache", b"x") == b"1:x"
    # the object is replaced: the JWT's hash no longer names what is stored, cached or not
    replaced = alice.upload(binaries.echo_dynamic, "echo")
    refused = alice.deploy(node.node_id, alice.deploy_body(target, echo, "echo"))
    assert f"the artifact's sha256 is {replaced.hash}, but the workload JWT claims {echo.hash}" in (refused.error or "")
    # stored again, it runs again (from the node's cache: the same verified bytes)
    alice.upload(binaries.echo, "echo")
    second = started(
        alice.deploy(
            node.node_id, alice.deploy_body(target, echo, "echo", echo_env(open_nats_server, "echo.cache2", "2:"))
        )
    )
    assert second.id != first.id
    assert echo_request(obus, "echo.cache2", b"y") == b"2:y"
    assert node.stop() == 0


def test_an_essential_workload_that_fails_is_restarted_with_backoff_up_to_its_limit(
    home: Path, open_nats_server: NatsServerProc, obus: Bus, binaries: Binaries
) -> None:
    needs_namespaces()
    alice = Requester(obus)
    backoff_ms, limit = 300, 2
    config = config_file(home, essential_restart_limit=limit, essential_backoff_ms=backoff_ms)
    node = NodeProcess(home, "--config", config, *reach(open_nats_server), server=open_nats_server.url).start(obus)
    events = obus.collect("$NEX.events.default.*")
    target = node.ping(obus)
    failing = alice.upload(binaries.echo, "failing")
    body = alice.deploy_body(target, failing, "failing", {"ECHO_EXIT": "1"}, essential=True, argv=["once"])

    first = started(alice.deploy(node.node_id, body))

    runs = []
    for _ in range(limit + 1):
        begun = events.wait("default.workload_started", source=node.node_id)
        ended = events.wait("default.workload_stopped", source=node.node_id)
        assert ended["data"]["id"] == begun["data"]["id"]
        assert ended["data"]["code"] == 1, ended
        runs.append((begun["data"]["id"], _seconds(begun["time"]), _seconds(ended["time"])))
    assert runs[0][0] == first.id
    assert len({vmid for vmid, _, _ in runs}) == limit + 1, "each run gets a fresh machine"
    for attempt in range(1, limit + 1):
        waited = runs[attempt][1] - runs[attempt - 1][2]
        assert waited >= backoff_ms / 1000 * 2 ** (attempt - 1) * 0.95, f"restart {attempt} after {waited:.3f}s"
    node.wait_log("Essential workload keeps failing; not restarting it again")
    assert node.ping(obus).running_machines == 0
    assert not events.pending("workload_started"), "no restart beyond the limit"
    assert node.stop() == 0


def _seconds(rfc3339: str) -> float:
    return datetime.datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def test_lame_duck_refuses_deploys_drops_essential_and_exits_once_the_workload_ends(
    home: Path, open_nats_server: NatsServerProc, obus: Bus, binaries: Binaries
) -> None:
    needs_namespaces()
    alice = Requester(obus)
    node = NodeProcess(home, *reach(open_nats_server), server=open_nats_server.url).start(obus)
    events = obus.collect("$NEX.events.>")
    target = node.ping(obus)
    echo = alice.upload(binaries.echo, "echo")
    body = alice.deploy_body(target, echo, "echo", echo_env(open_nats_server, "echo.ld"), essential=True)
    workload = started(alice.deploy(node.node_id, body))
    assert echo_request(obus, "echo.ld", b"x") == b"x"

    result = run_cli("lameduck", node.node_id, "-s", open_nats_server.url)

    assert result.returncode == 0, result.stderr
    events.wait("system.node_entered_lameduck", source=node.node_id)
    refused = alice.deploy(node.node_id, body)
    assert "lame duck" in (refused.error or "")
    still = node.ping(obus)  # the node waits for its workload
    assert still.running_machines == 1
    assert still.tags["nex.lameduck"] == "true"
    (pid,) = workload_pids(workload.id)
    os.kill(pid, signal.SIGKILL)  # an essential workload failing: in lame duck it is not restarted
    ended = events.wait("default.workload_stopped", source=node.node_id)
    assert ended["data"]["code"] == -9
    events.wait("system.node_stopped", source=node.node_id)
    assert node.wait() == 0
    assert "lame duck: no workloads left" in node.log()
    assert "restarting it" not in node.log()
