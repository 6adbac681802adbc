"""A control-API client, as the CLI uses it: plain nats-py on asyncio (a short-lived process).

Discovery is nex's scatter/gather: publish ``$NEX.PING`` with a fresh inbox as the reply subject and
collect every answer until the timeout, or until ``expect`` nodes have answered (``$NEX.WPING`` finds
workloads the same way). Requests to one node (``INFO``, ``LAMEDUCK``, ``DEPLOY``, ``STOP``) are plain
request/reply; a failure envelope becomes a :class:`NexError` carrying the node's reason.

Deploy and stop requests are signed with the requester's keys, kept as nex keeps them: an account
seed in ``~/.nex/issuer.nk`` (the workloads' issuer) and a curve seed in ``~/.nex/publisher.xk`` (the
sender of sealed environments), both made on first use.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
import nkeys
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ObjectStoreConfig

from nex import crypto
from nex.api import control, subjects
from nex.bus.errors import reason
from nex.workload import request as workload_request
from nex.workload.placement import pick

T = TypeVar("T")

DEFAULT_SERVER = "nats://127.0.0.1:4222"
# Seconds between a follower's reconnect attempts: a node that brought its own server back publishes
# node_started (and what its last run left) within moments, and a follower must be back by then.
FOLLOW_RECONNECT_WAIT = 0.1
DISCOVERY_WINDOW = 0.75  # how long to collect ping answers when picking a node
AUCTION_SETTLE = 0.05
"""An auction ends once no bid has come for this long after the first: nodes bid within milliseconds
(a cluster's farthest in a few), so waiting out nex's whole window (0.75 s) only delays the deploy.
A node too slow to bid by then is not one to place work on."""
REASK = 0.25  # between pings while waiting for an expected number of nodes
UPLOAD_BUCKET = "NEXCLIFILES"  # nex devrun's bucket
UPLOAD_MAX_BYTES = 100 * 1024 * 1024  # nex's objectStoreMaxBytes


class NexError(Exception):
    """A control-API call failed; the message is meant for the operator."""


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``2s``, ``500ms``, ``1m30s``, ``1h``, or a bare number of seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a duration (examples: 2s, 500ms, 1m30s, 1h)")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(number) * scale[unit] for number, unit in parts)


@dataclass(frozen=True)
class RequesterKeys:
    """The issuer account key that signs workload JWTs and the xkey that seals environments."""

    issuer: nkeys.KeyPair
    xkey: crypto.XKey

    @classmethod
    def load_or_create(cls, directory: Path) -> RequesterKeys:
        """``issuer.nk`` and ``publisher.xk`` in ``directory``, created (0600) on first use."""
        issuer_path, xkey_path = directory / "issuer.nk", directory / "publisher.xk"
        issuer_seed = crypto.read_or_create_seed(
            issuer_path, lambda: crypto.encode_seed(crypto.PREFIX_ACCOUNT, os.urandom(32))
        )
        xkey_seed = crypto.read_or_create_seed(xkey_path, lambda: crypto.XKey.generate().seed)
        try:
            issuer = crypto.signing_key_from_seed(issuer_seed, crypto.PREFIX_ACCOUNT)
        except (crypto.InvalidKey, nkeys.NkeysError) as exc:
            raise NexError(f"{issuer_path} does not hold an account (SA…) seed: {exc}") from None
        try:
            xkey = crypto.XKey.from_seed(xkey_seed)
        except crypto.InvalidKey as exc:
            raise NexError(f"{xkey_path} does not hold an xkey (SX…) seed: {exc}") from None
        return cls(issuer, xkey)


@dataclass(frozen=True)
class Artifact:
    """A workload binary in a JetStream object store."""

    location: str  # nats://BUCKET/key
    hash: str  # sha256 hex
    size: int


def deploy_body(
    artifact: Artifact,
    node: control.PingResponse | control.AuctionResponse,
    name: str,
    keys: RequesterKeys,
    *,
    environment: dict[str, str] | None = None,
    argv: list[str] | None = None,
    description: str = "",
    essential: bool = False,
    workload_type: str = "native",
) -> bytes:
    """The ``$NEX.DEPLOY`` body that runs ``artifact`` as ``name`` on ``node``: the environment
    sealed to the node's xkey, the JWT (with the artifact's sha256) signed by ``keys.issuer``."""
    deploy = workload_request.Deploy(
        location=artifact.location,
        name=name,
        hash=artifact.hash,
        node_id=node.node_id,
        node_xkey=node.target_xkey,
        environment=environment or {},
        argv=argv or [],
        description=description,
        essential=essential,
        workload_type=workload_type,
    )
    return workload_request.deploy_request(deploy, keys.issuer, keys.xkey)


class NexClient:
    def __init__(self, nc: Client, *, timeout: float, namespace: str, url: str = "") -> None:
        self.nc = nc
        self.url = url
        self.timeout = timeout
        self.namespace = namespace
        self._watchers: set[asyncio.Queue[Msg | None]] = set()  # told when the connection closes
        self._notices: list[Callable[[str], None]] = []  # followers' (see watch)

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, server: str | None, *, timeout: float = 2.0, namespace: str = "default"
    ) -> AsyncIterator[NexClient]:
        url = server or DEFAULT_SERVER

        errors: list[Exception] = []
        watchers: set[asyncio.Queue[Msg | None]] = set()

        async def remember(error: Exception) -> None:
            errors.append(error)

        async def closed() -> None:
            for queue in watchers:  # a follower must not wait forever on a connection that is gone
                queue.put_nowait(None)

        notices: list[Callable[[str], None]] = []  # a follower's, told of disconnections

        async def disconnected() -> None:
            for notice in notices:
                notice(f"lost the connection to NATS at {url}; reconnecting")

        async def reconnected() -> None:
            for notice in notices:
                notice(f"reconnected to NATS at {url}")

        try:
            # One retry, quickly: nats-py's defaults would retry a first connection 60 times, 2 s apart.
            nc = await nats.connect(
                url,
                name="nex-cli",
                max_reconnect_attempts=1,
                reconnect_time_wait=0.1,
                connect_timeout=min(timeout, 5.0),
                error_cb=remember,
                closed_cb=closed,
                disconnected_cb=disconnected,
                reconnected_cb=reconnected,
            )
        except Exception as exc:
            hint = "" if server else " (no node running? start one with `nex up`, or set --server / NATS_URL)"
            cause = reason(errors[-1] if errors else exc)  # nats-py's own error is a generic "no servers"
            raise NexError(f"cannot connect to NATS at {url}: {cause}{hint}") from None
        client = cls(nc, timeout=timeout, namespace=namespace, url=url)
        client._watchers = watchers
        client._notices = notices
        try:
            yield client
        finally:
            await nc.close()

    async def ping(self, expect: int | None = None) -> list[control.PingResponse]:
        """Every node that answers ``$NEX.PING`` within the timeout (sooner once ``expect`` answered)."""
        found = await self._gather(subjects.PING, control.PingResponse, expect, key=lambda node: node.node_id)
        return sorted(found, key=lambda n: (n.tags.get("node_name", ""), n.node_id))

    async def resolve(self, node_id: str | None) -> str:
        """A full node id from ``node_id`` (a full id, or a unique prefix) or, if None, the only node."""
        return (await self.find(node_id)).node_id

    async def find(self, node_id: str | None) -> control.PingResponse:
        """The ping answer of one node: ``node_id`` (a full id, or a unique prefix) or, if None, the only one.

        A full id is asked directly; otherwise nodes are discovered for :data:`DISCOVERY_WINDOW`
        (nex devrun's 750 ms), or --timeout if that is shorter.
        """
        if node_id and len(node_id) == 56 and node_id.startswith("N"):
            return await self._request(subjects.ping(node_id), b"", control.PingResponse)
        window = min(self.timeout, DISCOVERY_WINDOW)
        nodes = await self._gather(subjects.PING, control.PingResponse, None, window=window)
        if not nodes:
            raise NexError(f"no nodes answered on {subjects.PING} within {window:g}s")
        matches = [n for n in nodes if node_id is None or n.node_id.startswith(node_id)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise NexError(f"no node's id starts with {node_id!r}; known: {', '.join(n.node_id for n in nodes)}")
        listing = "\n".join(f"  {n.node_id}  {n.tags.get('node_name', '')}" for n in matches)
        what = "several nodes answered" if node_id is None else f"several node ids start with {node_id!r}"
        raise NexError(f"{what}; give a node id:\n{listing}")

    async def auction(self, request: control.AuctionRequest) -> list[control.AuctionResponse]:
        """The bids of every node that would take a workload like ``request`` (``$NEX.AUCTION``),
        gathered for :data:`DISCOVERY_WINDOW` (or --timeout if shorter), or until they stop coming
        (:data:`AUCTION_SETTLE`)."""
        window = min(self.timeout, DISCOVERY_WINDOW)
        return await self._gather(
            subjects.AUCTION,
            control.AuctionResponse,
            None,
            window=window,
            key=lambda bid: bid.node_id,
            payload=msgspec.json.encode(request),
            settle=AUCTION_SETTLE,
        )

    async def place(self, request: control.AuctionRequest) -> control.AuctionResponse:
        """The node to run a workload like ``request``: the least loaded bidder, ties at random."""
        bids = await self.auction(request)
        if not bids:
            wanted = msgspec.json.encode(request).decode()
            raise NexError(
                f"no node bid for the workload on {subjects.AUCTION} within {min(self.timeout, DISCOVERY_WINDOW):g}s "
                f"(asked for {wanted}); nodes in lame duck or at their workload limit do not bid: see `nex ls`"
            )
        return pick(bids)

    async def info(self, node_id: str) -> control.InfoResponse:
        return await self._request(subjects.info(self.namespace, node_id), b"", control.InfoResponse)

    async def lameduck(self, node_id: str, deadline: float | None = None) -> control.LameDuckResponse:
        body = b""
        if deadline is not None:
            body = msgspec.json.encode(control.LameDuckRequest(deadline_ms=int(deadline * 1000)))
        return await self._request(subjects.lameduck(node_id), body, control.LameDuckResponse)

    async def upload(self, data: bytes, key: str) -> Artifact:
        """Put ``data`` in the object store NEXCLIFILES under ``key`` (as nex devrun does)."""
        js = self.nc.jetstream()
        try:
            try:
                store = await js.object_store(UPLOAD_BUCKET)
            except nats.js.errors.NotFoundError:
                config = ObjectStoreConfig(max_bytes=UPLOAD_MAX_BYTES, description="nex: workloads uploaded by nex run")
                store = await js.create_object_store(UPLOAD_BUCKET, config=config)
            await store.put(key, data)
        except nats.errors.Error as exc:
            raise NexError(
                f"cannot upload {key} to the object store {UPLOAD_BUCKET}: {reason(exc)} "
                "(the NATS server needs JetStream; `nex up` without --server starts one with it)"
            ) from None
        return Artifact(location=f"nats://{UPLOAD_BUCKET}/{key}", hash=hashlib.sha256(data).hexdigest(), size=len(data))

    async def stored(self, location: str) -> Artifact:
        """An artifact already in an object store, with the sha256 its digest records."""
        bucket, _, key = location.removeprefix("nats://").partition("/")
        if not location.startswith("nats://") or not bucket or not key.strip("/"):
            raise NexError(f"{location!r} is not nats://BUCKET/key")
        try:
            store = await self.nc.jetstream().object_store(bucket)
        except nats.js.errors.NotFoundError:
            raise NexError(f"no object store {bucket} on this NATS (upload a file with `nex run FILE`)") from None
        except nats.errors.Error as exc:
            raise NexError(f"cannot open the object store {bucket}: {reason(exc)}") from None
        try:
            info = await store.get_info(key.strip("/"))
        except nats.js.errors.NotFoundError:
            raise NexError(f"no object {key.strip('/')!r} in the object store {bucket}") from None
        except nats.errors.Error as exc:
            raise NexError(f"cannot look up {location}: {reason(exc)}") from None
        algorithm, _, digest = (info.digest or "").partition("=")
        if algorithm.upper() != "SHA-256" or not digest:
            raise NexError(f"{location} has no SHA-256 digest to sign (digest {info.digest!r})")
        raw = base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4))
        return Artifact(location=location, hash=raw.hex(), size=info.size or 0)

    async def deploy(self, node: control.PingResponse | control.AuctionResponse, body: bytes) -> control.RunResponse:
        return await self._request(subjects.deploy(self.namespace, node.node_id), body, control.RunResponse)

    async def probe(self, target: str | None = None, *, first: bool = False) -> list[control.WorkloadPingResponse]:
        """The nodes running workloads (those whose id or name is ``target``), from ``$NEX.WPING``.

        Nodes with nothing matching stay silent. ``first``: return with the first answer instead of
        waiting out the timeout.
        """
        return await self._gather(
            subjects.wping(self.namespace, target), control.WorkloadPingResponse, 1 if first else None
        )

    async def stop(self, workload_id: str, issuer: nkeys.KeyPair) -> control.StopResponse:
        """Stop a workload, wherever it runs, with a stop JWT signed by ``issuer``.

        A stop JWT issued in the same second as the deploy's is refused as a replay (nex's rule), so
        then this waits for the next second and signs a new one, once.
        """
        answers = await self.probe(workload_id, first=True)
        found = [(node, m) for node in answers for m in node.running_machines if m.id == workload_id]
        if not found:
            raise NexError(
                f"no workload {workload_id!r} in namespace {self.namespace} answered within {self.timeout:g}s"
            )
        node, machine = found[0]
        subject = subjects.stop(self.namespace, node.node_id)
        for attempt in range(2):
            body = workload_request.stop_request(workload_id, machine.name, node.node_id, issuer)
            try:
                return await self._request(subject, body, control.StopResponse)
            except NexError as exc:
                if attempt or "cloned or captured" not in str(exc):
                    raise
                await asyncio.sleep(1 - time.time() % 1 + 0.01)
        raise AssertionError("unreachable")

    async def watch(
        self, subject_list: list[str], duration: float | None, *, notice: Callable[[str], None] | None = None
    ) -> AsyncIterator[Msg]:
        """Messages on these subjects as they come, for ``duration`` seconds (None: until cancelled).

        With no ``duration`` (a follower) the connection is patient: it reconnects for as long as it
        takes (a restarted server, a node that brought its own server back), telling ``notice``.

        Raises:
            NexError: the connection was lost (after nats-py's one quick reconnect attempt, when
                ``duration`` is given).
        """
        if duration is None:
            self.nc.options["max_reconnect_attempts"] = -1  # nats-py reads these at each attempt
            self.nc.options["reconnect_time_wait"] = FOLLOW_RECONNECT_WAIT
            if notice is not None:
                self._notices.append(notice)
        queue: asyncio.Queue[Msg | None] = asyncio.Queue()

        async def put(msg: Msg) -> None:
            queue.put_nowait(msg)

        self._watchers.add(queue)
        subs = [await self.nc.subscribe(subject, cb=put) for subject in subject_list]
        try:
            deadline = None if duration is None else time.monotonic() + duration
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return
                try:
                    msg = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    return
                if msg is None:
                    raise NexError(f"lost the connection to NATS at {self.url or 'the server'}")
                yield msg
        finally:
            self._watchers.discard(queue)
            for sub in subs:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()

    async def _gather(
        self,
        subject: str,
        kind: type[T],
        expect: int | None,
        *,
        window: float | None = None,
        key: Callable[[T], str] | None = None,
        payload: bytes = b"",
        settle: float | None = None,
    ) -> list[T]:
        """Scatter/gather: the answers to ``subject`` within ``window`` (the timeout), or the first
        ``expect``; with ``settle``, also once ``settle`` seconds pass with no new answer after the first.

        With ``expect`` and ``key`` (what tells answerers apart), the question is asked again every
        :data:`REASK` seconds until ``expect`` different answerers have answered: one that starts
        listening just after the first ask (a node coming up) is still found, and counted once.
        """
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        found: dict[object, T] = {}
        reask = expect is not None and key is not None
        try:
            await self.nc.publish(subject, payload, reply=inbox)
            deadline = time.monotonic() + (self.timeout if window is None else window)
            next_ask = time.monotonic() + REASK
            while (remaining := deadline - time.monotonic()) > 0 and (expect is None or len(found) < expect):
                wait = remaining if settle is None or not found else min(remaining, settle)
                if reask:
                    if time.monotonic() >= next_ask:
                        await self.nc.publish(subject, payload, reply=inbox)
                        next_ask = time.monotonic() + REASK
                    wait = max(0.001, min(remaining, next_ask - time.monotonic()))
                try:
                    msg = await sub.next_msg(timeout=wait)
                except nats.errors.TimeoutError:
                    if settle is not None and found and wait < remaining:
                        break  # quiet since the last answer: every node that will answer soon has
                    continue
                with contextlib.suppress(NexError):  # a node that cannot answer is not one we can list
                    answer = _unwrap(msg.data, kind)
                    found[key(answer) if key is not None else len(found)] = answer
        finally:
            await sub.unsubscribe()
        return list(found.values())

    async def _request(self, subject: str, payload: bytes, kind: type[T]) -> T:
        try:
            msg = await self.nc.request(subject, payload, timeout=self.timeout)
        except nats.errors.NoRespondersError:
            raise NexError(f"no node answers on {subject} (is the node id right, and the node up?)") from None
        except nats.errors.TimeoutError:
            raise NexError(f"no answer on {subject} within {self.timeout:g}s") from None
        return _unwrap(msg.data, kind)


def _unwrap(data: bytes, kind: type[T]) -> T:
    try:
        envelope = msgspec.json.decode(data, type=control.ReceivedEnvelope)
    except msgspec.DecodeError as exc:
        raise NexError(f"the node sent a reply this client cannot read: {exc}") from None
    if envelope.error:
        raise NexError(envelope.error)
    try:
        return msgspec.json.decode(envelope.data, type=kind)
    except msgspec.DecodeError as exc:
        raise NexError(f"the node sent a {envelope.type} this client cannot read: {exc}") from None
