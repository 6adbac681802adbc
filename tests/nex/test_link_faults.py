"""The nats-py bridge when things go wrong: cancelled calls, connections closed for good, overload.

Against real nats-servers, on the real clock, every wait bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio

from actors import ChildSpec, Mailbox, Supervisor, TooManyRestarts
from actors.testing import Probe
from nex.bus.aio import AsyncioThread, open_asyncio_thread
from nex.bus.link import InboundMsg, LinkDown, LinkError, LinkEvent, LinkUp, NatsLink, NoResponders, Subscription
from nex.bus.server import free_port, nats_server_binary

from .support import Bus, NatsServerProc, wait_for_port

pytestmark = pytest.mark.integration


@pytest.fixture
async def aio() -> AsyncIterator[AsyncioThread]:
    async with open_asyncio_thread("test-asyncio") as thread:
        yield thread


class AuthServer:
    """A nats-server that lets in one user, whose password can be changed under it (a config reload)."""

    def __init__(self, work_dir: Path) -> None:
        self.port = free_port("127.0.0.1")
        self.config = work_dir / f"auth-{self.port}.conf"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, password: str) -> AuthServer:
        self._write(password)
        argv = [str(nats_server_binary()), "-c", str(self.config)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, timeout=10)
        return self

    def change_password(self, password: str) -> None:
        """Rewrite the config and have the server reload it: clients with the old password are cut off."""
        assert self.proc is not None
        self._write(password)
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def _write(self, password: str) -> None:
        self.config.write_text(
            f'listen: "127.0.0.1:{self.port}"\nauthorization {{ user: nex, password: "{password}" }}\n'
        )


@pytest.fixture
def auth_server(home: Path) -> Iterator[AuthServer]:
    server = AuthServer(home).start("first")
    yield server
    server.stop()


# -- 1. a cancelled call leaves nothing running ----------------------------------------------------


async def test_cancelled_subscribes_leave_no_subscription_behind(
    nats_server: NatsServerProc, aio: AsyncioThread
) -> None:
    link = NatsLink("t", [nats_server.url], aio)
    asker = NatsLink("asker", [nats_server.url], aio)
    inbox = Probe[InboundMsg]("inbox")
    made: dict[int, Subscription] = {}

    async def subscribe(i: int) -> None:
        made[i] = await link.subscribe(f"cancelled.{i}", inbox.ref)

    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await nursery.start(asker.run)
        for i in range(50):
            async with trio.open_nursery() as attempt:
                attempt.start_soon(subscribe, i)
                for _ in range(i % 5):  # cancelled at different points of its way to the asyncio thread
                    await trio.lowlevel.checkpoint()
                attempt.cancel_scope.cancel()
        assert len(made) < 50, "no subscribe was cancelled: the test proves nothing"
        assert link.stats().subscriptions == len(made)
        await link.flush()  # the server has whatever the link sent, UNSUBs included
        with trio.fail_after(30):
            for i in range(50):
                if i in made:
                    continue
                with pytest.raises(NoResponders):  # the server knows of no subscription on the subject
                    await asker.request(f"cancelled.{i}", timeout=2)
        assert inbox.pending() == 0
        nursery.cancel_scope.cancel()


async def test_a_cancelled_call_has_ended_on_the_loop_when_it_returns(aio: AsyncioThread) -> None:
    started, ended = threading.Event(), threading.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.2)  # a cleanup that takes a while (a round trip to the server)
            ended.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(aio.run, work)
            assert await trio.to_thread.run_sync(started.wait, 10)
            nursery.cancel_scope.cancel()
    assert ended.is_set()


async def test_a_cancelled_call_with_an_undo_is_finished_then_undone(aio: AsyncioThread) -> None:
    started = threading.Event()
    undone: list[str] = []

    async def make() -> str:
        started.set()
        await asyncio.sleep(0.2)  # an operation that completes regardless (nats-py's subscribe does)
        return "resource"

    async def undo(resource: str) -> None:
        undone.append(resource)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: aio.run(make, undo=undo))
            assert await trio.to_thread.run_sync(started.wait, 10)
            nursery.cancel_scope.cancel()
    assert undone == ["resource"]


# -- 2. a connection nats-py closes for good ends the link -----------------------------------------


async def test_a_link_whose_credentials_are_revoked_fails_and_is_restarted(
    auth_server: AuthServer, aio: AsyncioThread
) -> None:
    events = Probe[LinkEvent]("events")
    link = NatsLink("t", [auth_server.url], aio, events=events.ref, user="nex", password="first")
    runs = 0

    async def run(*, task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal runs
        runs += 1
        await link.run(task_status=task_status)

    root = Supervisor("root", [ChildSpec(id="t-link", start=run, kind="actor")], intensity=2, period=60)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            ended = Outcome()
            nursery.start_soon(ended.watch, root.run)
            await events.expect(LinkUp)
            auth_server.change_password("second")
            assert (await events.expect(LinkDown)).reason == "disconnected"  # nats-py says so first
            refused = "closed: the server refuses the link's credentials (authorization violation)"
            assert (await events.expect(LinkDown)).reason == refused
            # restarted, and each restart refused by the server, until the supervisor gives up
            assert isinstance(await ended.get(), TooManyRestarts)
    assert runs >= 2
    assert link.state == "failed"


async def test_a_link_out_of_reconnect_attempts_fails(nats_server: NatsServerProc, aio: AsyncioThread) -> None:
    events = Probe[LinkEvent]("events")
    link = NatsLink("t", [nats_server.url], aio, events=events.ref, reconnect_wait=0.05, max_reconnect_attempts=2)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            ended = Outcome()
            nursery.start_soon(ended.watch, link.run)
            await events.expect(LinkUp)
            nats_server.stop()
            error = await ended.get()
    assert isinstance(error, LinkError)
    assert "reconnect attempts exhausted (connection refused)" in str(error)
    assert link.state == "failed"


class Outcome:
    """How a task ended (the exception it raised, or None), rather than failing the nursery."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: Exception | None = None

    async def watch(self, run: Callable[[], Awaitable[None]]) -> None:
        try:
            await run()
        except Exception as exc:
            self.error = exc
        finally:
            self.done.set()

    async def get(self) -> Exception | None:
        await self.done.wait()
        return self.error


