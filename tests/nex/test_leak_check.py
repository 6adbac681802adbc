"""The leak check itself (support.LeakCheck): it finds what a test left behind, and only that.

A host may run nodes besides the test's own (an operator's, another suite's): their machines come and
go during the test, and are not the test's leaks. Each case makes real objects: files where nex puts
leases and cgroups (in directories of the test's own, for the checker pointed there), and real
network links on the host. A running node is what holds a ``node.lock`` open: the test holds one,
with a journal beside it, to play a node outside the test's directory, and one inside it, to play a
node of the test's own that did not clean up.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from nex.net import netns

from .support import HostPlaces, LeakCheck


def journal(state_dir: Path, **data: str) -> None:
    """A journal record as a node writes it (actors.cleanup.Journal), naming a host object it holds."""
    (state_dir / "journal").mkdir(parents=True, exist_ok=True)
    record = {"kind": "netns", "name": "machine", "pid": 1, "data": data}
    (state_dir / "journal" / f"{secrets.randbits(60)}-1-0-netns-machine.json").write_text(json.dumps(record))


@pytest.fixture
def running_node(tmp_path: Path) -> Iterator[Path]:
    """A node running outside the test's directory: its state dir, whose node.lock is held open."""
    state_dir = tmp_path / "elsewhere" / "node"
    state_dir.mkdir(parents=True)
    fd = os.open(state_dir / "node.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        yield state_dir
    finally:
        os.close(fd)


def lease(root: Path, address: str, owner: str) -> Path:
    path = root / "fcnet" / address
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{owner}\r\nveth0")
    return path


def test_what_the_test_left_is_found_and_nothing_else(tmp_path: Path, running_node: Path) -> None:
    own = tmp_path / "test"
    places = HostPlaces(cgroups=tmp_path / "cgroup", leases=tmp_path / "leases", kernel=False)
    (places.cgroups / "memory").mkdir(parents=True)
    (places.cgroups / "nx0000000001").mkdir()  # there before the test
    lease(places.leases, "10.9.0.2", "a" * 20)
    check = LeakCheck(own, places)

    # another node makes a machine during the test: journaled first, then made
    journal(running_node, netns="nxabcdefabcd", host_link="nxabcdefabcdh", owner="b" * 20)
    (places.cgroups / "memory" / "nxabcdefabcd").mkdir()
    lease(places.leases, "10.9.0.3", "b" * 20)
    # the test's own leftovers
    (places.cgroups / "memory" / "nx1234567890").mkdir()
    ours = lease(places.leases, "10.9.0.4", "c" * 20)

    assert check.leaks() == {
        "cgroups": [str(places.cgroups / "memory" / "nx1234567890")],
        "leases": [str(ours)],
    }


def test_a_node_of_the_tests_own_is_no_excuse(tmp_path: Path) -> None:
    """What a node in the test's own directory holds is the test's, journaled or not."""
    own = tmp_path / "test"
    places = HostPlaces(cgroups=tmp_path / "cgroup", leases=tmp_path / "leases", kernel=False)
    places.cgroups.mkdir()
    check = LeakCheck(own, places)
    state_dir = own / "node"
    state_dir.mkdir(parents=True)
    fd = os.open(state_dir / "node.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        journal(state_dir, netns="nxfeedfeedfe", host_link="nxfeedfeedfeh")
        (places.cgroups / "nxfeedfeedfe").mkdir()
        assert check.leaks() == {"cgroups": [str(places.cgroups / "nxfeedfeedfe")]}
    finally:
        os.close(fd)


def test_a_node_killed_during_the_test_still_has_its_journal(tmp_path: Path) -> None:
    """A node running when the check began and killed since (its lock let go) left its objects and
    its journal: they are its own, not the test's."""
    places = HostPlaces(cgroups=tmp_path / "cgroup", leases=tmp_path / "leases", kernel=False)
    places.cgroups.mkdir()
    state_dir = tmp_path / "elsewhere" / "node"
    state_dir.mkdir(parents=True)
    fd = os.open(state_dir / "node.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        check = LeakCheck(tmp_path / "test", places)
        journal(state_dir, netns="nx0123456789", host_link="nx0123456789h")
        (places.cgroups / "nx0123456789").mkdir()
    finally:
        os.close(fd)  # killed: no process holds its lock any more
    (places.cgroups / "nx9876543210").mkdir()
    assert check.leaks() == {"cgroups": [str(places.cgroups / "nx9876543210")]}


def test_nothing_left_is_no_leak(tmp_path: Path) -> None:
    places = HostPlaces(cgroups=tmp_path / "cgroup", leases=tmp_path / "leases", kernel=False)
    check = LeakCheck(tmp_path / "test", places)
    made = places.cgroups / "nx00000000ff"
    made.mkdir(parents=True)
    made.rmdir()
    assert check.leaks() == {}


@pytest.mark.skipif(not netns.has_capabilities(), reason="needs CAP_NET_ADMIN (run as root)")
def test_real_links_of_the_host(tmp_path: Path, running_node: Path) -> None:
    from nex.net.rtnl import Rtnl

    before, theirs, ours = ("nx" + secrets.token_hex(5) + "g" for _ in range(3))
    with Rtnl() as host:
        try:
            host.add_dummy(before)
            check = LeakCheck(tmp_path / "test")
            journal(running_node, link=theirs)
            host.add_dummy(theirs)
            host.add_dummy(ours)
            links = check.leaks().get("links", [])
            assert ours in links, "a link the test made and left is its leak"
            assert before not in links, "a link there before the test is not"
            assert theirs not in links, "a link of another running node is not"
        finally:
            for name in (before, theirs, ours):
                host.delete_link(name)
