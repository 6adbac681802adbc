"""The node's configuration: a JSON file in nex's format, plus flags, into typed msgspec Structs.

Both spellings nex has used are accepted: the documented keys (``kernel_path``, ``rootfs_path``) and
the keys in nex's code (``kernel_filepath``, ``rootfs_filepath``); ``requester_public_keys`` (sender
xkeys allowed to deploy) and ``valid_issuers`` (issuer accounts allowed to deploy) are separate lists.
nex's sample ``machineconfig.json`` loads as it is.

Loading never half-succeeds: every problem is collected and reported together, each naming its JSON
path and the rule, for example ``machine_pool_size must be >= 1 at $.machine_pool_size``. Keys this
node does not know are reported as warnings (a typo should not go unnoticed), and keys nex knows but
this node does not apply are accepted with a warning saying so.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import re
from pathlib import Path
from typing import Any, Literal

import msgspec

from . import crypto

Driver = Literal["process", "qemu", "firecracker"]
VM_DRIVERS = ("qemu", "firecracker")
KNOWN_WORKLOAD_TYPES = ("native", "elf")
NR_OPEN = 1 << 20  # the kernel's default fs.nr_open: no process may have more open files
UID_BASE = 0x7000_0000
"""Host uids of machines start here: far above any login or system user, and above the ranges that
systemd-nspawn and rootless containers hand out."""
RESERVED_TARGETS = (
    *("/", "/app", "/dev", "/proc", "/tmp", "/work"),
    *("/etc/hosts", "/etc/passwd", "/etc/group", "/etc/resolv.conf"),
)
"""What the jail makes itself: an operator's bind mount may not cover these, nor sit inside them."""

#: documented key -> the key nex's code reads (and this node stores)
ALIASES = {"kernel_path": "kernel_filepath", "rootfs_path": "rootfs_filepath"}

#: keys nex reads that this node accepts but does not act on
ACCEPTED_NOT_APPLIED = (
    "rate_limiters",
    "host_services",
    "public_nats_server",
    "autostart",
)

METRICS_EXPORTERS = ("prometheus", "otlp", "file")
"""``otel_metrics_exporter``: a Prometheus endpoint, OTLP over HTTP to ``otlp_exporter_url``, or
``metrics.log`` in the state directory (nex's ``file``)."""
TRACES_EXPORTERS = ("otlp", "http", "file")
"""``otel_traces_exporter``: OTLP over HTTP (nex's ``http``; ``otlp`` is the same) to
``otlp_exporter_url``, or ``traces.log`` in the state directory (nex's ``file``)."""


class CniConfig(msgspec.Struct, kw_only=True, omit_defaults=True):
    network_name: str = "fcnet"
    interface_name: str = "veth0"
    subnet: str = "192.168.127.0/24"
    bin_path: list[str] = []


