"""One NATS connection, owned by one task-actor, usable from Trio.

:class:`NatsLink` wraps a nats-py client that lives on the node's :class:`~nex.bus.aio.AsyncioThread`.
Its task connects, serves until cancelled, then drains; its methods (``request``, ``publish``,
``subscribe``) are called from any Trio task and cross to the asyncio thread.

Inbound messages are delivered to actors: a subscription names an :class:`~actors.ActorRef` whose
mailbox receives :class:`InboundMsg`. Messages are built on the asyncio thread and handed to Trio in
batches (one ``run_sync_soon`` wakes Trio for everything that arrived meanwhile). A full mailbox drops
the message, as NATS itself drops for a slow consumer; drops are counted per subscription and logged.

Reconnects are nats-py's (forever, every ``reconnect_wait`` seconds); subscriptions survive them.
Subscriptions belong to the link object, not to one run of its task, so a restarted link makes them
again. Connection changes arrive as typed :data:`LinkEvent` messages to ``events``, if given.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import trio
from nats.aio.client import Client
from nats.aio.msg import Msg

from actors import ActorRef, ActorStopped, ChildSpec, MailboxFull, Message
from nex import logs

from .aio import AsyncioThread
from .errors import reason

log = logs.get("nex.bus")
T = TypeVar("T")

SUBSCRIBE_TIMEOUT = 5.0  # for the server to confirm subscriptions (a flush)


class InboundMsg(Message):
    """A message from NATS, as an actor receives it."""

    subject: str
    data: bytes
    reply: str = ""
    headers: dict[str, str] | None = None


class LinkUp(Message):
    link: str
    url: str


class LinkDown(Message):
    link: str
    reason: str


class LinkReconnected(Message):
    link: str
    url: str


LinkEvent = LinkUp | LinkDown | LinkReconnected


class LinkError(Exception):
    """A NATS operation failed; the message says which and why."""


class NoResponders(LinkError):
    """Nobody is subscribed to the subject of a request."""


class RequestTimeout(LinkError, trio.TooSlowError):
    """No reply arrived within the request's timeout."""


class NotConnected(LinkError):
    """The link has not connected yet, or has stopped."""


class LinkStats(msgspec.Struct):
    name: str
    url: str
    state: str
    subscriptions: int
    delivered: int
    dropped: int
    reconnects: int


class Subscription:
    """A subject (and optional queue group) whose messages go to ``target``."""

    _ids = itertools.count(1)

    def __init__(self, subject: str, queue: str, target: ActorRef[Any]) -> None:
        self.id = next(self._ids)
        self.subject = subject
        self.queue = queue
        self.target = target
        self.delivered = 0
        self.dropped = 0
        self._nats: Any = None  # nats-py's Subscription, touched on the asyncio thread only


