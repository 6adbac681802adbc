"""What outlives an actor's restart is read right by the fresh instance (issue 10's review findings).

Virtual clock; the pool and the credentials run under a real supervisor with stand-ins for what is
outside them (no machine is started: the pool's book is already full).
"""

from __future__ import annotations

import types
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from actors import DynamicSupervisor, Mailbox, Supervisor
from nex.bus.credentials import AgentCredentials
from nex.bus.server import ServerFailed
from nex.vm import pool
from nex.workload import manager
from nex.workload.checks import Refused


class NotInLameDuck:
    lameduck = False

    def __init__(self) -> None:
        self.on_lameduck: list[Any] = []


async def test_a_pool_restarted_on_a_full_book_starts_at_once(autojump_clock: MockClock) -> None:
    book = pool.PoolBook(handshakes=1)  # a previous instance filled it
    member = pool._Member("vm0", book.generation)
    member.state = "ready"
    book.members["vm0"] = member
    deps: Any = types.SimpleNamespace(credentials=None, agent_host="h", agent_port=1)
    spec = pool.Pool.spec(
        lambda: pool.Pool(NotInLameDuck(), DynamicSupervisor("machines"), deps, size=1, book=book), pool.mailbox()
    )
    sup = Supervisor("node", [spec])
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(sup.run)
        assert list(book.members) == ["vm0"]  # adopted, not replaced
        nursery.cancel_scope.cancel()


def test_a_deploy_in_flight_counts_once_against_max_workloads() -> None:
    limits = types.SimpleNamespace(max_workloads=2)
    state: Any = types.SimpleNamespace(lameduck=False, config=types.SimpleNamespace(node_limits=limits))
    book = manager.WorkloadBook(cache=None)  # type: ignore[arg-type]
    deployer = manager.WorkloadManager.__new__(manager.WorkloadManager)
    deployer.state, deployer.book, deployer.workloads = state, book, book.workloads
    deployer._reserve()  # deploy A holds a slot, and its workload is recorded before the agent answers
    book.workloads["vmA"] = types.SimpleNamespace(deploying=True)  # type: ignore[assignment]
    deployer._reserve()  # deploy B: two of two
    with pytest.raises(Refused, match="maximum workload limit"):
        deployer._reserve()


class ReloadFailsOnce:
    def __init__(self) -> None:
        self.failed = False

    async def reload(self) -> None:
        await trio.sleep(0.01)
        if not self.failed:
            self.failed = True
            raise ServerFailed("did not apply its new config")


async def test_a_credential_waited_for_survives_a_failed_reload(autojump_clock: MockClock) -> None:
    credentials = AgentCredentials(stock=1)
    credentials.attach(ReloadFailsOnce())  # type: ignore[arg-type]
    sup = Supervisor("s", [credentials.child_spec()], intensity=5, period=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await credentials.take()  # the stock's one; its top-up's reload fails, the next run applies it
        with trio.fail_after(30):
            vmid, _ = await credentials.take()
        assert vmid in credentials.agents()
        nursery.cancel_scope.cancel()


class NoCredentialsYet:
    """The pool starts no machine of its own: the test hands it one."""

    async def take(self) -> tuple[str, str]:
        await trio.sleep_forever()
        raise AssertionError


async def test_a_machine_ready_after_its_taker_gave_up_stays_in_the_pool(autojump_clock: MockClock) -> None:
    book = pool.PoolBook(handshakes=1)
    deps: Any = types.SimpleNamespace(credentials=NoCredentialsYet(), agent_host="h", agent_port=1)
    box = pool.mailbox()
    spec = pool.Pool.spec(
        lambda: pool.Pool(NotInLameDuck(), DynamicSupervisor("machines"), deps, size=1, book=book), box
    )
    sup = Supervisor("node", [spec])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        with pytest.raises(trio.TooSlowError):  # no machine yet: the taker gives up
            await box.ref.ask(lambda reply: pool.Take(reply=reply), timeout=1)
        member = pool._Member("vm1", book.generation)  # then a machine becomes ready
        member.state, member.ref = "ready", object()  # type: ignore[assignment]
        book.members["vm1"] = member
        with trio.fail_after(5):
            taken = await box.ref.ask(lambda reply: pool.Take(reply=reply))  # served by the next Take
        assert taken.vmid == "vm1"
        nursery.cancel_scope.cancel()


class QuietLink:
    async def subscribe(self, subject: str, ref: object) -> str:
        return subject

    async def unsubscribe(self, sub: str) -> None:
        return None


class Events:
    def __init__(self) -> None:
        self.emitted: list[tuple[str, Any]] = []

    def emit(self, event_type: str, data: Any, *, namespace: str) -> None:
        self.emitted.append((event_type, data))


async def test_a_fresh_manager_finishes_a_workload_whose_machine_ended_meanwhile(autojump_clock: MockClock) -> None:
    gone = Mailbox[Any](1, name="vm-gone")
    gone.close()  # its machine ended while no manager listened
    spec = manager.WorkloadSpec(
        name="w", namespace="default", issuer="A", subject="s", jti="j", iat=0, hash="h", artifact=b"",
        environment={}, argv=[], description="", essential=False,
    )  # fmt: skip
    book = manager.WorkloadBook(cache=None)  # type: ignore[arg-type]
    book.workloads["vm-gone"] = manager.Workload(spec=spec, vmid="vm-gone", ref=gone.ref, deploying=False)
    finished = trio.Event()  # the manager says its workloads changed
    state: Any = types.SimpleNamespace(
        node_id="N",
        lameduck=False,
        lameduck_entered=trio.Event(),  # never: nothing to move
        stop_requested=trio.Event(),  # never: the node does not stop, its manager restarts
        workloads_changed=finished.set,
        config=types.SimpleNamespace(),
    )
    events = Events()
    link: Any = QuietLink()
    spec_ = manager.WorkloadManager.spec(
        lambda: manager.WorkloadManager(state, link, link, events, pool.mailbox().ref, book),  # type: ignore[arg-type]
        manager.mailbox(),
    )
    sup = Supervisor("node", [spec_])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        with trio.fail_after(5):  # virtual time: the manager's report grace runs out first
            await finished.wait()
        assert "vm-gone" not in book.workloads
        nursery.cancel_scope.cancel()
    assert [(kind, data.id, data.code) for kind, data in events.emitted] == [("workload_stopped", "vm-gone", -1)]
