"""Interop with nex's Go client: tests/vectors/deploy-request.json was made by Go code (tests/vectors/gen).

The generator builds a deploy and a stop request as nex v0.2.7's ``controlapi`` does, with the real
nats-io/jwt library and Go's encoding/json, from pinned keys. Here: this client builds the same bytes
from the same inputs, and a node given the vector's node keys accepts the Go bytes as they are.
"""

from __future__ import annotations

import base64
import json
import platform
from pathlib import Path

import msgspec
import pytest

from nex import crypto
from nex.api import control
from nex.net import netns
from nex.workload import request as workload_request

from .support import Bus, NatsServerProc, NodeProcess
from .workloads import Requester, started

VECTORS = Path(__file__).parent.parent / "vectors"
VECTOR = json.loads((VECTORS / "deploy-request.json").read_text())
INPUTS = VECTOR["inputs"]
GO_DEPLOY = VECTOR["deploy_request"].encode()
GO_STOP = VECTOR["stop_request"].encode()


def test_this_client_builds_the_go_clients_deploy_request_byte_for_byte() -> None:
    wire = json.loads(GO_DEPLOY)
    sealed = base64.b64decode(wire["environment"])
    claims = crypto.decode_generic_jwt(wire["workload_jwt"])
    deploy = workload_request.Deploy(
        location=INPUTS["location"],
        name=INPUTS["name"],
        hash=INPUTS["hash"],
        node_id=INPUTS["node_id"],
        node_xkey=INPUTS["node_public_xkey"],
        environment=INPUTS["environment"],
        argv=INPUTS["argv"],
        description=INPUTS["description"],
        essential=INPUTS["essential"],
    )
    issuer = crypto.signing_key_from_seed(INPUTS["issuer_seed"], crypto.PREFIX_ACCOUNT)
    sender = crypto.XKey.from_seed(INPUTS["sender_xkey_seed"])

    ours = workload_request.deploy_request(
        deploy, issuer, sender, request_id=INPUTS["request_id"], issued_at=claims.iat, nonce=sealed[4:28]
    )

    assert ours == GO_DEPLOY


def test_this_client_builds_the_go_clients_stop_request_byte_for_byte() -> None:
    claims = crypto.decode_generic_jwt(json.loads(GO_STOP)["workload_jwt"])
    issuer = crypto.signing_key_from_seed(INPUTS["issuer_seed"], crypto.PREFIX_ACCOUNT)
    ours = workload_request.stop_request(
        INPUTS["stop_workload_id"], INPUTS["name"], INPUTS["node_id"], issuer, issued_at=claims.iat
    )
    assert ours == GO_STOP


def test_the_go_request_pins_nex_formats() -> None:
    wire = json.loads(GO_DEPLOY)
    header = wire["workload_jwt"].split(".")[0]
    assert base64.urlsafe_b64decode(header + "==") == b'{"typ":"JWT","alg":"ed25519-nkey"}'
    claims = crypto.decode_generic_jwt(wire["workload_jwt"])
    assert claims.sub == INPUTS["request_id"]
    assert claims.nats == {"hash": INPUTS["hash"], "name": INPUTS["name"], "version": 2}
    sealed = base64.b64decode(wire["environment"])
    assert sealed.startswith(b"xkv1")
    node = crypto.XKey.from_seed(INPUTS["node_xkey_seed"])
    assert json.loads(node.open(sealed, wire["sender_public_key"])) == INPUTS["environment"]
    request = msgspec.json.decode(GO_DEPLOY, type=control.DeployRequest)
    assert request.location_url() == INPUTS["location"]
    assert request.hash is None


@pytest.mark.integration
def test_a_node_accepts_the_go_clients_bytes_as_they_are(home: Path, nats_server: NatsServerProc, bus: Bus) -> None:
    if platform.machine() not in ("x86_64", "amd64"):
        pytest.skip("the vector's workload (tests/vectors/interop.elf) is an x86-64 binary")
    if not netns.has_capabilities():
        pytest.skip("runs a workload in a machine: needs root")
    state = home / "node"
    state.mkdir()
    (state / "node.nk").write_text(INPUTS["node_seed"] + "\n")
    (state / "node.xk").write_text(INPUTS["node_xkey_seed"] + "\n")
    for key in state.iterdir():
        key.chmod(0o600)
    node = NodeProcess(home, server=nats_server.url).start(bus)
    assert node.node_id == INPUTS["node_id"]
    events = bus.collect("$NEX.events.default.*")
    logs = bus.collect("$NEX.logs.default.>")
    artifact = Requester(bus).upload((VECTORS / "interop.elf").read_bytes(), "interop")
    assert artifact.location == INPUTS["location"]
    assert artifact.hash == INPUTS["hash"]

    reply = bus.request(f"$NEX.DEPLOY.default.{node.node_id}", GO_DEPLOY, timeout=30)

    response = started(msgspec.json.decode(reply, type=control.ReceivedEnvelope))
    issuer = crypto.signing_key_from_seed(INPUTS["issuer_seed"], crypto.PREFIX_ACCOUNT)
    assert (response.name, response.issuer) == ("interop", issuer.public_key.decode())
    line = logs.wait(f".interop.{response.id}")
    assert line["text"] == "interop: hello from a Go-built deploy request"
    ended = events.wait("default.workload_stopped", source=node.node_id)
    assert ended["data"]["id"] == response.id
    assert ended["data"]["code"] == 0
    assert node.stop() == 0
