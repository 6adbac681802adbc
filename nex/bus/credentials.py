"""Who may connect to the internal server: the node, and each agent with access to its own subjects only.

Every agent connects as its own nkey user, allowed to publish and subscribe on ``agentint.{vmid}.>``
(the node's requests to it ask for answers there too), to subscribe on its own reply inbox
``_INBOX_{vmid}.>``, and to read its machine's own object store (``NEXCACHE_{vmid}``); nothing else.
No ``allow_responses``: a reload resets the server's record of which replies are allowed, so an
answer sent just after a reload would be refused. So one agent can neither see
nor speak for another (nex v0.2.2 let every VM talk on every subject; v0.2.7 gave each agent an
account). The node's own user may do anything.

Users live in the server's config file; a change takes a reload (about 15 ms here). To keep reloads
off a machine's start, credentials are made ahead of need: a stock of (machine id, key) pairs already
in the server's config. The first stock is in the config the server starts with, so the first fill
of the pool needs no reload at all; :meth:`AgentCredentials.take` hands one out at once and the
stock is topped up in the background, many per reload. Revocations are applied lazily by the same
reloads. Only when the stock is empty does a machine wait for a reload of its own.

Reloads are paced: at most one per :data:`RELOAD_INTERVAL` unless a machine waits for a credential.
Each reload makes nats-server re-check every connection, and under a deploy storm (a machine ends
and one starts per deploy) back-to-back reloads made the server refuse agents that were just then
connecting. A revoked user lives on for at most that interval; its machine is gone already.
"""

from __future__ import annotations

import collections
import json
import math

import trio

from actors import ChildSpec
from nex import crypto, logs
from nex.api import agent as agent_api
from nex.ids import new_vmid

from .server import NatsServer

log = logs.get("nex.bus")

RELOAD_INTERVAL = 0.25  # seconds between two reloads nobody waits for


class AgentCredentials:
    """The internal server's users. Plug :meth:`render` into the server as its ``extra_config``, and
    run :meth:`run` (after the server) to apply changes.

    Args:
        stock: how many ready credentials to keep (the pool size is a good choice).
    """

    def __init__(self, stock: int = 4) -> None:
        self.node_key = crypto.create_signing_key(crypto.PREFIX_USER)
        self.target = max(1, stock)
        self._users: dict[str, str] = {}  # vmid -> public key: everyone the server should accept
        self._ready: collections.deque[tuple[str, str]] = collections.deque()  # applied, not handed out
        self._coming: list[tuple[str, str]] = []  # in the config, waiting for a reload
        self._server: NatsServer | None = None
        self._changes = 0
        self._applied = 0
        self._dirty = trio.Event()
        self._urgent = trio.Event()  # a take() waits for the next reload
        self._reloaded = trio.Event()
        self.reloads = 0
        for _ in range(self.target):  # in the config the server starts with: ready from the start
            self._ready.append(self._new())

    @property
    def node_seed(self) -> str:
        return str(self.node_key.seed.decode())

    def attach(self, server: NatsServer) -> None:
        self._server = server

    def child_spec(self) -> ChildSpec:
        return ChildSpec(id="credentials", start=self.run, shutdown=5.0)

    def render(self) -> str:
        """The ``authorization`` block for the server's config."""
        users = [{"nkey": self.node_key.public_key.decode(), "permissions": {"publish": ">", "subscribe": ">"}}]
        for vmid, public in self._users.items():
            own = f"{agent_api.PREFIX}.{vmid}.>"
            users.append(
                {
                    "nkey": public,
                    "permissions": {
                        "publish": {"allow": [own, *_artifact_api(vmid)]},
                        "subscribe": {"allow": [own, f"{agent_api.inbox_prefix(vmid)}.>"]},
                    },
                }
            )
        return "authorization {\n  users: " + json.dumps(users) + "\n}"

    async def take(self) -> tuple[str, str]:
        """A machine id and the seed of the user the server accepts for it."""
        if not self._ready:
            self._coming.append(self._new())
            change = self._mark_changed()
            self._urgent.set()
            await self._wait_applied(change)
        vmid, seed = self._ready.popleft()
        if len(self._ready) + len(self._coming) < self.target:
            for _ in range(self.target - len(self._ready) - len(self._coming)):
                self._coming.append(self._new())
            self._mark_changed()
        return vmid, seed

    def revoke(self, vmid: str) -> None:
        """Remove ``vmid``'s user; applied with the next reload (its connection is then closed)."""
        if self._users.pop(vmid, None) is not None:
            self._mark_changed()

    def agents(self) -> list[str]:
        """Machine ids whose users are on the server (given out, not yet revoked)."""
        spare = {vmid for vmid, _ in self._ready} | {vmid for vmid, _ in self._coming}
        return sorted(set(self._users) - spare)

    async def run(self, *, task_status: trio.TaskStatus[AgentCredentials] = trio.TASK_STATUS_IGNORED) -> None:
        """Apply changes as they come, each reload covering every change made before it started."""
        task_status.started(self)
        last = -math.inf
        if self._applied < self._changes:  # a previous run failed while applying these
            self._dirty.set()
            self._urgent.set()
        while True:
            await self._dirty.wait()
            with trio.move_on_at(last + RELOAD_INTERVAL):  # gather more changes, unless someone waits
                await self._urgent.wait()
            last = trio.current_time()
            self._dirty = trio.Event()
            self._urgent = trio.Event()
            covering = self._changes
            covered = len(self._coming)  # stays in _coming (spare, not given out) until applied
            if self._server is not None:
                await self._server.reload()
                self.reloads += 1
            self._ready.extend(self._coming[:covered])
            del self._coming[:covered]
            self._applied = covering
            self._reloaded.set()
            self._reloaded = trio.Event()

    def _new(self) -> tuple[str, str]:
        vmid = new_vmid()
        key = crypto.create_signing_key(crypto.PREFIX_USER)
        self._users[vmid] = key.public_key.decode()
        return vmid, str(key.seed.decode())

    def _mark_changed(self) -> int:
        self._changes += 1
        self._dirty.set()
        return self._changes

    async def _wait_applied(self, change: int) -> None:
        while self._applied < change:
            await self._reloaded.wait()


def _artifact_api(vmid: str) -> list[str]:
    """The JetStream API an agent needs to read its machine's object store, and no other store's.

    ``STREAM.NAMES`` (nats-py looks a stream up by subject) reveals names only, not contents.
    """
    stream = f"OBJ_{agent_api.bucket(vmid)}"
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        "$JS.API.STREAM.NAMES",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.FC.{stream}.>",
    ]
