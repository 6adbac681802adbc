"""IP leases as files, in CNI host-local's on-disk layout, safe between threads and processes.

``/var/lib/cni/networks/{network}/`` holds one file per leased address, named by the address and
containing ``{owner}\\r\\n{ifname}`` (what host-local writes), plus ``last_reserved_ip.0`` and a
``lock`` file that every allocator takes with ``flock``, as host-local does. So nex's operator advice
for leaked leases still applies, and a CNI plugin sharing the network would see our leases.

Allocation picks the next free address after the last one reserved (wrapping around), skipping the
network, broadcast and gateway addresses; the lease file is created with ``O_EXCL``, so even a writer
that ignores the lock cannot be handed the same address twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path

LAST_RESERVED = "last_reserved_ip.0"
LINE_BREAK = "\r\n"
DEFAULT_ROOT = Path("/var/lib/cni/networks")


class SubnetExhausted(Exception):
    """Every address of the subnet is leased."""


class Ipam:
    """Leases in ``{root}/{network}`` from ``subnet``; ``gateway`` (the host side) is never leased."""

    def __init__(
        self, network: str, subnet: ipaddress.IPv4Network, gateway: ipaddress.IPv4Address, root: Path = DEFAULT_ROOT
    ) -> None:
        self.dir = root / network
        self.subnet = subnet
        self.gateway = gateway

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def allocate(self, owner: str, ifname: str) -> ipaddress.IPv4Address:
        """Lease the next free address to ``owner`` (a machine id)."""
        with self._locked():
            hosts = [ip for ip in self.subnet.hosts() if ip != self.gateway]
            start = 0
            last = self._read(self.dir / LAST_RESERVED)
            if last is not None:
                with contextlib.suppress(ValueError):
                    start = hosts.index(ipaddress.IPv4Address(last)) + 1
            for i in range(len(hosts)):
                ip = hosts[(start + i) % len(hosts)]
                try:
                    fd = os.open(self.dir / str(ip), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    continue
                with os.fdopen(fd, "w") as lease:
                    lease.write(f"{owner}{LINE_BREAK}{ifname}")
                (self.dir / LAST_RESERVED).write_text(str(ip))
                return ip
        raise SubnetExhausted(
            f"no free address left in {self.subnet} (leases in {self.dir}); remove stale leases of stopped machines"
        )

    def release(self, ip: str, owner: str) -> bool:
        """Remove ``ip``'s lease if ``owner`` holds it; True if it did. Idempotent."""
        path = self.dir / ip
        with self._locked():
            held_by = self._read(path)
            if held_by is None or held_by.split(LINE_BREAK, 1)[0].strip() != owner:
                return False
            path.unlink(missing_ok=True)
            return True

    def leases(self) -> dict[str, str]:
        """Address -> owner, for every lease in the directory."""
        if not self.dir.is_dir():
            return {}
        found = {}
        for path in self.dir.iterdir():
            with contextlib.suppress(ValueError):
                ipaddress.IPv4Address(path.name)
                text = self._read(path)
                if text is not None:
                    found[path.name] = text.split(LINE_BREAK, 1)[0].strip()
        return found

    @staticmethod
    def _read(path: Path) -> str | None:
        try:
            return path.read_bytes().decode()  # not read_text(): it would turn the \r\n into \n
        except FileNotFoundError:
            return None
