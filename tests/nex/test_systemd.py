"""The node under systemd: the notify protocol against a real datagram socket, as systemd listens.

A test binds a ``SOCK_DGRAM`` unix socket, starts a real node with ``NOTIFY_SOCKET`` pointing at it
(and ``WATCHDOG_USEC``), and reads what the node says: a status while it starts, ``READY=1`` once
its pool is ready, ``WATCHDOG=1`` over and over, ``STOPPING=1`` on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nex.node.systemd import Notifier

from .support import Bus, NatsServerProc, NodeProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def systemd_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        yield sock, path
    finally:
        sock.close()


def messages(sock: socket.socket, until: str, timeout: float = 30) -> list[dict[str, str]]:
    """Datagrams as systemd parses them, until one holds ``until`` (KEY=VALUE)."""
    got: list[dict[str, str]] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {until} within {timeout}s; got {got}")
        sock.settimeout(left)
        data = sock.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in data.splitlines())
        got.append(fields)
        key, value = until.split("=", 1)
        if fields.get(key) == value:
            return got


def test_the_node_says_ready_feeds_the_watchdog_and_says_it_is_stopping(
    home: Path,
    nats_server: NatsServerProc,
    bus: Bus,
    systemd_socket: tuple[socket.socket, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sock, path = systemd_socket
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # 0.2 s: fed every 0.1 s
    node = NodeProcess(home, "--pool-size", "2", server=nats_server.url).start(bus)

    before = messages(sock, "READY=1")
    assert any(m.get("STATUS", "").startswith("starting node") for m in before), before
    assert before[-1]["STATUS"].startswith("ready: node "), before[-1]
    assert messages(sock, "WATCHDOG=1")[-1] == {"WATCHDOG": "1"}
    assert messages(sock, "WATCHDOG=1")[-1] == {"WATCHDOG": "1"}, "and again: it is fed, not told once"

    node.signal(signal.SIGTERM)
    stopping = messages(sock, "STOPPING=1")[-1]
    assert stopping["STATUS"].startswith("stopping: "), stopping
    assert node.wait() == 0


def test_without_notify_socket_nothing_is_sent_and_an_abstract_name_is_used_as_systemd_means(
    tmp_path: Path,
) -> None:
    assert not Notifier({}).send(ready="1")
    assert Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog is None
    assert Notifier({"WATCHDOG_USEC": "1000000"}).watchdog == 1.0
    name = f"nex-test-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)  # systemd's "@name": Linux's abstract namespace
        assert Notifier({"NOTIFY_SOCKET": f"@{name}"}).send(status="line one\nline two")
        assert sock.recv(100) == b"STATUS=line one line two", "one line per field"
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert not notifier.send(ready="1"), "a socket with no systemd behind it: not sent, and no error raised"


def test_log_lines_are_json_on_request_and_without_their_time_on_the_journal(
    home: Path, nats_server: NatsServerProc, bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = NodeProcess(home, "--log-format", "json", server=nats_server.url, name="json").start(bus)
    assert node.stop() == 0
    lines = [json.loads(line) for line in node.log().splitlines() if line.startswith("{")]
    ready = [line for line in lines if line["msg"] == "Node is ready"]
    assert ready, node.log()
    assert ready[0]["level"] == "info"
    assert ready[0]["node"] == node.node_id
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ready[0]["time"])

    journal = home / "journal.log"
    journal.touch()  # the node's stderr: JOURNAL_STREAM names it, as systemd names the journal's socket
    stat = journal.stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
    node = NodeProcess(home, server=nats_server.url, name="journal")
    node.log_path = journal
    node.start(bus)
    assert node.stop() == 0
    ready_line = next(line for line in journal.read_text().splitlines() if "Node is ready" in line)
    assert ready_line.startswith("INF Node is ready"), "journald stamps it: no time of its own"
