"""``nex preflight``: whether a node with this config can start on this host, and what to do if not.

Every check is tried for real where that can be done without harm: a user namespace in a child, a
network namespace and a tap made and deleted, the node's whole fence sent to the kernel, a guest
booted. Each :class:`Check` is **required** (it stops the node, or leaves it unable to run anything)
or **advisory** (the node runs, with less), and says how to get what is missing.

Throwaway objects are named ``nxpf…``:

- the network namespace (and its veth's host end) ``nxpf<pid><rand>``, deleted in a ``finally``; one
  left by a preflight that was killed outright is deleted by the next preflight (its pid is dead);
- the nftables table (a random ``nx…`` name, :func:`nex.net.fence.trial`) is created, filled with the
  fence's chains and rules and deleted again **in one batch**: there is no moment at which another
  process sees it, and nothing to leave behind whatever happens to this process;
- probe VMs are QEMU processes tied to this process's life (:mod:`nex.vm.kvm`), killed and reaped
  however the probe ends.

``nex up`` runs :func:`run_checks` with ``startup=True`` for a VM driver: only the required checks
the node would not find out early by itself (binaries, guest files, tun and tc, KVM where it is
required); the all-driver checks are the node's own start-up (it probes the sandbox and installs the
fence as it starts), and the process driver gets no extra check at all.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from nex import linux
from nex.config import NodeConfig
from nex.net import netns
from nex.sandbox import cgroups, support
from nex.vm import kvm

PREFIX = "nxpf"
QEMU_FIX = "apt-get install qemu-system-x86 (or dnf install qemu-system-x86-core), or set qemu_path"
FIRECRACKER_FIX = (
    "download a release from https://github.com/firecracker-microvm/firecracker/releases and put "
    "firecracker (and jailer) in /usr/local/bin, or set firecracker_path"
)
KVM_FIX = (
    "run on a host with hardware virtualization (bare metal, or a VM with nested virtualization on): "
    "modprobe kvm_intel or kvm_amd, and give the node /dev/kvm (root or the kvm group)"
)
IMAGE_FIX = "nex image build, then set kernel_path, rootfs_path (and initrd_path) to its files, or leave all unset"
ROOT_FIX = "run the node as root (sudo nex up)"
KVM_PROBE_TIMEOUT = 8.0  # a real KVM boots the probe in about a second
TCG_PROBE_TIMEOUT = 60.0
INITRD_BESIDE = "initrd.img"  # as nex.vm.qemu.boot: an initramfs beside the kernel is used when initrd_path is ""

_INITRD_MAGICS = {
    b"070701": "cpio",
    b"070702": "cpio",
    b"\x1f\x8b": "gzip",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\xfd7zXZ": "xz",
    b"\x02\x21\x4c\x18": "lz4",
    b"BZh": "bzip2",
    b"\x5d\x00\x00": "lzma",
}


@dataclass(frozen=True)
class Check:
    """One check's result. ``required``: a failure stops the node (``fatal``); else it is advisory."""

    name: str
    ok: bool
    required: bool
    detail: str
    fix: str = ""
    skipped: bool = False

    @property
    def fatal(self) -> bool:
        return self.required and not self.ok

    @property
    def mark(self) -> str:
        """✓ passed, ✗ fatal, ! advisory (failed, or skipped)."""
        return "✓" if self.ok else "✗" if self.required else "!"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "required": self.required,
            "fatal": self.fatal,
            "skipped": self.skipped,
            "detail": self.detail,
            "fix": self.fix,
        }


@dataclass(frozen=True)
class Report:
    driver: str
    checks: tuple[Check, ...]

    @property
    def fatal(self) -> list[Check]:
        """The checks that stop a node with this config."""
        return [c for c in self.checks if c.fatal]

    @property
    def could_start(self) -> bool:
        return not self.fatal

    def as_dict(self) -> dict[str, Any]:
        return {
            "driver": self.driver,
            "could_start": self.could_start,
            "fatal": [c.name for c in self.fatal],
            "checks": [c.as_dict() for c in self.checks],
        }

    def refusal(self) -> str:
        """One message naming every missing requirement and how to get it (for ``nex up``)."""
        lines = [f"the {self.driver} driver cannot work on this host (nex preflight says more):"]
        for check in self.fatal:
            fix = f" (fix: {check.fix})" if check.fix else ""
            lines.append(f"  - {check.name}: {check.detail}{fix}")
        return "\n".join(lines)


