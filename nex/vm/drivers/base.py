"""The driver interface every sandbox (process, and later Firecracker and QEMU) implements.

A driver works on one machine at a time, through the machine's :class:`MachineContext`. Anything it
creates outside the node's process it registers on ``context.cleanup`` *before* creating it, so the
machine's teardown (normal, crash or cancellation) releases it, and crash recovery can find it.

- ``prepare``: make what the sandbox needs (network, cgroup, disks), complete the machine's metadata
  (its jail) and write ``driver.json`` and ``metadata.json``;
- ``start``: start the sandbox with the agent in it, handing the agent its metadata privately;
  return the agent's process;
- ``stop``: ask the sandbox to stop, within ``grace`` seconds (cleanup kills what is left);
- ``describe``: facts for ``nex info`` and the logs (address, pid, sandbox, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from actors import CleanupStack
from nex.api.agent import MachineMetadata
from nex.net.netns import MachineNetwork
from nex.vm.launcher import AgentProcess
from nex.vm.state import MachineDir


@dataclass
class MachineContext:
    vmid: str
    dir: MachineDir
    cleanup: CleanupStack
    metadata: MachineMetadata  # the nkey seed included: never written to disk or an environment
    network: MachineNetwork | None = None
    facts: dict[str, str] = field(default_factory=dict)


class Driver(Protocol):
    name: str

    async def prepare(self, machine: MachineContext) -> None: ...

    async def start(self, machine: MachineContext) -> AgentProcess: ...

    async def stop(self, machine: MachineContext, agent: AgentProcess, grace: float) -> None: ...

    def describe(self, machine: MachineContext) -> dict[str, str]: ...
