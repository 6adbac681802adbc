"""A machine's network as every driver makes it: a lease, a namespace and a veth pair (:mod:`nex.net`).

Shared by the process driver (the agent runs in the namespace) and the VM drivers (the VM's monitor
runs in it, with a tap redirected to the veth, see :mod:`nex.net.tap`). What is created is journaled
before it exists: the lease, then the namespace with its veth pair; the namespace's teardown takes
whatever else a driver made inside it (a tap, tc filters) with it.
"""

from __future__ import annotations

import trio

from actors import ResourceRecord
from nex.net import netns
from nex.net.netns import MachineNetwork
from nex.net.network import Networks, Plan

from .base import STEM, MachineContext, NotOurs, Releaser


class MachineNetworks:
    """The networks of one driver's machines, by vmid."""

    def __init__(self, networks: Networks) -> None:
        self.networks = networks
        self._network: dict[str, MachineNetwork] = {}  # by vmid: each machine's namespace and link

    @property
    def namespaced(self) -> bool:
        return self.networks.namespaced

    def get(self, vmid: str) -> MachineNetwork | None:
        return self._network.get(vmid)

    async def prepare(self, machine: MachineContext, facts: dict[str, object]) -> MachineNetwork:
        """Lease an address and build the machine's namespace; ``facts`` gains their names and is
        written to ``driver.json`` before anything is created; both undos are on ``machine.cleanup``."""
        plan = self.networks.plan(machine.vmid)
        facts |= {
            "netns": plan.netns,
            "host_link": plan.host_link,
            "guest_link": plan.guest_link,
            "network": self.networks.network_name,
            "subnet": str(self.networks.subnet),
        }
        machine.dir.write_json("driver.json", facts)  # before the objects it names exist
        machine.cleanup.push(
            f"lease of {machine.vmid}",
            lambda: self.networks.release(machine.vmid),
            kind="lease",
            data={"owner": machine.vmid, "network": self.networks.network_name},
        )
        machine.cleanup.push(
            f"netns {plan.netns}",
            lambda: self._delete(machine.vmid, plan),
            kind="netns",
            data={"netns": plan.netns, "host_link": plan.host_link},
        )
        network = self._network[machine.vmid] = await self.networks.create(plan)
        machine.dir.note(f"network: netns {plan.netns}, {network.address} via {plan.host_link}")
        return network

    async def _delete(self, vmid: str, plan: Plan) -> None:
        self._network.pop(vmid, None)
        await self.networks.delete(plan)


def releasers(networks: Networks) -> dict[str, Releaser]:
    """How the next run releases a machine's namespace and lease (see ``Releaser``)."""

    async def drop_netns(record: ResourceRecord) -> None:
        await trio.to_thread.run_sync(netns.delete, str(record.data["netns"]), str(record.data["host_link"]))

    async def drop_lease(record: ResourceRecord) -> None:
        if record.data.get("network") != networks.network_name:
            raise NotOurs(f"a lease in network {record.data.get('network')!r}, not {networks.network_name}")
        await networks.release(str(record.data["owner"]))

    return {
        "netns": Releaser(drop_netns, {"netns": STEM, "host_link": rf"{STEM}h"}),
        "lease": Releaser(drop_lease, {"owner": r"[0-9a-v]{20}"}),
    }