def guest_files(config: NodeConfig) -> tuple[Path | None, Path | None, Path | None]:
    """(kernel, rootfs, initrd) as the config names them (None: not set). The initramfs is
    ``initrd_path``, else ``initrd.img`` beside the kernel when there is one, as the VM drivers read it."""
    kernel = Path(config.kernel_filepath) if config.kernel_filepath else None
    rootfs = Path(config.rootfs_filepath) if config.rootfs_filepath else None
    initrd: Path | None = None
    if config.initrd_path:
        initrd = Path(config.initrd_path)
    elif kernel is not None and (kernel.parent / INITRD_BESIDE).exists():
        initrd = kernel.parent / INITRD_BESIDE
    return kernel, rootfs, initrd


async def run_checks(
    config: NodeConfig,
    driver: str,
    *,
    kernel: Path | None,
    rootfs: Path | None,
    initrd: Path | None,
    boot: bool = False,
    startup: bool = False,
) -> Report:
    """Check this host for a node with ``config`` and ``driver`` (``process``, ``qemu`` or
    ``firecracker``). ``boot``: also boot the guest under TCG (slow). ``startup``: only what ``nex
    up`` checks before it starts anything (see the module's docstring). Blocking probes run in worker
    threads; call it from a process that has no other threads yet (the user-namespace probe forks).
    """
    if driver not in ("process", "qemu", "firecracker"):
        raise ValueError(f"no driver {driver!r} (process, qemu or firecracker)")
    vm = driver != "process"
    if startup and not vm:
        return Report(driver, ())
    plan = _Plan(config, driver, kernel, rootfs, initrd, boot=boot, startup=startup)
    return await plan.run()


