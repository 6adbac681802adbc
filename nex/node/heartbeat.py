"""The heartbeat: a ``heartbeat`` event every ``heartbeat_interval_ms`` (30 s by default), as nex sends."""

from __future__ import annotations

import trio

from actors import ChildSpec
from nex.api import events
from nex.bus.events import EventPublisher
from nex.state import NodeState


class Heartbeat:
    def __init__(self, state: NodeState, publisher: EventPublisher) -> None:
        self.state = state
        self.publisher = publisher
        self.interval = state.config.heartbeat_interval_ms / 1000
        self.sent = 0

    def child_spec(self) -> ChildSpec:
        return ChildSpec(id="heartbeat", start=self.run, shutdown=1.0)

    async def run(self, *, task_status: trio.TaskStatus[Heartbeat] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(self)
        next_beat = trio.current_time() + self.interval
        while True:
            await trio.sleep_until(next_beat)
            next_beat += self.interval  # keeps the cadence even when a beat is late
            self.publisher.emit(events.HEARTBEAT, self.data())
            self.sent += 1

    def data(self) -> events.HeartbeatData:
        return events.HeartbeatData(
            version=self.state.version,
            node_id=self.state.node_id,
            uptime=self.state.uptime(),
            running_machines=self.state.running_workloads(),
            tags=self.state.tags(),
        )
