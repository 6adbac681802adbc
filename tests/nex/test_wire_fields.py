"""Every payload writes the fields nex's Go structs write: a field without ``omitempty`` always, even
empty (Go's encoding/json writes it as ``""``, ``0``, ``false``, ``null``, ``[]`` or ``{}``), and a
field with ``omitempty`` not at all when empty.

Each payload is built with empty values and its raw JSON decoded as a plain object, so what is checked
is the bytes on the wire. The field lists are nex's, read from its Go structs at v0.2.2 and v0.2.7
(control-api/types.go, control-api/events.go, control-api/stop.go, internal/agent-api/types.go and
events.go): ``always`` are the fields without ``omitempty``, ``omitempty`` the ones with it.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from nex.api import agent, control, events

EMPTY_WORKLOAD = control.WorkloadSummary(name="", runtime="", type="")

#: (payload built with empty values, nex's fields always written, nex's fields left out when empty)
CASES: dict[str, tuple[msgspec.Struct, set[str], set[str]]] = {
    # control-api/types.go
    "RunResponse": (
        control.RunResponse(started=False, id="", issuer="", name=""),
        {"started", "id", "issuer", "name"},
        set(),
    ),
    "PingResponse": (
        control.PingResponse(node_id="", version="", uptime="", target_xkey="", running_machines=0),
        {"node_id", "version", "uptime", "target_xkey", "running_machines"},
        {"tags"},
    ),
    "WorkloadPingResponse": (
        control.WorkloadPingResponse(node_id="", target_xkey="", version="", uptime="", running_machines=[]),
        {"node_id", "target_xkey", "version", "uptime", "running_machines"},
        {"tags"},
    ),
    "WorkloadPingMachineSummary": (
        control.WorkloadPingMachine(id="", namespace="", name="", type=""),
        {"id", "namespace", "name", "type"},
        set(),
    ),
    "LameDuckResponse": (control.LameDuckResponse(node_id="", success=False), {"node_id", "success"}, set()),
    "MemoryStat": (control.MemoryStat(total=0, free=0, available=0), {"total", "free", "available"}, set()),
    "InfoResponse": (
        control.InfoResponse(version="", uptime="", public_xkey=""),
        {"version", "uptime", "public_xkey", "machines"},
        {"tags", "memory", "supported_workload_types"},
    ),
    "MachineSummary": (
        control.MachineSummary(id="", healthy=False, uptime="", workload=EMPTY_WORKLOAD),
        {"id", "healthy", "uptime", "workload"},  # workload: omitempty on a struct, which Go always writes
        {"namespace"},
    ),
    "WorkloadSummary": (EMPTY_WORKLOAD, {"name", "runtime", "type", "hash"}, {"description"}),
    "Envelope": (control.Envelope(type=""), {"type"}, {"data", "error"}),
    "RawLog": (control.RawLog(text="", level="", id=""), {"text", "level", "id"}, set()),
    "EmittedLog": (
        control.EmittedLog(
            namespace="", node_id="", workload_name="", workload_id="", timestamp="", text="", level="", id=""
        ),
        {"namespace", "node_id", "workload_id", "timestamp", "text", "level", "id"},
        set(),
    ),
    # control-api/stop.go
    "StopRequest": (
        control.StopRequest(workload_id="", workload_jwt=""),
        {"workload_id", "workload_jwt", "target_node"},
        set(),
    ),
    "StopResponse": (
        control.StopResponse(stopped=False, id="", issuer="", name=""),
        {"stopped", "id", "issuer", "name"},
        set(),
    ),
    # control-api/events.go (node_started's tags since v0.2.7)
    "NodeStartedEvent": (events.NodeStartedData(version="", id=""), {"version", "id"}, {"tags"}),
    "NodeStoppedEvent": (events.NodeStoppedData(id="", graceful=False), {"id", "graceful"}, set()),
    "LameDuckEnteredEvent": (events.LameDuckData(version="", id=""), {"version", "id"}, set()),
    "HeartbeatEvent": (
        events.HeartbeatData(version="", node_id="", uptime="", running_machines=0),
        {"version", "node_id", "uptime", "running_machines"},
        {"tags"},
    ),
    "WorkloadStoppedEvent": (events.WorkloadEventData(workload_name=""), {"workload_name", "code", "message"}, set()),
    # internal/agent-api
    "HandshakeRequest": (agent.HandshakeRequest(id="", start_time=""), {"id", "start_time"}, {"message"}),
    "DeployRequest": (
        agent.AgentDeployRequest(workload_name="", namespace="", hash="", total_bytes=0),
        {"description", "environment", "trigger_subjects", "workload_type"},  # workload_type: never empty
        {"argv", "essential"},
    ),
    "DeployResponse": (agent.DeployResponse(accepted=False), {"accepted", "message"}, set()),
    "WorkloadStatusEvent": (agent.WorkloadStatus(workload_name=""), {"workload_name", "code"}, {"message"}),
    "LogEntry": (agent.LogEntry(), set(), {"source", "level", "text"}),
    "MachineMetadata": (
        agent.MachineMetadata(vmid="", node_nats_host="", node_nats_port=0),
        {"vmid", "node_nats_host", "node_nats_port", "node_nats_nkey", "message"},
        set(),
    ),
}


def wire(payload: msgspec.Struct) -> dict[str, Any]:
    """The payload's fields as they are on the wire (the raw bytes, decoded as a plain object)."""
    decoded = json.loads(msgspec.json.encode(payload))
    assert isinstance(decoded, dict)
    return decoded


@pytest.mark.parametrize("name", sorted(CASES))
def test_fields_nex_always_writes_are_written_even_empty(name: str) -> None:
    payload, always, _ = CASES[name]
    missing = always - set(wire(payload))
    assert not missing, f"{name} leaves out {sorted(missing)}, which nex always writes"


@pytest.mark.parametrize("name", sorted(CASES))
def test_fields_nex_omits_when_empty_are_left_out(name: str) -> None:
    payload, _, omitempty = CASES[name]
    present = omitempty & set(wire(payload))
    assert not present, f"{name} writes {sorted(present)} empty, which nex leaves out"


def test_a_node_with_no_workload_says_so_in_info() -> None:
    """The defect this pins: INFO with no machine left ``machines`` out; nex writes ``[]``."""
    info = control.InfoResponse(version="v0.2.7", uptime="1s", public_xkey="X", machines=[])
    raw = control.success(control.INFO_RESPONSE, info)
    assert json.loads(raw)["data"]["machines"] == []


def test_empty_always_written_fields_are_written_as_go_writes_them() -> None:
    assert wire(agent.DeployResponse(accepted=True)) == {"accepted": True, "message": None}
    assert wire(agent.WorkloadStatus(workload_name="echo")) == {"workload_name": "echo", "code": 0}
    assert wire(EMPTY_WORKLOAD)["hash"] == ""


def test_defaults_still_apply_when_decoding_and_constructing() -> None:
    """Always written is about encoding only: a peer that leaves such a field out is still understood."""
    assert msgspec.json.decode(b'{"accepted": true}', type=agent.DeployResponse).message is None
    decoded = msgspec.json.decode(b'{"version": "v", "uptime": "1s", "public_xkey": "X"}', type=control.InfoResponse)
    assert decoded.machines == []
    request = agent.AgentDeployRequest(workload_name="a", namespace="b", hash="c", total_bytes=1)
    assert (request.environment, request.description, request.workload_type) == ({}, "", "native")
    other = agent.AgentDeployRequest(workload_name="a", namespace="b", hash="c", total_bytes=1)
    request.environment["X"] = "1"
    assert other.environment == {}, "each request has an environment of its own"
