"""``python3.11 -I -m nex.agent.guest``: PID 1 of a VM, and its agent.

Stage 1 of the guest image (see :mod:`nex.vm.image`) mounts the read-only root with a tmpfs overlaid
on it and ``switch_root``\\ s here. PID 1 must reap every orphan in the VM, and the agent must not be
PID 1 (a process the kernel never signals by default, and whose ``waitpid(-1)`` loop would steal the
exit statuses the agent waits for): so PID 1 forks, the child is the agent, and PID 1 only reaps until
the agent exits, then powers the VM off (qemu and Firecracker exit).

The agent imports everything it will need, then says :class:`~nex.api.agent.GuestReady` on its channel
and waits for its :class:`~nex.api.agent.GuestIdentity`. A template VM is saved as a snapshot at that
moment, so every clone restored from it starts here, already imported, with no identity: it takes the
entropy, clock, address and credentials its host sends, never the template's (see ``GuestIdentity``).

The channel is a virtio-serial port named :data:`PORT_NAME` (QEMU); it is private to the VM and its
host process. nex v0.2's Firecracker guests read MMDS instead: ``nex.channel=mmds`` on the kernel
command line selects it.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import fcntl
import os
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path

PORT_NAME = "nex.agent"
VIRTIO_PORTS = Path("/sys/class/virtio-ports")
WORKDIR = "/var/lib/nex"
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
RB_POWER_OFF = 0x4321FEDC
RB_AUTOBOOT = 0x01234567
RB_DISABLE_CAD = 0
MAX_IDENTITY = 1 << 20
PORT_WAIT = 10.0  # seconds the agent waits for its port's device to appear


def log(message: str) -> None:
    print(f"nex-guest: {message}", file=sys.stderr, flush=True)


# -- PID 1 -------------------------------------------------------------------------------------------


def pid1() -> None:
    """Fork the agent, reap every process until it exits, then end the VM."""
    with contextlib.suppress(OSError):
        os.makedirs(WORKDIR, exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    # Ctrl-Alt-Del (Firecracker's SendCtrlAltDel) then reaches init as SIGINT, rather than the
    # kernel's immediate reset: the agent gets to stop its workload first
    libc.reboot(RB_DISABLE_CAD)
    agent = os.fork()
    if agent == 0:
        try:
            code = agent_main()
        except BaseException as exc:  # anything: the VM must end, not hang
            log(f"the agent failed: {exc!r}")
            code = 1
        sys.stderr.flush()
        os._exit(code)
    # Ctrl-Alt-Del (Firecracker's stop) reaches init as SIGINT: the agent stops its workload and exits
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: os.kill(agent, signal.SIGTERM))
    code = 1
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == agent:
            code = os.waitstatus_to_exitcode(status)
            break
    log(f"the agent exited with code {code}; stopping the VM")
    os.sync()
    # qemu's microvm powers off by ACPI at once (a reset under TCG takes seconds); Firecracker has no
    # ACPI power-off, and exits on the reset its ``reboot=k`` asks for
    firecracker = "nex.identity=mmds" in Path("/proc/cmdline").read_text().split()
    libc.reboot(RB_AUTOBOOT if firecracker else RB_POWER_OFF)
    os._exit(code)  # only if it was refused


# -- the agent's side --------------------------------------------------------------------------------


def agent_main() -> int:
    """Import, say ready, take the identity, then run as the machine's agent; the exit code."""
    import msgspec
    import nkeys  # noqa: F401  nats-py imports it (and PyNaCl, and loads libsodium) only to sign its first CONNECT

    from nex.agent import main as agent  # the heavy imports: done before ready, so clones skip them
    from nex.api import agent as api
    from nex.sandbox import seccomp

    with contextlib.suppress(seccomp.SeccompUnavailable):  # the jail's filter, compiled once for every clone
        seccomp.program()

    cmdline = Path("/proc/cmdline").read_text().split()
    mmds = "nex.identity=mmds" in cmdline
    if mmds:  # Firecracker: nex v0.2's way
        raw = _from_mmds(template=api.TEMPLATE_ARG in cmdline)
    else:
        channel = _open_channel()
        try:
            os.write(channel, msgspec.json.encode(api.GuestReady(pid=os.getpid())) + b"\n")
            raw = _read_line(channel)
        finally:
            os.close(channel)
    try:
        identity = msgspec.json.decode(raw, type=api.GuestIdentity)
    except msgspec.DecodeError as exc:
        log(f"malformed identity from the host: {exc}")
        return 2
    begun = time.monotonic()
    take_identity(identity)
    if mmds:  # it holds the agent's seed: out of the workload's reach from now on
        unreachable(MMDS_ADDRESS)
    log(f"took the identity of {identity.metadata.vmid} in {(time.monotonic() - begun) * 1000:.1f} ms")
    os.chdir(WORKDIR)
    return agent.run_with(identity.metadata)


