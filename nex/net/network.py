"""Machine networks as the node uses them: a lease and a namespace per machine, made in a worker thread.

:class:`Networks` decides once, at start, whether machines get namespaces (the node has
CAP_NET_ADMIN and CAP_SYS_ADMIN) or share the host's loopback; :meth:`Networks.plan` names a
machine's objects from its id, :meth:`Networks.create` leases an address and builds the namespace in
one trip to a worker thread, and :meth:`Networks.delete` / :meth:`Networks.release` undo each part,
idempotently (they are what the machine's cleanup stack and crash recovery call).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import trio

from nex import ids
from nex.config import NodeConfig

from . import netns
from .ipam import DEFAULT_ROOT, Ipam


@dataclass(frozen=True)
class Plan:
    """A machine's network objects, named before anything is created."""

    vmid: str
    netns: str
    host_link: str
    guest_link: str


class Networks:
    """``group``: the interface group of the node's host links, which its fence matches them by."""

    def __init__(
        self, config: NodeConfig, *, namespaced: bool, group: int = 0, lease_root: Path = DEFAULT_ROOT
    ) -> None:
        self.namespaced = namespaced
        self.group = group
        self.subnet = config.subnet()
        self.gateway = ipaddress.IPv4Address(config.internal_host())
        self.interface = config.cni.interface_name
        self.network_name = config.cni.network_name
        self.ipam = Ipam(self.network_name, self.subnet, self.gateway, lease_root)
        self.limiter = trio.CapacityLimiter(4)

    @property
    def agent_host(self) -> str:
        """Where agents reach the internal server: the gateway, or loopback without namespaces."""
        return str(self.gateway) if self.namespaced else "127.0.0.1"

    def plan(self, vmid: str) -> Plan:
        return Plan(vmid=vmid, netns=ids.short(vmid), host_link=ids.host_link(vmid), guest_link=self.interface)

    async def create(self, plan: Plan) -> netns.MachineNetwork:
        """Lease an address and build the namespace and veth pair (blocking work in a worker thread)."""

        def build() -> netns.MachineNetwork:
            address = self.ipam.allocate(plan.vmid, plan.guest_link)
            net = netns.MachineNetwork(
                netns=plan.netns,
                host_link=plan.host_link,
                guest_link=plan.guest_link,
                address=str(address),
                prefixlen=32,  # CNI ptp: everything goes through the gateway
                gateway=str(self.gateway),
                group=self.group,
            )
            netns.create(net)
            return net

        return await trio.to_thread.run_sync(build, limiter=self.limiter)

    async def delete(self, plan: Plan) -> None:
        await trio.to_thread.run_sync(netns.delete, plan.netns, plan.host_link, limiter=self.limiter)

    async def release(self, vmid: str) -> None:
        """Release every lease ``vmid`` holds (normally one)."""

        def release_all() -> None:
            for address, owner in self.ipam.leases().items():
                if owner == vmid:
                    self.ipam.release(address, vmid)

        await trio.to_thread.run_sync(release_all, limiter=self.limiter)
