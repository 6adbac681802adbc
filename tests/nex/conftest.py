"""Fixtures for nex's integration tests, and the leak check that runs after each of them."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .image_fixture import guest_image  # noqa: F401  (a fixture, for the VM tests)
from .support import (
    STARTED,
    Bus,
    LeakCheck,
    NatsServerProc,
    host_objects,
    kill_leftovers,
    processes_mentioning,
    wait_gone,
)
from .workloads import Binaries, BuildUnavailable, build


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """The test's directory: nodes' state dirs and logs live here, so leaks can be found by path."""
    return tmp_path


@pytest.fixture
def nats_server(home: Path) -> Iterator[NatsServerProc]:
    server = NatsServerProc(home).start()
    yield server
    server.stop()


@pytest.fixture
def open_nats_server(home: Path) -> Iterator[NatsServerProc]:
    """A control server on every address, so that workloads reach it from their machines."""
    server = NatsServerProc(home, host="0.0.0.0").start()
    yield server
    server.stop()


@pytest.fixture
def obus(open_nats_server: NatsServerProc) -> Iterator[Bus]:
    """A client of the open control server."""
    client = Bus(open_nats_server.url)
    yield client
    client.close()


@pytest.fixture
def bystander() -> Iterator[int]:
    """A harmless host process of the test's own, whose pid and memory a hostile workload goes for."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def binaries(tmp_path_factory: pytest.TempPathFactory) -> Binaries:
    """The test workloads, built once with gcc (-static and not)."""
    try:
        return build(tmp_path_factory.mktemp("workloads"))
    except BuildUnavailable as exc:
        pytest.skip(f"cannot build the test workloads: {exc}")


@pytest.fixture
def bus(nats_server: NatsServerProc) -> Iterator[Bus]:
    client = Bus(nats_server.url)
    yield client
    client.close()


def kernel_objects() -> dict[str, set[str]]:
    """Every nx* host object, whoever made it (see :func:`.support.host_objects`); a test's own leaks
    are what :class:`.support.LeakCheck` finds."""
    return host_objects()


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    """After an integration test: none of its processes, stores, machine dirs, namespaces, links or leases.

    Only what the test itself left counts: its processes and files are found by its directory, and
    its kernel objects and leases are those that appeared during the test and that no other node
    running on the host holds (see :class:`.support.LeakCheck`), so that an operator's node, or another
    suite's, on the same host does not fail the suite.
    """
    integration = request.node.get_closest_marker("integration") is not None
    check = LeakCheck(tmp_path) if integration else None
    STARTED.clear()
    yield
    if check is None:
        return
    for node in STARTED:  # a test that failed half-way: stop its nodes as an operator would
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(30)
    marker = str(tmp_path)
    survivors = wait_gone(list(processes_mentioning(marker)), timeout=20)
    problems = []
    if survivors:
        leaked = kill_leftovers(marker)
        problems.append("processes left running: " + "; ".join(f"{pid}: {cmd}" for pid, cmd in leaked.items()))
    stores = sorted(str(p) for p in tmp_path.glob("*/nats"))
    if stores:
        problems.append(f"nats-server work directories left behind: {stores}")
    machines = sorted(str(p) for p in tmp_path.glob("*/vm/*/*/*"))
    if machines:
        problems.append(f"machine state directories left behind: {machines}")
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if marker in line]
    if mounts:
        problems.append(f"mounts of the test's files left behind: {mounts}")
    problems += [f"{kind} left behind: {found}" for kind, found in check.leaks().items()]
    assert not problems, "\n".join(problems)
