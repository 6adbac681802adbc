"""A machine whose agent exits while it deploys: the order of the exit and of the answer (virtual clock).

A workload that ends at once ends its agent at once too, right after the agent answered the deploy.
The node learns of the exit by pidfd and of the answer over NATS, so under load the exit can come
first. The answer must still count: the workload did run. These tests pin that order, which a real
agent produces only now and then, with stand-ins for the driver and the internal link (the machine's
real parts run in tests/nex/test_machine_sweep.py and the workload tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from actors import ActorCrashed, ActorRef, ActorStopped, Mailbox
from nex.api import agent as agent_api
from nex.bus.credentials import AgentCredentials
from nex.bus.link import InboundMsg
from nex.vm.drivers.base import MachineContext
from nex.vm.handshake import HandshakeBook
from nex.vm.machine import ANSWER_GRACE, AgentExited, Deploy, Machine, MachineDeps, MachineMsg


@pytest.fixture
def patient_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after 50 ms of real idleness: the machine's cleanup works in a
    thread (removing its directory), and a clock that jumps at once would time that out."""
    return trio.testing.MockClock(autojump_threshold=0.05)


REQUEST = agent_api.AgentDeployRequest(workload_name="brief", namespace="default", hash="00", total_bytes=1)


class StandInAgent:
    """An agent process that exits when the test says so."""

    pid = 4242

    def __init__(self) -> None:
        self.exited = trio.Event()

    async def wait(self) -> int | None:
        await self.exited.wait()
        return 0

    def signal(self, sig: int) -> None:
        self.exited.set()

    async def stop(self, grace: float) -> int | None:
        self.exited.set()
        return 0


class StandInDriver:
    """Starts a :class:`StandInAgent` that says hello at once."""

    name = "stand-in"

    def __init__(self, book: HandshakeBook) -> None:
        self.book = book
        self.agent = StandInAgent()
        self.stops: list[str] = []  # machines the machine actor asked its driver to stop

    async def prepare(self, machine: MachineContext) -> None:
        pass

    async def start(self, machine: MachineContext) -> StandInAgent:
        self.book.waiting[machine.vmid].set()  # its handshake
        return self.agent

    async def stop(self, machine: MachineContext, agent: Any, grace: float) -> None:
        self.stops.append(machine.vmid)
        await agent.stop(grace)

    def describe(self, machine: MachineContext) -> dict[str, str]:
        return {}


class StandInLink:
    """The internal link: staging succeeds at once; the agent's answer comes when the test says so."""

    def __init__(self) -> None:
        self.asked = trio.Event()
        self._answer = trio.Event()
        self._accepted = True

    async def call(self, fn: Any) -> None:
        return None

    async def request(self, subject: str, payload: bytes = b"", **_: Any) -> InboundMsg:
        self.asked.set()
        await self._answer.wait()
        response = agent_api.DeployResponse(accepted=self._accepted)
        return InboundMsg(subject=subject, data=msgspec.json.encode(response))

    def answer(self, accepted: bool = True) -> None:
        self._accepted = accepted
        self._answer.set()


def machine_with_stand_ins(tmp_path: Path) -> tuple[Machine, StandInDriver, StandInLink]:
    book = HandshakeBook()
    driver, link = StandInDriver(book), StandInLink()
    deps = MachineDeps(
        driver=driver,
        credentials=AgentCredentials(),
        handshakes=book,
        vm_root=tmp_path / "vm",
        journal=None,
        agent_host="127.0.0.1",
        agent_port=4222,
        handshake_timeout=10.0,
        internal=link,  # type: ignore[arg-type]
        ping_interval=0,  # its pings are not what these tests are about
    )
    return Machine("dc18order0000000000g", "SUSEED", deps), driver, link


async def deploy(ref: ActorRef[MachineMsg], outcome: list[str]) -> None:
    try:
        await ref.ask(lambda reply: Deploy(request=REQUEST, artifact=b"x", reply=reply), timeout=30)
        outcome.append("started")
    except Exception as exc:
        outcome.append(type(exc).__name__)


async def test_an_answer_that_comes_after_the_agent_exited_still_counts(
    tmp_path: Path, patient_clock: trio.testing.MockClock
) -> None:
    machine, driver, link = machine_with_stand_ins(tmp_path)
    outcome: list[str] = []
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(machine.run, Mailbox[MachineMsg](4, name=machine.vmid))
        nursery.start_soon(deploy, ref, outcome)
        await link.asked.wait()
        driver.agent.exited.set()  # it answered, its workload ended, it exited: the exit is seen first
        await trio.testing.wait_all_tasks_blocked()
        link.answer(accepted=True)
    # the machine ended cleanly (its job is done), not by a crash, and the deploy succeeded
    assert outcome == ["started"]
    assert machine.state == "running"
    assert not (tmp_path / "vm" / machine.vmid).exists()


async def test_an_agent_that_exits_without_answering_fails_the_deploy_after_a_grace(
    tmp_path: Path, patient_clock: trio.testing.MockClock
) -> None:
    machine, driver, link = machine_with_stand_ins(tmp_path)
    outcome: list[str] = []
    with pytest.RaisesGroup(AgentExited):  # the machine's crash, out of the nursery
        async with trio.open_nursery() as nursery:
            ref = await nursery.start(machine.run, Mailbox[MachineMsg](4, name=machine.vmid))
            nursery.start_soon(deploy, ref, outcome)
            await link.asked.wait()
            exited_at = trio.current_time()
            driver.agent.exited.set()
    assert outcome[0] in {ActorCrashed.__name__, ActorStopped.__name__}, outcome
    waited = trio.current_time() - exited_at
    assert ANSWER_GRACE <= waited < ANSWER_GRACE + 1, "bounded: an agent that died is not waited on for long"
    assert not (tmp_path / "vm" / machine.vmid).exists()


async def test_a_machine_stopped_by_its_supervisor_asks_its_driver_to_stop_it(
    tmp_path: Path, patient_clock: trio.testing.MockClock
) -> None:
    machine, driver, _ = machine_with_stand_ins(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(machine.run, Mailbox[MachineMsg](4, name=machine.vmid))
        nursery.cancel_scope.cancel()  # the node stops, say
    assert driver.stops == [machine.vmid]
    assert driver.agent.exited.is_set()
    assert not (tmp_path / "vm" / machine.vmid).exists()
