"""Moving artifacts: from the control NATS object store to the machine's own store on the internal server.

These are coroutines for the asyncio thread, run through :meth:`nex.bus.link.NatsLink.call`.

Reading and writing use the object store's wire format (NATS ADR-20: chunks on ``$O.{bucket}.C.{nuid}``,
then the object's metadata on ``$O.{bucket}.M.{base64(name)}``) with nats-py's JetStream calls, not
``ObjectStore.get``/``put``: on a deploy's path those repeat a lookup, hash the data again and wait
for every chunk's acknowledgement, about 4 ms of a 1 MiB deploy here. What is skipped is checked
elsewhere: the node compares the sha256 of what it read with the JWT's claim, the agent compares the
size and sha256 of what it received with the deploy request.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import Header, ObjectInfo, ObjectMetaOptions, ObjectStoreConfig, StorageType
from nats.js.kv import MSG_ROLLUP_SUBJECT
from nats.nuid import NUID

from nex.api import agent as agent_api

from .artifact import ArtifactError, Location

STAGE_CHUNK = 4 << 20
INTERNAL_MAX_PAYLOAD = 8 << 20  # the internal server's max_payload: a chunk and its headers fit
STREAM_NOT_FOUND = 10059  # JetStream's error code (else: no such message)
READ_TIMEOUT = 10.0  # between two chunks of an artifact being read
_nuid = NUID()


@dataclass(frozen=True)
class StoredArtifact:
    """What the object store says about an artifact, before anything is downloaded."""

    location: Location
    size: int
    chunks: int
    nuid: str
    sha256: str  # hex, from the writer's digest ("" if it recorded none): a claim, not a proof


async def describe(nc: Client, location: Location, jsdomain: str | None) -> StoredArtifact:
    """Look the artifact up (one request): its size, its chunks and the digest its writer recorded."""
    js = nc.jetstream(domain=jsdomain or None)
    stream = f"OBJ_{location.bucket}"
    try:
        msg = await js.get_last_msg(stream, _meta_subject(location.bucket, location.key))
    except nats.js.errors.NotFoundError as exc:
        if exc.err_code == STREAM_NOT_FOUND:
            raise ArtifactError(f"no object store {location.bucket}") from None
        raise ArtifactError(f"no object {location.key!r} in the object store {location.bucket}") from None
    try:
        info = json.loads(msg.data or b"{}")
    except ValueError:
        raise ArtifactError(
            f"the object store {location.bucket} holds unreadable metadata for {location.key!r}"
        ) from None
    if info.get("deleted") or not info.get("nuid"):
        raise ArtifactError(f"no object {location.key!r} in the object store {location.bucket} (deleted)")
    algorithm, _, encoded = str(info.get("digest") or "").partition("=")
    digest = ""
    if algorithm.upper() == "SHA-256" and encoded:
        with contextlib.suppress(ValueError):
            digest = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).hex()
    return StoredArtifact(
        location=location,
        size=int(info.get("size") or 0),
        chunks=int(info.get("chunks") or 0),
        nuid=str(info["nuid"]),
        sha256=digest,
    )


async def download(nc: Client, stored: StoredArtifact, jsdomain: str | None) -> bytes:
    """The chunks of the object :func:`describe` found, joined (an ordered consumer, then gone)."""
    if stored.chunks == 0:
        return b""
    js = nc.jetstream(domain=jsdomain or None)
    subject = f"$O.{stored.location.bucket}.C.{stored.nuid}"
    chunks: list[bytes] = []
    sub = await js.subscribe(subject, ordered_consumer=True)
    try:
        while len(chunks) < stored.chunks:
            try:
                msg = await sub.next_msg(timeout=READ_TIMEOUT)
            except nats.errors.TimeoutError:
                raise ArtifactError(f"{stored.location}: no chunk within {READ_TIMEOUT:g}s") from None
            chunks.append(msg.data)
            if msg.metadata.num_pending == 0:
                break
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    data = b"".join(chunks)
    if len(data) != stored.size:
        raise ArtifactError(f"{stored.location} has {len(data)} bytes, its metadata says {stored.size}")
    return data


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