class _Plan:
    def __init__(
        self,
        config: NodeConfig,
        driver: str,
        kernel: Path | None,
        rootfs: Path | None,
        initrd: Path | None,
        *,
        boot: bool,
        startup: bool,
    ) -> None:
        self.config = config
        self.driver = driver
        self.vm = driver != "process"
        self.kernel, self.rootfs, self.initrd = kernel, rootfs, initrd
        self.boot = boot
        self.startup = startup
        self.sandboxed = not config.no_sandbox
        self.privileged = support.privileged()
        self.namespaced = netns.has_capabilities()
        self.results: dict[str, list[Check]] = {}

    async def run(self) -> Report:
        order: list[str] = []
        jobs: list[tuple[str, Callable[[], Awaitable[list[Check]]]]] = []

        def add(key: str, job: Callable[[], Awaitable[list[Check]]]) -> None:
            order.append(key)
            jobs.append((key, job))

        if not self.startup:
            self.results["root"] = [self._root()]
            order.append("root")
            # first, before any thread: it forks
            self.results["userns"] = [self._user_namespaces()]
            add("cgroups", self._cgroups)
            add("seccomp", self._seccomp)
            order.append("userns")
            add("nftables", self._nftables)
        if not self.startup or self.vm:
            add("network", self._network)
        if self.driver == "qemu":
            add("qemu", self._qemu)
        if self.driver == "firecracker":
            add("firecracker", self._firecracker)
        if self.vm:
            add("files", self._files)
            add("kvm", self._kvm)
        if self.driver == "qemu" and not self.startup:
            add("boot", self._boot)

        # pyroute2's modules import each other in cycles: imported by several worker threads at once,
        # one of them can see another's half-initialised module. Imported once here, first.
        await trio.to_thread.run_sync(_import_netlink)
        async with trio.open_nursery() as nursery:
            for key, job in jobs:
                nursery.start_soon(self._collect, key, job)
        return Report(self.driver, tuple(check for key in order for check in self.results.get(key, [])))

    async def _collect(self, key: str, job: Callable[[], Awaitable[list[Check]]]) -> None:
        self.results[key] = await job()

    # -- every driver ----------------------------------------------------------------------------------

    def _root(self) -> Check:
        if self.privileged:
            return Check("root", True, False, "root, with the capabilities a jail is built with")
        who = f"euid {os.geteuid()}" if os.geteuid() != 0 else "root without CAP_SETUID/CAP_SETGID/CAP_SYS_ADMIN"
        if self.vm:
            detail = f"not root ({who}): VMs need a network namespace and a tap each"
        else:
            detail = (
                f"not root ({who}): machines share the host's loopback (no network namespace, no fence), "
                "get no cgroup limits and no /proc"
            )
        return Check("root", False, self.vm, detail, ROOT_FIX)

    def _user_namespaces(self) -> Check:
        name = "user namespaces"
        if not self.sandboxed or not self.config.sandbox.user_namespace:
            return Check(name, True, False, "off in the config", skipped=True)
        uid = self.config.sandbox.uid_base if self.privileged else None
        reason = support.user_namespaces(uid)
        if reason is None:
            return Check(name, True, False, "a child made one and mapped its uid")
        return Check(
            name,
            False,
            False,
            f"{reason}: workloads run as a plain unprivileged uid instead",
            "sysctl -w user.max_user_namespaces=15000 kernel.unprivileged_userns_clone=1",
        )

    async def _cgroups(self) -> list[Check]:
        name = "cgroups"
        if not self.sandboxed or not self.config.sandbox.cgroups:
            return [Check(name, True, False, "off in the config", skipped=True)]
        if not self.privileged:
            return [Check(name, False, False, "the node is not root: machines run without limits", ROOT_FIX)]
        try:
            hierarchy = await trio.to_thread.run_sync(cgroups.Hierarchy.detect)
        except cgroups.CgroupError as exc:
            fix = "mount the memory, cpu and pids controllers writable (cgroup v2, or v1), or set sandbox.cgroups=false"
            return [Check(name, False, True, str(exc), fix)]
        parent = self.config.sandbox.cgroup_parent or "the root"
        where = ", ".join(sorted({str(p) for _, p in hierarchy.mounts}))
        return [Check(name, True, False, f"{hierarchy.describe()}; machines under {parent} of {where}")]

    async def _seccomp(self) -> list[Check]:
        name = "seccomp"
        if not self.sandboxed or not self.config.sandbox.seccomp:
            return [Check(name, True, False, "off in the config", skipped=True)]
        reason = await trio.to_thread.run_sync(support.seccomp_filter)
        if reason is None:
            return [Check(name, True, False, "libseccomp loaded and compiled the workload filter")]
        # the process driver refuses every deploy without it; in a VM the guest kernel is the boundary
        required = not self.vm
        detail = f"{reason}: " + ("every deploy would be refused" if required else "the VM's jail has no filter")
        return [Check(name, False, required, detail, "apt-get install libseccomp2, or set sandbox.seccomp=false")]

    async def _nftables(self) -> list[Check]:
        name = "nftables"
        if not self.sandboxed or not self.config.sandbox.fence:
            return [Check(name, True, False, "the fence is off in the config", skipped=True)]
        if not self.namespaced:
            return [
                Check(name, False, self.vm, "no CAP_NET_ADMIN: no fence (machines share the host's loopback)", ROOT_FIX)
            ]
        reason = await trio.to_thread.run_sync(_try_fence, self.config)
        if reason is None:
            return [
                Check(
                    name,
                    True,
                    False,
                    "the kernel took the node's fence (a throwaway table, made and deleted in one batch)",
                )
            ]
        fix = "a kernel with nf_tables (CONFIG_NF_TABLES, nft_reject, nft_ct), or set sandbox.fence=false"
        return [Check(name, False, True, f"the node's fence was refused: {reason}", fix)]

    async def _network(self) -> list[Check]:
        names = ["network namespaces"] + (["/dev/net/tun", "tc redirect"] if self.vm else [])
        if not self.namespaced:
            detail = "no CAP_NET_ADMIN and CAP_SYS_ADMIN: " + (
                "VMs cannot get their network" if self.vm else "machines share the host's loopback network"
            )
            return [Check(name, False, self.vm, detail, ROOT_FIX) for name in names]
        found = await trio.to_thread.run_sync(_try_network, self.vm)
        checks = []
        for name in names:
            reason = found.get(name, "not tried: no namespace to try it in")
            if reason is None:
                checks.append(Check(name, True, False, _NETWORK_OK[name]))
            else:
                checks.append(Check(name, False, True, reason, _NETWORK_FIX[name]))
        return checks

    # -- VM drivers ------------------------------------------------------------------------------------

    async def _qemu(self) -> list[Check]:
        qemu = shutil.which(self.config.qemu_path)
        if qemu is None:
            return [
                Check("qemu", False, True, f"{self.config.qemu_path} not found on PATH", QEMU_FIX),
                Check("qemu microvm", False, True, "no QEMU to ask", QEMU_FIX),
            ]
        version = await _first_line([qemu, "--version"])
        machines = await _output([qemu, "-machine", "help"])
        checks = [Check("qemu", True, False, f"{qemu}: {version}")]
        if any(line.split()[:1] == ["microvm"] for line in machines.splitlines()):
            checks.append(Check("qemu microvm", True, False, "-M microvm is listed by -machine help"))
        else:
            checks.append(
                Check("qemu microvm", False, True, f"{qemu} has no microvm machine (QEMU 4.2 or later)", QEMU_FIX)
            )
        return checks

    async def _firecracker(self) -> list[Check]:
        checks = []
        wanted = [("firecracker", self.config.firecracker_path, "firecracker_path")]
        if self.config.jailer_path:
            wanted.append(("jailer", self.config.jailer_path, "jailer_path"))
        for name, program, key in wanted:
            found = shutil.which(program)
            if found is None:
                detail = f"{program} not found on PATH (the {key} setting); no Debian package ships it"
                checks.append(Check(name, False, True, detail, FIRECRACKER_FIX))
            else:
                checks.append(Check(name, True, False, f"{found}: {await _first_line([found, '--version'])}"))
        return checks

    async def _files(self) -> list[Check]:
        if self.kernel is None and self.rootfs is None:
            detail = (
                "kernel_path and rootfs_path are not set: the node uses its cached guest image (built on first start)"
            )
            return [Check("guest image", True, False, detail, "nex image build (ahead of time)")]
        checks = []
        for key, path, kind in (("kernel_path", self.kernel, "kernel"), ("rootfs_path", self.rootfs, "rootfs")):
            if path is None:
                detail = f"{key} is not set: a VM needs both kernel_path and rootfs_path (or neither)"
                checks.append(Check(kind, False, True, detail, IMAGE_FIX))
            else:
                checks.append(await trio.to_thread.run_sync(_file_check, kind, key, path, self.driver))
        if self.initrd is not None:
            checks.append(await trio.to_thread.run_sync(_file_check, "initrd", "initrd_path", self.initrd, self.driver))
        return checks

    async def _kvm(self) -> list[Check]:
        name = "kvm"
        accel = self.config.vm_accel
        required = self.driver == "firecracker" or accel == "kvm"
        if self.driver == "qemu" and accel == "tcg":
            return [Check(name, True, False, "vm_accel is tcg: KVM is not used", skipped=True)]
        if self.startup and not required:
            return []  # the QEMU driver probes it itself as it starts (vm_accel auto)
        fallback = "QEMU will use TCG: it works, but boots are several times slower"
        advice = "" if required else f"; {fallback}"
        reason = await trio.to_thread.run_sync(kvm.kvm_api_usable)
        if reason is not None:
            return [Check(name, False, required, reason + advice, KVM_FIX)]
        qemu = shutil.which(self.config.qemu_path)
        kernel, initrd = self._probe_kernel()
        if qemu is None or kernel is None:
            what = "no QEMU" if qemu is None else "no kernel"
            detail = f"/dev/kvm answers (API 12) but was not tried on a guest ({what} to boot one)"
            return [Check(name, True, required, detail)]
        ok, why = await kvm.kvm_runs_guest(qemu, kernel, initrd, KVM_PROBE_TIMEOUT)
        if ok:
            return [Check(name, True, required, f"KVM ran {kernel.name}: {why}")]
        return [Check(name, False, required, f"/dev/kvm opens but cannot run a Linux guest: {why}{advice}", KVM_FIX)]

    def _probe_kernel(self) -> tuple[Path | None, Path | None]:
        """A kernel (and initramfs) QEMU can boot to try KVM: the configured one, else the host's newest
        /boot/vmlinuz-* without an initramfs (it runs up to its panic for want of a root)."""
        if self.kernel is not None and _kernel_kind(self.kernel) == "bzImage":
            return self.kernel, self.initrd
        found = sorted(Path("/boot").glob("vmlinuz-*"), key=lambda p: p.stat().st_mtime)
        readable = [p for p in found if os.access(p, os.R_OK)]
        return (readable[-1], None) if readable else (None, None)

    async def _boot(self) -> list[Check]:
        name = "boot"
        if not self.boot:
            detail = "skipped: give --boot to boot the guest under TCG (takes 5-60 s)"
            return [Check(name, False, False, detail, "nex preflight --boot", skipped=True)]
        qemu = shutil.which(self.config.qemu_path)
        if qemu is None:
            return [Check(name, False, True, "no QEMU to boot with", QEMU_FIX)]
        if self.kernel is None:
            return [Check(name, False, False, "no kernel_path to boot (the cached guest image is not tried)")]
        if self.initrd is None:
            detail = "no initramfs (initrd_path, or initrd.img beside the kernel): nothing prints nex-probe-ok"
            return [Check(name, False, True, detail, IMAGE_FIX)]
        ok, why = await kvm.probe_boot(qemu, self.kernel, self.initrd, accel="tcg", timeout=TCG_PROBE_TIMEOUT)
        if ok:
            return [Check(name, True, False, why)]
        return [Check(name, False, True, f"the guest did not boot: {why}", IMAGE_FIX)]