class MachineTemplate(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A machine's size. nex's keys (vcpus, memory) and this node's: what a process machine's cgroup
    and jail also bound."""

    vcpu_count: int = 1
    memsize_mib: int = 256  # the whole machine: agent, workload and its files in memory
    pids_max: int = 1024  # processes and threads
    disk_mib: int = 64  # the workload's writable area (/tmp, /work, /dev/shm): full means ENOSPC
    nofile: int = 1024  # open files per process
    cpuset: str = ""  # CPUs the machine may run on ("0-1", "2"); "" = any
    log_lines_per_second: int = 100  # how fast its output goes out as log messages (0: unbounded)
    log_bytes_per_second: int = 256 << 10


class BindMount(msgspec.Struct, kw_only=True):
    """A host path workloads may read: bound read-only at ``target`` (default: the same path)."""

    source: str
    target: str = ""


class Opening(msgspec.Struct, kw_only=True):
    """A destination machines may reach besides the internal NATS server (port 0: any)."""

    cidr: str
    port: int = 0
    protocol: Literal["tcp", "udp", "any"] = "tcp"


class SandboxConfig(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How each workload is jailed. Every protection is on by default and can be turned off on its
    own; ``no_sandbox`` (nex's key) turns them all off. See docs/security.md."""

    user_namespace: bool = True  # where the kernel allows it (else a plain unprivileged uid)
    seccomp: bool = True
    cgroups: bool = True
    fence: bool = True
    uid_base: int = UID_BASE  # machine N of the subnet runs as host uid uid_base + N
    mounts: list[BindMount] = []
    allow: list[Opening] = []  # openings in the fence
    masquerade: bool = False  # NAT for openings beyond the host (the outside world)
    cgroup_parent: str = ""  # relative to each cgroup hierarchy's root
    nameservers: list[str] = []  # the workload's /etc/resolv.conf


class NodeLimits(msgspec.Struct, kw_only=True):
    """0 means unlimited."""

    max_workloads: int = 0
    max_workload_bytes: int = 0
    max_total_bytes: int = 0


class NodeConfig(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Everything a node reads from its config file; defaults are the embedded default's."""

    # nex v0.2.x keys
    kernel_filepath: str = ""
    rootfs_filepath: str = ""
    default_resource_dir: str = ""
    machine_pool_size: int = 1
    machine_template: MachineTemplate = msgspec.field(default_factory=MachineTemplate)
    cni: CniConfig = msgspec.field(default_factory=CniConfig)
    valid_issuers: list[str] = []
    requester_public_keys: list[str] = []
    tags: dict[str, str] = {}
    no_sandbox: bool = False
    internal_node_host: str | None = None
    internal_node_port: int = 9222
    agent_handshake_timeout_ms: int = 5000
    agent_ping_timeout_ms: int = 750
    workload_types: list[str] = msgspec.field(default_factory=lambda: ["native"])
    node_limits: NodeLimits = msgspec.field(default_factory=NodeLimits)
    preserve_network: bool = False
    bin_path: list[str] = []
    deny_trigger_subjects: list[str] = []
    pid_filepath: str | None = None
    rate_limiters: Any = None
    host_services: Any = None
    public_nats_server: Any = None
    # OpenTelemetry (nex's keys; see nex/node/telemetry.py): nothing at all unless turned on
    otel_metrics: bool = False
    otel_metrics_exporter: str = "prometheus"
    otel_metrics_port: int = 8085  # the Prometheus endpoint's, on every address: http://HOST:PORT/metrics
    otel_traces: bool = False
    otel_traces_exporter: str = "file"
    otlp_exporter_url: str = ""  # OTLP/HTTP collector, e.g. http://127.0.0.1:4318 ("": the SDK's default)
    autostart: Any = None
    # this node's own keys
    driver: Driver | None = None  # None: qemu when kernel_path or rootfs_path is set, else process
    initrd_path: str = ""  # the guest's initramfs; "": initrd.img beside kernel_path, if there is one
    qemu_path: str = "qemu-system-x86_64"
    firecracker_path: str = "firecracker"
    jailer_path: str = ""  # "": firecracker runs without its jailer
    vm_accel: Literal["auto", "kvm", "tcg"] = "auto"  # auto: KVM when /dev/kvm runs a guest, else TCG
    vm_snapshots: bool = True  # warm the pool from a snapshot of a booted template VM
    vm_boot_timeout_ms: int = 120_000  # a cold boot to the agent's handshake (the template's too)
    state_dir: str | None = None
    heartbeat_interval_ms: int = 30_000
    agent_ping_interval_ms: int = 5_000  # between pings of each agent (agent_ping_timeout_ms each); 0: none
    lameduck_deadline_ms: int = 600_000
    essential_restart_limit: int = 5  # restarts of an essential workload that keeps failing
    essential_backoff_ms: int = 1_000  # wait before its first restart; doubles each time, at most 30 s
    workload_stop_grace_ms: int = 5_000  # between SIGTERM and SIGKILL when a workload is stopped
    artifact_cache_bytes: int = 64 << 20  # verified artifacts kept for deploys of the same hash; 0: none
    # replicas of the workload records' KV bucket, if this node creates it (1-5); 0: as many as the
    # cluster allows, up to 3 (1 on a single server)
    state_replicas: int = 0
    # An xkey seed (SX…) every node of the cluster holds: nodes also seal each recorded environment to
    # it, so that when a node dies another can open and run its essential workloads ("" : none can)
    cluster_workload_key: str = ""
    node_dead_after_ms: int = 0  # a node silent this long is taken for dead (0: 3 heartbeat intervals)

    def dead_after(self) -> float:
        """Seconds of silence (no heartbeat) after which a node is taken for dead."""
        return (self.node_dead_after_ms or 3 * self.heartbeat_interval_ms) / 1000

    bus_thread_affinity: Literal["colocate", "none"] = "colocate"
    agent_launcher: Literal["zygote", "spawn"] = "zygote"
    sandbox: SandboxConfig = msgspec.field(default_factory=SandboxConfig)

    def machine_driver(self) -> Driver:
        """The driver machines get: the configured one; without one, a VM when the config names a
        kernel or a root filesystem (nex's sample config does: it means VMs), else a process."""
        if self.driver is not None:
            return self.driver
        if self.no_sandbox:  # nex's meaning: workloads run as plain processes, no VM
            return "process"
        return "qemu" if self.kernel_filepath or self.rootfs_filepath else "process"

    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.cni.subnet)

    def internal_host(self) -> str:
        """The internal server's address as the machines see it: the setting, or the subnet's first host."""
        return self.internal_node_host or str(next(self.subnet().hosts()))


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists each one (path and rule)."""

    def __init__(self, source: str, problems: list[str]) -> None:
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration ({source}):\n{lines}")
        self.source = source
        self.problems = problems


class LoadedConfig(msgspec.Struct, frozen=True):
    config: NodeConfig
    warnings: list[str]
    source: str


def load(
    path: Path | None, overrides: dict[str, Any] | None = None, *, openings: list[dict[str, Any]] | None = None
) -> LoadedConfig:
    """Read ``path`` (or start from the defaults), apply flag ``overrides`` (dotted keys) and add the
    fence ``openings`` given as flags to the file's, validate.

    Raises:
        ConfigError: the file is missing, not JSON, or any value breaks a rule.
    """
    source = str(path) if path is not None else "built-in defaults"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(source, [f"config file {path} does not exist"]) from None
        except OSError as exc:
            raise ConfigError(source, [f"cannot read {path}: {exc.strerror}"]) from None
        try:
            decoded = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise ConfigError(source, [f"{path} is not valid JSON: {exc}"]) from None
        if not isinstance(decoded, dict):
            raise ConfigError(source, ["the config must be a JSON object at $"])
        data = decoded
    problems: list[str] = []
    data = _fold_aliases(data, problems)
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    if openings:
        sandbox = data.setdefault("sandbox", {})
        if isinstance(sandbox, dict):
            sandbox["allow"] = [*(sandbox.get("allow") or []), *openings]
    warnings = [f"unknown key {p} (ignored; check its spelling)" for p in _unknown_keys(data, NodeConfig, "$")]
    warnings += [
        f"{key} is accepted for compatibility with nex but not applied by this node"
        for key in ACCEPTED_NOT_APPLIED
        if data.get(key) is not None
    ]
    known = _drop_unknown(data, NodeConfig)
    try:
        config = msgspec.convert(known, NodeConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(source, [*problems, _describe(exc)]) from None
    problems += validate(config)
    if problems:
        raise ConfigError(source, problems)
    unsupported = [t for t in config.workload_types if t not in KNOWN_WORKLOAD_TYPES]
    if unsupported:
        warnings.append(f"workload types {', '.join(unsupported)} are not supported by this node and are ignored")
    return LoadedConfig(config=config, warnings=warnings, source=source)


MAX_MS = 2**63 - 1  # JSON integers decode to any size; nex's Go reads these into int64


def _durations_ms(config: NodeConfig) -> list[tuple[str, int]]:
    """The config's durations in milliseconds, by name (each becomes a float of seconds)."""
    return [(name, getattr(config, name)) for name in type(config).__struct_fields__ if name.endswith("_ms")]


def validate(config: NodeConfig) -> list[str]:
    """Every rule a well-typed config can still break, as ``<rule> at <path>``."""
    problems: list[str] = []

    def at_least(value: int, minimum: int, path: str) -> None:
        if value < minimum:
            problems.append(f"{path.removeprefix('$.')} must be >= {minimum} at {path}")

    at_least(config.machine_pool_size, 1, "$.machine_pool_size")
    if config.no_sandbox and config.driver in VM_DRIVERS:
        problems.append(
            f"driver {config.driver} cannot be combined with no_sandbox (nex's no_sandbox runs workloads as plain "
            "processes): drop one at $.driver"
        )
    at_least(config.machine_template.vcpu_count, 1, "$.machine_template.vcpu_count")
    vcpus = config.machine_template.vcpu_count
    if config.machine_driver() == "firecracker" and vcpus > 1 and (vcpus % 2 or vcpus > 32):
        problems.append(
            "machine_template.vcpu_count must be 1 or an even number up to 32 for Firecracker "
            "at $.machine_template.vcpu_count"
        )
    at_least(config.machine_template.memsize_mib, 16, "$.machine_template.memsize_mib")
    at_least(config.machine_template.pids_max, 8, "$.machine_template.pids_max")
    at_least(config.machine_template.disk_mib, 1, "$.machine_template.disk_mib")
    at_least(config.machine_template.nofile, 16, "$.machine_template.nofile")
    at_least(config.machine_template.log_lines_per_second, 0, "$.machine_template.log_lines_per_second")
    at_least(config.machine_template.log_bytes_per_second, 0, "$.machine_template.log_bytes_per_second")
    if config.machine_template.nofile > NR_OPEN:
        problems.append(
            f"machine_template.nofile must be <= {NR_OPEN} (the kernel's nr_open) at $.machine_template.nofile"
        )
    at_least(config.agent_handshake_timeout_ms, 1, "$.agent_handshake_timeout_ms")
    at_least(config.agent_ping_timeout_ms, 1, "$.agent_ping_timeout_ms")
    at_least(config.vm_boot_timeout_ms, 1, "$.vm_boot_timeout_ms")
    at_least(config.heartbeat_interval_ms, 100, "$.heartbeat_interval_ms")
    at_least(config.agent_ping_interval_ms, 0, "$.agent_ping_interval_ms")
    at_least(config.lameduck_deadline_ms, 0, "$.lameduck_deadline_ms")
    for name, value in _durations_ms(config):
        if value > MAX_MS:
            problems.append(f"{name} must be at most {MAX_MS} (a Go int64, as nex reads it) at $.{name}")
    at_least(config.essential_restart_limit, 0, "$.essential_restart_limit")
    at_least(config.essential_backoff_ms, 0, "$.essential_backoff_ms")
    at_least(config.workload_stop_grace_ms, 0, "$.workload_stop_grace_ms")
    at_least(config.artifact_cache_bytes, 0, "$.artifact_cache_bytes")
    if config.cluster_workload_key:
        try:
            crypto.XKey.from_seed(config.cluster_workload_key)
        except crypto.InvalidKey:
            problems.append(
                "cluster_workload_key must be an xkey seed (SX…, as `nk -gen curve` makes), the same on every "
                "node of the cluster, at $.cluster_workload_key"
            )
    at_least(config.node_dead_after_ms, 0, "$.node_dead_after_ms")
    if not 0 <= config.state_replicas <= 5:
        problems.append(
            "state_replicas must be between 1 and 5 (JetStream's limit), or 0 for as many as the cluster "
            "allows, at $.state_replicas"
        )
    problems += _validate_telemetry(config)
    for field in ("max_workloads", "max_workload_bytes", "max_total_bytes"):
        at_least(getattr(config.node_limits, field), 0, f"$.node_limits.{field}")
    if not 0 <= config.internal_node_port <= 65535:
        problems.append("internal_node_port must be between 0 (any free port) and 65535 at $.internal_node_port")
    subnet = None
    try:
        subnet = ipaddress.IPv4Network(config.cni.subnet)
        if subnet.prefixlen > 30:
            problems.append("cni.subnet must leave room for machines (a prefix of /30 or shorter) at $.cni.subnet")
            subnet = None
    except ValueError as exc:
        problems.append(f"cni.subnet must be an IPv4 network such as 192.168.127.0/24 ({exc}) at $.cni.subnet")
    if subnet is not None and config.machine_pool_size > subnet.num_addresses - 3:
        room = subnet.num_addresses - 3  # network, broadcast and the gateway are not for machines
        problems.append(
            f"machine_pool_size {config.machine_pool_size} does not fit the CNI subnet {subnet}, which has "
            f"addresses for {room} machines (running workloads need theirs too): use a larger cni.subnet "
            "or a smaller pool at $.machine_pool_size"
        )
    if config.internal_node_host is not None:
        try:
            host = ipaddress.IPv4Address(config.internal_node_host)
            if subnet is not None and host not in subnet:
                problems.append(f"internal_node_host must be in the CNI subnet {subnet} at $.internal_node_host")
        except ValueError:
            problems.append("internal_node_host must be an IPv4 address at $.internal_node_host")
    for i, key in enumerate(config.valid_issuers):
        if not crypto.is_public_key(key, crypto.PREFIX_ACCOUNT):
            problems.append(f"valid_issuers entries must be account public keys (A…) at $.valid_issuers[{i}]")
    for i, key in enumerate(config.requester_public_keys):
        if not crypto.is_public_key(key, crypto.PREFIX_CURVE):
            problems.append(
                f"requester_public_keys entries must be curve public keys (X…) at $.requester_public_keys[{i}]"
            )
    for name in config.tags:
        if not name:
            problems.append("tag names must not be empty at $.tags")
        elif name.startswith("nex."):
            problems.append(f"tag {name} is set by the node itself; remove it at $.tags.{name}")
    if not config.cni.network_name or "/" in config.cni.network_name:
        problems.append("cni.network_name must be a plain name (it names a directory) at $.cni.network_name")
    problems += _validate_sandbox(config, subnet)
    return problems


def _validate_telemetry(config: NodeConfig) -> list[str]:
    problems: list[str] = []
    if config.otel_metrics_exporter not in METRICS_EXPORTERS:
        problems.append(
            f"otel_metrics_exporter must be one of {', '.join(METRICS_EXPORTERS)}, not "
            f"{config.otel_metrics_exporter!r}, at $.otel_metrics_exporter"
        )
    if not 1 <= config.otel_metrics_port <= 65535:
        problems.append("otel_metrics_port must be between 1 and 65535 at $.otel_metrics_port")
    if config.otel_traces_exporter == "grpc":
        problems.append(
            "otel_traces_exporter grpc is not supported by this node: use http (OTLP over HTTP, a collector's "
            "port 4318) at $.otel_traces_exporter"
        )
    elif config.otel_traces_exporter not in TRACES_EXPORTERS:
        problems.append(
            f"otel_traces_exporter must be one of {', '.join(TRACES_EXPORTERS)}, not "
            f"{config.otel_traces_exporter!r}, at $.otel_traces_exporter"
        )
    url = config.otlp_exporter_url
    if url and not re.fullmatch(r"(https?://)?[^\s/:]+(:\d{1,5})?(/\S*)?", url):
        problems.append(
            f"otlp_exporter_url must be a URL such as http://127.0.0.1:4318, not {url!r}, at $.otlp_exporter_url"
        )
    return problems


def _validate_sandbox(config: NodeConfig, subnet: ipaddress.IPv4Network | None) -> list[str]:
    problems: list[str] = []
    sandbox = config.sandbox
    cpuset = config.machine_template.cpuset
    if cpuset and not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", cpuset):
        problems.append("machine_template.cpuset must be a CPU list such as 0-1 or 0,2 at $.machine_template.cpuset")
    hosts = subnet.num_addresses if subnet is not None else 0
    if not 1000 <= sandbox.uid_base <= 0xFFFF_FFFE - hosts:
        problems.append(
            f"sandbox.uid_base must leave room for {hosts} machines between 1000 and 4294967294 "
            "(and name no real user) at $.sandbox.uid_base"
        )
    elif taken := sorted(u.pw_name for u in pwd.getpwall() if 0 <= u.pw_uid - sandbox.uid_base < hosts):
        problems.append(
            f"sandbox.uid_base gives machines the uids of users of this host ({', '.join(taken[:3])}): "
            "choose a range no user has at $.sandbox.uid_base"
        )
    for i, bind in enumerate(sandbox.mounts):
        path = f"$.sandbox.mounts[{i}]"
        target = bind.target or bind.source
        if not os.path.isabs(bind.source):
            problems.append(f"a mount's source must be an absolute host path at {path}.source")
        if not os.path.isabs(target) or ".." in Path(target).parts:
            problems.append(f"a mount's target must be an absolute path without '..' at {path}.target")
        elif any(_overlaps(os.path.normpath(target), reserved) for reserved in RESERVED_TARGETS):
            problems.append(f"{target} is part of the jail itself; mount somewhere else at {path}.target")
    for i, opening in enumerate(sandbox.allow):
        path = f"$.sandbox.allow[{i}]"
        try:
            ipaddress.ip_network(opening.cidr, strict=False)
        except ValueError:
            problems.append(f"an opening's cidr must be an IP network such as 192.168.127.1/32 at {path}.cidr")
        if not 0 <= opening.port <= 65535:
            problems.append(f"an opening's port must be between 0 (any) and 65535 at {path}.port")
    if sandbox.cgroup_parent and ".." in Path(sandbox.cgroup_parent).parts:
        problems.append("sandbox.cgroup_parent must not contain '..' at $.sandbox.cgroup_parent")
    for i, server in enumerate(sandbox.nameservers):
        try:
            ipaddress.ip_address(server)
        except ValueError:
            problems.append(f"a nameserver must be an IP address at $.sandbox.nameservers[{i}]")
    return problems


def _overlaps(target: str, reserved: str) -> bool:
    """Whether a bind at ``target`` would cover, or sit inside, what the jail makes at ``reserved``."""
    if reserved == "/":
        return target == "/"
    return target == reserved or target.startswith(reserved + "/") or reserved.startswith(target + "/")


def default_state_dir() -> Path:
    """/var/lib/nex as root, otherwise the XDG state directory ($XDG_STATE_HOME/nex)."""
    if os.geteuid() == 0:
        return Path("/var/lib/nex")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "nex"


def _fold_aliases(data: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    data = dict(data)
    for documented, code in ALIASES.items():
        if documented not in data:
            continue
        value = data.pop(documented)
        if code in data and data[code] != value:
            problems.append(
                f"{documented} and {code} are the same setting with different values; give one at $.{documented}"
            )
        data.setdefault(code, value)
    return data


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[last] = value


def _struct_fields(struct: type) -> dict[str, Any]:
    return {f.encode_name: f.type for f in msgspec.structs.fields(struct)}


def _nested_struct(annotation: Any) -> type | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct) else None


def _unknown_keys(data: dict[str, Any], struct: type, path: str) -> list[str]:
    fields = _struct_fields(struct)
    found: list[str] = []
    for key, value in data.items():
        if key not in fields:
            found.append(f"{path}.{key}")
            continue
        nested = _nested_struct(fields[key])
        if nested is not None and isinstance(value, dict):
            found.extend(_unknown_keys(value, nested, f"{path}.{key}"))
    return found


def _drop_unknown(data: dict[str, Any], struct: type) -> dict[str, Any]:
    fields = _struct_fields(struct)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            continue
        nested = _nested_struct(fields[key])
        out[key] = _drop_unknown(value, nested) if nested is not None and isinstance(value, dict) else value
    return out


def _describe(exc: msgspec.ValidationError) -> str:
    """msgspec's ``Expected `int`, got `str` - at `$.x``` as ``Expected `int`, got `str` at $.x``."""
    message = str(exc)
    if " - at `" in message:
        text, path = message.rsplit(" - at `", 1)
        return f"{text} at {path.rstrip('`')}"
    return f"{message} at $"
