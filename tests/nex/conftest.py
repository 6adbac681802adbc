"""Fixtures for nex's integration tests, and the leak check that runs after each of them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import Bus, NatsServerProc, kill_leftovers, processes_mentioning, wait_gone


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
def bus(nats_server: NatsServerProc) -> Iterator[Bus]:
    client = Bus(nats_server.url)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    """After an integration test: no process of the test left, no nats-server store left behind."""
    yield
    if request.node.get_closest_marker("integration") is None:
        return
    marker = str(tmp_path)
    survivors = wait_gone(list(processes_mentioning(marker)), timeout=20)
    problems = []
    if survivors:
        leaked = kill_leftovers(marker)
        problems.append("processes left running: " + "; ".join(f"{pid}: {cmd}" for pid, cmd in leaked.items()))
    stores = sorted(str(p) for p in tmp_path.glob("*/nats"))
    if stores:
        problems.append(f"nats-server work directories left behind: {stores}")
    assert not problems, "\n".join(problems)
