"""Workload records in the control NATS's KV bucket, and a node started again after a crash.

The integration tests read the bucket as any watcher would: a JetStream consumer of its stream,
with nats-py, not the node's own code. The node's records are signed and its JWT rule for a redeploy
is checked on its own too (no NATS needed).
"""

from __future__ import annotations

import base64
import hashlib
import json
import queue
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import nkeys
import pytest

from nex import crypto
from nex.api import control
from nex.bus.server import nats_server_binary
from nex.vm.machine import RunningWorkload
from nex.workload import checks, recovery
from nex.workload import request as workload_request
from nex.workload.checks import Refused
from nex.workload.records import BUCKET, WorkloadRecord, from_the_cluster, sign, signed_by_its_node

from .support import Bus, NatsServerProc, NodeProcess, wait_for_port
from .test_workloads import config_file, echo_env, echo_request, needs_namespaces, reach
from .workloads import Binaries, Requester, started

# -- helpers -------------------------------------------------------------------------------------------


class Records:
    """One node's records as a watcher of the bucket sees them: every put and removal, in order."""

    def __init__(self, bus: Bus, node_id: str) -> None:
        self.state: dict[str, WorkloadRecord] = {}  # workload id -> record
        self.history: list[tuple[str, WorkloadRecord | None]] = []
        self._changes: queue.Queue[tuple[str, str, bytes]] = queue.Queue()
        prefix = f"$KV.{BUCKET}.{node_id}."

        async def changed(msg: Any) -> None:
            operation = (msg.headers or {}).get("KV-Operation", "PUT")
            self._changes.put((msg.subject.removeprefix(prefix), operation, msg.data))

        self._bus = bus
        self._sub = bus.run(bus.nc.jetstream().subscribe(prefix + ">", cb=changed, ordered_consumer=True))

    def close(self) -> None:
        self._bus.run(self._sub.unsubscribe())

    def wait(self, condition: Callable[[dict[str, WorkloadRecord]], bool], what: str, timeout: float = 20) -> None:
        """Until ``condition(state)`` holds, as the changes come (each waited for with the deadline)."""
        deadline = time.monotonic() + timeout
        while not condition(self.state):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the bucket never held {what}; it holds {sorted(self.state)}")
            try:
                workload_id, operation, data = self._changes.get(timeout=remaining)
            except queue.Empty:
                continue
            if operation == "PUT":
                self.state[workload_id] = msgspec.json.decode(data, type=WorkloadRecord)
            else:
                self.state.pop(workload_id, None)
            self.history.append((workload_id, self.state.get(workload_id)))


def records_in_bucket(bus: Bus, node_id: str) -> dict[str, bytes]:
    """The bucket's current records of ``node_id``, key -> value, read with nats-py's KV API."""

    async def read() -> dict[str, bytes]:
        kv = await bus.nc.jetstream().key_value(BUCKET)
        try:
            keys = await kv.keys()
        except nats.js.errors.NoKeysError:
            return {}
        found = {}
        for key in keys:
            if key.startswith(f"{node_id}."):
                entry = await kv.get(key)
                found[key] = entry.value or b""
        return found

    return bus.run(read())


def wait_silent(bus: Bus, subject: str, timeout: float = 20) -> None:
    """Until nothing answers on ``subject`` (each try a real request)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            bus.request(subject, b"anyone?", timeout=0.5)
        except nats.errors.NoRespondersError:
            return
        except nats.errors.TimeoutError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{subject} still answered after {timeout}s")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def expiring_jwt(issuer: nkeys.KeyPair, name: str, artifact_hash: str, *, exp: int, iat: int) -> str:
    """A workload JWT as nex's clients sign it, with an expiry (theirs never set one)."""
    claims = {
        "exp": exp,
        "iat": iat,
        "iss": issuer.public_key.decode(),
        "jti": uuid.uuid4().hex,
        "sub": name,
        "nats": {"hash": artifact_hash, "name": name, "version": 2},
    }
    signing_input = f"{_b64url(json.dumps(crypto.JWT_HEADER).encode())}.{_b64url(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64url(issuer.sign(signing_input.encode()))}"


def with_jwt(body: bytes, token: str) -> bytes:
    request = json.loads(body)
    request["workload_jwt"] = token
    return json.dumps(request).encode()


