"""The process driver: the agent as a child process, in its own network namespace when the node may.

As root, each machine gets a namespace, a veth pair and a leased address (:mod:`nex.net`); without
CAP_NET_ADMIN, machines share the host's loopback and the node says so at start. The agent is started
by the node's launcher (the zygote, or a new process).
"""

from __future__ import annotations

from nex.net.network import Networks
from nex.vm.launcher import AgentProcess, Launcher, LaunchSpec

from .base import MachineContext


class ProcessDriver:
    name = "process"

    def __init__(self, networks: Networks, launcher: Launcher) -> None:
        self.networks = networks
        self.launcher = launcher

    async def prepare(self, machine: MachineContext) -> None:
        if not self.networks.namespaced:
            machine.dir.write_json(
                "driver.json", {"driver": self.name, "launcher": self.launcher.name, "network": "host loopback"}
            )
            return
        plan = self.networks.plan(machine.vmid)
        machine.dir.write_json(
            "driver.json",
            {
                "driver": self.name,
                "launcher": self.launcher.name,
                "netns": plan.netns,
                "host_link": plan.host_link,
                "guest_link": plan.guest_link,
                "network": self.networks.network_name,
                "subnet": str(self.networks.subnet),
            },
        )
        machine.cleanup.push(
            f"lease of {machine.vmid}",
            lambda: self.networks.release(machine.vmid),
            kind="lease",
            data={"owner": machine.vmid, "network": self.networks.network_name},
        )
        machine.cleanup.push(
            f"netns {plan.netns}",
            lambda: self.networks.delete(plan),
            kind="netns",
            data={"netns": plan.netns, "host_link": plan.host_link},
        )
        machine.network = await self.networks.create(plan)
        machine.dir.note(f"network: netns {plan.netns}, {machine.network.address} via {plan.host_link}")

    async def start(self, machine: MachineContext) -> AgentProcess:
        spec = LaunchSpec(
            vmid=machine.vmid,
            env=machine.env,
            stdout=machine.dir.stdout,
            stderr=machine.dir.stderr,
            cwd=machine.dir.path,
            netns=machine.network.netns_path if machine.network else None,
        )
        agent = await self.launcher.launch(spec, machine.cleanup)  # registers the agent's release
        machine.dir.write_pid(agent.pid)
        machine.dir.note(f"agent started by {self.launcher.name}: pid {agent.pid}")
        return agent

    async def stop(self, machine: MachineContext, agent: AgentProcess, grace: float) -> None:
        await agent.stop(grace)

    def describe(self, machine: MachineContext) -> dict[str, str]:
        facts = {"driver": self.name, "launcher": self.launcher.name}
        if machine.network is not None:
            facts |= {
                "ip": machine.network.address,
                "netns": machine.network.netns,
                "hosttap": machine.network.host_link,
            }
        else:
            facts["ip"] = "127.0.0.1"
        return facts
