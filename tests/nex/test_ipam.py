"""Leases in CNI host-local's layout: format, ownership, wrap-around, exhaustion, concurrent writers."""

from __future__ import annotations

import ipaddress
import multiprocessing
from pathlib import Path

import pytest

from nex.net.ipam import Ipam, SubnetExhausted

SUBNET = ipaddress.IPv4Network("10.9.0.0/29")  # hosts .1-.6; .1 is the gateway
GATEWAY = ipaddress.IPv4Address("10.9.0.1")


def ipam(root: Path) -> Ipam:
    return Ipam("testnet", SUBNET, GATEWAY, root)


def test_a_lease_is_a_host_local_file(tmp_path: Path) -> None:
    address = ipam(tmp_path).allocate("vm1", "veth0")
    assert str(address) == "10.9.0.2"
    lease = tmp_path / "testnet" / "10.9.0.2"
    assert lease.read_bytes() == b"vm1\r\nveth0"
    assert (tmp_path / "testnet" / "last_reserved_ip.0").read_text() == "10.9.0.2"
    assert (tmp_path / "testnet" / "lock").exists()


def test_only_the_owner_releases_and_release_is_idempotent(tmp_path: Path) -> None:
    pool = ipam(tmp_path)
    address = str(pool.allocate("vm1", "veth0"))
    assert not pool.release(address, "vm2")
    assert pool.leases() == {address: "vm1"}
    assert pool.release(address, "vm1")
    assert not pool.release(address, "vm1")
    assert pool.leases() == {}


def test_allocation_moves_on_and_wraps_around_skipping_the_gateway(tmp_path: Path) -> None:
    pool = ipam(tmp_path)
    first = [str(pool.allocate(f"vm{i}", "veth0")) for i in range(5)]
    assert first == ["10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6"]
    with pytest.raises(SubnetExhausted, match=r"no free address left in 10\.9\.0\.0/29"):
        pool.allocate("vm5", "veth0")
    pool.release("10.9.0.3", "vm1")
    assert str(pool.allocate("vm6", "veth0")) == "10.9.0.3"


def _allocate_many(root: str, prefix: str, count: int) -> list[str]:
    pool = Ipam("testnet", ipaddress.IPv4Network("10.8.0.0/24"), ipaddress.IPv4Address("10.8.0.1"), Path(root))
    return [str(pool.allocate(f"{prefix}-{i}", "veth0")) for i in range(count)]


def test_concurrent_processes_never_share_an_address(tmp_path: Path) -> None:
    with multiprocessing.get_context("spawn").Pool(4) as workers:
        results = workers.starmap(_allocate_many, [(str(tmp_path), f"p{n}", 40) for n in range(4)])
    addresses = [a for batch in results for a in batch]
    assert len(addresses) == 160
    assert len(set(addresses)) == 160
