"""Moving artifacts: from the control NATS object store to the machine's own store on the internal server.

These are coroutines for the asyncio thread, run through :meth:`nex.bus.link.NatsLink.call`.
"""

from __future__ import annotations

import base64
import contextlib
import weakref
from dataclasses import dataclass

import nats.js.errors
from nats.aio.client import Client
from nats.js.api import ObjectMeta, ObjectMetaOptions, ObjectStoreConfig, StorageType
from nats.js.object_store import ObjectStore

from nex.api import agent as agent_api

from .artifact import ArtifactError, Location

STAGE_CHUNK = 4 << 20
INTERNAL_MAX_PAYLOAD = 8 << 20  # the internal server's max_payload: a chunk and its headers fit


@dataclass(frozen=True)
class StoredArtifact:
    """What the object store says about an artifact, before anything is downloaded."""

    size: int
    sha256: str  # hex, from the writer's digest ("" if it recorded none): a claim, not a proof


async def describe(nc: Client, location: Location, jsdomain: str | None) -> StoredArtifact:
    """Look the artifact up (one request): its size and the digest its writer recorded."""
    store = await _bind(nc, location.bucket, jsdomain)
    try:
        info = await store.get_info(location.key)
    except (nats.js.errors.NotFoundError, nats.js.errors.ObjectNotFoundError):
        raise ArtifactError(f"no object {location.key!r} in the object store {location.bucket}") from None
    algorithm, _, encoded = (info.digest or "").partition("=")
    digest = ""
    if algorithm.upper() == "SHA-256" and encoded:
        with contextlib.suppress(ValueError):
            digest = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).hex()
    return StoredArtifact(size=info.size or 0, sha256=digest)


async def download(nc: Client, location: Location, jsdomain: str | None) -> bytes:
    """The artifact's bytes (nats-py checks them against the recorded digest)."""
    store = await _bind(nc, location.bucket, jsdomain)
    try:
        return bytes((await store.get(location.key)).data or b"")
    except (nats.js.errors.NotFoundError, nats.js.errors.ObjectNotFoundError):
        raise ArtifactError(f"no object {location.key!r} in the object store {location.bucket}") from None
    except nats.js.errors.DigestMismatchError:
        raise ArtifactError(f"the object {location} does not match the digest stored with it") from None


_bound: weakref.WeakKeyDictionary[Client, dict[tuple[str, str | None], ObjectStore]] = weakref.WeakKeyDictionary()


async def _bind(nc: Client, bucket: str, jsdomain: str | None) -> ObjectStore:
    """The bucket's ObjectStore, looked up once per connection (binding costs a request)."""
    stores = _bound.setdefault(nc, {})
    store = stores.get((bucket, jsdomain))
    if store is None:
        try:
            store = await nc.jetstream(domain=jsdomain or None).object_store(bucket)
        except (nats.js.errors.NotFoundError, nats.js.errors.BucketNotFoundError):
            raise ArtifactError(f"no object store {bucket}") from None
        stores[(bucket, jsdomain)] = store
    return store


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
    """Write the artifact (the agent, watching, receives it as it is written).

    In chunks of :data:`STAGE_CHUNK`, so that most artifacts are one message and one acknowledgement
    (the internal server allows messages that large; the object store default is 128 KiB).
    """
    options = ObjectMetaOptions(max_chunk_size=max(1, min(len(data), STAGE_CHUNK)))  # put allocates a chunk
    await bucket.put(agent_api.ARTIFACT_KEY, data, meta=ObjectMeta(name=agent_api.ARTIFACT_KEY, options=options))


async def unstage(nc: Client, vmid: str) -> None:
    """Delete the machine's store; nothing if it is not there."""
    with contextlib.suppress(nats.js.errors.NotFoundError, nats.js.errors.BucketNotFoundError):
        await nc.jetstream().delete_object_store(agent_api.bucket(vmid))
