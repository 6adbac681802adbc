"""The template snapshot cache every VM driver uses (nex.vm.snapshots): made once under a lock,
whole or not at all, stale and partial ones removed, dropped on a failed restore, and a failure to
make one said once and turned into cold boots.

The maker here writes files: these test the cache, not a hypervisor (test_qemu.py restores real
snapshots; test_firecracker_api.py checks Firecracker's template requests).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from nex.vm.snapshots import Made, TemplateFailed, TemplateSnapshots


class Maker:
    def __init__(self, *, directory: bool = False, fail: str = "") -> None:
        self.directory = directory
        self.fail = fail
        self.made: list[Path] = []
        self.called = trio.Event()
        self.release = trio.Event()
        self.release.set()

    async def __call__(self, path: Path) -> Made:
        self.made.append(path)
        await trio.to_thread.run_sync(self._write, path)
        self.called.set()
        await self.release.wait()
        if self.fail:
            raise TemplateFailed(self.fail)
        return Made(boot_s=0.0, size=1)

    def _write(self, path: Path) -> None:
        assert not path.exists(), "a maker writes a new file or directory"
        if self.directory:
            path.mkdir()
            (path / "state").write_text("s")
            (path / "memory").write_text("m" * 10)
        else:
            path.write_text("half")  # half-written until released


def cache(directory: Path, maker: Maker, key: str = "k1", timeout: float = 60) -> TemplateSnapshots:
    return TemplateSnapshots(directory, key=lambda: key, make=maker, suffix=".snap", timeout=timeout)


async def test_the_first_machine_makes_it_the_others_wait_and_share_it(tmp_path: Path) -> None:
    maker = Maker()
    maker.release = trio.Event()
    snapshots = cache(tmp_path / "snaps", maker)
    got: list[Path | None] = []

    async def get() -> None:
        got.append(await snapshots.get())

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(get)
        await maker.called.wait()
        await trio.testing.wait_all_tasks_blocked()  # the other two wait on the lock
        assert [p.name for p in maker.made] == ["k1.snap.partial"]
        assert not (tmp_path / "snaps" / "k1.snap").exists(), "not under its name while half-written"
        maker.release.set()

    assert got == [tmp_path / "snaps" / "k1.snap"] * 3
    assert len(maker.made) == 1
    assert sorted(p.name for p in (tmp_path / "snaps").iterdir()) == ["k1.snap"]
    assert await snapshots.get() == tmp_path / "snaps" / "k1.snap"  # kept: not made again
    assert len(maker.made) == 1


async def test_stale_and_partial_snapshots_go_and_a_directory_snapshot_is_renamed_whole(tmp_path: Path) -> None:
    folder = tmp_path / "snaps"
    folder.mkdir()
    (folder / "old.snap").write_text("another image's")
    (folder / "k2.snap.partial").mkdir()  # a killed node's
    (folder / "k2.snap.partial" / "state").write_text("half")
    (folder / "template.log").write_text("kept: not a snapshot")
    maker = Maker(directory=True)

    path = await cache(folder, maker, key="k2").get()

    assert path == folder / "k2.snap"
    assert sorted(p.name for p in folder.iterdir()) == ["k2.snap", "template.log"]
    assert sorted(p.name for p in path.iterdir()) == ["memory", "state"]


async def test_a_template_that_fails_leaves_nothing_and_machines_cold_boot_for_good(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    maker = Maker(directory=True, fail="the guest panicked")
    snapshots = cache(tmp_path / "snaps", maker)

    assert await snapshots.get() is None
    assert await snapshots.get() is None
    assert len(maker.made) == 1, "not tried again by every machine"
    assert snapshots.failed == "the template VM could not be saved: the guest panicked"
    assert list((tmp_path / "snaps").iterdir()) == [], "no partial snapshot left"


async def test_a_template_that_never_becomes_ready_is_given_up(tmp_path: Path, autojump_clock: MockClock) -> None:
    maker = Maker()
    maker.release = trio.Event()  # never set
    snapshots = cache(tmp_path / "snaps", maker, timeout=5)

    assert await snapshots.get() is None  # under the autojump clock: no real wait
    assert "did not become ready in time" in snapshots.failed
    assert list((tmp_path / "snaps").iterdir()) == []


async def test_a_failed_restore_drops_the_snapshot_and_the_next_machine_makes_a_new_one(tmp_path: Path) -> None:
    maker = Maker(directory=True)
    snapshots = cache(tmp_path / "snaps", maker)
    first = await snapshots.get()
    assert first is not None

    snapshots.forget("qemu: Unknown savevm section")

    assert not first.exists()
    assert await snapshots.get() == first
    assert first.exists()
    assert len(maker.made) == 2


async def test_cancelled_while_making_it_leaves_nothing(tmp_path: Path, autojump_clock: MockClock) -> None:
    maker = Maker(directory=True)
    maker.release = trio.Event()
    snapshots = cache(tmp_path / "snaps", maker)
    with trio.move_on_after(1):
        await snapshots.get()
    assert list((tmp_path / "snaps").iterdir()) == []
    assert snapshots.failed == ""  # a cancelled node: nothing to say about the template
