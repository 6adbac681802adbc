"""One NATS connection, owned by one task-actor, usable from Trio.

:class:`NatsLink` wraps a nats-py client that lives on the node's :class:`~nex.bus.aio.AsyncioThread`.
Its task connects, serves until cancelled, then drains; its methods (``request``, ``publish``,
``subscribe``) are called from any Trio task and cross to the asyncio thread. A call whose caller is
cancelled leaves nothing running behind it: a subscription made after all is unsubscribed, a
request's publish is waited for (see :meth:`nex.bus.aio.AsyncioThread.run`).

Inbound messages are delivered to actors: a subscription names an :class:`~actors.ActorRef` whose
mailbox receives :class:`InboundMsg`. Messages are built on the asyncio thread and handed to Trio in
batches through a bounded buffer (:class:`~nex.bus.aio.TrioInbox`, ``inbound_capacity`` messages).
Whatever does not fit is dropped, as NATS itself drops for a slow consumer: by the buffer when Trio
falls behind (``overflowed``), by a full mailbox for an actor that does (``dropped``, per
subscription); both are counted and logged. :meth:`publish_nowait` goes the other way through a
bounded :class:`~nex.bus.aio.Outbox` and drops (``publish_dropped``) rather than block or raise.

Reconnects are nats-py's (forever by default, every ``reconnect_wait`` seconds); subscriptions survive
them. A connection nats-py closes for good (the server revoked the link's credentials, reconnect
attempts ran out) ends the task with :class:`LinkError`, so that its supervisor restarts it.
Subscriptions belong to the link object, not to one run of its task, so a restarted link makes them
again. Connection changes arrive as typed :data:`LinkEvent` messages to ``events``, if given.

Threads. The Trio thread owns the link's state: ``state``, ``url``, ``reconnects``, the client handle,
the subscriptions and the pending requests are written by Trio code only. nats-py's callbacks run on
the asyncio thread and write none of it; they post the change to Trio (``run_sync_soon``), tagged with
the run of the task they belong to, so that a late callback of an earlier connection is ignored. The
asyncio thread owns nats-py's objects and its own bookkeeping (the last connection error, the
publishes nats-py refused); Trio reads those only after a call to the loop has returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NamedTuple, TypeVar

import msgspec
import nats.errors
import trio
from nats.aio.client import Client
from nats.aio.msg import Msg

from actors import ActorRef, ActorStopped, ChildSpec, MailboxFull, Message
from nex import logs

from .aio import CANCEL_GRACE, AsyncioThread, Outbox, TrioInbox
from .errors import closed_reason, is_authorization, reason

log = logs.get("nex.bus")
T = TypeVar("T")

SUBSCRIBE_TIMEOUT = 5.0  # for the server to confirm subscriptions (a flush)
CLOSE_TIMEOUT = 2.0  # for the connection to drain when the link stops
INBOUND_CAPACITY = 65_536  # messages waiting for Trio
OUTBOUND_CAPACITY = 65_536  # publish_nowait messages waiting for the asyncio thread
AUTH_REFUSALS = 2  # reconnects refused for the credentials in a row before the link gives up (as nats.go)


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
    dropped: int  # by full mailboxes
    reconnects: int
    overflowed: int = 0  # inbound messages dropped because Trio fell ``inbound_capacity`` behind
    publish_dropped: int = 0  # publish_nowait messages dropped: not connected, queue full, refused


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


class _Publish(NamedTuple):
    subject: str
    payload: bytes
    reply: str
    headers: dict[str, str] | None


class _Connection(NamedTuple):
    nc: Client
    url: str
    reply_prefix: str
    pump: asyncio.Task[None]  # sends what publish_nowait queued


class NatsLink:
    """A named NATS connection (the node has two: ``control`` and ``internal``).

    Args:
        name: for logs, errors and the actor tree.
        servers: NATS URLs.
        aio: the asyncio thread the client lives on.
        events: receives :data:`LinkEvent` messages, if given.
        client_name: the connection name the server shows (``nex <name>`` by default).
        max_reconnect_attempts: once connected, how many times to try each server again after losing
            it before the link fails (and its supervisor restarts it); -1 (the default): forever.
        reply_spaces: wildcard subjects (such as ``agentint.*.reply.*``) on which replies to
            :meth:`request` calls with a ``reply_prefix`` arrive; subscribed on every connection.
        inbound_capacity: messages that may wait for the Trio thread; more are dropped and counted.
        outbound_capacity: :meth:`publish_nowait` messages that may wait for the asyncio thread.
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
        max_reconnect_attempts: int = -1,
        connect_timeout: float = 2.0,
        reply_spaces: Sequence[str] = (),
        inbound_capacity: int = INBOUND_CAPACITY,
        outbound_capacity: int = OUTBOUND_CAPACITY,
        **options: Any,
    ) -> None:
        self.name = name
        self.servers = servers
        self.aio = aio
        self.events = events
        self.client_name = client_name or f"nex {name}"
        self.reconnect_wait = reconnect_wait
        self.max_reconnect_attempts = max_reconnect_attempts
        self.connect_timeout = connect_timeout
        self.reply_spaces = tuple(reply_spaces)
        self.options = options
        # Trio's (see "Threads" above)
        self.state = "idle"
        self.url = ""
        self.reconnects = 0
        self._nc: Client | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._run = 0  # which run of the task; callbacks of earlier ones are ignored
        self._early: list[Callable[[], None]] = []  # changes that overtook the connect call's result
        self._lost = trio.Event()
        self._lost_reason = ""
        self._subs: dict[int, Subscription] = {}
        self._tokens = itertools.count(1)
        self._replies: dict[str, _PendingReply] = {}
        self._reply_prefix = ""
        self._publish_dropped = 0
        self._publish_drop_logged = False  # once per disconnection
        # the asyncio thread's
        self._last_error: Exception | None = None
        self._refused = 0
        self._refusal_logged = False  # once per disconnection
        # the crossings
        self._inbox = TrioInbox[tuple[Subscription | str, InboundMsg]](name, self._deliver, inbound_capacity)
        self._outbox = Outbox[_Publish](aio, outbound_capacity)

    # -- the task ----------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[NatsLink] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, make the subscriptions, serve until cancelled, then drain (bounded).

        Raises:
            LinkError: the first connection failed, or nats-py closed the connection for good.
        """
        self._token = self._inbox.token = trio.lowlevel.current_trio_token()
        self._run += 1
        self._lost = trio.Event()
        self._early = []
        self.state = "connecting"
        try:
            # Cancelled meanwhile: a connection made after all is closed, even after the grace
            conn = await self.aio.run(self._connect, self._run, undo=self._close, grace=1.0)
        except Exception as exc:
            self.state = "failed"
            cause = reason(self._last_error or exc)  # nats-py's own error is a generic "no servers"
            raise LinkError(f"cannot connect to NATS at {', '.join(self.servers)}: {cause}") from None
        self._nc, self.url, self._reply_prefix, _ = conn
        self._connected()
        for change in self._early:
            change()
        try:
            for sub in list(self._subs.values()):
                await self.aio.run(self._nats_subscribe, conn.nc, sub)
            if self._subs:
                await self._confirm_subscriptions()
            log.info("Established NATS connection", link=self.name, servers=self.url)
            self._emit(LinkUp(link=self.name, url=self.url))
            task_status.started(self)
            await self._lost.wait()
            raise LinkError(f"the {self.name} NATS connection was closed for good: {self._lost_reason}")
        finally:
            self.state = "closing"
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                try:
                    await self.aio.run(self._close, conn, grace=1.0)
                except Exception as exc:  # must not hide why the link ends; the client is gone either way
                    log.debug("Closing the NATS connection failed", link=self.name, error=repr(exc))
            self.state = "failed" if self._lost.is_set() else "closed"
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

        A cancelled request returns once its publish is done with on the asyncio thread.

        Raises:
            NoResponders: nobody listens on ``subject``.
            RequestTimeout: no reply within ``timeout``.
            NotConnected: the link is not connected.
        """
        nc = self._client()
        token = str(next(self._tokens))
        reply = f"{reply_prefix}.{token}" if reply_prefix is not None else self._reply_prefix + token
        pending = _PendingReply()
        self._replies[reply] = pending
        try:
            self.aio.call_soon(self._start_publish, nc, _Publish(subject, payload, reply, headers), pending)
            try:
                with trio.move_on_after(timeout):
                    await pending.done.wait()
            except trio.Cancelled:
                with trio.move_on_after(CANCEL_GRACE, shield=True):
                    await self.aio.run(_settle_publish, pending)
                raise
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
        """Publish and wait until nats-py has taken the message (not until the server has).

        Raises:
            LinkError: not connected, or nats-py refused the message (more than the server's
                max_payload, a subject it rejects, a connection closing).
        """
        try:
            await self.aio.run(self._client().publish, subject, payload, reply, headers)
        except nats.errors.Error as exc:
            raise LinkError(f"cannot publish to {subject}: {reason(exc)}") from None

    def publish_nowait(
        self, subject: str, payload: bytes = b"", *, reply: str = "", headers: dict[str, str] | None = None
    ) -> None:
        """Publish without waiting (events, logs); never raises.

        While the link is connected or reconnecting the message is queued for the asyncio thread (and
        nats-py buffers it while it reconnects). It is dropped instead when the link is not running,
        when ``outbound_capacity`` messages wait already, or when nats-py refuses it (its reconnect
        buffer is full); drops are counted in :attr:`LinkStats.publish_dropped` and logged once per
        disconnection, not per message.
        """
        if self.state not in ("connected", "reconnecting"):
            self._drop_publish(subject, f"the link is {self.state}")
        elif not self._outbox.put(_Publish(subject, payload, reply, headers)):
            self._drop_publish(subject, f"{self._outbox.capacity} messages are waiting to be sent")

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
        message sent on another connection could overtake it. A cancelled or failed call leaves no
        subscription behind.
        """
        sub = Subscription(subject, queue, target)
        self._subs[sub.id] = sub
        if self._nc is not None:
            try:
                await self.aio.run(self._nats_subscribe, self._nc, sub, undo=self._nats_unsubscribe)
                await self._confirm_subscriptions()
            except BaseException:
                del self._subs[sub.id]
                with trio.move_on_after(CANCEL_GRACE, shield=True):
                    await self.aio.run(self._nats_unsubscribe, sub)
                raise
        return sub

    async def unsubscribe(self, sub: Subscription) -> None:
        """Stop delivering ``sub``; finishes (bounded) even if the caller is cancelled meanwhile."""
        if self._subs.pop(sub.id, None) is not None and self._nc is not None:
            with trio.move_on_after(CANCEL_GRACE, shield=True):
                await self.aio.run(self._nats_unsubscribe, sub)

    async def call(
        self,
        fn: Callable[[Client], Coroutine[Any, Any, T]],
        *,
        undo: Callable[[T], Coroutine[Any, Any, object]] | None = None,
    ) -> T:
        """Run ``fn(client)`` on the asyncio thread: for nats-py APIs the link does not wrap (JetStream).

        If the caller is cancelled, ``fn`` is cancelled and waited for; with ``undo`` it is left to
        finish instead and ``undo(result)`` is run (see :meth:`~nex.bus.aio.AsyncioThread.run`).
        """
        return await self.aio.run(fn, self._client(), undo=undo)

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
            overflowed=self._inbox.overflowed,
            publish_dropped=self._publish_dropped + self._refused,
        )

    # -- Trio: connection changes (posted by the asyncio thread) -----------------------------------

    def _connected(self) -> None:
        self.state = "connected"
        self._publish_drop_logged = False

    def _apply(self, run: int, change: Callable[..., None], *args: Any) -> None:
        """A change posted by the asyncio thread: ignored if it is about an earlier run of the task,
        kept until the connect call's result is in if it overtook that result."""
        if run != self._run:
            return
        if self.state == "connecting":
            self._early.append(functools.partial(change, *args))
        else:
            change(*args)

    def _went_down(self) -> None:
        if self.state == "connected":
            self.state = "reconnecting"
            self._emit(LinkDown(link=self.name, reason="disconnected"))

    def _came_back(self, url: str) -> None:
        if self.state in ("connected", "reconnecting"):
            self._connected()
            self.reconnects += 1
            self.url = url
            self._emit(LinkReconnected(link=self.name, url=url))

    def _closed(self, why: str) -> None:
        if self.state in ("connected", "reconnecting") and not self._lost.is_set():
            self._lost_reason = why
            self._lost.set()
            self._emit(LinkDown(link=self.name, reason=f"closed: {why}"))

    def _drop_publish(self, subject: str, why: str) -> None:
        self._publish_dropped += 1
        if not self._publish_drop_logged:
            self._publish_drop_logged = True
            log.warning("Dropping NATS publishes", link=self.name, subject=subject, why=why)

    # -- the asyncio side ---------------------------------------------------------------------------

    async def _connect(self, run: int) -> _Connection:
        # Try each server twice, then fail; only once connected allow reconnects (forever by
        # default). (With max_reconnect_attempts <= 0, nats-py retries even a first connection forever.)
        self._last_error = None
        self._refusal_logged = False
        nc = Client()
        watch = _Watch(self, nc, run)
        timing: dict[str, Any] = {"reconnect_time_wait": self.reconnect_wait, "connect_timeout": self.connect_timeout}
        await nc.connect(
            servers=self.servers,
            max_reconnect_attempts=1,
            error_cb=watch.error,
            disconnected_cb=watch.disconnected,
            reconnected_cb=watch.reconnected,
            closed_cb=watch.closed,
            drain_timeout=2,
            name=self.client_name,
            **timing,
            **self.options,
        )
        watch.established = True
        try:
            nc.options["max_reconnect_attempts"] = self.max_reconnect_attempts
            prefix = f"{nc.new_inbox()}."

            async def on_reply(msg: Msg) -> None:
                self._inbox.post((msg.subject, _inbound(msg)))

            for pattern in (prefix + "*", *self.reply_spaces):
                await nc.subscribe(pattern, cb=on_reply)
        except BaseException:
            await nc.close()
            raise
        pump = asyncio.ensure_future(self._outbox.pump(functools.partial(self._publish_queued, nc)))
        return _Connection(nc, _url(nc), prefix, pump)

    def _start_publish(self, nc: Client, message: _Publish, pending: _PendingReply) -> None:
        """asyncio thread: publish a request; a failure goes back to the waiting caller."""

        def done(task: asyncio.Future[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                error = LinkError(f"cannot publish to {message.subject}: {reason(task.exception())}")  # type: ignore[arg-type]
                self._to_trio(pending.fail, error)

        pending.publishing = asyncio.ensure_future(nc.publish(*message))
        pending.publishing.add_done_callback(done)

    async def _publish_queued(self, nc: Client, message: _Publish) -> None:
        """asyncio thread: one :meth:`publish_nowait` message; a refusal is counted, not raised."""
        try:
            await nc.publish(*message)
        except Exception as exc:
            self._refused += 1
            if not self._refusal_logged:
                self._refusal_logged = True
                log.warning(
                    "Dropping NATS publishes until the link is reconnected",
                    link=self.name,
                    subject=message.subject,
                    error=reason(exc),
                )

    async def _close(self, conn: _Connection) -> None:
        nc, pump = conn.nc, conn.pump
        pump.cancel()
        await asyncio.wait([pump])
        if nc.is_closed:
            return
        try:
            await self._outbox.empty(functools.partial(self._publish_queued, nc))  # what was put before the stop
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

    async def _nats_subscribe(self, nc: Client, sub: Subscription) -> Subscription:
        async def callback(msg: Msg) -> None:
            self._inbox.post((sub, _inbound(msg)))

        sub._nats = await nc.subscribe(sub.subject, queue=sub.queue, cb=callback)
        return sub

    async def _nats_unsubscribe(self, sub: Subscription) -> None:
        nats_sub, sub._nats = sub._nats, None
        if nats_sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await nats_sub.unsubscribe()

    def _to_trio(self, fn: Callable[..., object], *args: Any) -> None:
        if self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(fn, *args)

    # -- Trio: delivery -----------------------------------------------------------------------------

    def _deliver(self, item: tuple[Subscription | str, InboundMsg]) -> None:
        """Trio thread: hand one message to its actor, or to the request waiting for it.

        ``target`` is a subscription, or the reply subject of a request waiting for its reply.
        """
        target, msg = item
        if isinstance(target, str):
            pending = self._replies.get(target)
            if pending is not None:  # else: a late reply to a request that timed out
                pending.settle(msg)
            return
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

    def _emit(self, event: LinkEvent) -> None:
        if isinstance(event, LinkDown) and event.reason == "disconnected":
            log.warning("Lost NATS connection; reconnecting", link=self.name)
        elif isinstance(event, LinkDown):
            log.error("NATS closed the connection for good", link=self.name, reason=self._lost_reason)
        elif isinstance(event, LinkReconnected):
            log.info("Reconnected to NATS", link=self.name, servers=event.url)
        if self.events is not None:
            with contextlib.suppress(MailboxFull, ActorStopped):
                self.events.send_nowait(event)

    def _client(self) -> Client:
        if self._nc is None:
            raise NotConnected(f"the {self.name} NATS link is not connected")
        return self._nc


class _Watch:
    """nats-py's callbacks for one connection, on the asyncio thread: they post what changed to Trio.

    nats-py reconnects forever by default, even to a server that refuses the link's credentials (they
    were revoked, or the account is gone): after :data:`AUTH_REFUSALS` refusals in a row it is closed
    for good here, so that the link fails instead of retrying in silence.
    """

    def __init__(self, link: NatsLink, nc: Client, run: int) -> None:
        self.link = link
        self.nc = nc
        self.run = run
        self.established = False  # errors of the first connection are the connect call's to report
        self.refusals = 0
        self.closing: asyncio.Future[None] | None = None

    async def error(self, error: Exception) -> None:
        self.link._last_error = error
        log.debug("NATS error", link=self.link.name, error=reason(error))
        if self.established and is_authorization(error):
            self.refusals += 1
            if self.refusals >= AUTH_REFUSALS and self.closing is None:
                self.closing = asyncio.ensure_future(self.nc.close())  # not from within its reconnect task

    async def disconnected(self) -> None:
        self.link._to_trio(self.link._apply, self.run, self.link._went_down)

    async def reconnected(self) -> None:
        self.refusals = 0
        self.link._refusal_logged = False
        self.link._to_trio(self.link._apply, self.run, self.link._came_back, _url(self.nc))

    async def closed(self) -> None:
        why = closed_reason(self.nc.last_error, self.link._last_error)
        self.link._to_trio(self.link._apply, self.run, self.link._closed, why)


class _PendingReply:
    """A request waiting for its reply. ``publishing`` is the asyncio thread's, the rest Trio's."""

    __slots__ = ("done", "error", "msg", "publishing")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.msg: InboundMsg | None = None
        self.error: LinkError | None = None
        self.publishing: asyncio.Future[None] | None = None

    def settle(self, msg: InboundMsg) -> None:
        if not self.done.is_set():
            self.msg = msg
            self.done.set()

    def fail(self, error: LinkError) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


async def _settle_publish(pending: _PendingReply) -> None:
    """asyncio thread: until the publish of a cancelled request has ended (stopped if it was waiting)."""
    task = pending.publishing
    if task is not None and not task.done():
        task.cancel()
        await asyncio.wait([task])


def _url(nc: Client) -> str:
    url = nc.connected_url
    return f"{url.scheme}://{url.hostname}:{url.port}" if url is not None else ""


def _inbound(msg: Msg) -> InboundMsg:
    return InboundMsg(subject=msg.subject, data=msg.data, reply=msg.reply or "", headers=msg.headers or None)
