"""The node's jail policy: from the config and what the host supports, what each machine gets and what
the node says about it (pure: no host is touched)."""

from __future__ import annotations

from pathlib import Path

from nex import config
from nex.sandbox.cgroups import Hierarchy
from nex.sandbox.policy import HostSupport, Sandbox

V1 = Hierarchy(version=1, mounts=(("memory", Path("/m")), ("cpu", Path("/c")), ("pids", Path("/p"))))
ROOT = HostSupport(privileged=True, namespaced=True, user_namespaces=None, seccomp=None, cgroups=V1)


def states(sandbox: Sandbox) -> dict[str, str]:
    return {p.name: p.state for p in sandbox.protections}


def test_a_root_node_on_a_capable_host_applies_every_layer() -> None:
    sandbox = Sandbox(config.load(None).config, ROOT)
    assert set(states(sandbox).values()) == {"on"}
    assert (sandbox.kind, sandbox.unsafe, sandbox.fence, sandbox.hierarchy) == ("jail", False, True, V1)
    jail = sandbox.jail("dc71pab8di14snq73jq0", sandbox.uid_for("192.168.127.41"), ["/m/nx1", "/c/nx1"])
    assert jail is not None
    assert (jail.hostname, jail.uid, jail.user_namespace, jail.seccomp, jail.rootless) == (
        "dc71pab8di14snq73jq0",
        0x7000_0000 + 41,
        True,
        True,
        False,
    )
    assert (jail.memory_mib, jail.disk_mib, jail.nofile, jail.cgroup) == (256, 64, 1024, ["/m/nx1", "/c/nx1"])


def test_what_the_host_lacks_is_missing_with_its_reason_and_makes_the_node_unsafe() -> None:
    host = HostSupport(
        privileged=True,
        namespaced=True,
        user_namespaces="unshare(CLONE_NEWUSER): Operation not permitted",
        seccomp="libseccomp is not available",
        cgroups="no memory controller mounted",
    )
    sandbox = Sandbox(config.load(None).config, host)
    missing = {p.name: p.detail for p in sandbox.missing()}
    assert missing["user namespace"].endswith("workloads run as a plain unprivileged uid instead")
    assert missing["seccomp"] == "libseccomp is not available"
    assert missing["cgroups"] == "no memory controller mounted"
    assert sandbox.unsafe
    assert sandbox.hierarchy is None
    jail = sandbox.jail("x" * 20, 1879048200, [])
    assert jail is not None
    assert not jail.user_namespace, "the fallback: a plain unprivileged uid"
    assert jail.seccomp, "fails closed: each deploy is refused, saying why, unless the operator turns it off"


def test_what_the_operator_turns_off_is_said_and_not_applied() -> None:
    cfg = config.load(None, {"sandbox.seccomp": False, "sandbox.fence": False, "sandbox.cgroups": False}).config
    sandbox = Sandbox(cfg, ROOT)
    off = {p.name for p in sandbox.protections if p.state == "off"}
    assert off == {"seccomp", "cgroups", "network fence"}
    assert (sandbox.unsafe, sandbox.fence, sandbox.hierarchy) == (True, False, None)
    jail = sandbox.jail("x" * 20, 1879048200, [])
    assert jail is not None
    assert not jail.seccomp


def test_no_sandbox_means_no_jail_at_all() -> None:
    sandbox = Sandbox(config.load(None, {"no_sandbox": True}).config, ROOT)
    assert (sandbox.kind, sandbox.unsafe, sandbox.protections) == ("none", True, [])
    assert sandbox.jail("x" * 20, 0, []) is None


def test_a_node_without_root_jails_from_a_user_namespace_of_its_own() -> None:
    host = HostSupport(privileged=False, namespaced=False, user_namespaces=None, seccomp=None, cgroups="not root")
    sandbox = Sandbox(config.load(None).config, host)
    found = states(sandbox)
    assert found["cgroups"] == "missing"
    assert "no /proc" in next(p.detail for p in sandbox.protections if p.name == "namespaces")
    jail = sandbox.jail("x" * 20, sandbox.uid_for(None), [])
    assert jail is not None
    assert (jail.rootless, jail.own_network) == (True, True)
