"""A VM's start cancelled all along the way, with everything real: nothing may be left behind.

As ``test_machine_sweep`` does for processes, with the QEMU driver: real namespaces, veths, taps, tc
filters, leases, a real qemu restoring a real snapshot of the guest image, the agent's handshake
over a real internal nats-server. The template's snapshot is made first (its boot is slow under
TCG), then run *k* cancels the machine's start after the *k*-th step of the Trio run: every step up
to the handshake's wait, then a sample of the wait's many steps (each run restores a VM).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from actors.testing import cancel_at_each_checkpoint
from nex import ids
from nex.bus.credentials import AgentCredentials
from nex.config import load
from nex.net import netns
from nex.net.network import Networks
from nex.sandbox.policy import HostSupport, Sandbox
from nex.vm.drivers.qemu import QemuDriver
from nex.vm.image import GuestImage
from nex.vm.machine import MachineDeps

from .image_fixture import tcg_spec
from .support import processes_mentioning
from .test_machine_sweep import MachineStarts, machines_of

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not netns.has_capabilities(), reason="needs CAP_NET_ADMIN and CAP_SYS_ADMIN (run as root)"),
]

HOST = HostSupport(privileged=True, namespaced=True, user_namespaces=None, seccomp=None, cgroups="")
EVERY_STEP_UNTIL = 120  # the steps of prepare and of qemu's start and restore, each swept
THEN_EVERY = 25  # then a sample of the handshake's


@pytest.fixture
async def vm_parts(tmp_path: Path, guest_image: GuestImage) -> AsyncIterator[tuple[MachineDeps, AgentCredentials]]:
    config = load(None, {"cni.subnet": "10.213.8.0/24", "cni.network_name": "nextestvm"}).config
    networks = Networks(config, namespaced=True, lease_root=tmp_path / "leases")
    spec = tcg_spec(guest_image)
    driver = QemuDriver(
        networks,
        Sandbox(config, HOST),
        spec,
        image_digest=guest_image.digest,
        snapshot_dir=tmp_path / "snapshots",
        boot_timeout=120,
    )
    assert driver.snapshots is not None
    assert await driver.snapshots.get() is not None, driver.snapshots.failed
    async with machines_of(tmp_path, networks, driver, handshake_timeout=30.0) as deps:
        yield deps, deps.credentials


async def test_a_vm_start_cancelled_at_every_step_leaves_nothing(
    vm_parts: tuple[MachineDeps, AgentCredentials], tmp_path: Path
) -> None:
    deps, credentials = vm_parts
    scenario = MachineStarts(deps, credentials)

    def check(step: int) -> None:
        vmid = scenario.runs[-1]
        where = f"(cancelled after step {step})"
        assert ids.short(vmid) not in netns.namespaces("nx"), f"netns (and its tap) left {where}"
        assert ids.host_link(vmid) not in netns.links("nx"), f"veth left {where}"
        assert deps.driver.nets.networks.ipam.leases() == {}, f"lease left {where}"  # type: ignore[attr-defined]
        assert not (deps.vm_root / vmid).exists(), f"state dir left {where}"
        assert deps.journal is not None
        assert deps.journal.records() == [], f"journal record left {where}"
        assert credentials.agents() == [], f"credentials left {where}"
        assert vmid not in deps.handshakes.waiting, f"handshake waiter left {where}"
        assert processes_mentioning(str(deps.vm_root / vmid)) == {}, f"qemu left {where}"
        assert list((tmp_path / "snapshots").glob("*.partial")) == [], f"partial snapshot left {where}"

    steps = itertools.chain(range(1, EVERY_STEP_UNTIL), itertools.count(EVERY_STEP_UNTIL, THEN_EVERY))
    with trio.fail_after(900):
        swept = await cancel_at_each_checkpoint(scenario, check, steps=steps)
    print(f"swept {swept} cancellation points")
    assert swept >= 40, "a VM's start has many steps: netlink, tap, tc, qemu, QMP, restore, identity, handshake"
    assert scenario.ready, "the last run must complete"
    assert processes_mentioning(str(tmp_path / "vm")) == {}


async def test_a_snapshot_qemu_cannot_restore_is_dropped_and_the_machine_cold_boots(
    vm_parts: tuple[MachineDeps, AgentCredentials],
) -> None:
    deps, credentials = vm_parts
    driver = deps.driver
    assert isinstance(driver, QemuDriver)
    assert driver.snapshots is not None
    snapshot = await driver.snapshots.get()
    assert snapshot is not None
    await trio.to_thread.run_sync(snapshot.write_bytes, b"QEVM\0\0\0\3" + b"\xff" * 4096)  # not a VM's state
    scenario = MachineStarts(deps, credentials)

    with trio.fail_after(300):
        await scenario()

    assert scenario.ready == scenario.runs, "the machine came up all the same (cold-booted)"
    assert not driver.snapshots.made, "the snapshot that failed is forgotten"
    assert not snapshot.exists(), "and removed: the next machine makes a new one"
    assert driver.snapshots.failed == ""
