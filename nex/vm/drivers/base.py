"""The driver interface every sandbox (process, and later Firecracker and QEMU) implements.

A driver owns its machines whole. It works on one machine at a time, through the machine's
:class:`MachineContext`, which carries nothing of any one driver: what a driver keeps per machine
(a network namespace, a tap, a VM's sockets) it keeps itself. Anything it creates outside the node's
process it registers on ``context.cleanup`` *before* creating it, so the machine's teardown (normal,
crash or cancellation) releases it, and crash recovery can find it.

- ``prepare``: make what the sandbox needs (network, cgroup, disks), complete the machine's metadata
  (its jail), set ``context.address`` and write ``driver.json`` and ``metadata.json``;
- ``start``: start the sandbox with the agent in it, handing the agent its metadata in the driver's
  own private way; return a :class:`MachineHandle`;
- ``stop``: ask the sandbox to stop, within ``grace`` seconds; the machine calls it first in its
  teardown, and the releases registered before it kill what is left;
- ``describe``: facts for ``nex info`` and the logs (address, pid, sandbox, ...).

After a crash of the node, the next run releases what the journal records; a driver says how to
release each kind of record it writes, and what names it gives (:class:`Releaser`), so that crash
recovery acts only on records shaped like its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from actors import CleanupStack, ResourceRecord
from nex.api.agent import MachineMetadata
from nex.vm.state import MachineDir


class MachineHandle(Protocol):
    """A running machine, whatever runs it: a process, a VM's monitor."""

    pid: int  #: the host process that holds the machine (the agent, or the hypervisor)

    async def wait(self) -> int | None:
        """Until the machine has ended; its exit code when known."""
        ...

    def signal(self, sig: int) -> None: ...

    async def stop(self, grace: float) -> int | None:
        """Ask it to stop, ``grace`` seconds, then end it; shielded."""
        ...


#: The shape of a name this node gives its objects: ``nx`` and 10 hex characters.
STEM = r"nx[0-9a-f]{10}"


class DriverUnavailable(Exception):
    """The driver cannot work on this host or with this config (the message says why and what to do)."""


class NotOurs(Exception):
    """A journal record this node could not have written."""


@dataclass(frozen=True)
class Releaser:
    """How crash recovery releases one kind of journal record, and the shape of the names in its
    data that this node gives (a record whose names have another shape is not released)."""

    release: Callable[[ResourceRecord], Awaitable[None]]
    shapes: dict[str, str] = field(default_factory=dict)


@dataclass
class MachineContext:
    vmid: str
    dir: MachineDir
    cleanup: CleanupStack
    metadata: MachineMetadata  # the nkey seed included: never written to disk or an environment
    address: str = ""  # the machine's IP address, once its driver has prepared it
    boot_allowance: float = 0.0  # seconds its start may take beyond the handshake timeout (a VM's cold boot)
    facts: dict[str, str] = field(default_factory=dict)


class Driver(Protocol):
    name: str

    @property
    def kind(self) -> str:
        """What isolates a machine, as ``nex ls`` and ``nex info`` show it ("jail", "vm (kvm) + jail")."""
        ...

    async def prepare(self, machine: MachineContext) -> None: ...

    async def start(self, machine: MachineContext) -> MachineHandle: ...

    async def stop(self, machine: MachineContext, handle: MachineHandle, grace: float) -> None: ...

    def describe(self, machine: MachineContext) -> dict[str, str]: ...
