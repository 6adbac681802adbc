"""Who may connect to the internal server: the node, and each agent with access to its own subjects only.

Every agent gets its own nkey user when its machine starts, allowed to publish and subscribe on
``agentint.{vmid}.>``, to subscribe on its own reply inbox ``_INBOX_{vmid}.>``, and to answer the
requests it receives; nothing else. So one agent can neither see nor speak for another (nex v0.2.2
let every VM talk on every subject; v0.2.7 gave each agent an account). The node's own user may do
anything.

Users live in the server's config file, applied with a reload. Reloads are coalesced: while one is
being applied, later grants wait and are all applied by the next one, so a pool of 32 machines
starting together costs a couple of reloads, not 32.
"""

from __future__ import annotations

import json

import trio

from nex import crypto
from nex.api import agent as agent_api

from .server import NatsServer


class AgentCredentials:
    """The internal server's users; plug :meth:`render` into the server as its ``extra_config``."""

    def __init__(self) -> None:
        self.node_key = crypto.create_signing_key(crypto.PREFIX_USER)
        self._agents: dict[str, str] = {}  # vmid -> public key
        self._server: NatsServer | None = None
        self._lock = trio.Lock()
        self._wanted = 0  # changes made
        self._applied = 0  # changes the server has confirmed

    @property
    def node_seed(self) -> str:
        return str(self.node_key.seed.decode())

    def attach(self, server: NatsServer) -> None:
        self._server = server

    def render(self) -> str:
        """The ``authorization`` block for the server's config."""
        users = [{"nkey": self.node_key.public_key.decode(), "permissions": {"publish": ">", "subscribe": ">"}}]
        for vmid, public in self._agents.items():
            own = f"{agent_api.PREFIX}.{vmid}.>"
            users.append(
                {
                    "nkey": public,
                    "permissions": {
                        "publish": {"allow": [own]},
                        "subscribe": {"allow": [own, f"{agent_api.inbox_prefix(vmid)}.>"]},
                        "allow_responses": True,
                    },
                }
            )
        return "authorization {\n  users: " + json.dumps(users, indent=2) + "\n}"

    async def grant(self, vmid: str) -> str:
        """A new user for ``vmid``'s agent; returns its seed once the server accepts it."""
        key = crypto.create_signing_key(crypto.PREFIX_USER)
        self._agents[vmid] = key.public_key.decode()
        self._wanted += 1
        await self._apply()
        return str(key.seed.decode())

    async def revoke(self, vmid: str) -> None:
        """Remove ``vmid``'s user (its connection, if any, is closed by the server)."""
        if self._agents.pop(vmid, None) is not None:
            self._wanted += 1
            await self._apply()

    def agents(self) -> list[str]:
        return sorted(self._agents)

    async def _apply(self) -> None:
        target = self._wanted
        async with self._lock:
            if self._applied >= target or self._server is None:
                return  # a reload that started after our change already covered it
            covering = self._wanted
            await self._server.reload()
            self._applied = covering
