"""``nex preflight`` and the checks ``nex up`` makes before it starts a VM driver: real probes, no mocks.

On this project's machine kind QEMU runs under TCG but ``-accel kvm`` cannot run a guest, and there is
no firecracker binary; the assertions that depend on that are skipped on a host where it is not so.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from nex.net import fence, netns
from nex.vm import kvm

from .support import NEX, processes_mentioning, run_cli, wait_gone

pytestmark = pytest.mark.integration

ROOT = os.geteuid() == 0 and netns.has_capabilities()
QEMU = shutil.which("qemu-system-x86_64")
KERNELS = sorted(Path("/boot").glob("vmlinuz-*"))
PROBE_INIT = b"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc
/bin/busybox mount -t proc proc /proc
for word in $(/bin/busybox cat /proc/cmdline); do
  [ "$word" = nex.probe=1 ] && echo nex-probe-ok
done
/bin/busybox reboot -f
"""


def preflight(*args: str, timeout: float = 120) -> tuple[int, dict[str, Any]]:
    result = run_cli("preflight", "--json", *args, timeout=timeout)
    assert result.returncode in (0, 1), result.stderr
    assert result.stdout.startswith("{"), result.stderr  # not a crash (a traceback also exits 1)
    return result.returncode, json.loads(result.stdout)


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {check["name"]: check for check in report["checks"]}


def throwaways() -> set[str]:
    """Every nxpf… object on this host: network namespaces, links, nftables tables."""
    found = set(netns.namespaces("nxpf")) | set(netns.links("nxpf"))
    if netns.has_capabilities():
        found |= {f"table {t}" for t in fence.tables("nxpf")}
    return found


def write_config(path: Path, **settings: Any) -> Path:
    path.write_text(json.dumps(settings))
    return path


def newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio archive in the kernel's initramfs format (newc)."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], 1):
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        out += b"070701" + "".join(f"{value:08x}" for value in fields).encode() + encoded
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


