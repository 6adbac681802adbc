"""Agents' answers to the node survive reloads of the internal server's users.

A machine starting elsewhere changes the server's users (a reload). An agent answering a node's
request at that moment used to be refused: ``allow_responses`` is reset by a reload. Now the node
asks agents to answer under their own subjects (``agentint.{vmid}.reply.*``), which their plain
publish permission covers. Real nats-server, real reloads, the agent's real credentials.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from actors import Mailbox
from nex.api import agent as agent_api
from nex.bus.aio import AsyncioThread, open_asyncio_thread
from nex.bus.credentials import AgentCredentials
from nex.bus.link import InboundMsg, NatsLink, RequestTimeout
from nex.bus.server import NatsServer, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
async def aio() -> AsyncIterator[AsyncioThread]:
    async with open_asyncio_thread("test-asyncio") as thread:
        yield thread


async def test_an_agent_answering_right_after_a_reload_still_reaches_the_node(
    tmp_path: Path, aio: AsyncioThread
) -> None:
    credentials = AgentCredentials(stock=1)
    port = free_port("127.0.0.1")
    server = NatsServer(
        "internal", host="127.0.0.1", port=port, work_dir=tmp_path / "nats", extra_config=credentials.render
    )
    credentials.attach(server)
    url = f"nats://127.0.0.1:{port}"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            await nursery.start(credentials.run)
            node = NatsLink(
                "node", [url], aio, nkeys_seed_str=credentials.node_seed, reply_spaces=[agent_api.ALL_REPLIES]
            )
            await nursery.start(node.run)
            vmid, seed = await credentials.take()
            agent = NatsLink("agent", [url], aio, nkeys_seed_str=seed, inbox_prefix=agent_api.inbox_prefix(vmid))
            await nursery.start(agent.run)
            inbox = Mailbox[InboundMsg](4, name="agent")
            await agent.subscribe(agent_api.deploy(vmid), inbox.ref)
            await agent.flush()

            async def answer_after_a_reload() -> None:
                while True:
                    msg = await inbox.receive()
                    reloads = server.reloads
                    await server.reload()  # as when another machine starts between request and answer
                    assert server.reloads > reloads  # (a top-up of the credentials may have reloaded too)
                    await agent.respond(msg, b"accepted")

            nursery.start_soon(answer_after_a_reload)

            reply = await node.request(agent_api.deploy(vmid), b"{}", timeout=5, reply_prefix=agent_api.replies(vmid))
            assert reply.data == b"accepted"
            # an answer on the node's own inbox is refused now (no allow_responses), reload or not
            with pytest.raises(RequestTimeout):
                await node.request(agent_api.deploy(vmid), b"{}", timeout=2)
            nursery.cancel_scope.cancel()