def record(**changes: Any) -> WorkloadRecord:
    fields: dict[str, Any] = {
        "node_id": "N",
        "workload_id": "vm1",
        "namespace": "default",
        "name": "echo",
        "location": "nats://NEXCLIFILES/echo",
        "hash": "ab" * 32,
        "essential": True,
        "accepted_at": 1_700_000_000,
        "deploy_request": msgspec.Raw(b'{"workload_jwt":"x"}'),
    }
    return WorkloadRecord(**{**fields, **changes})


# -- without NATS ------------------------------------------------------------------------------------


def test_a_record_verifies_only_as_its_node_signed_it() -> None:
    node, other = crypto.NodeIdentity.generate(), crypto.NodeIdentity.generate()
    signed = sign(record(node_id=node.node_id), node)
    assert signed_by_its_node(signed)
    assert signed_by_its_node(msgspec.json.decode(msgspec.json.encode(signed), type=WorkloadRecord))
    assert signed_by_its_node(msgspec.structs.replace(signed, started_at="2030-01-01T00:00:00Z"))  # not covered
    tampered = {
        "accepted_at": 1_800_000_000,  # an expired JWT made to look accepted in time
        "essential": False,
        "restart_pending": True,
        "deploy_request": msgspec.Raw(b'{"workload_jwt":"y"}'),
        "workload_id": "vm2",
        "node_id": other.node_id,
        "namespace": "other",  # and what a takeover acts on
        "name": "other",
        "location": "nats://ELSEWHERE/x",
        "hash": "0" * 64,
        "shared_environment": "eGt2MQ==",
        "shared_sender": "XAAA",
    }
    for name, value in tampered.items():
        assert not signed_by_its_node(msgspec.structs.replace(signed, **{name: value})), name
    assert not signed_by_its_node(sign(record(node_id=node.node_id), other)), "another node's signature"
    assert not signed_by_its_node(msgspec.structs.replace(signed, signature="not base64!"))


def test_only_a_holder_of_the_cluster_key_writes_a_record_another_node_acts_on() -> None:
    """Any nkey signs a record of its own "node": a takeover acts only on records MACed under the key."""
    node, key, other_key = crypto.NodeIdentity.generate(), crypto.XKey.generate().seed, crypto.XKey.generate().seed
    member = sign(record(node_id=node.node_id, shared_environment="eGt2MQ==", shared_sender="X"), node, key)
    assert from_the_cluster(member, key)
    stranger = sign(record(node_id=node.node_id, shared_environment="eGt2MQ==", shared_sender="X"), node, other_key)
    assert signed_by_its_node(stranger), "a perfectly signed record"
    assert not from_the_cluster(stranger, key), "but not from this cluster"
    assert not from_the_cluster(sign(record(node_id=node.node_id), node), key), "no MAC at all"
    assert not from_the_cluster(msgspec.structs.replace(member, name="other"), key), "the MAC covers what it signs"


def test_a_redeploy_judges_the_jwt_expiry_when_the_request_was_accepted() -> None:
    issuer = crypto.create_signing_key(crypto.PREFIX_ACCOUNT)
    now = int(time.time())
    token = expiring_jwt(issuer, "echo", "ab" * 32, exp=now - 60, iat=now - 120)
    request = control.DeployRequest(workload_jwt=token)
    with pytest.raises(Refused, match="expired"):
        checks.check_jwt(request)
    assert checks.check_jwt(request, at=now - 90).sub == "echo"
    with pytest.raises(Refused, match="expired"):
        checks.check_jwt(control.DeployRequest(workload_jwt=token), at=now - 30)


def test_leftovers_redeploy_only_essential_workloads_the_machines_say_ran_or_were_due() -> None:
    ran = [RunningWorkload(vmid=v, name=v, namespace="default") for v in ("kept", "plain", "unrecorded")]
    records = [
        record(workload_id="kept", name="kept"),
        record(workload_id="plain", name="plain", essential=False),
        record(workload_id="due", name="due", restart_pending=True),  # exited; its restart was due
        record(workload_id="stale", name="stale"),  # not running: its removal failed
    ]
    found = {leftover.workload_id: leftover for leftover in recovery.leftovers(ran, records)}
    assert {k: (v.ran, v.redeploy, v.record is not None) for k, v in found.items()} == {
        "kept": (True, True, True),
        "plain": (True, False, True),
        "unrecorded": (True, False, False),
        "due": (False, True, True),
        "stale": (False, False, True),
    }


