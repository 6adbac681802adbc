"""Moving artifacts: from the control NATS object store to the machine's own store on the internal server.

These are coroutines for the asyncio thread, run through :meth:`nex.bus.link.NatsLink.call`.
"""

from __future__ import annotations

import contextlib

import nats.js.errors
from nats.aio.client import Client
from nats.js.api import ObjectStoreConfig, StorageType
from nats.js.object_store import ObjectStore

from nex.api import agent as agent_api

from .artifact import ArtifactError, Location


async def fetch(nc: Client, location: Location, jsdomain: str | None, max_bytes: int) -> bytes:
    """The artifact's bytes; refused before downloading if it is larger than ``max_bytes`` (0: no limit)."""
    js = nc.jetstream(domain=jsdomain or None)
    try:
        store = await js.object_store(location.bucket)
    except (nats.js.errors.NotFoundError, nats.js.errors.BucketNotFoundError):
        raise ArtifactError(f"no object store {location.bucket} (from {location})") from None
    try:
        info = await store.get_info(location.key)
    except (nats.js.errors.NotFoundError, nats.js.errors.ObjectNotFoundError):
        raise ArtifactError(f"no object {location.key!r} in the object store {location.bucket}") from None
    if max_bytes and (info.size or 0) > max_bytes:
        raise ArtifactError(
            f"Workload file size would exceed node limitations: {info.size} bytes, at most {max_bytes} allowed"
        )
    return bytes((await store.get(location.key)).data or b"")


async def create(nc: Client, vmid: str) -> ObjectStore:
    """Make ``NEXCACHE_{vmid}`` (memory storage), the one store that machine's agent may read.

    Made when the machine starts, so that its agent can watch it from the start and a deploy only
    has to write the artifact.
    """
    return await nc.jetstream().create_object_store(
        agent_api.bucket(vmid),
        config=ObjectStoreConfig(storage=StorageType.MEMORY, description=f"nex: artifact of {vmid}"),
    )


async def stage(bucket: ObjectStore, data: bytes) -> None:
    """Write the artifact (the agent, watching, receives it as it is written)."""
    await bucket.put(agent_api.ARTIFACT_KEY, data)


async def unstage(nc: Client, vmid: str) -> None:
    """Delete the machine's store; nothing if it is not there."""
    with contextlib.suppress(nats.js.errors.NotFoundError, nats.js.errors.BucketNotFoundError):
        await nc.jetstream().delete_object_store(agent_api.bucket(vmid))
