"""The microVM guest image: what is in it, its cache, its command, and that it boots (real apt, pip,
mkfs.ext4 and qemu; no mocks).

The image is built once per session by the ``guest_image`` fixture (see image_fixture.py); the tests
here that build again use its download caches, so only the first session downloads.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.metadata
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from nex.vm import image as images
from nex.vm.image import GuestImage, ImageError, build_image, image_inputs, load_order, source_digest
from nex.vm.kvm import tcg_tsc_khz

from .image_fixture import image_cache  # the guest_image fixture comes from conftest.py

REPO = Path(__file__).resolve().parents[2]
QEMU = shutil.which("qemu-system-x86_64")
BOOT_DEADLINE = 60.0


# --- what is in the image -----------------------------------------------------------------------------


def test_kernel_is_a_bzimage(guest_image: GuestImage) -> None:
    with guest_image.kernel.open("rb") as f:
        f.seek(0x202)
        assert f.read(4) == b"HdrS"  # the x86 boot protocol's header magic


def _cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    """A newc cpio archive's entries: name → (mode, contents); read here, not with the builder's code."""
    entries: dict[str, tuple[int, bytes]] = {}
    offset = 0
    while True:
        assert data[offset : offset + 6] == b"070701", f"no newc header at {offset}"
        fields = [int(data[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        mode, size, name_size = fields[1], fields[6], fields[11]
        name_at = offset + 110
        name = data[name_at : name_at + name_size - 1].decode()
        body_at = name_at + name_size + (-(110 + name_size) % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[body_at : body_at + size])
        offset = body_at + size + (-size % 4)


def _depends(module: bytes) -> list[str]:
    modinfo = ELFFile(io.BytesIO(module)).get_section_by_name(".modinfo")
    assert modinfo is not None
    for entry in modinfo.data().split(b"\0"):
        if entry.startswith(b"depends="):
            return [name.replace("-", "_") for name in entry[8:].decode().split(",") if name]
    return []


def test_initramfs_holds_init_busybox_and_modules_after_their_dependencies(guest_image: GuestImage) -> None:
    assert guest_image.initrd is not None
    entries = _cpio(gzip.decompress(guest_image.initrd.read_bytes()))
    assert entries["init"][1].startswith(b"#!/bin/sh\n")
    assert entries["init"][0] & 0o111
    assert entries["bin/busybox"][1][:4] == b"\x7fELF"
    assert {"bin/sh", "bin/switch_root", "bin/insmod", "dev/console"} <= set(entries)
    order = entries["lib/modules/load"][1].decode().split()
    assert {"virtio", "virtio_ring", "virtio_mmio", "virtio_blk", "virtio_net", "virtio_console", "overlay"} <= set(
        order
    )
    for position, name in enumerate(order):
        module = entries[f"lib/modules/{name}.ko"][1]
        assert module[:4] == b"\x7fELF", f"{name} is not a plain (uncompressed) module"
        for dependency in _depends(module):
            assert dependency in order[:position], f"{name} needs {dependency}, which is not loaded before it"


def _debugfs(rootfs: Path, request: str) -> str:
    done = subprocess.run(["debugfs", "-R", request, str(rootfs)], capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


def test_rootfs_holds_python_the_agent_and_an_empty_dev(guest_image: GuestImage) -> None:
    if shutil.which("debugfs") is None:
        pytest.skip("debugfs (e2fsprogs) is not installed")
    site = "/usr/local/lib/python3.11/dist-packages"
    for path in ("/usr/bin/python3.11", f"{site}/nex/agent/main.py", f"{site}/nats/__init__.py", "/etc/ld.so.cache"):
        assert "Type: regular" in _debugfs(guest_image.rootfs, f"stat {path}"), path
    assert "Type: symlink" in _debugfs(guest_image.rootfs, "stat /usr/bin/python3")
    listing = _debugfs(guest_image.rootfs, "ls -p /dev").splitlines()  # /inode/mode/uid/gid/name/size/
    assert sorted(line.split("/")[5] for line in listing if line.startswith("/")) == [".", ".."]


def test_manifest_pins_the_hosts_wheels(guest_image: GuestImage) -> None:
    manifest = guest_image.manifest()
    wheels = manifest["wheels"]
    assert isinstance(wheels, dict)
    assert wheels["msgspec"] == importlib.metadata.version("msgspec")
    assert wheels["nats-py"] == importlib.metadata.version("nats-py")
    assert manifest["rootfs_path"] == str(guest_image.rootfs)
    assert str(manifest["python"]).startswith("3.11.")


# --- the cache ----------------------------------------------------------------------------------------


def _skip_if_edited(image: GuestImage) -> None:
    """Tests of reuse expect the session's image: not if someone edits the checkout meanwhile."""
    if source_digest() != image.manifest()["nex_sources"]:
        pytest.skip("the nex sources changed since the session built its image (the checkout is being edited)")