# -- on a real node -------------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_running_workload_has_a_signed_record_until_it_is_stopped(
    home: Path, open_nats_server: NatsServerProc, obus: Bus, binaries: Binaries
) -> None:
    needs_namespaces()
    alice = Requester(obus)
    node = NodeProcess(home, *reach(open_nats_server), server=open_nats_server.url).start(obus)
    records = Records(obus, node.node_id)
    events = obus.collect("$NEX.events.default.*")
    target = node.ping(obus)
    echo = alice.upload(binaries.echo, "echo")
    secret = f"secret-{uuid.uuid4().hex}"
    body = alice.deploy_body(target, echo, "echo", echo_env(open_nats_server, "records.one", secret))
    before = int(time.time())

    workload = started(alice.deploy(node.node_id, body))

    assert echo_request(obus, "records.one", b"x") == f"{secret}x".encode()
    records.wait(lambda state: workload.id in state, "the workload's record")
    kept = records.state[workload.id]
    assert (kept.node_id, kept.workload_id, kept.namespace, kept.name) == (node.node_id, workload.id, "default", "echo")
    assert (kept.location, kept.hash) == (echo.location, hashlib.sha256(binaries.echo).hexdigest())
    assert (kept.essential, kept.restarts, kept.restart_pending) == (False, 0, False)
    assert before <= kept.accepted_at <= int(time.time())
    assert bytes(kept.deploy_request) == body, "the request as it was received"
    assert signed_by_its_node(kept)
    stored = records_in_bucket(obus, node.node_id)
    assert list(stored) == [f"{node.node_id}.{workload.id}"]
    assert secret.encode() not in stored[f"{node.node_id}.{workload.id}"], "the environment stays sealed"
    info = obus.run(obus.nc.jetstream().stream_info(f"KV_{BUCKET}"))
    assert (info.config.num_replicas, info.config.max_msgs_per_subject) == (1, 1)

    later = int(time.time()) + 1  # a stop issued in the deploy's second would look replayed
    stop = workload_request.stop_request(workload.id, "echo", node.node_id, alice.keys.issuer, issued_at=later)
    assert alice.stop(node.node_id, stop).error is None
    assert events.wait("default.workload_stopped", source=node.node_id)["data"]["id"] == workload.id
    records.wait(lambda state: not state, "no record once the workload stopped")
    assert records_in_bucket(obus, node.node_id) == {}
    records.close()
    assert node.stop() == 0


@pytest.mark.integration
def test_an_essential_restart_keeps_the_record_while_it_is_due_then_hands_it_on(
    home: Path, open_nats_server: NatsServerProc, obus: Bus, binaries: Binaries
) -> None:
    needs_namespaces()
    alice = Requester(obus)
    config = config_file(home, essential_restart_limit=1, essential_backoff_ms=1500)
    node = NodeProcess(home, "--config", config, *reach(open_nats_server), server=open_nats_server.url).start(obus)
    records = Records(obus, node.node_id)
    events = obus.collect("$NEX.events.default.*")
    failing = alice.upload(binaries.echo, "failing")
    body = alice.deploy_body(node.ping(obus), failing, "failing", {"ECHO_EXIT": "1"}, essential=True)

    first = started(alice.deploy(node.node_id, body))

    assert events.wait("default.workload_started", source=node.node_id)["data"]["id"] == first.id
    assert events.wait("default.workload_stopped", source=node.node_id)["data"]["id"] == first.id
    records.wait(
        lambda state: first.id in state and state[first.id].restart_pending,
        "the failed run's record, its restart due",
    )
    due = records.state[first.id]
    assert (due.restarts, due.essential, bytes(due.deploy_request)) == (1, True, body)
    second = events.wait("default.workload_started", source=node.node_id)["data"]["id"]
    assert second != first.id
    assert events.wait("default.workload_stopped", source=node.node_id)["data"]["id"] == second
    node.wait_log("Essential workload keeps failing; not restarting it again")
    records.wait(lambda state: not state, "no record once no restart is left")
    assert all(kept is None or kept.restarts == 1 for workload_id, kept in records.history if workload_id == second)
    records.close()
    assert node.stop() == 0


