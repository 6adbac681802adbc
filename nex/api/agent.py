"""The node↔agent protocol on the internal NATS server (reference §4), as nex v0.2 defines it.

Subjects are ``agentint.{vmid}.*``: the agent requests ``handshake`` once connected and answers
``ping`` (with ``OK``), ``deploy`` and ``undeploy``; it publishes ``events.{type}`` and ``logs``.
Each agent connects with its own nkey user, allowed only its own ``agentint.{vmid}.>`` subjects and
its own reply inbox ``_INBOX_{vmid}.>`` (and to answer requests it receives).

The payloads write their fields as nex's Go structs do (see :func:`nex.api.control.written`): a field
without ``omitempty`` in Go is always written, even empty. The structs marked nex-py are this node's own.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from .control import written

PREFIX = "agentint"


def subject(vmid: str, verb: str) -> str:
    return f"{PREFIX}.{vmid}.{verb}"


def handshake(vmid: str) -> str:
    return subject(vmid, "handshake")


def ping(vmid: str) -> str:
    return subject(vmid, "ping")


def deploy(vmid: str) -> str:
    return subject(vmid, "deploy")


def undeploy(vmid: str) -> str:
    return subject(vmid, "undeploy")


def logs(vmid: str) -> str:
    return subject(vmid, "logs")


def events(vmid: str, event_type: str = "*") -> str:
    return subject(vmid, f"events.{event_type}")


def replies(vmid: str) -> str:
    """Where the agent answers the node's requests: under its own subjects, so that its plain publish
    permission covers the answers (``allow_responses`` is reset by every server reload)."""
    return subject(vmid, "reply")


#: everything every agent says (the workload manager picks the logs and events out of it, in order)
ALL_AGENT_SUBJECTS = f"{PREFIX}.*.>"

#: the node's subscription for every agent's answers (matched to requests by the full subject)
ALL_REPLIES = f"{PREFIX}.*.reply.*"


def inbox_prefix(vmid: str) -> str:
    """The agent's own reply-inbox prefix, so its credentials need not cover anyone else's replies."""
    return f"_INBOX_{vmid}"


ALL_HANDSHAKES = f"{PREFIX}.*.handshake"


class BindMount(msgspec.Struct, frozen=True):
    """A host path the operator lets workloads read, and where it appears in their root."""

    source: str
    target: str


class Jail(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """How the agent jails its workload (:mod:`nex.sandbox.jail` applies it; None: no jail at all).

    ``uid`` is the machine's own unprivileged host uid (and gid); with ``user_namespace`` it is uid 0
    in a user namespace of the workload's own. ``cgroup`` lists the machine's cgroup directories,
    which the agent joins before anything else so that all it starts is inside.
    """

    hostname: str
    uid: int
    user_namespace: bool = True
    seccomp: bool = True
    rootless: bool = False  # a node without root: see nex.sandbox.jail
    own_network: bool = False  # a network namespace with only loopback (the machine has none of its own)
    pids_max: int = 1024  # also its processes' limit (RLIMIT_NPROC: the uid is the machine's alone)
    memory_mib: int = 256
    disk_mib: int = 64
    nofile: int = 1024
    mounts: list[BindMount] = []
    nameservers: list[str] = []
    cgroup: list[str] = []


class LogBudget(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """How fast one workload's output (stdout and stderr together) may go out as log messages.

    A token bucket per count: lines and bytes, refilled at ``*_per_second`` and holding at most
    ``burst_*``. A workload that writes faster is not cut: its agent stops reading its pipes until the
    budget allows more, so the workload blocks on its own writes and every line still arrives, late
    (see :mod:`nex.agent.runner`). Without it one workload printing short lines as fast as it can makes
    its node relay a million messages a second, and the node's other machines pay for it.

    The defaults are sized for a node of 32 machines all writing as fast as they can. The node relays
    every line as a message of its own, through the one mailbox (4096 messages) that deploys and the
    agents' events share: 32 times the rate must stay well within what the node relays, and 32 bursts
    must fit in that mailbox at once. A person following a log reads far fewer than 100 lines a second,
    and a burst takes a start-up banner or a stack trace at once; the byte rate binds only workloads
    writing long lines. 0 lifts that one limit (for workloads the operator trusts).
    """

    lines_per_second: Annotated[float, msgspec.Meta(ge=0)] = 100
    bytes_per_second: Annotated[float, msgspec.Meta(ge=0)] = 256 << 10
    burst_lines: Annotated[int, msgspec.Meta(ge=0)] = 100
    burst_bytes: Annotated[int, msgspec.Meta(ge=0)] = 256 << 10


class MachineMetadata(msgspec.Struct, omit_defaults=True):
    """What an agent needs to find its node and to jail its workload.

    Delivered in the driver's own way, never through an environment (the nkey seed is a secret): for
    processes, the zygote's socket or a pipe (see :mod:`nex.vm.launcher`). ``metadata.json`` in the
    machine's directory holds it without the seed.
    """

    vmid: str
    node_nats_host: str
    node_nats_port: int
    node_nats_nkey: str = written(str)
    message: str = written(lambda: "Host-supplied metadata")
    # nex-py
    jail: Jail | None = None
    log_budget: LogBudget = LogBudget()


class GuestNetwork(msgspec.Struct, frozen=True):
    """A VM's one interface as its agent sets it up (the kernel ignores ``ip=``): ``address``/``prefixlen``
    on ``eth0``, a route to ``gateway`` on the link, and the default route through it (CNI ptp's shape)."""

    address: str
    prefixlen: int
    gateway: str


class GuestIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """nex-py: what a VM's agent takes from its host before anything else, over its private channel
    (a virtio-serial port for QEMU, MMDS for Firecracker), one JSON line.

    A VM may be a clone of a snapshot that a template VM took: it then shares the template's memory,
    so its random state and its clock are the template's too, and it has no identity yet. The agent
    therefore mixes ``entropy`` into the kernel's RNG and reseeds it, sets the clock to ``time_ns``
    (the host's ``CLOCK_REALTIME`` when it sent this), and only then configures its network and
    connects with ``metadata``'s credentials.
    """

    metadata: MachineMetadata
    network: GuestNetwork | None = None
    time_ns: int = 0
    entropy: str = ""  # base64 of random bytes from the host


class GuestReady(msgspec.Struct, frozen=True, tag="ready"):
    """nex-py: what a VM's agent says on its channel once it has started and waits for its identity:
    the moment a template VM can be saved as a snapshot."""

    pid: int


#: On a Firecracker guest's kernel command line: a template VM, snapshotted once its agent is ready
#: (Firecracker has no private channel to say so on: the agent says READY_MARKER on its console).
TEMPLATE_ARG = "nex.template=1"
READY_MARKER = "nex-guest: ready for an identity"


class HandshakeRequest(msgspec.Struct, omit_defaults=True):
    id: str
    start_time: str
    message: str = ""


class AgentDeployRequest(msgspec.Struct, omit_defaults=True):
    """What the node asks of an agent on ``agentint.{vmid}.deploy`` (nex's ``agentapi.DeployRequest``).

    The environment is in clear here: only this agent's credentials reach this subject. The artifact
    is in the object store ``NEXCACHE_{vmid}`` under the key ``workload``.
    """

    workload_name: str
    namespace: str
    hash: str
    total_bytes: int
    workload_type: str = written(lambda: "native")
    argv: list[str] = []
    environment: dict[str, str] = written(dict)
    description: str = written(str)
    essential: bool = False
    trigger_subjects: list[str] = written(list)  # functions only: never any for native workloads


class LogEntry(msgspec.Struct, omit_defaults=True):
    """A line of the workload's output, published on ``agentint.{vmid}.logs``."""

    source: str = ""
    level: int = 4  # nex's agent levels: 2 error (stderr), 4 info (stdout)
    text: str = ""


class WorkloadStatus(msgspec.Struct, omit_defaults=True):
    """``workload_started`` / ``workload_stopped`` data, as the agent reports it (nex's
    ``WorkloadStatusEvent``: ``code`` always, ``message`` only when there is one)."""

    workload_name: str
    code: int = written(int)
    message: str = ""


def bucket(vmid: str) -> str:
    """The object store that holds one machine's artifact (its agent may read only this one)."""
    return f"NEXCACHE_{vmid}"


ARTIFACT_KEY = "workload"
LEVEL_ERROR = 2
LEVEL_INFO = 4


class UndeployRequest(msgspec.Struct, omit_defaults=True):
    """``agentint.{vmid}.undeploy``: stop the workload (SIGTERM, then SIGKILL after ``grace_ms``).

    The agent answers once the workload is gone. An empty body means the default grace.
    """

    grace_ms: int = 5_000


class DeployResponse(msgspec.Struct, omit_defaults=True):
    accepted: bool
    message: str | None = written(lambda: None)  # null when accepted, as nex writes it
