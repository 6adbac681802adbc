"""Control-API payloads, field for field as nex v0.2.2/v0.2.7 puts them on the wire (reference §1.2, §1.3).

Every reply is an :class:`Envelope` ``{"type", "data", "error"}``. On success ``error`` is absent; on
failure nex sends ``"data": ""`` and the reason in ``error`` (a quirk of Go's ``omitempty``), which
:func:`failure` reproduces so that nex's own clients read our errors as theirs.

Unknown fields are ignored when decoding (msgspec's default), so newer or older peers interoperate;
fields this node adds beyond nex's (marked "nex-py") are ones a Go client simply skips.

Which fields are written follows nex's Go structs: a field tagged ``omitempty`` is left out when
empty (here: ``omit_defaults`` and a default), every other one is always written, empty or not
(here: no default, or a default made by :func:`written`). tests/nex/test_wire_fields.py pins both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")


def written(factory: Callable[[], T]) -> T:
    """A field default that is written out even when the struct has ``omit_defaults``: for a field that
    Go writes always (no ``omitempty``), on a struct whose other defaults stand for Go's ``omitempty``.

    msgspec leaves a field out when its value *is* the field's default, or when the default is the
    ``list``, ``dict`` or ``set`` factory and the value an empty one of that type (its documented
    "detection logic"). A factory of its own is neither, so such a field is always written, while
    decoding and constructing still fall back on ``factory()``.
    """
    return msgspec.field(default_factory=lambda: factory())


TYPE_PREFIX = "io.nats.nex.v1"
PING_RESPONSE = f"{TYPE_PREFIX}.ping_response"
INFO_RESPONSE = f"{TYPE_PREFIX}.info_response"
RUN_RESPONSE = f"{TYPE_PREFIX}.run_response"
STOP_RESPONSE = f"{TYPE_PREFIX}.stop_response"
LAMEDUCK_RESPONSE = f"{TYPE_PREFIX}.lameduck_response"
AUCTION_RESPONSE = f"{TYPE_PREFIX}.auction_response"


class Envelope(msgspec.Struct, omit_defaults=True):
    """The reply wrapper as sent."""

    type: str
    data: Any = None
    error: str | None = None


class ReceivedEnvelope(msgspec.Struct):
    """The reply wrapper as received: ``data`` stays raw until its ``type`` says what it is."""

    type: str = ""
    data: msgspec.Raw = msgspec.Raw(b"null")
    error: str | None = None


class MemoryStat(msgspec.Struct):
    """From /proc/meminfo, in kB."""

    total: int
    free: int
    available: int


class WorkloadSummary(msgspec.Struct, omit_defaults=True):
    name: str
    runtime: str
    type: str
    hash: str = written(str)
    description: str = ""


class MachineSummary(msgspec.Struct, omit_defaults=True):
    id: str
    healthy: bool
    uptime: str
    workload: WorkloadSummary
    namespace: str = ""
    ip: str = ""  # an extension: the machine's address
    sandbox: str = ""  # an extension: "jail" or "none"


class PingResponse(msgspec.Struct, omit_defaults=True):
    node_id: str
    version: str
    uptime: str
    target_xkey: str
    running_machines: int
    tags: dict[str, str] = {}


class AuctionRequest(msgspec.Struct, omit_defaults=True):
    """nex v0.2.7's ``$NEX.AUCTION`` body: a node answers only if it matches every field given.

    ``arch`` and ``os`` are compared with the tags ``nex.arch`` and ``nex.os`` (Go's names: amd64,
    arm64, linux), ``sandboxed`` with whether the node sandboxes its workloads, ``tags`` one by one,
    and ``workload_types`` with the types the node runs."""

    arch: str | None = None
    os: str | None = None
    sandboxed: bool | None = None
    tags: dict[str, str] | None = None
    workload_types: list[str] | None = None


class AuctionResponse(msgspec.Struct, omit_defaults=True):
    """A node's bid: nex v0.2.7's (a ping response's shape), then what a placer weighs (nex-py)."""

    node_id: str
    version: str
    uptime: str
    target_xkey: str
    running_machines: int  # deployed workloads, as in a ping
    tags: dict[str, str] = {}
    nexus: str = ""
    ready_machines: int = 0  # nex-py: warm machines, ready for a deploy now
    workloads_left: int | None = None  # nex-py: deploys left under max_workloads; None: no limit


class PoolMember(msgspec.Struct):
    """nex-py: a warm pool machine that has no workload yet."""

    id: str
    state: str
    ip: str = ""
    sandbox: str = ""  # "jail" or "none"


class SandboxProtection(msgspec.Struct, omit_defaults=True):
    """nex-py: one layer of the jail: ``on``, ``off`` (by the operator) or ``missing`` (and why)."""

    name: str
    state: str
    detail: str = ""


class SandboxInfo(msgspec.Struct, omit_defaults=True):
    """nex-py: how this node's machines are jailed (``kind`` "jail", or "none" under no_sandbox)."""

    kind: str
    unsafe: bool
    protections: list[SandboxProtection] = []
    driver: str = ""  # what a machine is: "process", "qemu", "firecracker"
    accel: str = ""  # a VM driver's accelerator: "kvm", or "tcg" (emulated)


class ActorSummary(msgspec.Struct, omit_defaults=True):
    """nex-py: one line of the node's actor tree."""

    name: str
    kind: str
    state: str
    depth: int
    restarts: int = 0
    mailbox: str = ""


class InfoResponse(msgspec.Struct, omit_defaults=True):
    version: str
    uptime: str
    public_xkey: str
    machines: list[MachineSummary] = written(list)  # [] when none, as nex writes it
    tags: dict[str, str] = {}
    memory: MemoryStat | None = None
    supported_workload_types: list[str] = []
    # nex-py additions
    node_id: str = ""
    pool: list[PoolMember] = []
    actors: list[ActorSummary] = []
    sandbox: SandboxInfo | None = None


class LameDuckRequest(msgspec.Struct, omit_defaults=True):
    """nex-py: an optional body for ``$NEX.LAMEDUCK.{node}`` (nex v0.2 sends none and ignores it).

    ``deadline_ms``: how long the node waits for its workloads to end before it stops anyway.
    """

    deadline_ms: int | None = None


class LameDuckResponse(msgspec.Struct):
    node_id: str
    success: bool


class GoUrl(msgspec.Struct):
    """A Go ``net/url.URL`` as ``encoding/json`` writes it (nex's Go client sends ``location`` so)."""

    Scheme: str = ""
    Host: str = ""
    Path: str = ""


class DeployRequest(msgspec.Struct, omit_defaults=True):
    """``$NEX.DEPLOY.{ns}.{node}`` (reference §2.1). Unknown fields are ignored.

    ``location`` is ``nats://BUCKET/key``: a string, or the URL object nex's Go client sends. There is
    no name or hash field in v0.2: both come from the JWT (``sub`` and ``nats.hash``); later nex
    versions also send ``workload_name`` and ``hash``, which must then agree with the JWT.
    """

    workload_jwt: str | None = None
    environment: str | None = None
    sender_public_key: str | None = None
    location: str | GoUrl | None = None
    type: str | None = None
    argv: list[str] = []
    description: str | None = None
    essential: bool | None = None
    jsdomain: str | None = None
    target_node: str | None = None
    trigger_subjects: list[str] = []
    retry_count: int | None = None
    workload_name: str | None = None
    hash: str | None = None

    def location_url(self) -> str:
        if isinstance(self.location, GoUrl):
            return f"{self.location.Scheme}://{self.location.Host}{self.location.Path}"
        return self.location or ""


class StopRequest(msgspec.Struct):
    """``$NEX.STOP.{ns}.{node}``: a fresh JWT from the issuer that deployed, ``sub`` = the workload name."""

    workload_id: str
    workload_jwt: str
    target_node: str = ""


class WorkloadPingMachine(msgspec.Struct):
    id: str
    namespace: str
    name: str
    type: str


class WorkloadPingResponse(msgspec.Struct, omit_defaults=True):
    node_id: str
    target_xkey: str
    version: str
    uptime: str
    running_machines: list[WorkloadPingMachine]
    tags: dict[str, str] = {}


class RawLog(msgspec.Struct):
    """A workload's output line on ``$NEX.logs.{ns}.{node}.{workload}.{vmid}``; ``id`` is the machine."""

    text: str
    level: str
    id: str


class EmittedLog(msgspec.Struct):
    """A log line as ``nex logs --json`` prints it: the raw line plus what its subject says."""

    namespace: str
    node_id: str
    workload_name: str
    workload_id: str
    timestamp: str
    text: str
    level: str
    id: str


class RunResponse(msgspec.Struct):
    started: bool
    id: str
    issuer: str
    name: str


class StopResponse(msgspec.Struct):
    stopped: bool
    id: str
    issuer: str
    name: str


_encoder = msgspec.json.Encoder()


def success(payload_type: str, data: msgspec.Struct) -> bytes:
    """A success envelope: ``{"type": …, "data": {…}}``."""
    return _encoder.encode(Envelope(type=payload_type, data=data))


def failure(payload_type: str, reason: str) -> bytes:
    """A failure envelope exactly as nex sends it: ``{"type": …, "data": "", "error": reason}``."""
    return _encoder.encode(Envelope(type=payload_type, data="", error=reason))