@pytest.mark.integration
def test_a_node_killed_and_started_again_redeploys_its_essential_workload_and_reports_the_other(
    home: Path, open_nats_server: NatsServerProc, obus: Bus, binaries: Binaries
) -> None:
    needs_namespaces()
    alice = Requester(obus)
    args = ["--pool-size", "2", *reach(open_nats_server)]
    node = NodeProcess(home, *args, server=open_nats_server.url).start(obus)
    records = Records(obus, node.node_id)
    target = node.ping(obus)
    echo = alice.upload(binaries.echo, "echo")
    now = int(time.time())
    # its JWT expires before the node comes back: the node judges it when it accepted the request
    token = expiring_jwt(alice.keys.issuer, "kept", echo.hash, exp=now + 4, iat=now)
    kept_body = with_jwt(
        alice.deploy_body(target, echo, "kept", echo_env(open_nats_server, "records.kept", "kept-"), essential=True),
        token,
    )
    lost_body = alice.deploy_body(target, echo, "lost", echo_env(open_nats_server, "records.lost", "lost-"))
    kept = started(alice.deploy(node.node_id, kept_body))
    lost = started(alice.deploy(node.node_id, lost_body))
    assert echo_request(obus, "records.kept", b"x") == b"kept-x"
    assert echo_request(obus, "records.lost", b"x") == b"lost-x"
    records.wait(lambda state: set(state) == {kept.id, lost.id}, "both workloads' records")
    original = records.state[kept.id]
    while time.time() <= now + 4:  # the wall clock must pass the JWT's expiry (not a synchronisation)
        obus.run(obus.nc.flush())

    node.signal(signal.SIGKILL)
    assert node.wait() == -signal.SIGKILL
    wait_silent(obus, "records.kept")  # the workloads died with their node
    wait_silent(obus, "records.lost")
    events = obus.collect("$NEX.events.default.*")
    again = NodeProcess(home, *args, server=open_nats_server.url).start(obus)

    assert again.node_id == node.node_id, "the same identity, from the same state directory"
    begun = events.wait("default.workload_started", source=again.node_id)
    assert begun["data"]["workload_name"] == "kept"
    redeployed = begun["data"]["id"]
    assert redeployed not in (kept.id, lost.id)
    assert echo_request(obus, "records.kept", b"y") == b"kept-y", "its sealed environment, opened again"
    stopped = {}
    for _ in range(2):
        event = events.wait("default.workload_stopped", source=again.node_id)["data"]
        stopped[event["id"]] = event
    assert {k: (v["workload_name"], v["code"]) for k, v in stopped.items()} == {
        kept.id: ("kept", -1),
        lost.id: ("lost", -1),
    }
    assert stopped[kept.id]["message"] == recovery.redeployed(redeployed)
    assert stopped[lost.id]["message"] == recovery.CRASHED
    assert not events.pending("workload_started"), "the non-essential workload is not run again"
    with pytest.raises(nats.errors.NoRespondersError):
        obus.request("records.lost", b"gone?", timeout=2)
    records.wait(lambda state: set(state) == {redeployed}, "the redeployed workload's record alone")
    now_kept = records.state[redeployed]
    assert (now_kept.name, now_kept.essential, bytes(now_kept.deploy_request)) == ("kept", True, kept_body)
    assert (now_kept.accepted_at, now_kept.restarts) == (original.accepted_at, original.restarts)
    info = again.info(obus)
    assert [(m.id, m.workload.name) for m in info.machines] == [(redeployed, "kept")]

    records.close()
    assert again.stop() == 0
    assert records_in_bucket(obus, again.node_id) == {}, "a node that stops removes its records"


@pytest.mark.integration
def test_without_jetstream_the_node_serves_and_says_once_that_it_keeps_no_records(home: Path) -> None:
    server = NatsServerProc(home, jetstream=False).start()
    bus = Bus(server.url)
    try:
        node = NodeProcess(home, server=server.url).start(bus)
        assert node.ping(bus).node_id == node.node_id
        alice = Requester(bus)
        refused = alice.deploy(node.node_id, b"{}")
        assert refused.error is not None
        node.wait_log("Not keeping workload records")
        assert node.stop() == 0
        log = node.log()
        assert log.count("Not keeping workload records") == 1, log
        assert "no JetStream on the control server" in log
    finally:
        bus.close()
        server.stop()


