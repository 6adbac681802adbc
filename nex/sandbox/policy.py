"""The node's jail policy: from its config and what the host supports, the jail of each machine.

Decided once at start (:class:`Sandbox`), stated in the node's log, its tags (``nex.sandbox``,
``nex.unsafe``) and ``nex info``. A protection is ``on``, ``off`` (the operator turned it off) or
``missing`` (asked for, but this host cannot apply it; the reason is given). What is missing fails
closed where it must: a jail step the host refuses refuses the deploy with the reason, unless the
operator turned the step off. The user namespace is the one exception the design makes on purpose:
"where the kernel allows it", with a plain unprivileged uid otherwise (still without capabilities).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from nex.api import agent as api
from nex.config import NodeConfig

from .cgroups import Hierarchy, Limits

State = Literal["on", "off", "missing"]


@dataclass(frozen=True)
class Protection:
    name: str
    state: State
    detail: str = ""

    def __str__(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.name}: {self.state}{detail}"


@dataclass(frozen=True)
class HostSupport:
    """What the probes found (``None``: works; else the reason it does not)."""

    privileged: bool
    namespaced: bool  # machines get network namespaces (the node has CAP_NET_ADMIN)
    user_namespaces: str | None
    seccomp: str | None
    cgroups: Hierarchy | str


class Sandbox:
    """How this node's machines are jailed."""

    def __init__(self, config: NodeConfig, host: HostSupport) -> None:
        self.config = config
        self.enabled = not config.no_sandbox
        wanted = config.sandbox
        self.privileged = host.privileged
        self.namespaced = host.namespaced
        self.user_namespace = self.enabled and wanted.user_namespace and host.user_namespaces is None
        self.seccomp = self.enabled and wanted.seccomp  # missing: each deploy is refused, saying why
        self.hierarchy = (
            host.cgroups if self.enabled and wanted.cgroups and isinstance(host.cgroups, Hierarchy) else None
        )
        # installing the fence at start is its test: a node that cannot does not start
        self.fence = self.enabled and wanted.fence and host.namespaced
        self.subnet = config.subnet()
        self.protections = self._protections(host) if self.enabled else []

    def _protections(self, host: HostSupport) -> list[Protection]:
        wanted = self.config.sandbox
        basics = "own mount, UTS, IPC, cgroup and PID namespaces, root by pivot_root"
        if not host.privileged:
            basics += "; no /proc (its PID namespace is made inside its user namespace, for its own)"
        found = [Protection("namespaces", "on", basics)]

        def judge(name: str, wanted_on: bool, reason: str | None, detail: str = "") -> Protection:
            if not wanted_on:
                return Protection(name, "off")
            return Protection(name, "on", detail) if reason is None else Protection(name, "missing", reason)

        if host.privileged:
            userns_reason = host.user_namespaces
            if wanted.user_namespace and userns_reason is not None:
                userns_reason += "; workloads run as a plain unprivileged uid instead"
            found.append(judge("user namespace", wanted.user_namespace, userns_reason, "uid 0 inside is unprivileged"))
            found.append(Protection("unprivileged uid", "on", f"one per machine from {wanted.uid_base}"))
        else:
            found.append(judge("user namespace", True, host.user_namespaces, "mapped to the node's own uid"))
        found.append(Protection("capabilities dropped, no_new_privs", "on"))
        found.append(judge("seccomp", wanted.seccomp, host.seccomp, "Docker's denylist and more"))
        cgroups_reason = host.cgroups if isinstance(host.cgroups, str) else None
        detail = host.cgroups.describe() if isinstance(host.cgroups, Hierarchy) else ""
        found.append(judge("cgroups", wanted.cgroups, cgroups_reason, detail))
        if host.namespaced:
            found.append(judge("network fence", wanted.fence, None, "only the internal NATS server"))
        else:
            found.append(Protection("network fence", "on", "no network but loopback: no veth without CAP_NET_ADMIN"))
        return found

    @property
    def kind(self) -> str:
        return "jail" if self.enabled else "none"

    @property
    def unsafe(self) -> bool:
        """nex's ``nex.unsafe`` tag: workloads run without the full jail."""
        return not self.enabled or any(p.state != "on" for p in self.protections)

    def missing(self) -> list[Protection]:
        return [p for p in self.protections if p.state == "missing"]

    def uid_for(self, address: str | None) -> int:
        """The machine's host uid: ``uid_base`` plus its address's offset in the subnet (leases make
        both unique), or ``uid_base`` for a machine without an address of its own."""
        if address is None:
            return self.config.sandbox.uid_base
        offset = int(ipaddress.IPv4Address(address)) - int(self.subnet.network_address)
        return self.config.sandbox.uid_base + offset

    def limits(self) -> Limits:
        template = self.config.machine_template
        return Limits(
            memory_bytes=template.memsize_mib << 20,
            cpus=template.vcpu_count,
            pids_max=template.pids_max,
            cpuset=template.cpuset,
        )

    def log_budget(self) -> api.LogBudget:
        """How fast a machine's output may go out (with or without a jail: it protects the node)."""
        template = self.config.machine_template
        lines, nbytes = template.log_lines_per_second, template.log_bytes_per_second
        return api.LogBudget(lines_per_second=lines, bytes_per_second=nbytes, burst_lines=lines, burst_bytes=nbytes)

    def jail(self, vmid: str, uid: int, cgroup: list[str]) -> api.Jail | None:
        """The jail of machine ``vmid`` (None under ``no_sandbox``)."""
        if not self.enabled:
            return None
        wanted, template = self.config.sandbox, self.config.machine_template
        return api.Jail(
            hostname=vmid,
            uid=uid,
            user_namespace=self.user_namespace,
            seccomp=self.seccomp,
            rootless=not self.privileged,
            own_network=not self.namespaced,
            pids_max=template.pids_max,
            memory_mib=template.memsize_mib,
            disk_mib=template.disk_mib,
            nofile=template.nofile,
            mounts=[api.BindMount(source=m.source, target=m.target or m.source) for m in wanted.mounts],
            nameservers=list(wanted.nameservers),
            cgroup=cgroup,
        )
