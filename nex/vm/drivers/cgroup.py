"""A machine's cgroup on the host, as every driver makes it: journaled before it exists, made with the
machine's limits in a worker thread, removed with the machine (and by crash recovery, see
:func:`nex.vm.drivers.process.releasers`). What goes in it is the driver's choice: the agent (which
joins it) or the VM's hypervisor (which starts in it)."""

from __future__ import annotations

import trio

from nex import ids
from nex.sandbox.cgroups import Limits
from nex.sandbox.policy import Sandbox

from .base import MachineContext


async def prepare_cgroup(machine: MachineContext, sandbox: Sandbox, limits: Limits) -> list[str]:
    """The machine's cgroup, made with ``limits``; its directories (none without cgroups here)."""
    hierarchy = sandbox.hierarchy
    if hierarchy is None:
        return []
    name, parent = ids.short(machine.vmid), sandbox.config.sandbox.cgroup_parent
    machine.cleanup.push(
        f"cgroup {name}",
        lambda: trio.to_thread.run_sync(hierarchy.remove, name, parent),
        kind="cgroup",
        data={"name": name, "parent": parent},
    )
    paths = await trio.to_thread.run_sync(hierarchy.create, name, limits, parent)
    machine.dir.note(f"cgroup {name}: {', '.join(str(p) for p in paths)}")
    return [str(path) for path in paths]
