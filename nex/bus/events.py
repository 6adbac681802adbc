"""Publishing the node's CloudEvents on ``$NEX.events.{namespace}.{type}``."""

from __future__ import annotations

import msgspec

from nex import logs
from nex.api import events, subjects
from nex.bus.link import LinkError, NatsLink

log = logs.get("nex.node")


class EventPublisher:
    """Events with this node as their ``source``, sent on the control link."""

    def __init__(self, link: NatsLink, node_id: str) -> None:
        self.link = link
        self.node_id = node_id

    def emit(self, event_type: str, data: msgspec.Struct, namespace: str = subjects.SYSTEM_NAMESPACE) -> None:
        """Publish without waiting (heartbeats, lifecycle events)."""
        self.link.publish_nowait(
            subjects.event(namespace, event_type), events.cloud_event(self.node_id, event_type, data)
        )

    async def emit_flushed(
        self, event_type: str, data: msgspec.Struct, namespace: str = subjects.SYSTEM_NAMESPACE, timeout: float = 2.0
    ) -> bool:
        """Publish and wait until the server has it (events that must not be lost on exit); False if not."""
        try:
            await self.link.publish(
                subjects.event(namespace, event_type), events.cloud_event(self.node_id, event_type, data)
            )
            await self.link.flush(timeout)
        except LinkError as exc:
            log.warning("Could not publish event", type=event_type, error=str(exc))
            return False
        return True
