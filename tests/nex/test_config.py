"""Loading and validating the node's config file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nex import config, crypto

from .support import SEED_SAMPLE


def load(tmp_path: Path, data: Any, overrides: dict[str, Any] | None = None) -> config.LoadedConfig:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return config.load(path, overrides)


def problems(tmp_path: Path, data: Any) -> list[str]:
    with pytest.raises(config.ConfigError) as info:
        load(tmp_path, data)
    return info.value.problems


def test_the_seed_sample_loads_exactly_as_written(tmp_path: Path) -> None:
    loaded = load(tmp_path, SEED_SAMPLE)
    assert loaded.warnings == []
    assert loaded.config.kernel_filepath == SEED_SAMPLE["kernel_path"]
    assert loaded.config.rootfs_filepath == SEED_SAMPLE["rootfs_path"]
    assert loaded.config.cni.network_name == "fcnet"
    assert loaded.config.cni.subnet == "192.168.127.0/24"  # nex's default fills what the file omits
    assert loaded.config.machine_template.memsize_mib == 256


def test_defaults_are_the_embedded_default() -> None:
    cfg = config.load(None).config
    assert (cfg.machine_pool_size, cfg.machine_driver(), cfg.internal_node_port) == (1, "process", 9222)
    assert cfg.driver is None, "no driver named: the config decides (a kernel and rootfs mean VMs)"
    assert cfg.agent_handshake_timeout_ms == 5000
    assert cfg.heartbeat_interval_ms == 30_000
    assert cfg.internal_host() == "192.168.127.1"


def test_code_keys_are_accepted_too(tmp_path: Path) -> None:
    issuer = crypto.create_signing_key(crypto.PREFIX_ACCOUNT).public_key.decode()
    cfg = load(
        tmp_path,
        {
            "kernel_filepath": "/k",
            "rootfs_filepath": "/r",
            "valid_issuers": [issuer],
            "default_resource_dir": "/res",
            "tags": {"zone": "a"},
            "no_sandbox": True,
            "internal_node_host": "10.10.10.1",
            "internal_node_port": 9333,
            "agent_handshake_timeout_ms": 900,
            "workload_types": ["native"],
            "node_limits": {"max_workloads": 3},
            "cni": {"subnet": "10.10.10.0/24"},
            "preserve_network": True,
        },
    ).config
    assert (cfg.kernel_filepath, cfg.valid_issuers, cfg.node_limits.max_workloads) == ("/k", [issuer], 3)


def test_an_alias_given_twice_with_different_values_is_refused(tmp_path: Path) -> None:
    assert problems(tmp_path, {"kernel_path": "/a", "kernel_filepath": "/b"}) == [
        "kernel_path and kernel_filepath are the same setting with different values; give one at $.kernel_path"
    ]


def test_unknown_keys_are_warned_about_with_their_path(tmp_path: Path) -> None:
    loaded = load(tmp_path, {"machine_poool_size": 3, "cni": {"subnett": "x"}, "tags": {"anything": "goes"}})
    assert loaded.warnings == [
        "unknown key $.machine_poool_size (ignored; check its spelling)",
        "unknown key $.cni.subnett (ignored; check its spelling)",
    ]


def test_keys_nex_knows_but_this_node_does_not_apply_are_flagged(tmp_path: Path) -> None:
    loaded = load(tmp_path, {"rate_limiters": {"bandwidth": {}}, "workload_types": ["elf", "v8", "wasm"]})
    assert loaded.warnings == [
        "rate_limiters is accepted for compatibility with nex but not applied by this node",
        "workload types v8, wasm are not supported by this node and are ignored",
    ]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"machine_pool_size": 0}, "machine_pool_size must be >= 1 at $.machine_pool_size"),
        (
            {"machine_template": {"vcpu_count": 0}},
            "machine_template.vcpu_count must be >= 1 at $.machine_template.vcpu_count",
        ),
        ({"agent_handshake_timeout_ms": 0}, "agent_handshake_timeout_ms must be >= 1 at $.agent_handshake_timeout_ms"),
        (
            {"node_limits": {"max_workloads": -1}},
            "node_limits.max_workloads must be >= 0 at $.node_limits.max_workloads",
        ),
        (
            {"internal_node_port": 70000},
            "internal_node_port must be between 0 (any free port) and 65535 at $.internal_node_port",
        ),
        ({"machine_pool_size": "two"}, "Expected `int`, got `str` at $.machine_pool_size"),
        ({"tags": {"zone": 3}}, "Expected `str`, got `int` at $.tags[...]"),
        (
            {"cni": {"subnet": "10.0.0.0/31"}},
            "cni.subnet must leave room for machines (a prefix of /30 or shorter) at $.cni.subnet",
        ),
        (
            {"internal_node_host": "10.9.9.9"},
            "internal_node_host must be in the CNI subnet 192.168.127.0/24 at $.internal_node_host",
        ),
        ({"internal_node_host": "nope"}, "internal_node_host must be an IPv4 address at $.internal_node_host"),
        (
            {"lameduck_deadline_ms": 10**400},
            f"lameduck_deadline_ms must be at most {2**63 - 1} (a Go int64, as nex reads it) at $.lameduck_deadline_ms",
        ),
        (
            {"machine_pool_size": 14, "cni": {"subnet": "10.0.0.0/28"}},
            "machine_pool_size 14 does not fit the CNI subnet 10.0.0.0/28, which has addresses for 13 machines "
            "(running workloads need theirs too): use a larger cni.subnet or a smaller pool at $.machine_pool_size",
        ),
        (
            {"requester_public_keys": ["ABC"]},
            "requester_public_keys entries must be curve public keys (X…) at $.requester_public_keys[0]",
        ),
        ({"tags": {"nex.os": "plan9"}}, "tag nex.os is set by the node itself; remove it at $.tags.nex.os"),
        ({"driver": "docker"}, "Invalid enum value 'docker' at $.driver"),
        (
            {"machine_template": {"pids_max": 2}},
            "machine_template.pids_max must be >= 8 at $.machine_template.pids_max",
        ),
        (
            {"machine_template": {"cpuset": "all"}},
            "machine_template.cpuset must be a CPU list such as 0-1 or 0,2 at $.machine_template.cpuset",
        ),
        (
            {"sandbox": {"uid_base": 0}},
            "sandbox.uid_base must leave room for 256 machines between 1000 and 4294967294 (and name no real user) "
            "at $.sandbox.uid_base",
        ),
        (
            {"sandbox": {"mounts": [{"source": "etc/ssl"}]}},
            "a mount's source must be an absolute host path at $.sandbox.mounts[0].source",
        ),
        (
            {"sandbox": {"mounts": [{"source": "/srv", "target": "/srv/../proc"}]}},
            "a mount's target must be an absolute path without '..' at $.sandbox.mounts[0].target",
        ),
        (
            {"sandbox": {"mounts": [{"source": "/etc"}]}},
            "/etc is part of the jail itself; mount somewhere else at $.sandbox.mounts[0].target",
        ),
        (
            {"sandbox": {"mounts": [{"source": "/x", "target": "/proc/sys"}]}},
            "/proc/sys is part of the jail itself; mount somewhere else at $.sandbox.mounts[0].target",
        ),
        (
            {"sandbox": {"allow": [{"cidr": "10.1.2.3/33"}]}},
            "an opening's cidr must be an IP network such as 192.168.127.1/32 at $.sandbox.allow[0].cidr",
        ),
        (
            {"sandbox": {"allow": [{"cidr": "10.0.0.0/8", "port": 70000}]}},
            "an opening's port must be between 0 (any) and 65535 at $.sandbox.allow[0].port",
        ),
        (
            {"sandbox": {"allow": [{"cidr": "10.0.0.0/8", "protocol": "icmp"}]}},
            "Invalid enum value 'icmp' at $.sandbox.allow[0].protocol",
        ),
        ({"sandbox": {"nameservers": ["dns"]}}, "a nameserver must be an IP address at $.sandbox.nameservers[0]"),
        (
            {"sandbox": {"uid_base": 65534 - 9}},
            "sandbox.uid_base gives machines the uids of users of this host (nobody): choose a range no user has "
            "at $.sandbox.uid_base",
        ),
        ([], "the config must be a JSON object at $"),
    ],
)
def test_each_rule_names_its_path(tmp_path: Path, data: Any, expected: str) -> None:
    assert expected in problems(tmp_path, data)


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    found = problems(tmp_path, {"machine_pool_size": 0, "heartbeat_interval_ms": 1, "valid_issuers": ["x"]})
    assert len(found) == 3


def test_malformed_json_and_missing_files_are_clear(tmp_path: Path) -> None:
    (bad,) = problems(tmp_path, '{"machine_pool_size": 2,}')
    assert "is not valid JSON" in bad
    assert "trailing comma" in bad
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.json")


def test_the_sandbox_is_on_by_default_and_openings_from_flags_add_to_the_files(tmp_path: Path) -> None:
    cfg = config.load(None).config
    assert (cfg.no_sandbox, cfg.sandbox.user_namespace, cfg.sandbox.seccomp, cfg.sandbox.cgroups) == (
        False,
        True,
        True,
        True,
    )
    assert (cfg.sandbox.fence, cfg.sandbox.allow, cfg.machine_template.pids_max) == (True, [], 1024)
    path = tmp_path / "c.json"
    path.write_text('{"sandbox": {"allow": [{"cidr": "10.0.0.0/8", "port": 443}]}}')
    cfg = config.load(path, openings=[{"cidr": "192.168.127.1/32", "port": 4222}]).config
    assert [(o.cidr, o.port, o.protocol) for o in cfg.sandbox.allow] == [
        ("10.0.0.0/8", 443, "tcp"),
        ("192.168.127.1/32", 4222, "tcp"),
    ]


def test_flags_override_the_file(tmp_path: Path) -> None:
    cfg = load(tmp_path, {"machine_pool_size": 2, "tags": {"a": "1"}}, {"machine_pool_size": 5, "tags.b": "2"}).config
    assert cfg.machine_pool_size == 5
    assert cfg.tags == {"a": "1", "b": "2"}


def test_flag_values_are_validated_like_file_values(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"machine_pool_size must be >= 1"):
        config.load(None, {"machine_pool_size": 0})