# -- 5. bounded crossings --------------------------------------------------------------------------


async def test_messages_trio_does_not_take_in_time_are_dropped_and_counted(
    nats_server: NatsServerProc, aio: AsyncioThread, bus: Bus
) -> None:
    link = NatsLink("t", [nats_server.url], aio, inbound_capacity=16)
    burst = Mailbox[InboundMsg](1000, name="burst")
    seen_end = threading.Event()
    post = link._inbox.post

    def watch(item: tuple[Subscription | str, InboundMsg]) -> None:
        post(item)
        if item[1].subject == "burst.end":
            seen_end.set()

    link._inbox.post = watch  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        sub = await link.subscribe("burst.>", burst.ref)
        # The Trio thread blocks (no await) until the asyncio thread has had all 101 messages: none
        # is taken meanwhile, so all but 16 must be dropped.
        for i in range(100):
            bus.run(bus.nc.publish("burst.n", b"%d" % i))
        bus.run(bus.nc.publish("burst.end"))
        bus.run(bus.nc.flush())
        assert seen_end.wait(10)
        with trio.fail_after(10):
            for i in range(16):
                assert (await burst.receive()).data == b"%d" % i
            await link.publish("burst.after")
            assert (await burst.receive()).subject == "burst.after"
        assert (sub.delivered, link.stats().overflowed) == (17, 85)
        nursery.cancel_scope.cancel()


async def test_publish_nowait_beyond_capacity_drops_and_counts(nats_server: NatsServerProc, aio: AsyncioThread) -> None:
    link = NatsLink("t", [nats_server.url], aio, outbound_capacity=64)
    receiver = NatsLink("receiver", [nats_server.url], aio)
    inbox = Mailbox[InboundMsg](2000, name="inbox")
    entered, release = threading.Event(), threading.Event()

    def block_the_loop() -> None:
        entered.set()
        release.wait(10)

    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await nursery.start(receiver.run)
        await receiver.subscribe("burst", inbox.ref)
        aio.call_soon(block_the_loop)
        try:
            assert await trio.to_thread.run_sync(entered.wait, 10)
            for i in range(1000):  # the asyncio thread takes none of these meanwhile
                link.publish_nowait("burst", b"%d" % i)
        finally:
            release.set()
        assert link.stats().publish_dropped == 936
        with trio.fail_after(10):
            for i in range(64):
                assert (await inbox.receive()).data == b"%d" % i
            await link.publish("burst", b"end")
            assert (await inbox.receive()).data == b"end"
        nursery.cancel_scope.cancel()
