"""Agents' handshakes: one subscription on ``agentint.*.handshake`` for every machine of the node.

A machine registers the handshake it expects *before* its agent starts (so a fast agent cannot be
missed) and waits on the returned event. The handshake is answered with ``{}``, as nex does; one from
a machine this node is not waiting for gets no answer.
"""

from __future__ import annotations

import msgspec
import trio

from actors import Actor, ChildSpec, Mailbox, Overflow, actor_spec
from nex import logs
from nex.api import agent as agent_api
from nex.bus.link import InboundMsg, NatsLink

log = logs.get("nex.vm")


class Handshakes(Actor[InboundMsg]):
    def __init__(self, link: NatsLink, waiting: dict[str, trio.Event]) -> None:
        self.link = link
        self.waiting = waiting

    @classmethod
    def spec(cls, link: NatsLink, waiting: dict[str, trio.Event]) -> ChildSpec:
        mailbox = Mailbox[InboundMsg](1024, Overflow.FAIL, name="handshakes")
        return actor_spec(lambda: cls(link, waiting), mailbox)

    async def on_start(self) -> None:
        sub = await self.link.subscribe(agent_api.ALL_HANDSHAKES, self.ref)
        self.cleanup.push("handshake subscription", lambda: self.link.unsubscribe(sub), durable=False)

    async def handle(self, message: InboundMsg) -> None:
        vmid = message.subject.split(".")[1]
        event = self.waiting.get(vmid)
        if event is None:
            log.warning("Handshake from an unknown machine ignored", vmid=vmid)
            return
        try:
            hello = msgspec.json.decode(message.data, type=agent_api.HandshakeRequest)
            note = hello.message
        except msgspec.DecodeError:
            note = "(unreadable handshake)"
        await self.link.respond(message, b"{}")
        log.info("Received agent handshake", vmid=vmid, message=note)
        event.set()


class HandshakeBook:
    """The events machines wait on, shared by the machines and the :class:`Handshakes` actor."""

    def __init__(self) -> None:
        self.waiting: dict[str, trio.Event] = {}

    def expect(self, vmid: str) -> trio.Event:
        event = trio.Event()
        self.waiting[vmid] = event
        return event

    def forget(self, vmid: str) -> None:
        self.waiting.pop(vmid, None)