@pytest.fixture
def one_stream_server(home: Path) -> Iterator[NatsServerProc]:
    """A control server whose account may have one JetStream stream: the artifacts' object store."""
    server = NatsServerProc(home, host="0.0.0.0")
    store = home / f"js-{server.port}"  # where stop() looks
    config = home / "limited.conf"
    config.write_text(
        f'listen: "0.0.0.0:{server.port}"\n'
        f'jetstream {{ store_dir: "{store}" }}\n'
        "accounts { APP { jetstream { max_streams: 1, max_mem: 64MB, max_file: 256MB }, "
        "users [ { user: app, password: app } ] } }\n"
        "no_auth_user: app\n"
    )
    server.proc = subprocess.Popen(
        [str(nats_server_binary()), "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_port(server.port, timeout=10)
    yield server
    server.stop()


@pytest.mark.integration
def test_a_bucket_the_account_cannot_have_costs_no_deploy(
    home: Path, one_stream_server: NatsServerProc, binaries: Binaries
) -> None:
    needs_namespaces()
    bus = Bus(one_stream_server.url)
    try:
        alice = Requester(bus)
        echo = alice.upload(binaries.echo, "echo")  # the account's one stream
        node = NodeProcess(home, *reach(one_stream_server), server=one_stream_server.url).start(bus)
        target = node.ping(bus)
        for n in range(2):
            body = alice.deploy_body(target, echo, f"echo{n}", echo_env(one_stream_server, f"limited.{n}", "l-"))
            workload = started(alice.deploy(node.node_id, body))
            assert echo_request(bus, f"limited.{n}", b"x") == b"l-x"
            later = int(time.time()) + 1
            stop = workload_request.stop_request(
                workload.id, f"echo{n}", node.node_id, alice.keys.issuer, issued_at=later
            )
            assert alice.stop(node.node_id, stop).error is None
        with pytest.raises(nats.js.errors.BucketNotFoundError):
            bus.run(bus.nc.jetstream().key_value(BUCKET))
        assert node.stop() == 0
        assert node.log().count("Not keeping workload records") == 1, node.log()
    finally:
        bus.close()


def test_state_replicas_is_a_config_key_within_jetstreams_limits(tmp_path: Path) -> None:
    from nex import config

    path = tmp_path / "node.json"
    path.write_text(json.dumps({"state_replicas": 3}))
    assert config.load(path).config.state_replicas == 3
    assert config.load(None).config.state_replicas == 0  # as many as the cluster allows
    path.write_text(json.dumps({"state_replicas": -1}))
    with pytest.raises(config.ConfigError, match=r"state_replicas must be between 1 and 5"):
        config.load(path)


@pytest.mark.integration
def test_a_workload_whose_record_another_node_took_ends_here(
    home: Path, open_nats_server: NatsServerProc, obus: Bus, binaries: Binaries
) -> None:
    """As a node that took this one for dead does (a partition, a stall): it deletes the record, and
    this node, alive after all, ends its copy rather than run it twice."""
    needs_namespaces()
    alice = Requester(obus)
    node = NodeProcess(home, *reach(open_nats_server), server=open_nats_server.url).start(obus)
    records = Records(obus, node.node_id)
    events = obus.collect("$NEX.events.default.*")
    echo = alice.upload(binaries.echo, "echo")
    body = alice.deploy_body(node.ping(obus), echo, "echo", echo_env(open_nats_server, "records.taken", ""))
    workload = started(alice.deploy(node.node_id, body))
    records.wait(lambda state: workload.id in state, "the workload's record")

    kv = obus.run(obus.nc.jetstream().key_value(BUCKET))
    obus.run(kv.delete(f"{node.node_id}.{workload.id}"))  # taken, as nex.node.takeover takes one

    stopped = events.wait("default.workload_stopped", source=node.node_id, timeout=30)
    assert stopped["data"]["id"] == workload.id
    assert stopped["data"]["message"] == "moved to another node, which took this one for dead"
    assert node.info(obus).machines == [], "its copy ended here"
    assert node.stop() == 0
    records.close()