def test_a_second_build_reuses_the_image(guest_image: GuestImage) -> None:
    before = guest_image.rootfs.stat().st_mtime_ns
    started = time.monotonic()
    inputs = image_inputs()
    _skip_if_edited(guest_image)
    again = build_image(image_cache(), inputs=inputs)
    assert again == guest_image
    assert again.rootfs.stat().st_mtime_ns == before
    assert time.monotonic() - started < 15  # two apt queries, no download, no build
    assert images.cached_image(image_cache()) == guest_image


def test_the_digest_follows_the_nex_sources(tmp_path: Path) -> None:
    patched = tmp_path / "nex"
    shutil.copytree(images.SOURCE, patched, ignore=shutil.ignore_patterns("__pycache__"))
    assert source_digest(patched) == source_digest(images.SOURCE)
    with (patched / "agent" / "main.py").open("a") as f:
        f.write("# changed\n")
    assert source_digest(patched) != source_digest(images.SOURCE)
    assert image_inputs(patched).digest != image_inputs().digest


def test_load_order_puts_dependencies_first_and_names_what_is_missing() -> None:
    needs = {"a": ["b", "c"], "b": ["c"], "c": [], "d": ["builtin"]}
    assert load_order(["a", "d"], needs.__getitem__, set(needs), {"builtin"}) == ["c", "b", "a", "d"]
    with pytest.raises(ImageError, match="no module c"):
        load_order(["a"], needs.__getitem__, {"a", "b"}, set())
    with pytest.raises(ImageError, match="cycle"):
        load_order(["x"], {"x": ["y"], "y": ["x"]}.__getitem__, {"x", "y"}, set())


def test_tsc_khz_is_the_hosts_clock() -> None:
    assert 100_000 < tcg_tsc_khz() < 10_000_000


def _seed_downloads(state_dir: Path) -> None:
    """Give a fresh state dir the session's downloads (hard links where possible), so it builds offline."""
    for cache in (".debs", ".wheels"):
        target = images.image_root(state_dir) / cache
        target.mkdir(parents=True, exist_ok=True)
        for path in (images.image_root(image_cache()) / cache).glob("*.*"):
            try:
                os.link(path, target / path.name)
            except OSError:
                shutil.copy2(path, target / path.name)


