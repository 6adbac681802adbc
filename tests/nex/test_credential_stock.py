"""The stock of agent credentials: what counts as handed out, across reloads (virtual clock).

The server here is a stand-in whose reload blocks until the test lets it finish: the bookkeeping is
under test, not nats-server (tests/nex/test_credentials.py runs the real one).
"""

from __future__ import annotations

import trio
import trio.testing

from nex.bus.credentials import AgentCredentials


class SlowServer:
    """Reloads finish only when the test says so."""

    def __init__(self) -> None:
        self.started = trio.Event()
        self.finish = trio.Event()

    async def reload(self) -> None:
        self.started.set()
        await self.finish.wait()


async def test_spare_credentials_in_a_reload_are_not_counted_as_given_out() -> None:
    credentials = AgentCredentials(stock=2)
    server = SlowServer()
    credentials.attach(server)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(credentials.run)
        vmid, _ = await credentials.take()  # from the first stock; tops the stock up: a reload
        await server.started.wait()
        assert credentials.agents() == [vmid], "the top-up being applied is spare, not given out"
        server.finish.set()
        await trio.testing.wait_all_tasks_blocked()
        assert credentials.agents() == [vmid]
        credentials.revoke(vmid)
        assert credentials.agents() == []
        second, _ = await credentials.take()
        third, _ = await credentials.take()
        assert len({vmid, second, third}) == 3, "every take hands out a different machine id"
        assert credentials.agents() == sorted([second, third])
        nursery.cancel_scope.cancel()


async def test_take_with_an_empty_stock_waits_for_the_reload_that_applies_it() -> None:
    credentials = AgentCredentials(stock=1)
    server = SlowServer()
    credentials.attach(server)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(credentials.run)
        await credentials.take()  # the only ready one; its top-up is now being applied
        await server.started.wait()
        taken: list[str] = []
        got = trio.Event()

        async def take() -> None:
            taken.append((await credentials.take())[0])
            got.set()

        nursery.start_soon(take)
        await trio.testing.wait_all_tasks_blocked()
        assert taken == [], "a credential the server has not loaded yet must not be handed out"
        server.finish.set()
        with trio.fail_after(5):
            await got.wait()
        assert taken[0] in credentials.agents()
        nursery.cancel_scope.cancel()
