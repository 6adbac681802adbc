"""Reading artifacts from the control NATS object store (the machine's own store on the internal
server is :mod:`nex.bus.staging`'s).

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
import json
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.nuid import NUID

from .artifact import ArtifactError, Location
from .checks import shown

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
    key = shown(location.key)
    try:
        msg = await js.get_last_msg(stream, meta_subject(location.bucket, location.key))
    except nats.js.errors.NotFoundError as exc:
        if exc.err_code == STREAM_NOT_FOUND:
            raise ArtifactError(f"no object store {location.bucket}") from None
        raise ArtifactError(f"no object {key} in the object store {location.bucket}") from None
    except nats.js.errors.ServiceUnavailableError:  # no responders: no JetStream (in that domain)
        where = f"in the JetStream domain {shown(jsdomain)} (jsdomain)" if jsdomain else "on the control NATS server"
        raise ArtifactError(f"no JetStream answered {where}") from None
    try:
        info = json.loads(msg.data or b"{}")
    except ValueError:
        raise ArtifactError(f"the object store {location.bucket} holds unreadable metadata for {key}") from None
    if info.get("deleted") or not info.get("nuid"):
        raise ArtifactError(f"no object {key} in the object store {location.bucket} (deleted)")
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


def meta_subject(bucket: str, name: str) -> str:
    """Where an object store keeps an object's metadata (NATS ADR-20)."""
    return f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
