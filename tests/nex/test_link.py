"""The nats-py bridge (NatsLink) against a real nats-server, in-process.

These run on the real clock (there is a real thread), each wait bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator

import pytest
import trio

from actors import Mailbox, Overflow
from actors.testing import Probe
from nex.bus.aio import AsyncioThread, open_asyncio_thread
from nex.bus.link import (
    InboundMsg,
    LinkDown,
    LinkError,
    LinkEvent,
    LinkReconnected,
    LinkUp,
    NatsLink,
    NoResponders,
    NotConnected,
    RequestTimeout,
)

from .support import NatsServerProc

pytestmark = pytest.mark.integration


@pytest.fixture
async def aio() -> AsyncIterator[AsyncioThread]:
    async with open_asyncio_thread("test-asyncio") as thread:
        yield thread


async def echo(link: NatsLink, box: Mailbox[InboundMsg]) -> None:
    while True:
        msg = await box.receive()
        await link.respond(msg, b"echo:" + msg.data)


async def test_request_reply_and_its_failures(nats_server: NatsServerProc, aio: AsyncioThread) -> None:
    link = NatsLink("t", [nats_server.url], aio)
    with pytest.raises(NotConnected):
        await link.request("x")
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        box = Mailbox[InboundMsg](16, name="echo")
        await link.subscribe("svc.echo", box.ref)
        nursery.start_soon(echo, link, box)
        await link.subscribe("svc.silent", Mailbox[InboundMsg](16, name="silent").ref)
        await link.flush()
        with trio.fail_after(10):
            reply = await link.request("svc.echo", b"hi", timeout=5)
            assert reply.data == b"echo:hi"
            with pytest.raises(NoResponders, match=r"svc\.nobody"):
                await link.request("svc.nobody", timeout=5)
            with pytest.raises(RequestTimeout, match=r"within 0\.2s"):
                await link.request("svc.silent", timeout=0.2)
            assert (await link.request("svc.echo", b"again", timeout=5)).data == b"echo:again"
        nursery.cancel_scope.cancel()
    assert link.state == "closed"


async def test_a_full_mailbox_drops_and_counts(nats_server: NatsServerProc, aio: AsyncioThread) -> None:
    link = NatsLink("t", [nats_server.url], aio)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        slow = Mailbox[InboundMsg](2, Overflow.FAIL, name="slow")  # never read: a consumer that cannot keep up
        marker = Probe[InboundMsg]("marker")
        sub = await link.subscribe("burst", slow.ref)
        await link.subscribe("marker", marker.ref)
        await link.flush()
        for i in range(10):
            link.publish_nowait("burst", b"%d" % i)
        link.publish_nowait("marker", b"end")
        with trio.fail_after(10):
            await marker.expect(InboundMsg)  # delivered in order, so every burst message came first
        assert (sub.delivered, sub.dropped) == (2, 8)
        assert link.stats().dropped == 8
        nursery.cancel_scope.cancel()


async def test_disconnects_and_reconnects_arrive_as_typed_events(
    nats_server: NatsServerProc, aio: AsyncioThread
) -> None:
    events = Probe[LinkEvent]("events")
    link = NatsLink("t", [nats_server.url], aio, events=events.ref)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        box = Mailbox[InboundMsg](16, name="echo")
        await link.subscribe("svc.echo", box.ref)
        nursery.start_soon(echo, link, box)
        with trio.fail_after(20):
            assert (await events.expect(LinkUp)).url == nats_server.url
            nats_server.stop()
            assert (await events.expect(LinkDown)).link == "t"
            assert link.state == "reconnecting"
            nats_server.start()
            assert (await events.expect(LinkReconnected)).url == nats_server.url
            assert (await link.request("svc.echo", b"back", timeout=5)).data == b"echo:back"
        assert link.stats().reconnects == 1
        nursery.cancel_scope.cancel()


async def test_a_restarted_link_makes_its_subscriptions_again(nats_server: NatsServerProc, aio: AsyncioThread) -> None:
    link = NatsLink("t", [nats_server.url], aio)
    inbox = Probe[InboundMsg]("inbox")
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await link.subscribe("hello", inbox.ref)
        nursery.cancel_scope.cancel()
    assert link.state == "closed"
    other = NatsLink("publisher", [nats_server.url], aio)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)  # the same link object, run again (as a supervisor restarts it)
        await nursery.start(other.run)
        await other.publish("hello", b"again")
        with trio.fail_after(10):
            assert (await inbox.expect(InboundMsg)).data == b"again"
        nursery.cancel_scope.cancel()


async def test_an_unreachable_server_fails_fast_with_the_reason(aio: AsyncioThread) -> None:
    link = NatsLink("t", ["nats://127.0.0.1:1"], aio)
    with trio.fail_after(10), pytest.raises(LinkError, match=r"nats://127.0.0.1:1: connection refused"):
        await link.run()
    assert link.state == "failed"


async def test_publish_nowait_never_raises_and_logs_once_per_disconnection(
    nats_server: NatsServerProc, aio: AsyncioThread, caplog: pytest.LogCaptureFixture
) -> None:
    link = NatsLink("t", [nats_server.url], aio)
    receiver = NatsLink("receiver", [nats_server.url], aio)
    inbox = Probe[InboundMsg]("inbox")

    def drops_logged() -> int:
        return sum(1 for r in caplog.records if r.getMessage().startswith("Dropping NATS publishes"))

    caplog.set_level(logging.WARNING, logger="nex.bus")
    for _ in range(3):
        link.publish_nowait("events", b"before")  # not running yet: dropped, not raised
    assert (drops_logged(), link.stats().publish_dropped) == (1, 3)
    async with trio.open_nursery() as nursery:
        await nursery.start(receiver.run)
        await receiver.subscribe("events", inbox.ref)
        async with trio.open_nursery() as running:
            await running.start(link.run)
            link.publish_nowait("events", b"while up")
            with trio.fail_after(10):
                assert (await inbox.expect(InboundMsg)).data == b"while up"
            running.cancel_scope.cancel()
        for _ in range(3):
            link.publish_nowait("events", b"after")  # stopped: a new disconnection, logged once more
        assert (drops_logged(), link.stats().publish_dropped) == (2, 6)
        nursery.cancel_scope.cancel()


async def test_connection_state_is_written_on_the_trio_thread_only(
    nats_server: NatsServerProc, aio: AsyncioThread
) -> None:
    writers: set[str] = set()

    class Watched(NatsLink):
        def __setattr__(self, name: str, value: object) -> None:
            if name in ("state", "url", "reconnects"):
                writers.add(threading.current_thread().name)
            super().__setattr__(name, value)

    events = Probe[LinkEvent]("events")
    link = Watched("t", [nats_server.url], aio, events=events.ref)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        with trio.fail_after(20):
            await events.expect(LinkUp)
            nats_server.stop()
            await events.expect(LinkDown)
            assert link.state == "reconnecting"
            nats_server.start()
            await events.expect(LinkReconnected)
            assert (link.state, link.reconnects) == ("connected", 1)
        nursery.cancel_scope.cancel()
    assert writers == {threading.current_thread().name}


async def test_a_publish_nats_py_refuses_is_a_link_error(nats_server: NatsServerProc, aio: AsyncioThread) -> None:
    """Callers handle one kind of error: more than the server's max_payload is a LinkError too."""
    link = NatsLink("t", [nats_server.url], aio)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        with pytest.raises(LinkError, match="cannot publish to big: "):
            await link.publish("big", b"x" * (2 << 20))  # the server's default max_payload is 1 MiB
        await link.publish("small", b"fine")  # the link goes on
        nursery.cancel_scope.cancel()
