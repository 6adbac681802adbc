"""Cleanup stacks: reverse, total, shielded and bounded release; the journal; the cancellation sweep."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from actors import (
    Actor,
    CleanupFailed,
    CleanupStack,
    Journal,
    Mailbox,
    Message,
    ResourceRecord,
    Supervisor,
    actor_spec,
    recover,
)
from actors.testing import cancel_at_each_checkpoint


class FakeHost:
    """Stands in for the kernel: records what exists, with checkpoints inside create and delete."""

    def __init__(self, journal: Journal | None = None) -> None:
        self.live: set[str] = set()
        self.created: list[str] = []
        self.released: list[str] = []
        self.journal = journal
        self.fail_release: set[str] = set()
        self.records_seen_at_create: list[int] = []

    async def create(self, name: str) -> str:
        if self.journal is not None:
            self.records_seen_at_create.append(len(self.journal.records()))
        await trio.lowlevel.checkpoint()
        self.live.add(name)
        self.created.append(name)
        await trio.lowlevel.checkpoint()
        return name

    async def delete(self, name: str) -> None:
        await trio.lowlevel.checkpoint()
        if name in self.fail_release:
            raise OSError(f"cannot delete {name}")
        assert name in self.live, f"released {name}, which was never acquired"
        self.live.discard(name)
        self.released.append(name)


async def test_releases_in_reverse_order_exactly_once() -> None:
    host = FakeHost()
    async with CleanupStack() as stack:
        for name in ("netns", "veth", "process"):
            await stack.acquire(name, lambda n=name: host.create(n), host.delete)
        assert len(stack) == 3
    assert host.released == ["process", "veth", "netns"]
    assert not host.live


async def acquire_all(host: FakeHost, names: tuple[str, ...], then_raise: Exception | None = None) -> None:
    async with CleanupStack() as stack:
        for name in names:
            await stack.acquire(name, lambda n=name: host.create(n), host.delete)
        if then_raise is not None:
            raise then_raise


async def test_one_failing_release_does_not_skip_the_others() -> None:
    host = FakeHost()
    host.fail_release = {"veth"}
    with pytest.raises(CleanupFailed, match="veth") as info:
        await acquire_all(host, ("netns", "veth", "process"))
    assert host.released == ["process", "netns"]
    assert [name for name, _ in info.value.failures] == ["veth"]


async def test_a_failing_release_while_unwinding_is_noted_on_the_original_error() -> None:
    host = FakeHost()
    host.fail_release = {"veth"}
    with pytest.raises(KeyError) as info:
        await acquire_all(host, ("veth",), then_raise=KeyError("original"))
    assert any("veth could not be released" in note for note in info.value.__notes__)


async def test_releases_are_shielded_and_bounded(autojump_clock: MockClock) -> None:
    released: list[str] = []

    async def slow_release(_: object) -> None:
        await trio.sleep(1)  # needs time even though the owner was cancelled
        released.append("slow")

    async def stuck_release(_: object) -> None:
        await trio.sleep_forever()

    async def nothing() -> None:
        return None

    stack = CleanupStack(release_timeout=3)
    with trio.move_on_after(10):
        async with stack:
            await stack.acquire("slow", nothing, slow_release)
            await stack.acquire("stuck", nothing, stuck_release)
            await trio.sleep_forever()
    assert released == ["slow"]
    assert trio.current_time() == 10 + 3 + 1  # the stuck release got its 3 s, then the slow one ran
    assert [(name, type(err)) for name, err in stack.failures] == [("stuck", trio.TooSlowError)]


async def test_push_registers_an_idempotent_release_before_creating() -> None:
    host = FakeHost()

    async def delete_if_present() -> None:
        if "veth" in host.live:
            await host.delete("veth")

    with trio.CancelScope() as scope:
        async with CleanupStack() as stack:
            stack.push("veth", delete_if_present)
            host.live.add("veth")  # the kernel made it...
            scope.cancel()
            await trio.lowlevel.checkpoint()  # ...and the owner was cancelled before it knew
    assert host.released == ["veth"]


async def test_journal_records_exist_from_before_creation_until_release(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    host = FakeHost(journal)
    async with CleanupStack(journal=journal, owner="vm1") as stack:
        await stack.acquire("netns nx1", lambda: host.create("netns"), host.delete, kind="netns", data={"name": "nx1"})
        await stack.acquire("veth nx1h", lambda: host.create("veth"), host.delete, kind="link")
        records = [r for _, r in journal.records()]
        assert [(r.kind, r.name, r.owner) for r in records] == [
            ("link", "veth nx1h", "vm1"),
            ("netns", "netns nx1", "vm1"),
        ]
        assert records[1].data == {"name": "nx1"}
    assert host.records_seen_at_create == [1, 2], "each record is on disk before its create runs"
    assert journal.records() == []


async def test_journal_record_is_dropped_when_create_fails(tmp_path: Path) -> None:
    journal = Journal(tmp_path)

    async def broken() -> str:
        raise OSError("no such device")

    async def never(_: str) -> None:
        raise AssertionError("a resource that was never acquired must not be released")

    with pytest.raises(OSError, match="no such device"):
        async with CleanupStack(journal=journal) as stack:
            await stack.acquire("tap", broken, never)
    assert journal.records() == []


async def test_recover_releases_leftovers_newest_first_and_keeps_what_it_cannot(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    for kind, name, pid in [
        ("netns", "nx1", 111),
        ("link", "nx1h", 111),
        ("mystery", "m", 111),
        ("netns", "nx2", 222),
    ]:
        journal.write(ResourceRecord(kind=kind, name=name, data={}, owner="vm", pid=pid, created=0))
    released: list[str] = []

    async def release(record: ResourceRecord) -> None:
        await trio.lowlevel.checkpoint()
        released.append(record.name)

    done = await recover(journal, {"netns": release, "link": release}, is_stale=lambda r: r.pid == 111)
    assert released == ["nx1h", "nx1"]
    assert [r.name for r in done] == ["nx1h", "nx1"]
    assert sorted(r.name for _, r in journal.records()) == ["m", "nx2"]  # unknown kind, live owner


async def test_unreadable_journal_files_are_kept_for_the_operator(tmp_path: Path) -> None:
    (tmp_path / "123-1-0-junk.json").write_text("{not json")
    assert Journal(tmp_path).records() == []
    assert (tmp_path / "123-1-0-junk.json").exists()


# -- the cancellation sweep ------------------------------------------------------------------------


class Poke(Message):
    pass


class Machine(Actor[Poke]):
    """Acquires three resources while starting, as a machine does (netns, veth, process)."""

    def __init__(self, host: FakeHost, journal: Journal) -> None:
        self.host = host
        self.journal = journal

    async def on_start(self) -> None:
        # Ends with an acquisition, so ``started`` follows shielded work: the case where a cancelled
        # starter leaves the actor to unwind outside the supervisor's nursery.
        for name in ("netns", "veth", "process"):
            if name != "netns":
                await trio.sleep(0.5)
            await self.cleanup.acquire(name, lambda n=name: self.host.create(n), self.host.delete, kind=name)

    async def handle(self, message: Poke) -> None:
        pass


def check_nothing_leaked(host: FakeHost, journal: Journal) -> None:
    assert not host.live, f"leaked {host.live}"
    assert sorted(host.released) == sorted(host.created), "every acquired resource released exactly once"
    assert len(host.released) == len(set(host.released))
    assert journal.records() == [], "no journal record outlives its resource"


@pytest.mark.parametrize("under", ["nursery", "supervisor"])
async def test_cancelled_at_every_checkpoint_of_startup_nothing_leaks(
    under: str, tmp_path: Path, autojump_clock: MockClock
) -> None:
    runs: list[tuple[FakeHost, Journal]] = []

    async def scenario() -> None:
        journal = Journal(tmp_path / f"run{len(runs)}")
        host = FakeHost()
        runs.append((host, journal))
        mailbox = Mailbox[Poke](name="m")
        sup = Supervisor("machines", [actor_spec(lambda: Machine(host, journal), mailbox)])
        with trio.fail_after(60):  # a deadlocked start shows as a failure, not a hang
            async with trio.open_nursery() as nursery:
                if under == "supervisor":
                    await nursery.start(sup.run)
                else:
                    await nursery.start(Machine(host, journal).run, mailbox)
                nursery.cancel_scope.cancel()

    swept = await cancel_at_each_checkpoint(scenario, lambda step: check_nothing_leaked(*runs[-1]))
    assert swept >= 9, "three resources with two checkpoints each, plus the pauses between them"
    # Acquisitions are atomic and on_start begins with one, so every run made at least one resource;
    # the sweep cut the others off between every pair of acquisitions and after the last.
    assert {len(host.created) for host, _ in runs} == {1, 2, 3}
