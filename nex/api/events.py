"""Events as CloudEvents 1.0 JSON, as nex publishes them on ``$NEX.events.{ns}.{type}`` (reference §7).

Node events go to the ``system`` namespace with the node's public key as ``source``. As in
:mod:`nex.api.control`, a field is left out when empty only where nex's Go struct says ``omitempty``
(``tags``); every other one is always written.
"""

from __future__ import annotations

import datetime
import uuid
from typing import Any

import msgspec

NODE_STARTED = "node_started"
NODE_STOPPED = "node_stopped"
NODE_ENTERED_LAMEDUCK = "node_entered_lameduck"
HEARTBEAT = "heartbeat"
WORKLOAD_STARTED = "workload_started"
WORKLOAD_STOPPED = "workload_stopped"


class CloudEvent(msgspec.Struct):
    specversion: str
    id: str
    source: str
    type: str
    time: str
    datacontenttype: str = "application/json"
    data: Any = None


class NodeStartedData(msgspec.Struct, omit_defaults=True):
    version: str
    id: str
    tags: dict[str, str] = {}


class NodeStoppedData(msgspec.Struct):
    id: str
    graceful: bool


class LameDuckData(msgspec.Struct):
    version: str
    id: str


class HeartbeatData(msgspec.Struct, omit_defaults=True):
    version: str
    node_id: str
    uptime: str
    running_machines: int
    tags: dict[str, str] = {}


class WorkloadEventData(msgspec.Struct):
    """``workload_started`` / ``workload_stopped``: nex's agent fields plus the machine and workload id."""

    workload_name: str
    code: int = 0
    message: str = ""
    id: str = ""
    namespace: str = ""


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


_encoder = msgspec.json.Encoder()


def cloud_event(source: str, event_type: str, data: msgspec.Struct) -> bytes:
    """A CloudEvent 1.0 JSON document with a fresh id and the current time."""
    return _encoder.encode(
        CloudEvent(
            specversion="1.0",
            id=str(uuid.uuid4()),
            source=source,
            type=event_type,
            time=now_rfc3339(),
            data=data,
        )
    )
