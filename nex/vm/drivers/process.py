"""The process driver: the agent as a child process, jailed, limited and fenced when the node may.

As root, each machine gets a network namespace, a veth pair and a leased address (:mod:`nex.net`),
a cgroup enforcing its template (:mod:`nex.sandbox.cgroups`), and a host uid of its own; its agent
builds the workload's jail from the metadata (:mod:`nex.sandbox.jail`). Without CAP_NET_ADMIN,
machines share the host's loopback (their workloads get no network at all) and the node says so at
start. The agent is started by the node's launcher (the zygote, or a new process), which hands it
its metadata privately.
"""

from __future__ import annotations

import msgspec
import trio

from actors import ResourceRecord
from nex.net.network import Networks
from nex.sandbox import cgroups
from nex.sandbox.policy import Sandbox
from nex.vm.launcher import Launcher, LaunchSpec

from . import network
from .base import STEM, MachineContext, MachineHandle, NotOurs, Releaser
from .cgroup import prepare_cgroup
from .network import MachineNetworks


class ProcessDriver:
    name = "process"

    def __init__(self, networks: Networks, launcher: Launcher, sandbox: Sandbox) -> None:
        self.networks = networks
        self.launcher = launcher
        self.sandbox = sandbox
        self._networks = MachineNetworks(networks)  # each machine's namespace and link

    async def prepare(self, machine: MachineContext) -> None:
        facts: dict[str, object] = {"driver": self.name, "launcher": self.launcher.name}
        facts["sandbox"] = self.sandbox.kind
        if self.networks.namespaced:
            await self._networks.prepare(machine, facts)
        else:
            facts["network"] = "host loopback"
        cgroup = await prepare_cgroup(machine, self.sandbox, self.sandbox.limits())
        network = self._networks.get(machine.vmid)
        address = network.address if network is not None else None
        machine.address = address or "127.0.0.1"
        jail = self.sandbox.jail(machine.vmid, self.sandbox.uid_for(address), cgroup)
        machine.metadata = msgspec.structs.replace(machine.metadata, jail=jail, log_budget=self.sandbox.log_budget())
        machine.dir.write_json("driver.json", facts)
        machine.dir.write_json("metadata.json", msgspec.structs.replace(machine.metadata, node_nats_nkey=""))

    async def start(self, machine: MachineContext) -> MachineHandle:
        network = self._networks.get(machine.vmid)
        spec = LaunchSpec(
            metadata=machine.metadata,
            stdout=machine.dir.stdout,
            stderr=machine.dir.stderr,
            cwd=machine.dir.path,
            netns=network.netns_path if network is not None else None,
        )
        agent = await self.launcher.launch(spec, machine.cleanup)  # registers the agent's release
        machine.dir.write_pid(agent.pid)
        machine.dir.note(f"agent started by {self.launcher.name}: pid {agent.pid}")
        return agent

    async def stop(self, machine: MachineContext, handle: MachineHandle, grace: float) -> None:
        await handle.stop(grace)

    @property
    def kind(self) -> str:
        return self.sandbox.kind

    def describe(self, machine: MachineContext) -> dict[str, str]:
        facts = {"driver": self.name, "launcher": self.launcher.name, "sandbox": self.sandbox.kind}
        network = self._networks.get(machine.vmid)
        if network is not None:
            facts |= {"ip": network.address, "netns": network.netns, "hosttap": network.host_link}
        else:
            facts["ip"] = "127.0.0.1"
        return facts


def releasers(networks: Networks, sandbox: Sandbox) -> dict[str, Releaser]:
    """How the next run releases what a process driver's machines left behind (see ``Releaser``)."""

    async def drop_cgroup(record: ResourceRecord) -> None:
        def remove() -> None:
            hierarchy = sandbox.hierarchy or cgroups.Hierarchy.detect()  # no_sandbox now, say
            try:
                hierarchy.remove(str(record.data["name"]), str(record.data.get("parent", "")))
            except ValueError as exc:  # a name or parent that is not one of ours
                raise NotOurs(str(exc)) from None

        await trio.to_thread.run_sync(remove)

    return {
        **network.releasers(networks),
        "cgroup": Releaser(drop_cgroup, {"name": STEM}),
    }
