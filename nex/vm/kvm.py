"""Whether this host's KVM can run a Linux guest, and a probe boot that finds out for real.

Opening ``/dev/kvm`` and asking its API version proves little: a nested or paravirtual KVM (such as
``kvm_pvm``) may answer every ioctl and still stop a real kernel early ("KVM internal error.
Suberror: 1", a QEMU assertion on an MSR, or a guest that never gets anywhere). So the answer that
counts is a probe boot: the kernel (and the initramfs, whose stage-1 init prints :data:`PROBE_OK` and
powers off when its command line has :data:`PROBE_ARG`) under ``qemu -M microvm`` within a deadline.
Without an initramfs, a kernel that gets as far as its panic about the missing root filesystem has run
too. The same probe under TCG tells whether a kernel and initramfs boot at all (slow: tens of seconds).

Nothing here knows of the CLI: the QEMU driver uses it to pick its accelerator, ``nex preflight`` to
report. The probe's QEMU is started through :func:`nex.proc.spawn` (it dies with this process, even
on SIGKILL) and is killed and reaped however the probe ends, cancellation included.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Literal

import trio

from nex import proc

KVM = "/dev/kvm"
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_API_VERSION = 12  # stable since Linux 2.6.22
PROBE_ARG = "nex.probe=1"
PROBE_OK = "nex-probe-ok"
DEFAULT_TSC_KHZ = 2_000_000
_PANIC = "Kernel panic - not syncing"
_KVM_FAILURES = ("KVM internal error", "kvm_buf_set_msrs", "failed to set MSR", "KVM_RUN failed", "kvm run failed")
_OUTPUT_KEPT = 64 << 10  # the tail of the console kept for the reason of a failure

Accel = Literal["kvm", "tcg"]


def kvm_api_usable(path: str = KVM) -> str | None:
    """None when ``/dev/kvm`` opens read-write, speaks API version 12 and makes a VM; else why not.

    This is necessary, not sufficient: see :func:`kvm_runs_guest`.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"{path} does not exist (no KVM: kvm_intel or kvm_amd is not loaded, or the CPU has no virtualization)"
    except PermissionError:
        return f"{path}: permission denied (add the node's user to the kvm group, or run as root)"
    except OSError as exc:
        return f"cannot open {path}: {exc.strerror}"
    try:
        try:
            version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
        except OSError as exc:
            return f"KVM_GET_API_VERSION on {path} failed: {exc.strerror}"
        if version != KVM_API_VERSION:
            return f"{path} speaks KVM API version {version}, not {KVM_API_VERSION}"
        try:
            vm = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        except OSError as exc:
            return f"KVM_CREATE_VM on {path} failed: {exc.strerror}"
        os.close(vm)
        return None
    finally:
        os.close(fd)


def tcg_tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int:
    """The host CPU's clock in kHz, from the first ``cpu MHz`` of ``/proc/cpuinfo`` (default 2 GHz).

    A microvm guest under TCG has no HPET nor PM timer to calibrate its TSC against: give it this as
    ``tsc_early_khz=`` or about half its boots hang.
    """
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return DEFAULT_TSC_KHZ
    found = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.MULTILINE)
    if found is None:
        return DEFAULT_TSC_KHZ
    khz = int(float(found.group(1)) * 1000)
    return khz if khz > 0 else DEFAULT_TSC_KHZ


def probe_command(
    qemu: str, kernel: Path, initrd: Path | None, *, accel: Accel, rootfs: Path | None = None, memory_mib: int = 128
) -> list[str]:
    """The QEMU command line of a probe boot: microvm, serial console on stdout, no reboot."""
    append = ["console=ttyS0", "panic=-1", PROBE_ARG]
    if accel == "tcg":
        append.append(f"tsc_early_khz={tcg_tsc_khz()}")
    argv = [qemu, "-M", "microvm", "-accel", accel, "-cpu", "host" if accel == "kvm" else "max"]
    argv += ["-m", str(memory_mib), "-smp", "1", "-nographic", "-no-reboot", "-kernel", str(kernel)]
    if initrd is not None:
        argv += ["-initrd", str(initrd)]
    if rootfs is not None:
        argv += ["-drive", f"id=root,file={rootfs},format=raw,if=none,readonly=on"]
        argv += ["-device", "virtio-blk-device,drive=root"]
    return [*argv, "-append", " ".join(append)]


async def probe_boot(
    qemu: str,
    kernel: Path,
    initrd: Path | None,
    *,
    accel: Accel,
    timeout: float,
    rootfs: Path | None = None,
) -> tuple[bool, str]:
    """Boot ``kernel`` (and ``initrd``) under ``accel`` with :data:`PROBE_ARG`; (whether it ran, what
    was seen). With an initramfs, success is its :data:`PROBE_OK`; without one, the kernel's panic for
    want of a root filesystem (it got that far). QEMU is killed as soon as the answer is known, and
    however this ends.
    """
    argv = probe_command(qemu, kernel, initrd, accel=accel, rootfs=rootfs)
    started = trio.current_time()
    try:
        child = proc.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as exc:
        return False, f"cannot run {qemu}: {exc.strerror}"
    assert child.stdout is not None
    output = ""
    verdict: tuple[bool, str] | None = None
    stream = trio.lowlevel.FdStream(os.dup(child.stdout))
    try:
        with trio.move_on_after(timeout):
            while verdict is None:
                chunk = await stream.receive_some(65536)
                if chunk:
                    output = (output + chunk.decode(errors="replace"))[-_OUTPUT_KEPT:]
                verdict = _judge(output, initrd is not None, ended=not chunk)
        elapsed = trio.current_time() - started
        if verdict is None:
            seen = _last_line(output)
            return False, f"no answer from the guest within {timeout:g} s ({accel}){f'; last: {seen}' if seen else ''}"
        ok, why = verdict
        return ok, f"{why} after {elapsed:.1f} s ({accel})" if ok else f"{why} ({accel})"
    finally:
        with trio.CancelScope(shield=True):
            child.signal(signal.SIGKILL)
            await child.wait()
            await stream.aclose()


def _judge(output: str, with_initrd: bool, *, ended: bool) -> tuple[bool, str] | None:
    """The probe's answer from the console so far; None while it is still unknown."""
    if PROBE_OK in output:
        return True, f"the guest printed {PROBE_OK}"
    for line in output.splitlines():  # the first sign of failure, in the order it came
        if any(failure in line for failure in _KVM_FAILURES):
            return False, line.strip()[:300]
    if not with_initrd and _PANIC in output:
        return True, "the kernel ran up to its panic for want of a root filesystem"
    if ended:
        seen = _last_line(output)
        return False, f"QEMU exited before the guest printed {PROBE_OK}{f': {seen}' if seen else ''}"
    return None


def _last_line(output: str) -> str:
    """The most telling line of the console: QEMU's own last complaint, else the last line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    complaints = [ln for ln in lines if ln.startswith(("qemu-system", "nex-init:")) or "error" in ln.lower()]
    return (complaints or lines or [""])[-1][:300]


async def kvm_runs_guest(qemu: str, kernel: Path, initrd: Path | None, timeout: float) -> tuple[bool, str]:
    """Whether KVM runs this Linux guest here: the API first (:func:`kvm_api_usable`), then a probe
    boot with ``-accel kvm`` within ``timeout`` seconds (a second or two on a host with real KVM)."""
    reason = await trio.to_thread.run_sync(kvm_api_usable)
    if reason is not None:
        return False, reason
    return await probe_boot(qemu, kernel, initrd, accel="kvm", timeout=timeout)
