"""The agent's view of its machine's object store, received as it is written.

The node puts the workload's artifact in ``NEXCACHE_{vmid}`` and then asks the agent to run it.
Fetching it only then (``ObjectStore.get``: look up the object, create a consumer, receive the
chunks) would add a second transfer after the node's. Instead the agent subscribes to the store's
stream when it starts, with an ordered push consumer on ``$O.{bucket}.>``: chunks arrive while the
node writes them, and the object's metadata (``$O.{bucket}.M.{name}``, written after its chunks, on
the same stream) says when it is complete. By the time the deploy request comes, the artifact is
here. This is the object store's own wire format (NATS ADR-20), read with nats-py's JetStream API.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy


class StoredObject(msgspec.Struct):
    """The fields of an object's metadata message this reader needs."""

    name: str
    nuid: str
    size: int = 0
    chunks: int = 0
    deleted: bool = False


class StoreWatch:
    """Objects of one object store as they are written; :meth:`read` returns a complete one."""

    def __init__(self, nc: Client, bucket: str, on_chunk: Callable[[], None] | None = None) -> None:
        self.nc = nc
        self.bucket = bucket
        self.on_chunk = on_chunk  # told of every chunk as it arrives: a deploy is coming
        self._chunks: collections.defaultdict[str, list[bytes]] = collections.defaultdict(list)
        self._objects: dict[str, StoredObject] = {}
        self._changed = asyncio.Event()
        self._sub: object = None

    async def start(self) -> None:
        """Subscribe from the stream's start (raises if the store does not exist)."""
        self._sub = await self.nc.jetstream().subscribe(
            f"$O.{self.bucket}.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL, cb=self._on_msg
        )

    async def _on_msg(self, msg: Msg) -> None:
        kind, _, token = msg.subject.removeprefix(f"$O.{self.bucket}.").partition(".")
        if kind == "C":
            self._chunks[token].append(msg.data)
            if self.on_chunk is not None:
                self.on_chunk()
        elif kind == "M":
            with contextlib.suppress(msgspec.DecodeError):
                info = msgspec.json.decode(msg.data, type=StoredObject)
                previous = self._objects.get(info.name)
                if previous is not None and previous.nuid != info.nuid:
                    self._chunks.pop(previous.nuid, None)  # replaced: its old chunks are garbage
                self._objects[info.name] = info
                self._changed.set()
                self._changed = asyncio.Event()

    async def read(self, name: str, timeout: float) -> bytes:
        """The object's bytes once its metadata has arrived, checked against its size (the caller checks
        the sha256 against what it expects, which is stronger than the writer's own digest).

        Raises:
            TimeoutError: the object was not written within ``timeout``.
            ValueError: it was deleted, or its chunks do not add up to what its metadata says.
        """
        async with asyncio.timeout(timeout):
            while name not in self._objects:
                await self._changed.wait()
        info = self._objects[name]
        if info.deleted:
            raise ValueError(f"object {name!r} was deleted from {self.bucket}")
        chunks = self._chunks.pop(info.nuid, [])
        data = b"".join(chunks)
        if len(chunks) != info.chunks or len(data) != info.size:
            raise ValueError(f"object {name!r}: {len(data)} bytes in {len(chunks)} chunks, expected {info.size}")
        return data
