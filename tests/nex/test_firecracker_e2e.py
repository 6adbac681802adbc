"""A real node with the Firecracker driver: its pool of one handshakes, an echo workload runs in a
microVM and stops. Runs only where Firecracker can: ``firecracker`` on PATH, and a ``/dev/kvm`` that
opens, speaks API version 12 and boots a Linux guest (a probe boot under Firecracker itself).

The guest images come from ``NEX_VM_KERNEL``, ``NEX_VM_ROOTFS`` and, optionally, ``NEX_VM_INITRD``
(the image builder's output). Where any of this is missing the test skips and says what.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import msgspec
import pytest

from nex.api import control
from nex.net import netns

from .support import Bus, NatsServerProc, NodeProcess, run_cli
from .test_workloads import echo_env, echo_request, reach, wait_pool_ready
from .workloads import Binaries

pytestmark = pytest.mark.integration

KVM_GET_API_VERSION = 0xAE00
PROBE_TIMEOUT = 20.0


def _kvm_problem() -> str | None:
    if Path("/sys/module/kvm_pvm").exists():
        return "/dev/kvm here (kvm_pvm) cannot run a Linux guest"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"/dev/kvm cannot be opened ({exc.strerror})"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        return f"KVM_GET_API_VERSION on /dev/kvm failed ({exc.strerror})"
    finally:
        os.close(fd)
    return None if version == 12 else f"/dev/kvm speaks KVM API {version}, not 12"


def _images() -> tuple[Path, Path, Path | None] | str:
    kernel, rootfs, initrd = (os.environ.get(k, "") for k in ("NEX_VM_KERNEL", "NEX_VM_ROOTFS", "NEX_VM_INITRD"))
    if not kernel or not rootfs or not Path(kernel).is_file() or not Path(rootfs).is_file():
        return "no guest images: set NEX_VM_KERNEL and NEX_VM_ROOTFS (and NEX_VM_INITRD) to the image builder's files"
    return Path(kernel), Path(rootfs), Path(initrd) if initrd else None


def _probe_boot(firecracker: str, kernel: Path, rootfs: Path, initrd: Path | None) -> str | None:
    """Boot the kernel under Firecracker (no API: a config file) until it prints its banner."""
    with tempfile.TemporaryDirectory(prefix="nxfc") as work:
        boot: dict[str, object] = {"kernel_image_path": str(kernel), "boot_args": "console=ttyS0 reboot=k panic=1"}
        if initrd is not None:
            boot["initrd_path"] = str(initrd)
        config = {
            "boot-source": boot,
            "drives": [
                {"drive_id": "rootfs", "path_on_host": str(rootfs), "is_root_device": True, "is_read_only": True}
            ],
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        }
        (Path(work) / "vm.json").write_text(json.dumps(config))
        console = Path(work) / "console"
        with console.open("wb") as out:
            vm = subprocess.Popen(
                [firecracker, "--no-api", "--config-file", "vm.json"], cwd=work, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            deadline = time.monotonic() + PROBE_TIMEOUT
            while time.monotonic() < deadline:  # the console is another process's file: polled
                if b"Linux version" in console.read_bytes():
                    return None
                if vm.poll() is not None and b"Linux version" not in console.read_bytes():
                    break
                time.sleep(0.05)
            tail = console.read_bytes()[-300:].decode(errors="replace")
            return f"a probe boot under Firecracker printed no kernel banner within {PROBE_TIMEOUT:g} s: {tail!r}"
        finally:
            vm.kill()
            vm.wait()


@pytest.fixture(scope="module")
def firecracker_host() -> tuple[Path, Path, Path | None]:
    """The guest images, where Firecracker can run them; else the test skips, saying why."""
    binary = shutil.which("firecracker")
    problems = [] if binary else ["firecracker is not installed"]
    kvm = _kvm_problem()
    if kvm is not None:
        problems.append(kvm)
    if problems:
        pytest.skip(" and ".join(problems))
    assert binary is not None
    if not netns.has_capabilities():
        pytest.skip("each microVM gets a network namespace and a tap: needs root")
    images = _images()
    if isinstance(images, str):
        pytest.skip(images)
    problem = _probe_boot(binary, *images)
    if problem is not None:
        pytest.skip(problem)
    return images


def test_a_firecracker_pool_of_two_clones_handshakes_and_runs_an_echo_workload(
    firecracker_host: tuple[Path, Path, Path | None],
    home: Path,
    open_nats_server: NatsServerProc,
    obus: Bus,
    binaries: Binaries,
) -> None:
    kernel, rootfs, initrd = firecracker_host
    settings: dict[str, object] = {
        "driver": "firecracker",
        "kernel_filepath": str(kernel),
        "rootfs_filepath": str(rootfs),
        "machine_pool_size": 2,
        "machine_template": {"vcpu_count": 1, "memsize_mib": 256},
    }
    if initrd is not None:
        settings["initrd_path"] = str(initrd)
    (home / "node.json").write_text(json.dumps(settings))
    node = NodeProcess(home, "--config", str(home / "node.json"), *reach(open_nats_server), server=open_nats_server.url)
    node.start(obus, timeout=120)
    events = obus.collect("$NEX.events.default.*")

    vmids = wait_pool_ready(node, obus, 2, timeout=120)  # the pool's microVMs: their agents shook hands
    [snapshot] = node.state_dir.glob("snapshots/*/*.fcsnap")  # the template's, saved at its ready marker
    assert sorted(p.name for p in snapshot.iterdir() if p.name in ("state", "memory")) == ["memory", "state"]
    for vmid in vmids:
        [machine_dir] = node.state_dir.glob(f"vm/*/*/{vmid}")
        assert json.loads((machine_dir / "driver.json").read_text())["start"] == "snapshot"  # a clone
        assert (machine_dir / "firecracker.cfg").is_file()
        assert int((machine_dir / "firecracker.pid").read_text().split()[0]) > 0
        console = (machine_dir / "firecracker.stdout").read_text(errors="replace")
        assert f"took the identity of {vmid}" in console  # from its own MMDS, after the restore
    vmid = sorted(vmids)[0]
    [machine_dir] = node.state_dir.glob(f"vm/*/*/{vmid}")

    (home / "bin").mkdir()
    (home / "bin" / "echo").write_bytes(binaries.echo)
    user = {"HOME": str(home / "user"), "NATS_URL": open_nats_server.url}
    env_args = [f"--env={k}={v}" for k, v in echo_env(open_nats_server, "echo.fc", "vm-").items()]
    run = run_cli("run", str(home / "bin" / "echo"), *env_args, "--json", env=user)
    assert run.returncode == 0, run.stderr
    response = msgspec.json.decode(run.stdout, type=control.RunResponse)
    assert response.started
    assert response.id in vmids  # a warm microVM took it
    assert echo_request(obus, "echo.fc", b"ping", timeout=60) == b"vm-ping"

    stop = run_cli("stop", response.id, env=user)
    assert stop.returncode == 0, stop.stderr
    ended = events.wait("default.workload_stopped", source=node.node_id, timeout=60)
    assert ended["data"]["id"] == response.id
    assert node.stop(timeout=60) == 0
    assert not list(node.state_dir.glob(f"vm/*/*/{response.id}"))
