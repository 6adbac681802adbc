"""Staging artifacts: each machine's own object store on the internal server, which its agent watches.

These are coroutines for the asyncio thread, run through :meth:`nex.bus.link.NatsLink.call`. The
object is written in the object store's wire format (NATS ADR-20) with nats-py's JetStream calls,
not ``ObjectStore.put``, which would hash the data again and wait for every chunk's acknowledgement;
the agent compares the size and sha256 of what it received with the deploy request.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json

import nats.js.errors
from nats.aio.client import Client
from nats.js.api import Header, ObjectInfo, ObjectMetaOptions, ObjectStoreConfig, StorageType
from nats.js.kv import MSG_ROLLUP_SUBJECT
from nats.nuid import NUID

from nex.api import agent as agent_api

STAGE_CHUNK = 4 << 20
INTERNAL_MAX_PAYLOAD = 8 << 20  # the internal server's max_payload: a chunk and its headers fit
_nuid = NUID()


async def create(nc: Client, vmid: str) -> None:
    """Make ``NEXCACHE_{vmid}`` (memory storage), the one store that machine's agent may read.

    Made when the machine starts, so that its agent can watch it from the start and a deploy only
    has to write the artifact.
    """
    await nc.jetstream().create_object_store(
        agent_api.bucket(vmid),
        config=ObjectStoreConfig(storage=StorageType.MEMORY, description=f"nex: artifact of {vmid}"),
    )


async def stage(nc: Client, vmid: str, data: bytes, sha256: str) -> None:
    """Write the artifact into the machine's store, which the agent watches (it receives it as written).

    The store is new and only the node writes it, so there is no earlier object to look up or purge.
    Chunks of :data:`STAGE_CHUNK` (most artifacts are one) are published without waiting; the
    metadata, which carries the digest the node computed already, with an acknowledgement: on one
    connection the stream stores them in order.
    """
    bucket = agent_api.bucket(vmid)
    nuid = _nuid.next().decode()
    chunk_subject = f"$O.{bucket}.C.{nuid}"
    chunks = 0
    for offset in range(0, len(data), STAGE_CHUNK):
        await nc.publish(chunk_subject, data[offset : offset + STAGE_CHUNK])
        chunks += 1
    info = ObjectInfo(
        name=agent_api.ARTIFACT_KEY,
        bucket=bucket,
        nuid=nuid,
        size=len(data),
        chunks=chunks,
        mtime=datetime.datetime.now(datetime.UTC).isoformat(),
        digest="SHA-256=" + base64.urlsafe_b64encode(bytes.fromhex(sha256)).decode(),
        options=ObjectMetaOptions(max_chunk_size=STAGE_CHUNK),
    )
    await nc.jetstream().publish(
        _meta_subject(bucket, agent_api.ARTIFACT_KEY),
        json.dumps(info.as_dict()).encode(),
        headers={Header.ROLLUP.value: MSG_ROLLUP_SUBJECT},
    )


async def unstage(nc: Client, vmid: str) -> None:
    """Delete the machine's store; nothing if it is not there."""
    with contextlib.suppress(nats.js.errors.NotFoundError, nats.js.errors.BucketNotFoundError):
        await nc.jetstream().delete_object_store(agent_api.bucket(vmid))


def _meta_subject(bucket: str, name: str) -> str:
    return f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
