"""Lame duck, and then a clean exit.

nex v0.2 enters lame duck on ``$NEX.LAMEDUCK.{node}`` and then never leaves (reference §6, issue #302).
Here, once in lame duck the node refuses deploys (the control API checks :attr:`NodeState.lameduck`),
and this watcher asks the node to stop as soon as it runs no workloads, or when the lame-duck deadline
passes, whichever comes first. The stop is the same graceful stop as on SIGTERM.
"""

from __future__ import annotations

import trio

from actors import ChildSpec, Restart
from nex import logs
from nex.state import NodeState

log = logs.get("nex.node")


class LameDuckWatcher:
    def __init__(self, state: NodeState) -> None:
        self.state = state

    def child_spec(self) -> ChildSpec:
        # transient: once it has asked the node to stop, its job is done
        return ChildSpec(id="lameduck", start=self.run, restart=Restart.TRANSIENT, shutdown=1.0)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self.state.lameduck_entered.wait()
        deadline = self.state.lameduck_deadline
        assert deadline is not None
        with trio.move_on_at(deadline):
            while (running := self.state.running_workloads()) > 0:
                log.info("Lame duck: waiting for workloads to end", running=running)
                await self.state.wait_workloads_changed()
            self.state.request_stop("lame duck: no workloads left")
            return
        log.warning("Lame duck: deadline passed with workloads still running", running=self.state.running_workloads())
        self.state.request_stop("lame duck: deadline passed")