@pytest.fixture(scope="module")
def probe_initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny initramfs (busybox-static) whose /init prints nex-probe-ok under nex.probe=1 and reboots."""
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        pytest.skip("needs /bin/busybox (the busybox-static package)")
    archive = newc(
        [
            ("bin", 0o040755, b""),
            ("proc", 0o040755, b""),
            ("bin/busybox", 0o100755, busybox.read_bytes()),
            ("init", 0o100755, PROBE_INIT),
        ]
    )
    path = tmp_path_factory.mktemp("probe") / "probe.cpio"
    path.write_bytes(archive)
    return path


@pytest.fixture
def fake_rootfs(tmp_path: Path) -> Path:
    """A file with ext4's superblock magic (what the check looks at), small enough for a probe VM's disk."""
    data = bytearray(1 << 20)
    data[1080:1082] = b"\x53\xef"
    path = tmp_path / "root.ext4"
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Any:
    before = throwaways()
    yield
    assert throwaways() - before == set(), "preflight left throwaway objects behind"
    assert processes_mentioning(kvm.PROBE_ARG) == {}, "a probe VM is still running"


# -- the drivers on this host -----------------------------------------------------------------------


def test_the_process_driver_passes() -> None:
    code, report = preflight("--driver", "process")
    assert code == 0, report
    assert report["could_start"] is True
    assert report["driver"] == "process"
    checks = by_name(report)
    assert {"root", "cgroups", "seccomp", "user namespaces", "nftables", "network namespaces"} <= set(checks)
    assert "qemu" not in checks
    assert "firecracker" not in checks
    if ROOT:
        assert all(c["ok"] for c in report["checks"]), report
        assert "cgroup v" in checks["cgroups"]["detail"]


def test_node_preflight_is_an_alias() -> None:
    result = run_cli("node", "preflight", "--driver", "process")
    assert result.returncode == 0, result.stderr
    assert "could start" in result.stdout
    assert "✓" in result.stdout


@pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86_64 (apt-get install qemu-system-x86)")
@pytest.mark.skipif(not ROOT, reason="needs root: the tun and tc checks make a namespace")
def test_the_qemu_driver_finds_qemu_tun_and_tc_and_kvm_is_advisory() -> None:
    code, report = preflight("--driver", "qemu")
    checks = by_name(report)
    for name in ("qemu", "qemu microvm", "/dev/net/tun", "tc redirect", "network namespaces"):
        assert checks[name]["ok"], checks[name]
    assert "QEMU emulator version" in checks["qemu"]["detail"]
    assert checks["kvm"]["required"] is False  # under qemu, TCG stands in (vm_accel auto)
    if not checks["kvm"]["ok"]:
        assert "TCG" in checks["kvm"]["detail"]
        assert checks["kvm"]["fix"]
    assert checks["boot"]["skipped"]
    assert "--boot" in checks["boot"]["detail"]
    assert code == 0, report
    assert report["could_start"]


@pytest.mark.skipif(shutil.which("firecracker") is not None, reason="this host has firecracker")
def test_the_firecracker_driver_is_fatal_without_its_binary() -> None:
    code, report = preflight("--driver", "firecracker")
    assert code == 1
    assert report["could_start"] is False
    assert "firecracker" in report["fatal"]
    check = by_name(report)["firecracker"]
    assert check["required"]
    assert not check["ok"]
    assert "not found" in check["detail"]
    assert "github.com/firecracker-microvm/firecracker/releases" in check["fix"]
    assert by_name(report)["kvm"]["required"] is True  # firecracker has no TCG to fall back on
    human = run_cli("preflight", "--driver", "firecracker")
    assert human.returncode == 1
    assert "could NOT start" in human.stdout
    assert "firecracker" in human.stdout
    assert "✗" in human.stdout


# -- the guest's files ------------------------------------------------------------------------------


def test_a_kernel_that_does_not_exist_is_fatal_and_named(tmp_path: Path, fake_rootfs: Path) -> None:
    missing = tmp_path / "no-such-vmlinuz"
    config = write_config(
        tmp_path / "config.json", driver="qemu", kernel_path=str(missing), rootfs_path=str(fake_rootfs)
    )
    code, report = preflight("--config", str(config))
    assert code == 1
    check = by_name(report)["kernel"]
    assert check["fatal"]
    assert str(missing) in check["detail"]
    assert "kernel_path" in check["detail"]
    assert by_name(report)["rootfs"]["ok"]


def test_files_of_the_wrong_kind_are_said_to_be_so(tmp_path: Path) -> None:
    not_a_kernel = tmp_path / "vmlinuz"
    not_a_kernel.write_bytes(b"#!/bin/sh\necho hello\n" * 100)
    not_ext4 = tmp_path / "rootfs.img"
    not_ext4.write_bytes(bytes(4096))
    not_initrd = tmp_path / "initrd.img"  # beside the kernel: the drivers use it, so it is checked
    not_initrd.write_text("hello")
    config = write_config(
        tmp_path / "config.json", driver="qemu", kernel_path=str(not_a_kernel), rootfs_path=str(not_ext4)
    )
    code, report = preflight("--config", str(config))
    assert code == 1
    checks = by_name(report)
    assert "is not a kernel" in checks["kernel"]["detail"]
    assert "is not an ext4 filesystem" in checks["rootfs"]["detail"]
    assert "is not an initramfs" in checks["initrd"]["detail"]
    assert {"kernel", "rootfs", "initrd"} <= set(report["fatal"])


def test_no_guest_files_means_the_cached_image_and_is_not_fatal() -> None:
    code, report = preflight("--driver", "qemu")
    check = by_name(report)["guest image"]
    assert check["ok"]
    assert not check["required"]
    assert "nex image build" in check["fix"]
    assert "guest image" not in report["fatal"]
    assert code in (0, 1)


def test_bad_config_is_a_usage_error(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text("{not json")
    result = run_cli("preflight", "--config", str(config))
    assert result.returncode == 2
    assert "not valid JSON" in result.stderr


# -- the KVM and boot probes ------------------------------------------------------------------------


@pytest.mark.skipif(QEMU is None or not KERNELS, reason="needs qemu-system-x86_64 and a /boot/vmlinuz-*")
async def test_the_kvm_probe_says_no_here_with_the_reason(probe_initrd: Path) -> None:
    assert QEMU is not None
    api = kvm.kvm_api_usable()
    ok, why = await kvm.kvm_runs_guest(QEMU, KERNELS[-1], probe_initrd, timeout=8)
    if ok:
        pytest.skip(f"this host's KVM runs a guest: {why}")
    assert why
    if api is None:  # /dev/kvm answers, as kvm_pvm does, yet the guest does not run
        assert "(kvm)" in why


@pytest.mark.skipif(QEMU is None or not KERNELS, reason="needs qemu-system-x86_64 and a /boot/vmlinuz-*")
async def test_the_tcg_probe_boots_the_initramfs(probe_initrd: Path) -> None:
    assert QEMU is not None
    ok, why = await kvm.probe_boot(QEMU, KERNELS[-1], probe_initrd, accel="tcg", timeout=60)
    assert ok, why
    assert kvm.PROBE_OK in why


@pytest.mark.skipif(QEMU is None or not KERNELS, reason="needs qemu-system-x86_64 and a /boot/vmlinuz-*")
async def test_a_cancelled_probe_leaves_no_vm(probe_initrd: Path) -> None:
    assert QEMU is not None
    with trio.move_on_after(0.5) as scope:
        await kvm.probe_boot(QEMU, KERNELS[-1], probe_initrd, accel="tcg", timeout=60)
    assert scope.cancelled_caught
    assert processes_mentioning(kvm.PROBE_ARG) == {}


def test_tcg_tsc_khz_reads_cpu_mhz(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu MHz\t\t: 2445.426\n")
    assert kvm.tcg_tsc_khz(cpuinfo) == 2_445_426
    cpuinfo.write_text("processor\t: 0\n")
    assert kvm.tcg_tsc_khz(cpuinfo) == kvm.DEFAULT_TSC_KHZ
    assert kvm.tcg_tsc_khz() > 0


@pytest.mark.skipif(QEMU is None or not KERNELS, reason="needs qemu-system-x86_64 and a /boot/vmlinuz-*")
def test_preflight_boot_boots_the_configured_guest(tmp_path: Path, probe_initrd: Path, fake_rootfs: Path) -> None:
    config = write_config(
        tmp_path / "config.json",
        driver="qemu",
        vm_accel="tcg",
        kernel_path=str(KERNELS[-1]),
        rootfs_path=str(fake_rootfs),
        initrd_path=str(probe_initrd),
    )
    _, report = preflight("--config", str(config), "--boot")
    checks = by_name(report)
    assert checks["boot"]["ok"], checks["boot"]
    assert kvm.PROBE_OK in checks["boot"]["detail"]
    assert checks["kernel"]["detail"].endswith("bzImage")
    assert checks["initrd"]["detail"].endswith("cpio")
    assert checks["kvm"]["skipped"]  # vm_accel tcg


# -- cleanup however it ends -------------------------------------------------------------------------


@pytest.mark.skipif(not ROOT, reason="needs root: the network checks make a namespace")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_stopped_preflight_leaves_nothing_once_the_next_has_run(sig: int) -> None:
    """SIGTERM and SIGINT: the probes finish their cleanup before it exits. SIGKILL: its probe VM dies
    with it, its nft batch never commits anything, and the next preflight deletes its namespace."""
    proc = subprocess.Popen([NEX, "preflight", "--driver", "qemu"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not throwaways() and proc.poll() is None:
        time.sleep(0.005)  # until its namespace exists (or it is done)
    proc.send_signal(sig)
    proc.wait(30)
    assert wait_gone(list(processes_mentioning(kvm.PROBE_ARG)), timeout=10) == []
    if sig != signal.SIGKILL:
        assert throwaways() == set()
    run_cli("preflight", "--driver", "process")  # sweeps what a killed one left
    assert throwaways() == set()


# -- nex up refuses a driver that cannot work ---------------------------------------------------------


@pytest.mark.skipif(shutil.which("firecracker") is not None, reason="this host has firecracker")
@pytest.mark.parametrize("how", ["flag", "config"])
def test_up_refuses_firecracker_without_its_binary(tmp_path: Path, how: str) -> None:
    state = tmp_path / "state"
    if how == "flag":
        args = ["--driver", "firecracker"]
    else:
        args = ["--config", str(write_config(tmp_path / "config.json", driver="firecracker"))]
    started = time.monotonic()
    result = run_cli("up", *args, "--state-dir", str(state), "--server", "nats://127.0.0.1:1", timeout=60)
    assert result.returncode == 1, result.stderr
    assert "the firecracker driver cannot work on this host" in result.stderr
    assert "firecracker: firecracker not found on PATH" in result.stderr
    assert "github.com/firecracker-microvm/firecracker/releases" in result.stderr
    assert time.monotonic() - started < 30
    assert not state.exists()  # refused before the node made anything
    assert processes_mentioning(str(tmp_path)) == {}


def test_up_with_the_process_driver_runs_no_extra_check() -> None:
    from nex.cli.preflight import start_refusal
    from nex.config import NodeConfig

    started = time.perf_counter()
    assert start_refusal(NodeConfig()) is None
    assert time.perf_counter() - started < 0.005