_NETWORK_OK = {
    "network namespaces": "made and deleted one (nxpf…) with a veth, as each machine gets",
    "/dev/net/tun": "made a tap in a throwaway namespace",
    "tc redirect": "ingress qdisc and u32 + mirred redirect between a veth and a tap",
}
_NETWORK_FIX = {
    "network namespaces": "run the node as root, with /run/netns writable and CONFIG_NET_NS, CONFIG_VETH",
    "/dev/net/tun": "modprobe tun (CONFIG_TUN), and give the node /dev/net/tun (mknod /dev/net/tun c 10 200)",
    "tc redirect": "a kernel with CONFIG_NET_SCH_INGRESS, CONFIG_NET_CLS_U32 and CONFIG_NET_ACT_MIRRED (modprobe "
    "sch_ingress cls_u32 act_mirred)",
}


# -- blocking probes (worker threads) -----------------------------------------------------------------


def _import_netlink() -> None:
    from pyroute2 import IPRoute  # noqa: F401  (nex.net.tap's)

    from nex.net import fence, rtnl  # noqa: F401  (pyroute2's netlink and nftables modules)


def _try_fence(config: NodeConfig) -> str | None:
    """The node's fence, tried under a throwaway name (:func:`nex.net.fence.trial`: made, filled and
    deleted in one batch). None when the kernel took it all."""
    from nex.net import fence

    try:
        plan = fence.FencePlan(
            table="nx" + secrets.token_hex(5),  # random: an existing table of the name is refused, not touched
            group=1 + secrets.randbelow(fence.MAX_GROUP - 1),
            gateway=config.internal_host(),
            port=config.internal_node_port or 9222,
            subnet=config.cni.subnet,
            openings=tuple(fence.Opening(cidr=o.cidr, port=o.port, protocol=o.protocol) for o in config.sandbox.allow),
            masquerade=config.sandbox.masquerade,
        )
    except ValueError as exc:
        return f"the fence's plan is invalid: {exc}"
    return fence.trial(plan)