def _from_mmds(template: bool) -> bytes:
    """The identity Firecracker's MMDS holds, over a link-local address on eth0 that the real one
    then replaces (an ``SIOCSIFADDR`` sets the interface's first address).

    A ``template`` VM (``nex.template=1``) has none yet: it says ``READY_MARKER`` on its console,
    where its host waits for it to snapshot the VM, and asks MMDS until a clone's host has put one,
    with no deadline (a clone may be restored long after) and short attempts (an attempt in flight
    when the snapshot was taken is lost with the template's MMDS connection)."""
    from nex.agent import mmds
    from nex.api.agent import READY_MARKER

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock, SIOCSIFADDR, _ifreq("eth0", _sockaddr("169.254.0.2")))
        fcntl.ioctl(sock, SIOCSIFNETMASK, _ifreq("eth0", _sockaddr("255.255.0.0")))
        _link_up(sock, "eth0")
    if not template:
        return mmds.fetch_metadata(timeout=MMDS_TIMEOUT)
    print(READY_MARKER, file=sys.stderr, flush=True)
    return mmds.fetch_metadata(timeout=None, attempt_timeout=TEMPLATE_ATTEMPT_TIMEOUT)


def _open_channel() -> int:
    """The virtio-serial port named :data:`PORT_NAME`, open for reading and writing.

    Its ``/dev/vportNpM`` number depends on the order of the devices, so it is found by name; the
    device may appear a moment after the module loads."""
    deadline = time.monotonic() + PORT_WAIT
    while True:
        for entry in sorted(VIRTIO_PORTS.glob("*")):
            with contextlib.suppress(OSError):
                if (entry / "name").read_text().strip() == PORT_NAME:
                    return os.open(f"/dev/{entry.name}", os.O_RDWR | os.O_CLOEXEC)
        if time.monotonic() > deadline:
            raise RuntimeError(f"no virtio-serial port named {PORT_NAME} (is this a nex VM?)")
        time.sleep(0.01)  # a device node the kernel has yet to make: nothing to wait on


def _read_line(fd: int) -> bytes:
    """One line from the port. A read returns at once, empty, while no host is connected (the
    clone of a snapshot before its host attaches): then wait for the port to change."""
    data = b""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while b"\n" not in data:
        chunk = os.read(fd, 65536)
        if chunk:
            data += chunk
            if len(data) > MAX_IDENTITY:
                raise RuntimeError("the identity from the host is too large")
            continue
        poller.poll(5)  # POLLHUP returns at once while unconnected: bound the spin
    return data.split(b"\n", 1)[0]


def take_identity(identity: object) -> None:
    """Reseed the RNG, set the clock, configure the network: what a clone must not keep from its
    template."""
    from nex.api.agent import GuestIdentity

    assert isinstance(identity, GuestIdentity)
    if identity.entropy:
        reseed(base64.b64decode(identity.entropy))
    if identity.time_ns:
        time.clock_settime_ns(time.CLOCK_REALTIME, identity.time_ns)
    if identity.network is not None:
        net = identity.network
        configure_network(net.address, net.prefixlen, net.gateway)


SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCADDRT = 0x890B
IFF_UP = 0x1
RTF_UP, RTF_GATEWAY, RTF_HOST, RTF_REJECT = 0x1, 0x2, 0x4, 0x200
MMDS_ADDRESS = "169.254.169.254"
MMDS_TIMEOUT = 10.0
TEMPLATE_ATTEMPT_TIMEOUT = 0.1  # seconds per MMDS attempt in a template (MMDS answers in microseconds)


def configure_network(address: str, prefixlen: int, gateway: str, device: str = "eth0") -> None:
    """``address/prefixlen`` on ``device``, both links up, a route to ``gateway`` on the link and the
    default route through it (CNI ptp's shape), by the kernel's ioctls: no ``ip`` process to fork,
    which under TCG costs as much as everything else a clone does before its handshake."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _link_up(sock, "lo")
        mask = socket.inet_ntoa(((0xFFFFFFFF << (32 - prefixlen)) & 0xFFFFFFFF).to_bytes(4, "big"))
        fcntl.ioctl(sock, SIOCSIFADDR, _ifreq(device, _sockaddr(address)))
        fcntl.ioctl(sock, SIOCSIFNETMASK, _ifreq(device, _sockaddr(mask)))
        _link_up(sock, device)
        _add_route(sock, gateway, "255.255.255.255", "0.0.0.0", RTF_UP | RTF_HOST, device)
        _add_route(sock, "0.0.0.0", "0.0.0.0", gateway, RTF_UP | RTF_GATEWAY, device)


def unreachable(address: str) -> None:
    """A reject route to ``address`` (``ip route add unreachable``): a workload without CAP_NET_ADMIN
    in the VM's network namespace cannot remove it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _add_route(sock, address, "255.255.255.255", "0.0.0.0", RTF_UP | RTF_HOST | RTF_REJECT, "lo")


def _sockaddr(address: str) -> bytes:
    return struct.pack("=HH4s8x", socket.AF_INET, 0, socket.inet_aton(address))


def _ifreq(device: str, payload: bytes) -> bytes:
    return struct.pack("16s24s", device.encode(), payload)


def _link_up(sock: socket.socket, device: str) -> None:
    flags = struct.unpack_from("H", fcntl.ioctl(sock, SIOCGIFFLAGS, _ifreq(device, b"")), 16)[0]
    fcntl.ioctl(sock, SIOCSIFFLAGS, _ifreq(device, struct.pack("H", flags | IFF_UP)))


def _add_route(sock: socket.socket, destination: str, mask: str, gateway: str, flags: int, device: str) -> None:
    name = ctypes.create_string_buffer(device.encode())  # struct rtentry points at the device's name
    entry = struct.pack(
        "=Q16s16s16sHh4xQQh6xQQQH6x",  # struct rtentry on a 64-bit kernel
        *(0, _sockaddr(destination), _sockaddr(gateway), _sockaddr(mask), flags, 0, 0, 0, 0),
        *(ctypes.addressof(name), 0, 0, 0),
    )
    fcntl.ioctl(sock, SIOCADDRT, entry)


def reseed(entropy: bytes) -> None:
    """Mix the host's ``entropy`` into the kernel's pool, credited, and reseed the CRNG now, so that
    two clones of one snapshot never draw the same numbers; then reseed Python's own generator."""
    import random

    with open("/dev/urandom", "wb", buffering=0) as urandom:
        request = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
        try:
            fcntl.ioctl(urandom, RNDADDENTROPY, request)
            fcntl.ioctl(urandom, RNDRESEEDCRNG)
        except OSError:  # not root (a test outside a VM): mixing in is still better than nothing
            urandom.write(entropy)
    random.seed()


if __name__ == "__main__":
    if os.getpid() == 1:
        pid1()
    else:  # a test, or someone by hand: be the agent alone
        sys.exit(agent_main())
