"""A control-API client, as the CLI uses it: plain nats-py on asyncio (a short-lived process).

Discovery is nex's scatter/gather: publish ``$NEX.PING`` with a fresh inbox as the reply subject and
collect every answer until the timeout, or until ``expect`` nodes have answered. Requests to one node
(``INFO``, ``LAMEDUCK``) are plain request/reply; a failure envelope becomes a :class:`NexError`
carrying the node's reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import TypeVar

import msgspec
import nats
import nats.errors
from nats.aio.client import Client

from nex.api import control, subjects
from nex.bus.errors import reason

T = TypeVar("T")

DEFAULT_SERVER = "nats://127.0.0.1:4222"


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


class NexClient:
    def __init__(self, nc: Client, *, timeout: float, namespace: str) -> None:
        self.nc = nc
        self.timeout = timeout
        self.namespace = namespace

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, server: str | None, *, timeout: float = 2.0, namespace: str = "default"
    ) -> AsyncIterator[NexClient]:
        url = server or DEFAULT_SERVER

        errors: list[Exception] = []

        async def remember(error: Exception) -> None:
            errors.append(error)

        try:
            # One retry, quickly: nats-py's defaults would retry a first connection 60 times, 2 s apart.
            nc = await nats.connect(
                url,
                name="nex-cli",
                max_reconnect_attempts=1,
                reconnect_time_wait=0.1,
                connect_timeout=min(timeout, 5.0),
                error_cb=remember,
            )
        except Exception as exc:
            hint = "" if server else " (no node running? start one with `nex up`, or set --server / NATS_URL)"
            cause = reason(errors[-1] if errors else exc)  # nats-py's own error is a generic "no servers"
            raise NexError(f"cannot connect to NATS at {url}: {cause}{hint}") from None
        try:
            yield cls(nc, timeout=timeout, namespace=namespace)
        finally:
            await nc.close()

    async def ping(self, expect: int | None = None) -> list[control.PingResponse]:
        """Every node that answers ``$NEX.PING`` within the timeout (sooner once ``expect`` answered)."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        found: list[control.PingResponse] = []
        try:
            await self.nc.publish(subjects.PING, b"", reply=inbox)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.timeout
            while expect is None or len(found) < expect:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    msg = await sub.next_msg(timeout=remaining)
                except nats.errors.TimeoutError:
                    break
                with contextlib.suppress(NexError, msgspec.DecodeError):
                    found.append(_unwrap(msg.data, control.PingResponse))
        finally:
            await sub.unsubscribe()
        return sorted(found, key=lambda n: (n.tags.get("node_name", ""), n.node_id))

    async def resolve(self, node_id: str | None) -> str:
        """A full node id from ``node_id`` (a full id, or a unique prefix) or, if None, the only node."""
        if node_id and len(node_id) == 56 and node_id.startswith("N"):
            return node_id
        nodes = await self.ping()
        if not nodes:
            raise NexError(f"no nodes answered on {subjects.PING} within {self.timeout:g}s")
        matches = [n for n in nodes if node_id is None or n.node_id.startswith(node_id)]
        if len(matches) == 1:
            return matches[0].node_id
        if not matches:
            raise NexError(f"no node's id starts with {node_id!r}; known: {', '.join(n.node_id for n in nodes)}")
        listing = "\n".join(f"  {n.node_id}  {n.tags.get('node_name', '')}" for n in matches)
        what = "several nodes answered" if node_id is None else f"several node ids start with {node_id!r}"
        raise NexError(f"{what}; give a node id:\n{listing}")

    async def info(self, node_id: str) -> control.InfoResponse:
        return await self._request(subjects.info(self.namespace, node_id), b"", control.InfoResponse)

    async def lameduck(self, node_id: str, deadline: float | None = None) -> control.LameDuckResponse:
        body = b""
        if deadline is not None:
            body = msgspec.json.encode(control.LameDuckRequest(deadline_ms=int(deadline * 1000)))
        return await self._request(subjects.lameduck(node_id), body, control.LameDuckResponse)

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