def _try_network(vm: bool) -> dict[str, str | None]:
    """Make a throwaway machine network (namespace + veth) and, for VMs, a tap and the tc redirects in
    it; delete it all. None for what worked, else why not. Sweeps what killed preflights left first."""
    _sweep()
    name = f"{PREFIX}{os.getpid():07x}{secrets.token_hex(1)}"
    a, b = secrets.randbelow(256), secrets.randbelow(63) * 4
    network = netns.MachineNetwork(
        netns=name,
        host_link=f"{name}h",
        guest_link="veth0",
        address=f"198.19.{a}.{b + 2}",  # 198.18.0.0/15: benchmarking, never routed
        prefixlen=32,
        gateway=f"198.19.{a}.{b + 1}",
    )
    found: dict[str, str | None] = {}
    try:
        try:
            netns.create(network)
        except OSError as exc:
            found["network namespaces"] = str(exc)
            return found
        found["network namespaces"] = None
        if vm:
            found["/dev/net/tun"] = _try_tun(network.netns_path)
            if found["/dev/net/tun"] is None:
                found["tc redirect"] = _try_tc(network.netns_path, network.guest_link)
    finally:
        try:
            netns.delete(network.netns, network.host_link)
        except OSError as exc:
            found["network namespaces"] = f"could not delete the throwaway namespace {name}: {exc}"
        left = set(netns.namespaces(name)) | set(netns.links(name))
        if left and found.get("network namespaces") is None:
            found["network namespaces"] = f"the throwaway namespace's objects outlived their deletion: {sorted(left)}"
    return found