class NatsLink:
    """A named NATS connection (the node has two: ``control`` and ``internal``).

    Args:
        name: for logs, errors and the actor tree.
        servers: NATS URLs.
        aio: the asyncio thread the client lives on.
        events: receives :data:`LinkEvent` messages, if given.
        client_name: the connection name the server shows (``nex <name>`` by default).
        reply_spaces: wildcard subjects (such as ``agentint.*.reply.*``) on which replies to
            :meth:`request` calls with a ``reply_prefix`` arrive; subscribed on every connection.
        options: passed to ``nats.connect`` (credentials, ``name``, …).
    """

    def __init__(
        self,
        name: str,
        servers: list[str],
        aio: AsyncioThread,
        *,
        events: ActorRef[LinkEvent] | None = None,
        client_name: str | None = None,
        reconnect_wait: float = 0.25,
        connect_timeout: float = 2.0,
        reply_spaces: Sequence[str] = (),
        **options: Any,
    ) -> None:
        self.name = name
        self.servers = servers
        self.aio = aio
        self.events = events
        self.client_name = client_name or f"nex {name}"
        self.reconnect_wait = reconnect_wait
        self.connect_timeout = connect_timeout
        self.reply_spaces = tuple(reply_spaces)
        self.options = options
        self.state = "idle"
        self.url = ""
        self.reconnects = 0
        self._nc: Client | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._subs: dict[int, Subscription] = {}
        self._inbound: collections.deque[tuple[Subscription | str, InboundMsg]] = collections.deque()
        self._wake_pending = False
        self._tokens = itertools.count(1)
        self._replies: dict[str, _PendingReply] = {}
        self._reply_prefix = ""
        self._last_error: Exception | None = None

    # -- the task ----------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[NatsLink] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, make the subscriptions, serve until cancelled, then drain (bounded)."""
        self._token = trio.lowlevel.current_trio_token()
        self.state = "connecting"
        try:
            self._nc = await self.aio.run(self._connect)
        except Exception as exc:
            self.state = "failed"
            cause = reason(self._last_error or exc)  # nats-py's own error is a generic "no servers"
            raise LinkError(f"cannot connect to NATS at {', '.join(self.servers)}: {cause}") from None
        try:
            self.state = "connected"
            self.url = self._connected_url()
            for sub in list(self._subs.values()):
                await self.aio.run(self._nats_subscribe, sub)
            if self._subs:
                await self._confirm_subscriptions()
            log.info("Established NATS connection", link=self.name, servers=self.url)
            self._emit(LinkUp(link=self.name, url=self.url))
            task_status.started(self)
            await trio.sleep_forever()
        finally:
            self.state = "closing"
            with trio.move_on_after(2.0, shield=True):
                await self.aio.run(self._close)
            self.state = "closed"
            self._nc = None

    def child_spec(self) -> ChildSpec:
        return ChildSpec(id=f"{self.name}-link", start=self.run, shutdown=5.0, kind="actor")

    # -- operations (any Trio task) ----------------------------------------------------------------

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        *,
        timeout: float = 2.0,
        headers: dict[str, str] | None = None,
        reply_prefix: str | None = None,
    ) -> InboundMsg:
        """Send a request and wait for its reply.

        Replies come back on this link's own inbox subscription (made once per connection) and are
        matched to the waiting caller by their subject, so a request costs one hop to the asyncio
        thread and one back, with no asyncio task or future waiting on the reply.

        ``reply_prefix`` puts the reply subject under that prefix instead, inside one of the link's
        ``reply_spaces``: for responders whose permissions allow publishing only under their own
        subjects (agents), which holds across server reloads where ``allow_responses`` does not.

        Raises:
            NoResponders: nobody listens on ``subject``.
            RequestTimeout: no reply within ``timeout``.
            NotConnected: the link is not connected.
        """
        self._client()
        token = str(next(self._tokens))
        reply = f"{reply_prefix}.{token}" if reply_prefix is not None else self._reply_prefix + token
        pending = _PendingReply()
        self._replies[reply] = pending
        try:
            self.aio.call_soon(self._start_publish, subject, payload, reply, headers, pending)
            with trio.move_on_after(timeout):
                await pending.done.wait()
        finally:
            del self._replies[reply]
        if pending.error is not None:
            raise pending.error
        msg = pending.msg
        if msg is None:
            raise RequestTimeout(f"no reply on {subject} within {timeout:g}s")
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            raise NoResponders(f"no responders on {subject}")
        return msg

    async def publish(
        self, subject: str, payload: bytes = b"", *, reply: str = "", headers: dict[str, str] | None = None
    ) -> None:
        """Publish and wait until nats-py has taken the message (not until the server has)."""
        await self.aio.run(self._client().publish, subject, payload, reply, headers)

    def publish_nowait(
        self, subject: str, payload: bytes = b"", *, reply: str = "", headers: dict[str, str] | None = None
    ) -> None:
        """Publish without waiting (events, logs); a failure is logged, not raised."""
        self.aio.submit(self._client().publish, subject, payload, reply, headers, what=f"publish {subject}")

    async def respond(self, msg: InboundMsg, payload: bytes) -> None:
        """Reply to a request; a message without a reply subject gets nothing."""
        if msg.reply:
            await self.publish(msg.reply, payload)

    async def flush(self, timeout: float = 2.0) -> None:
        try:
            await self.aio.run(self._client().flush, timeout)
        except (nats.errors.TimeoutError, TimeoutError):
            raise RequestTimeout(f"{self.name} link: flush not acknowledged within {timeout:g}s") from None

    async def subscribe(self, subject: str, target: ActorRef[Any], *, queue: str = "") -> Subscription:
        """Deliver every message on ``subject`` to ``target`` as :class:`InboundMsg`.

        Returns once the server has the subscription (a flush: one round trip), so whatever anyone
        publishes after that is delivered; nats-py alone returns once the SUB is buffered, and a
        message sent on another connection could overtake it.
        """
        sub = Subscription(subject, queue, target)
        self._subs[sub.id] = sub
        if self._nc is not None:
            try:
                await self.aio.run(self._nats_subscribe, sub)
                await self._confirm_subscriptions()
            except BaseException:
                del self._subs[sub.id]
                raise
        return sub

    async def unsubscribe(self, sub: Subscription) -> None:
        if self._subs.pop(sub.id, None) is not None and sub._nats is not None and self._nc is not None:
            with contextlib.suppress(nats.errors.Error):
                await self.aio.run(sub._nats.unsubscribe)

    async def call(self, fn: Callable[[Client], Coroutine[Any, Any, T]]) -> T:
        """Run ``fn(client)`` on the asyncio thread: for nats-py APIs the link does not wrap (JetStream)."""
        return await self.aio.run(fn, self._client())

    def new_inbox(self) -> str:
        return str(self._client().new_inbox())

    def stats(self) -> LinkStats:
        return LinkStats(
            name=self.name,
            url=self.url,
            state=self.state,
            subscriptions=len(self._subs),
            delivered=sum(s.delivered for s in self._subs.values()),
            dropped=sum(s.dropped for s in self._subs.values()),
            reconnects=self.reconnects,
        )

    # -- the asyncio side ---------------------------------------------------------------------------

    async def _connect(self) -> Client:
        # Try each server twice, then fail; only once connected allow reconnects forever. (With
        # max_reconnect_attempts <= 0, nats-py retries even a first connection forever.)
        self._last_error = None
        nc = await nats.connect(
            servers=self.servers,
            max_reconnect_attempts=1,
            reconnect_time_wait=self.reconnect_wait,
            connect_timeout=self.connect_timeout,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            drain_timeout=2,
            name=self.client_name,
            **self.options,
        )
        nc.options["max_reconnect_attempts"] = -1
        self._reply_prefix = f"{nc.new_inbox()}."

        async def on_reply(msg: Msg) -> None:
            self._post(msg.subject, _inbound(msg))

        for pattern in (self._reply_prefix + "*", *self.reply_spaces):
            await nc.subscribe(pattern, cb=on_reply)
        return nc

    def _start_publish(
        self, subject: str, payload: bytes, reply: str, headers: dict[str, str] | None, pending: _PendingReply
    ) -> None:
        """asyncio thread: publish a request; a failure goes back to the waiting caller."""
        nc = self._nc
        if nc is None:
            return

        def done(task: asyncio.Future[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                error = LinkError(f"cannot publish to {subject}: {reason(task.exception())}")  # type: ignore[arg-type]
                self._from_asyncio_call(pending.fail, error)

        asyncio.ensure_future(nc.publish(subject, payload, reply, headers)).add_done_callback(done)

    async def _close(self) -> None:
        nc = self._nc
        if nc is None or nc.is_closed:
            return
        try:
            await nc.drain()
        except (Exception, asyncio.CancelledError):
            # nats-py cancels its own drain when the server goes away under it (a node stopping
            # stops its servers and links together); close is what is left to do either way.
            await nc.close()

    async def _confirm_subscriptions(self) -> None:
        """Until the server has every subscription sent so far (a flush).

        Raises:
            RequestTimeout: it did not confirm within :data:`SUBSCRIBE_TIMEOUT`.
        """
        try:
            await self.aio.run(self._client().flush, SUBSCRIBE_TIMEOUT)
        except (nats.errors.TimeoutError, TimeoutError):
            raise RequestTimeout(
                f"{self.name} link: the server did not confirm subscriptions within {SUBSCRIBE_TIMEOUT:g}s"
            ) from None

    async def _nats_subscribe(self, sub: Subscription) -> None:
        async def callback(msg: Msg) -> None:
            self._post(sub, _inbound(msg))

        sub._nats = await self._client().subscribe(sub.subject, queue=sub.queue, cb=callback)

    def _post(self, target: Subscription | str, msg: InboundMsg) -> None:
        """asyncio thread: queue for Trio, waking it only if no wake-up is pending already.

        ``target`` is a subscription, or the reply subject of a request waiting for its reply.
        """
        self._inbound.append((target, msg))
        if not self._wake_pending and self._token is not None:
            self._wake_pending = True
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._deliver)

    def _deliver(self) -> None:
        """Trio thread: hand everything queued to its actors and waiting requests."""
        self._wake_pending = False  # before draining: a later arrival schedules another wake-up
        while self._inbound:
            target, msg = self._inbound.popleft()
            if isinstance(target, str):
                pending = self._replies.get(target)
                if pending is not None:  # else: a late reply to a request that timed out
                    pending.settle(msg)
                continue
            try:
                target.target.send_nowait(msg)
                target.delivered += 1
            except (MailboxFull, ActorStopped) as exc:
                target.dropped += 1
                if target.dropped in (1, 10, 100, 1000) or target.dropped % 10_000 == 0:
                    log.warning(
                        "Dropping NATS messages: the receiving actor cannot keep up",
                        link=self.name,
                        subject=target.subject,
                        actor=target.target.name,
                        dropped=target.dropped,
                        reason=type(exc).__name__,
                    )

    def _from_asyncio_call(self, fn: Any, *args: Any) -> None:
        if self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(fn, *args)

    async def _on_error(self, error: Exception) -> None:
        self._last_error = error
        log.debug("NATS error", link=self.name, error=reason(error))

    async def _on_disconnected(self) -> None:
        if self.state == "connected":
            self.state = "reconnecting"
            self._from_asyncio(LinkDown(link=self.name, reason="disconnected"))

    async def _on_reconnected(self) -> None:
        self.state = "connected"
        self.reconnects += 1
        self.url = self._connected_url()
        self._from_asyncio(LinkReconnected(link=self.name, url=self.url))

    def _from_asyncio(self, event: LinkEvent) -> None:
        if self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._emit, event)

    def _emit(self, event: LinkEvent) -> None:
        if isinstance(event, LinkDown):
            log.warning("Lost NATS connection; reconnecting", link=self.name)
        elif isinstance(event, LinkReconnected):
            log.info("Reconnected to NATS", link=self.name, servers=event.url)
        if self.events is not None:
            with contextlib.suppress(MailboxFull, ActorStopped):
                self.events.send_nowait(event)

    def _client(self) -> Client:
        if self._nc is None:
            raise NotConnected(f"the {self.name} NATS link is not connected")
        return self._nc

    def _connected_url(self) -> str:
        url = self._nc.connected_url if self._nc is not None else None
        return f"{url.scheme}://{url.hostname}:{url.port}" if url is not None else ""


class _PendingReply:
    """A request waiting for its reply (Trio side)."""

    __slots__ = ("done", "error", "msg")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.msg: InboundMsg | None = None
        self.error: LinkError | None = None

    def settle(self, msg: InboundMsg) -> None:
        if not self.done.is_set():
            self.msg = msg
            self.done.set()

    def fail(self, error: LinkError) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


def _inbound(msg: Msg) -> InboundMsg:
    return InboundMsg(subject=msg.subject, data=msg.data, reply=msg.reply or "", headers=msg.headers or None)
