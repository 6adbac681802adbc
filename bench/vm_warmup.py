"""Warm-up of a pool of QEMU microvms: cold boots, snapshot clones, a pool of 8, memory per VM.

A node whose config names a kernel and a root filesystem runs each machine as a ``-M microvm`` VM
(TCG where KVM cannot run a guest, as on this project's hosts). It boots one template VM per guest
image, saves it (QMP ``migrate`` to a file) and restores every pool member as a clone of it. This
measures, in one run, on the guest image the tests use (built once into ``~/.cache/nex-tests``, or
``$NEX_TEST_IMAGE_CACHE``):

1. the limits: qemu booting the bare stage-1 initramfs to its marker (``nex.probe=1``: it prints
   ``nex-probe-ok`` and powers off), the floor of any cold boot; ``qemu -incoming`` restoring the
   node's own snapshot up to QMP ``cont``, the floor of a clone, and the same plus the guest taking an
   identity (no network peer, no NATS), the guest's share; ``python -c pass`` on the host, for scale;
2. cold boot to handshake: a node with ``vm_snapshots: false`` and a pool of 1, its VM's qemu killed
   for a replacement, COLD_ROUNDS boots in all; each from the qemu process's start (its start time
   in ``/proc``) to the node's "Adding new VM to warm pool" line;
3. snapshot clone to handshake: the same from qemu's start, for clones started one at a time (a
   member's qemu killed once the pool's VMs are quiet: a clone keeps working for seconds after its
   handshake) and for the clones of each pool fill (8 restored at once); split into restore (qemu's
   start to the node's "Machine started", logged once the restored VM runs and has its identity) and
   the guest's part (identity to handshake, of which the guest's own "took the identity … in N ms"
   from the machine's console), with the CPU time qemu used by its handshake (what a clone costs
   whatever else the host runs); the template's boot and save times as the node logs them, and the
   cores a ready pool's qemu processes use in the seconds after ready;
4. a pool of 8 ready: from starting ``nex up`` to "Warm pool ready" on a fresh state directory (the
   template is booted and saved) and again on the same directory (the snapshot is there), REPEATS
   times each; against the targets: ready within the template's boot + 4 s, a clone ready within 1 s
   of its qemu's start (p50 of the one-at-a-time clones);
5. memory per VM: RSS (``VmRSS``) and PSS (``smaps_rollup``) of each qemu at ready, cloned and cold;
6. the process driver's pool of 8 (no kernel in the config), from ``nex up`` to "Warm pool ready".

Every node runs on a CNI network, subnet and uid range of its own. Every node is stopped (SIGTERM, then
SIGKILL after STOP_TIMEOUT) however the run ends, and then any qemu still mentioning its state
directory is killed and reported. ``--quick`` takes fewer rounds. Prints a table per section and
writes ``bench/results/vm_warmup.json``. Needs root (a namespace and a tap per VM) and qemu.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import trio
from common import NodeProcess, echo_server, percentile
from deploy_throughput import forget_network, leftovers
from rich.console import Console
from rich.table import Table

from nex.api import agent as agent_api
from nex.config import NodeConfig
from nex.net import netns
from nex.vm import kvm
from nex.vm.image import GuestImage, ImageError, build_image
from nex.vm.qemu.command import VmSpec
from nex.vm.qemu.vm import QemuVm, VmFailed, launch

NETWORK = "nexbench-vmwarm"
SUBNET = "10.231.5.0/24"
NETWORK_CONFIG = {"cni": {"network_name": NETWORK, "subnet": SUBNET}, "sandbox": {"uid_base": 0x7105_0000}}
POOL = 8
TARGETS = {"pool_8_ready_beyond_template_boot_s": 4.0, "clone_to_handshake_p50_s": 1.0}
STOP_TIMEOUT = 30.0
READY_TIMEOUT = 180.0  # a template boot under TCG on a busy 2-core host, then 8 clones
COLD_TIMEOUT = 120.0
CLONE_TIMEOUT = 60.0
AFTER_READY = 5  # seconds (one sample each) of a ready pool's qemu processes' CPU use
SETTLED_CORES = 0.4  # before each one-at-a-time clone: the pool's qemu processes use less CPU than this
SETTLE_TIMEOUT = 15.0
HZ = os.sysconf("SC_CLK_TCK")
IDENTITY = re.compile(r"took the identity of \S+ in ([0-9.]+) ms")


def _boot_offset() -> float:
    """CLOCK_BOOTTIME (what a process's start time in ``/proc`` counts) minus ``perf_counter``."""
    return min(time.clock_gettime(time.CLOCK_BOOTTIME) - time.perf_counter() for _ in range(5))


BOOT_OFFSET = _boot_offset()


def image_cache() -> Path:
    """The tests' image cache (``tests/nex/image_fixture.py``), used as the state directory of a build."""
    configured = os.environ.get("NEX_TEST_IMAGE_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "nex-tests"


def memory_mib(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of ``pid`` in MiB; zeros if it is gone."""
    rss = pss = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss / 1024, pss / 1024


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time the processes ``pids`` have used so far (those still there)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / HZ


def qemus_of(state_dir: Path) -> dict[int, str]:
    """Live qemu-system processes whose command line mentions ``state_dir`` (their console is in it)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if "qemu-system" in cmdline and str(state_dir) in cmdline and state != "Z":
            found[int(entry.name)] = cmdline
    return found


class VmNode(NodeProcess):
    """A node of this benchmark: its log read by vmid, its machines' qemu processes and consoles."""

    def drain(self) -> list[tuple[float, str]]:
        self.tail(0)  # moves what the reader has queued into self.log
        return self.log

    def at(self, needle: str, vmid: str | None = None) -> float | None:
        """When the first line with ``needle`` (and ``vmid=<vmid>``) arrived."""
        for at, line in self.drain():
            if needle in line and (vmid is None or f"vmid={vmid}" in line):
                return at
        return None

    def added(self) -> list[tuple[float, str, float]]:
        """(when, vmid, warmup_ms) of every "Adding new VM to warm pool" line so far."""
        found = []
        for at, line in self.drain():
            if "Adding new VM to warm pool" in line:
                vmid = re.search(r"vmid=(\S+)", line)
                warmup = re.search(r"warmup_ms=([0-9.]+)", line)
                if vmid and warmup:
                    found.append((at, vmid.group(1), float(warmup.group(1))))
        return found

    def template(self) -> dict[str, float]:
        """The template's boot and save (the node's "Saved the template VM" line), and when they ran."""
        for at, line in self.drain():
            if "Saved the template VM" in line:
                fields = dict(re.findall(r"(boot_s|save_s|mib)=([0-9.]+)", line))
                booting = self.at("Booting the template VM")
                return {
                    "boot_s": float(fields.get("boot_s", "nan")),
                    "save_s": float(fields.get("save_s", "nan")),
                    "mib": float(fields.get("mib", "nan")),
                    "boot_began_after_up_s": (booting - self.started) if booting is not None else float("nan"),
                    "saved_after_up_s": at - self.started,
                }
        return {}

    def machine_dir(self, vmid: str) -> Path | None:
        return next(iter(self.state_dir.glob(f"vm/*/*/{vmid}")), None)

    def qemu(self, vmid: str) -> tuple[int, float] | None:
        """(pid, start as a ``perf_counter`` time) of the machine's qemu, from its pid file."""
        folder = self.machine_dir(vmid)
        if folder is None:
            return None
        try:
            pid, ticks = (int(word) for word in (folder / "pid").read_text().split()[:2])
        except (OSError, ValueError):
            return None
        return pid, ticks / HZ - BOOT_OFFSET

    def machine(self, vmid: str, handshake: float, warmup_ms: float) -> dict[str, float]:
        """One machine's timings (seconds) and memory, read while it runs."""
        row: dict[str, float] = {"warmup_ms": warmup_ms}
        found = self.qemu(vmid)
        if found is None:
            return row
        pid, began = found
        row["qemu_to_handshake_s"] = handshake - began
        started = self.at("Machine started", vmid)
        if started is not None:
            row["qemu_to_identity_sent_s"] = started - began
            row["identity_sent_to_handshake_s"] = handshake - started
        folder = self.machine_dir(vmid)
        with contextlib.suppress(OSError, AttributeError):
            assert folder is not None
            taken = IDENTITY.search((folder / "stdout").read_text(errors="replace"))
            if taken:
                row["guest_take_identity_ms"] = float(taken.group(1))
        row["rss_mib"], row["pss_mib"] = memory_mib(pid)
        row["qemu_cpu_s"] = cpu_seconds([pid])  # by now: at its handshake if read at once
        return row


class Nodes:
    """Every node this run starts, stopped however the run ends; what each left behind, recorded."""

    def __init__(self, work: Path, url: str, console: Console) -> None:
        self.work = work
        self.url = url
        self.console = console
        self.live: list[VmNode] = []
        self.left: dict[str, dict[str, list[str]]] = {}
        self.stops: list[float] = []

    def start(self, name: str, size: int, config: dict[str, object], state_dir: Path | None = None) -> VmNode:
        path = self.work / f"{name}.json"
        path.write_text(json.dumps(config))
        state = state_dir or self.work / name
        args = ("--config", str(path), "--pool-size", str(size), "--handshake-timeout", "30s")
        node = VmNode(state, self.url, *args)
        self.live.append(node)
        return node

    def stop(self, node: VmNode, name: str) -> None:
        began = time.perf_counter()
        found: dict[str, list[str]] = {}
        if node.stop(STOP_TIMEOUT):
            found["stop"] = [f"no exit within {STOP_TIMEOUT:g} s of SIGTERM: killed"]
        self.stops.append(time.perf_counter() - began)
        with contextlib.suppress(ValueError):
            self.live.remove(node)
        deadline = time.monotonic() + 5  # qemu dies with the node (PDEATHSIG): give it a moment
        while (stray := qemus_of(node.state_dir)) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid, cmdline in stray.items():
            found.setdefault("qemu", []).append(f"{pid} {cmdline[:100]}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        found |= {kind: names for kind, names in leftovers(node, NETWORK).items() if names}
        if found:
            self.left.setdefault(name, {}).update(found)

    def stop_all(self) -> None:
        for node in list(self.live):
            self.stop(node, f"{node.state_dir.name} (at exit)")


@contextlib.contextmanager
def running(
    nodes: Nodes, name: str, size: int, config: dict[str, object], state: Path | None = None
) -> Iterator[VmNode]:
    node = nodes.start(name, size, config, state)
    try:
        yield node
    except RuntimeError:
        nodes.console.print(f"{name}: the node failed; its last lines:\n{node.tail(25)}", markup=False)
        raise
    finally:
        nodes.stop(node, name)


# --- the limits ----------------------------------------------------------------------------------------


def time_python(n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        samples.append(time.perf_counter() - start)
    return samples


def time_probe_boots(image: GuestImage, n: int) -> tuple[list[float], str]:
    """qemu (TCG) from its start to the bare stage 1's ``nex-probe-ok``, ``n`` times; (times, a failure)."""
    samples: list[float] = []
    for _ in range(n):
        began = time.perf_counter()
        probe = functools.partial(kvm.probe_boot, "qemu-system-x86_64", image.kernel, image.initrd, accel="tcg")
        ok, why = trio.run(functools.partial(probe, timeout=60))
        if not ok:
            return samples, why
        samples.append(time.perf_counter() - began)
    return samples, ""


def vm_spec(image: GuestImage) -> VmSpec:
    """The spec the node's VMs have (the config's defaults), for restoring its snapshot here."""
    template = NodeConfig().machine_template
    return VmSpec(
        qemu="qemu-system-x86_64",
        kernel=image.kernel,
        initrd=image.initrd,
        rootfs=image.rootfs,
        memory_mib=template.memsize_mib,
        vcpus=template.vcpu_count,
        accel="tcg",
        tsc_khz=kvm.tcg_tsc_khz(),
    )


async def restore(spec: VmSpec, snapshot: Path, console: Path, *, identity: bool) -> tuple[float, float | None]:
    """Restore ``snapshot`` up to ``cont`` (seconds from qemu's start); with ``identity``, also the
    time until the guest says it took one (no NATS to reach: the agent gets no further), else None."""
    started: list[QemuVm] = []
    await trio.Path(console).unlink(missing_ok=True)
    began = time.perf_counter()
    try:
        vm = await launch(spec, console=console, snapshot=snapshot, started=started)
        restored = time.perf_counter() - began
        if not identity:
            return restored, None
        metadata = agent_api.MachineMetadata(vmid="benchfloor", node_nats_host="10.0.0.1", node_nats_port=4222)
        await vm.send_identity(
            agent_api.GuestIdentity(
                metadata=metadata,
                network=agent_api.GuestNetwork(address="10.0.0.2", prefixlen=32, gateway="10.0.0.1"),
                time_ns=time.time_ns(),
                entropy=base64.b64encode(secrets.token_bytes(64)).decode(),
            )
        )
        with trio.fail_after(30):
            while True:  # the console is a file qemu appends to: nothing to wait on but time
                if "took the identity" in await trio.Path(console).read_text(errors="replace"):
                    break
                await trio.sleep(0.005)
        return restored, time.perf_counter() - began
    finally:
        with trio.CancelScope(shield=True):
            for vm in started:
                await vm.stop(1.0)


def time_restores(image: GuestImage, snapshot: Path, work: Path, n: int) -> dict[str, object]:
    spec = vm_spec(image)
    to_cont: list[float] = []
    to_identity: list[float] = []
    try:
        for _ in range(n):
            cont, _ = trio.run(functools.partial(restore, spec, snapshot, work / "restore.log", identity=False))
            to_cont.append(cont)
            cont, taken = trio.run(functools.partial(restore, spec, snapshot, work / "restore.log", identity=True))
            to_cont.append(cont)
            if taken is not None:
                to_identity.append(taken)
    except (VmFailed, trio.TooSlowError, OSError) as exc:
        return {"failed": f"{type(exc).__name__}: {exc}", "restore_to_cont_s": to_cont}
    return {"restore_to_cont_s": to_cont, "restore_to_identity_taken_s": to_identity}


# --- the nodes ------------------------------------------------------------------------------------------


def pool_fill(
    nodes: Nodes, name: str, config: dict[str, object], state: Path | None
) -> tuple[dict[str, object], VmNode]:
    """Start a node with a pool of 8 and wait for it; its figures and the node, still running."""
    node = nodes.start(name, POOL, config, state)
    try:
        ready = node.wait_line("Warm pool ready", READY_TIMEOUT)
    except RuntimeError:
        nodes.console.print(f"{name}: no ready pool; the node's last lines:\n{node.tail(25)}", markup=False)
        nodes.stop(node, name)
        raise
    machines = [node.machine(vmid, at, warmup) for at, vmid, warmup in node.added()]
    row: dict[str, object] = {"ready_s": ready - node.started, "machines": machines, "template": node.template()}
    pids = list(qemus_of(node.state_dir))
    row["qemu_cpu_after_ready_cores"] = [cores(pids, 1.0) for _ in range(AFTER_READY)]
    return row, node


def cores(pids: list[int], seconds: float) -> float:
    """How many cores the processes ``pids`` use over the next ``seconds``."""
    before, began = cpu_seconds(pids), time.perf_counter()
    time.sleep(seconds)
    return (cpu_seconds(pids) - before) / (time.perf_counter() - began)


def settle(node: VmNode) -> float:
    """Wait until the pool's VMs are quiet (a clone keeps working for seconds after its handshake);
    how long that took."""
    began = time.perf_counter()
    pids = list(qemus_of(node.state_dir))
    while cores(pids, 0.5) > SETTLED_CORES and time.perf_counter() - began < SETTLE_TIMEOUT:
        pass
    return time.perf_counter() - began


def replacements(node: VmNode, rounds: int, timeout: float) -> list[dict[str, float]]:
    """Kill a ready machine's qemu ``rounds`` times in turn; each replacement's figures, and the time
    from the kill to its handshake."""
    done: list[dict[str, float]] = []
    known = {vmid for _, vmid, _ in node.added()}
    for _ in range(rounds):
        settled = settle(node)
        victims = [(vmid, found) for vmid in sorted(known) if (found := node.qemu(vmid)) is not None]
        victims = [(vmid, found) for vmid, found in victims if Path(f"/proc/{found[0]}").exists()]
        if not victims:
            raise RuntimeError("no live machine to kill")
        vmid, (pid, _) = victims[0]
        killed = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        known.discard(vmid)
        at = node.wait_line("Adding new VM to warm pool", timeout)
        fresh = [(a, v, w) for a, v, w in node.added() if v not in known and a == at]
        if not fresh:
            raise RuntimeError("the replacement's line names no new machine")
        _, new, warmup = fresh[0]
        known.add(new)
        row = node.machine(new, at, warmup)
        row["kill_to_handshake_s"] = at - killed
        row["settled_before_kill_s"] = settled
        done.append(row)
    return done


def cold_boots(nodes: Nodes, image: GuestImage, rounds: int) -> dict[str, object]:
    config = {"kernel_path": str(image.kernel), "rootfs_path": str(image.rootfs), "vm_snapshots": False}
    with running(nodes, "cold-1", 1, {**NETWORK_CONFIG, **config}) as node:
        at = node.wait_line("Adding new VM to warm pool", COLD_TIMEOUT)
        node.wait_line("Warm pool ready", 10)
        ((_, vmid, warmup),) = node.added()
        first = node.machine(vmid, at, warmup)
        more = replacements(node, rounds - 1, COLD_TIMEOUT)
        return {"machines": [first, *more], "snapshotted": node.at("Saved the template VM") is not None}


def process_pools(nodes: Nodes, repeats: int) -> list[float]:
    ready = []
    for repeat in range(repeats):
        with running(nodes, f"process-{repeat}", POOL, NETWORK_CONFIG) as node:
            ready.append(node.wait_line("Warm pool ready", 60) - node.started)
    return ready


# --- the run ----------------------------------------------------------------------------------------------


def series(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    return {
        "n": len(samples),
        "p50": percentile(samples, 0.5),
        "p95": percentile(samples, 0.95),
        "min": min(samples),
        "max": max(samples),
    }


def column(rows: list[dict[str, float]], key: str) -> list[float]:
    return [row[key] for row in rows if key in row]


def unavailable() -> str | None:
    if os.geteuid() != 0 or not netns.has_capabilities():
        return "VMs need a namespace and a tap each: run as root"
    if shutil.which("qemu-system-x86_64") is None:
        return "no qemu-system-x86_64 (apt-get install qemu-system-x86)"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about half the time)")
    quick = parser.parse_args().quick
    rounds = {
        "python": 10 if quick else 20,
        "probe": 2 if quick else 3,
        "restore": 2 if quick else 3,  # each: one restore to cont, one to the identity taken
        "cold": 2 if quick else 3,
        "fills": 1 if quick else 2,  # fresh state directory, then the same one with its snapshot
        "replacements": 5 if quick else 12,
        "process": 1 if quick else 3,
    }
    console = Console()
    out = Path(__file__).parent / "results" / "vm_warmup.json"
    out.parent.mkdir(exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through the finally blocks below
    results: dict[str, object] = {"cpus": os.cpu_count(), "quick": quick, "rounds": rounds, "targets": TARGETS}
    results["load_before"] = os.getloadavg()
    reason = unavailable()
    image: GuestImage | None = None
    if reason is None:
        try:
            image = build_image(image_cache(), say=lambda line: console.print(f"guest image: {line}"))
        except ImageError as exc:
            reason = f"no guest image: {exc}"
    if reason is not None or image is None:
        console.print(f"vm_warmup skipped: {reason}")
        out.write_text(json.dumps({**results, "skipped": reason}, indent=2))
        return
    results["image"] = {"digest": image.digest, "kernel": str(image.kernel), "rootfs": str(image.rootfs)}
    vm_config = {**NETWORK_CONFIG, "kernel_path": str(image.kernel), "rootfs_path": str(image.rootfs)}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nexbench-vm-") as tmp, echo_server() as (url, _):
        work = Path(tmp)
        nodes = Nodes(work, url, console)
        try:
            step = progress(console, began)
            step("limits: python -c pass, qemu to the bare stage 1's marker")
            limits: dict[str, object] = {"python_c_pass_s": series(time_python(rounds["python"]))}
            probes, probe_failure = time_probe_boots(image, rounds["probe"])
            limits["probe_boot_s"] = series(probes)
            if probe_failure:
                limits["probe_boot_failed"] = probe_failure
            fills: list[dict[str, object]] = []
            cached: list[dict[str, object]] = []
            single: list[dict[str, float]] = []
            snapshot: Path | None = None
            for repeat in range(rounds["fills"]):
                state = work / f"vm-{repeat}"
                step(f"pool of {POOL} on a fresh state directory ({repeat + 1}/{rounds['fills']})")
                row, node = pool_fill(nodes, f"vm-{repeat}-fresh", vm_config, state)
                try:
                    if repeat == 0:
                        step(f"{rounds['replacements']} clones one at a time (a member's qemu killed)")
                        single = replacements(node, rounds["replacements"], CLONE_TIMEOUT)
                finally:
                    nodes.stop(node, f"vm-{repeat}-fresh")
                fills.append(row)
                snapshot = next(iter(state.glob("snapshots/*/*.vmstate")), snapshot)
                step(f"pool of {POOL} again on that directory: its snapshot is there")
                row, node = pool_fill(nodes, f"vm-{repeat}-cached", vm_config, state)
                nodes.stop(node, f"vm-{repeat}-cached")
                cached.append(row)
            if snapshot is not None:
                step("limits: the snapshot restored to cont, and to the guest's identity taken")
                limits |= {
                    key: series(value) if isinstance(value, list) else value
                    for key, value in time_restores(image, snapshot, work, rounds["restore"]).items()
                }
            step(f"cold boots: vm_snapshots false, a pool of 1, {rounds['cold']} boots")
            cold = cold_boots(nodes, image, rounds["cold"])
            step(f"the process driver's pool of {POOL}")
            process = process_pools(nodes, rounds["process"])
        finally:
            nodes.stop_all()
            forget_network(NETWORK)
    results["runtime_s"] = time.perf_counter() - began
    results["load_after"] = os.getloadavg()
    results["limits"] = limits
    results |= summarize(fills, cached, single, cold, process)
    results["node_stop_s"] = series(nodes.stops)
    results["left_behind"] = nodes.left
    report(console, results)
    out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {out}")


def progress(console: Console, began: float) -> Callable[[str], None]:
    def step(what: str) -> None:
        console.print(f"[{time.perf_counter() - began:6.1f} s] {what}", markup=False, highlight=False)

    return step


def summarize(
    fills: list[dict[str, object]],
    cached: list[dict[str, object]],
    single: list[dict[str, float]],
    cold: dict[str, object],
    process: list[float],
) -> dict[str, object]:
    def machines(rows: list[dict[str, object]]) -> list[dict[str, float]]:
        found: list[dict[str, float]] = []
        for row in rows:
            listed = row["machines"]
            assert isinstance(listed, list)
            found += listed
        return found

    def ready(rows: list[dict[str, object]]) -> list[float]:
        return [float(row["ready_s"]) for row in rows]  # type: ignore[arg-type]

    templates = [row["template"] for row in fills if row["template"]]
    fresh_clones = machines(fills)
    cached_clones = machines(cached)
    cold_rows = cold["machines"]
    assert isinstance(cold_rows, list)
    parts = (
        "qemu_to_handshake_s",
        "qemu_to_identity_sent_s",
        "identity_sent_to_handshake_s",
        "guest_take_identity_ms",
        "qemu_cpu_s",
    )

    def clones(rows: list[dict[str, float]]) -> dict[str, object]:
        return {part: series(column(rows, part)) for part in (*parts, "warmup_ms")} | {"rows": rows}

    return {
        "template": {
            key: series([float(t[key]) for t in templates])  # type: ignore[index]
            for key in ("boot_s", "save_s", "mib", "boot_began_after_up_s", "saved_after_up_s")
        },
        "clones": {
            "one_at_a_time": clones(single)
            | {
                "kill_to_handshake_s": series(column(single, "kill_to_handshake_s")),
                "settled_before_kill_s": series(column(single, "settled_before_kill_s")),
            },
            "in_a_cached_fill_of_8": clones(cached_clones),
            "in_a_fresh_fill_of_8": clones(fresh_clones),  # their warm-up includes waiting for the template
        },
        "cold_boot": clones(cold_rows)
        | {
            "kill_to_handshake_s": series(column(cold_rows, "kill_to_handshake_s")),
            "snapshot_made": cold["snapshotted"],
        },
        "pool_of_8": {
            "vm_fresh_ready_s": ready(fills),
            "vm_fresh_ready_beyond_template_boot_s": [
                float(row["ready_s"]) - float(row["template"].get("boot_s", "nan"))  # type: ignore[arg-type, attr-defined]
                for row in fills
            ],
            "vm_cached_ready_s": ready(cached),
            "process_ready_s": process,
            "qemu_cpu_after_ready_cores": [row["qemu_cpu_after_ready_cores"] for row in [*fills, *cached]],
        },
        "memory_mib": {
            "clone_rss": series(column([*fresh_clones, *cached_clones, *single], "rss_mib")),
            "clone_pss": series(column([*fresh_clones, *cached_clones, *single], "pss_mib")),
            "cold_rss": series(column(cold_rows, "rss_mib")),
            "cold_pss": series(column(cold_rows, "pss_mib")),
            "pool_of_8_clones_pss_sum": [sum(column(row["machines"], "pss_mib")) for row in cached],  # type: ignore[arg-type]
        },
    }


# --- the report -------------------------------------------------------------------------------------------


def _s(value: float) -> str:
    return f"{value:.2f}"


def report(console: Console, results: dict[str, Any]) -> None:
    """Print a table per section, the ratios to the limits and the verdicts (``results``: as in the JSON)."""
    limits = results["limits"]
    template = results["template"]
    clones = results["clones"]
    cold = results["cold_boot"]
    pools = results["pool_of_8"]
    memory = results["memory_mib"]
    load = f"load {results['load_before'][0]:.1f} → {results['load_after'][0]:.1f}"
    where = f"{results['cpus']} CPUs, TCG, {load}"

    def stats_table(title: str, rows: list[tuple[str, dict[str, float]]], unit: str = "s") -> Table:
        table = Table(title=title)
        table.add_column("measurement")
        for name in ("n", f"p50 ({unit})", f"p95 ({unit})", f"min ({unit})", f"max ({unit})"):
            table.add_column(name, justify="right", no_wrap=True)
        for label, stats in rows:
            if not stats:
                table.add_row(label, "0", "—", "—", "—", "—")
                continue
            scale = 0.001 if label.endswith("(ms → s)") else 1.0
            values = (stats[k] * scale for k in ("p50", "p95", "min", "max"))
            table.add_row(label, f"{stats['n']:.0f}", *(f"{v:.2f}" if unit == "s" else f"{v:.0f}" for v in values))
        return table

    probe = limits.get("probe_boot_s", {})
    cont = limits.get("restore_to_cont_s", {})
    console.print(
        stats_table(
            f"1. Limits ({where})",
            [
                ("python -c pass (host)", limits["python_c_pass_s"]),
                ("cold-boot floor: qemu → stage 1's nex-probe-ok", probe),
                ("clone floor: qemu -incoming → QMP cont done", cont),
                ("… → guest took an identity (no NATS)", limits.get("restore_to_identity_taken_s", {})),
            ],
        )
    )
    for key in ("probe_boot_failed", "failed"):
        if key in limits:
            console.print(f"limits: {key}: {limits[key]}", markup=False)
    console.print(
        stats_table(
            f"2. Cold boot → handshake (vm_snapshots false, pool of 1, {where})",
            [
                ("qemu start → handshake", cold["qemu_to_handshake_s"]),
                ("qemu start → identity sent", cold["qemu_to_identity_sent_s"]),
                ("identity sent → handshake", cold["identity_sent_to_handshake_s"]),
                ("qemu's CPU time at handshake", cold["qemu_cpu_s"]),
                ("machine created → handshake (ms → s)", cold["warmup_ms"]),
                ("kill → replacement's handshake", cold.get("kill_to_handshake_s", {})),
            ],
        )
    )
    single, fill = clones["one_at_a_time"], clones["in_a_cached_fill_of_8"]
    console.print(
        stats_table(
            f"3. Snapshot clone → handshake ({where})",
            [
                ("one at a time: qemu → handshake", single["qemu_to_handshake_s"]),
                ("  qemu → restored, identity sent", single["qemu_to_identity_sent_s"]),
                ("  identity sent → handshake", single["identity_sent_to_handshake_s"]),
                ("  guest: took the identity (ms → s)", single["guest_take_identity_ms"]),
                ("  qemu's CPU time at handshake", single["qemu_cpu_s"]),
                ("  kill → replacement's handshake", single["kill_to_handshake_s"]),
                ("  (pool quiet before the kill after)", single["settled_before_kill_s"]),
                ("  machine created → handshake (ms → s)", single["warmup_ms"]),
                (f"{POOL} at once (cached fill): qemu → handshake", fill["qemu_to_handshake_s"]),
                ("  qemu → restored, identity sent", fill["qemu_to_identity_sent_s"]),
                ("  identity sent → handshake", fill["identity_sent_to_handshake_s"]),
                ("template boot (log boot_s)", template["boot_s"]),
                ("template save (log save_s)", template["save_s"]),
            ],
        )
    )
    if template["mib"]:
        console.print(f"template snapshot: {template['mib']['p50']:.0f} MiB")
    table = Table(title=f"4 and 6. A pool of {POOL}: `nex up` → Warm pool ready ({where})")
    for name in ("driver, state", "runs (s)", "median (s)", "measured against", "target (s)", "verdict"):
        table.add_column(name, justify="left" if name in ("driver, state", "measured against") else "right")
    beyond = TARGETS["pool_8_ready_beyond_template_boot_s"]
    verdicts: list[str] = []
    rows: tuple[tuple[str, str, str | None, str], ...] = (
        (
            "qemu, fresh state dir",
            "vm_fresh_ready_s",
            "vm_fresh_ready_beyond_template_boot_s",
            "ready − its template boot",
        ),
        ("qemu, snapshot cached", "vm_cached_ready_s", "vm_cached_ready_s", "ready (no template boot)"),
        ("process driver", "process_ready_s", None, ""),
    )
    for label, key, checked, against in rows:
        runs = pools[key]
        if not runs:
            table.add_row(label, "—", "—", "", "", "")
            continue
        verdict = ""
        if checked is not None and pools[checked]:
            value = statistics.median(pools[checked])
            met = "meets" if value <= beyond else "MISSES"
            verdict = f"{value:.2f}: {met}"
            verdicts.append(f"pool of {POOL}, {label}: {against} {value:.2f} s against ≤ {beyond:g} s: {met}")
        table.add_row(
            label,
            " ".join(_s(r) for r in runs),
            _s(statistics.median(runs)),
            against,
            "—" if checked is None else f"≤ {beyond:g}",
            verdict,
        )
    console.print(table)
    console.print(
        stats_table(
            f"5. Memory per VM at ready (MiB, -m {NodeConfig().machine_template.memsize_mib})",
            [
                ("clone: qemu RSS", memory["clone_rss"]),
                ("clone: qemu PSS", memory["clone_pss"]),
                ("cold boot: qemu RSS", memory["cold_rss"]),
                ("cold boot: qemu PSS", memory["cold_pss"]),
            ],
            unit="MiB",
        )
    )
    if memory["pool_of_8_clones_pss_sum"]:
        sums = ", ".join(f"{s:.0f}" for s in memory["pool_of_8_clones_pss_sum"])
        console.print(f"the {POOL} clones of a cached fill, PSS summed: {sums} MiB")
    for run in pools["qemu_cpu_after_ready_cores"]:
        cpu = " ".join(f"{c:.2f}" for c in run)
        console.print(f"cores used by a pool's {POOL} qemu processes, each second after ready: {cpu}")
    ratios = []
    if cont and single["qemu_to_handshake_s"]:
        ratios.append(
            f"clone (one at a time) p50 / restore-to-cont floor p50: "
            f"{single['qemu_to_handshake_s']['p50'] / cont['p50']:.1f}×"
        )
    if probe and cold["qemu_to_handshake_s"]:
        ratios.append(
            f"cold boot p50 / bare stage-1 boot p50: {cold['qemu_to_handshake_s']['p50'] / probe['p50']:.1f}×"
        )
    if cold["qemu_to_handshake_s"] and single["qemu_to_handshake_s"]:
        ratios.append(
            f"cold boot / clone (p50): {cold['qemu_to_handshake_s']['p50'] / single['qemu_to_handshake_s']['p50']:.1f}×"
        )
    python = limits["python_c_pass_s"]
    if python and single["qemu_to_handshake_s"]:
        ratios.append(f"clone p50 / python -c pass p50: {single['qemu_to_handshake_s']['p50'] / python['p50']:.1f}×")
    if pools["vm_cached_ready_s"] and pools["process_ready_s"]:
        vm, proc = statistics.median(pools["vm_cached_ready_s"]), statistics.median(pools["process_ready_s"])
        ratios.append(f"pool of {POOL}, qemu (cached snapshot) / process driver: {vm / proc:.1f}×")
    for line in ratios:
        console.print(line, markup=False, highlight=False)
    if single["qemu_to_handshake_s"]:
        p50 = single["qemu_to_handshake_s"]["p50"]
        target = TARGETS["clone_to_handshake_p50_s"]
        verdicts.append(
            f"a clone (one at a time) p50 {p50:.2f} s against ≤ {target:g} s: {'meets' if p50 <= target else 'MISSES'}"
        )
    for line in verdicts:
        console.print(line, markup=False, highlight=False)
    console.print(f"left behind by the nodes: {results['left_behind'] or 'nothing'}", markup=False, highlight=False)
    console.print(f"runtime {results['runtime_s']:.0f} s", markup=False)


if __name__ == "__main__":
    main()