def _lines(stream: int, deadline: float) -> Iterator[str]:
    """Lines from a pipe until EOF or the deadline (waiting on the pipe, never sleeping)."""
    pending = b""
    while (remaining := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([stream], [], [], remaining)
        if not ready:
            break
        chunk = os.read(stream, 65536)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from (line.decode(errors="replace") for line in lines)
    if pending:
        yield pending.decode(errors="replace")


def _nex(*args: str) -> list[str]:
    return [sys.executable, "-m", "nex", *args]


@pytest.mark.integration
def test_a_killed_build_leaves_no_image_and_the_next_build_cleans_up(guest_image: GuestImage, tmp_path: Path) -> None:
    _seed_downloads(tmp_path)
    root = images.image_root(tmp_path)
    proc = subprocess.Popen(
        _nex("image", "build", "--state-dir", str(tmp_path)),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own group: killed with its children (dpkg-deb, the chroot's python)
    )
    assert proc.stderr is not None
    try:
        said = []
        for line in _lines(proc.stderr.fileno(), time.monotonic() + 120):
            said.append(line)
            if "byte-compiling" in line:  # half-way: packages unpacked, no ext4 yet
                break
        else:
            pytest.fail(f"the build never reached byte-compiling: {said}")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == []
    assert list(root.glob(".build-*")) != []

    built = build_image(tmp_path)
    assert list(root.glob(".build-*")) == []
    assert list(root.glob(".*/.partial-*")) == []
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == [built.digest]


@pytest.mark.integration
def test_image_build_json_reports_the_reused_image(guest_image: GuestImage) -> None:
    _skip_if_edited(guest_image)
    done = subprocess.run(
        _nex("image", "build", "--json", "--state-dir", str(image_cache())),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["reused"] is True
    assert shown["digest"] == guest_image.digest
    assert shown["kernel_path"] == str(guest_image.kernel)
    assert shown["initrd_path"] == str(guest_image.initrd)
    assert shown["rootfs_path"] == str(guest_image.rootfs)
    assert shown["kernel"]["package"].startswith("linux-image-")


@pytest.mark.integration
def test_image_build_on_an_unusable_state_dir_says_so_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    done = subprocess.run(
        _nex("image", "build", "--state-dir", str(tmp_path / "file" / "state")),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    assert "Not a directory" in lines[0] or "needs root" in lines[0] or "apt" in lines[0]


# --- booting it ---------------------------------------------------------------------------------------


def _boot(image: GuestImage, words: str) -> tuple[str, int | None]:
    """Boot the image in a TCG microvm with extra kernel command-line ``words``: its console, and
    qemu's exit code (None if it had not ended by the deadline; it is killed then)."""
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    assert image.initrd is not None
    append = f"console=ttyS0 quiet panic=-1 tsc_early_khz={tcg_tsc_khz()} {words}"
    argv = [QEMU, "-M", "microvm", "-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1", "-nographic"]
    argv += ["-no-reboot", "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append]
    argv += ["-drive", f"id=root,file={image.rootfs},format=raw,if=none,readonly=on"]
    argv += ["-device", "virtio-blk-device,drive=root"]
    deadline = time.monotonic() + BOOT_DEADLINE
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    try:
        console = "\n".join(_lines(proc.stdout.fileno(), deadline))  # until qemu ends (EOF) or the deadline
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.1, deadline - time.monotonic()))
        return console, proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


@pytest.mark.integration
def test_the_probe_boots_and_powers_off(guest_image: GuestImage) -> None:
    console, code = _boot(guest_image, "nex.probe=1")
    assert "nex-probe-ok" in console.splitlines(), console
    assert code == 0, console
    assert "nex-init:" not in console


@pytest.mark.integration
def test_stage1_hands_over_to_the_guests_python(guest_image: GuestImage) -> None:
    console, code = _boot(guest_image, "nex.check=1 nex.rw_mib=64")
    assert "nex-python-ok" in console.splitlines(), console
    assert code == 0, console
    assert "nex-init:" not in console


@pytest.mark.integration
def test_stage1_failure_is_one_line_and_ends_the_vm(guest_image: GuestImage) -> None:
    console, code = _boot(guest_image, "nex.rw_mib=lots")
    assert "nex-init: bad nex.rw_mib: lots" in console.splitlines(), console
    assert code == 0, console


@pytest.mark.integration
def test_image_ls_lists_the_sessions_image(guest_image: GuestImage) -> None:
    done = subprocess.run(
        _nex("image", "ls", "--json", "--state-dir", str(image_cache())),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert guest_image.digest in [shown["digest"] for shown in json.loads(done.stdout)]