def _try_tun(netns_path: Path) -> str | None:
    from nex.net import tap

    def attempt() -> None:
        os.close(tap.open_tap(f"{PREFIX}t0"))  # not persistent: gone with its descriptor

    try:
        _inside(netns_path, attempt)
    except OSError as exc:
        return f"cannot make a tap with {tap.TUN}: {exc.strerror or exc}"
    return None


def _try_tc(netns_path: Path, veth: str) -> str | None:
    from nex.net import tap

    try:
        tap.add_redirected_tap(netns_path, veth, f"{PREFIX}t1")  # dies with the namespace
    except Exception as exc:  # pyroute2 raises its NetlinkError (an OSError) or others of its own
        return f"tc refused the ingress redirect between a veth and a tap: {exc}"
    return None


def _inside(netns_path: Path, work: Callable[[], None]) -> None:
    """Run ``work`` in the namespace at ``netns_path`` (this thread moves there and back)."""
    host = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        netns.enter(netns_path)
        try:
            work()
        finally:
            linux.setns(host, linux.CLONE_NEWNET, "return to the host netns")
    finally:
        os.close(host)


def _sweep() -> None:
    """Delete the throwaway namespaces (and veth ends) of preflights that were killed: their pid is dead."""
    names = set(netns.namespaces(PREFIX)) | {n.removesuffix("h") for n in netns.links(PREFIX) if n.endswith("h")}
    for name in names:
        try:
            pid = int(name[len(PREFIX) : len(PREFIX) + 7], 16)
        except ValueError:
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        with contextlib.suppress(OSError):
            netns.delete(name, f"{name}h")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kernel_kind(path: Path) -> str | None:
    """``bzImage`` (``HdrS`` at 0x202), ``vmlinux`` (an ELF file), or None."""
    try:
        with path.open("rb") as f:
            head = f.read(0x206)
    except OSError:
        return None
    if head[:4] == b"\x7fELF":
        return "vmlinux"
    if head[0x202:0x206] == b"HdrS":
        return "bzImage"
    return None


def _file_check(kind: str, key: str, path: Path, driver: str) -> Check:
    """The configured guest file ``path`` (config key ``key``): there, readable, of the right format."""
    try:
        with path.open("rb") as f:
            head = f.read(2048)
    except FileNotFoundError:
        return Check(kind, False, True, f"{key} {path} does not exist", IMAGE_FIX)
    except IsADirectoryError:
        return Check(kind, False, True, f"{key} {path} is a directory, not a file", IMAGE_FIX)
    except OSError as exc:
        return Check(kind, False, True, f"{key} {path} cannot be read: {exc.strerror}", IMAGE_FIX)
    if kind == "kernel":
        found = _kernel_kind(path)
        if found is None:
            detail = f"{key} {path} is not a kernel (neither a bzImage, HdrS at 0x202, nor an ELF vmlinux)"
            return Check(kind, False, True, detail, IMAGE_FIX)
        if driver == "firecracker" and found != "vmlinux":
            detail = f"{key} {path} is a bzImage: firecracker boots an uncompressed ELF vmlinux"
            return Check(kind, False, True, detail, "extract it with the kernel's scripts/extract-vmlinux")
        return Check(kind, True, False, f"{path}: {found}")
    if kind == "rootfs":
        if head[1080:1082] != b"\x53\xef":
            detail = f"{key} {path} is not an ext4 filesystem (no superblock magic 0xEF53 at offset 1080)"
            return Check(kind, False, True, detail, IMAGE_FIX)
        return Check(kind, True, False, f"{path}: ext4")
    fmt = next((name for magic, name in _INITRD_MAGICS.items() if head.startswith(magic)), None)
    if fmt is None:
        detail = f"{key} {path} is not an initramfs (a cpio archive, plain or compressed)"
        return Check(kind, False, True, detail, IMAGE_FIX)
    return Check(kind, True, False, f"{path}: {fmt}")


async def _output(argv: list[str]) -> str:
    """``argv``'s stdout (and stderr), or the reason it could not run; within 10 s."""

    def run() -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return str(exc)
        return done.stdout + done.stderr

    return await trio.to_thread.run_sync(run)


async def _first_line(argv: list[str]) -> str:
    return next((line.strip() for line in (await _output(argv)).splitlines() if line.strip()), "no version")
