"""The installed console scripts: help, usage errors, and talking to a bus with no nodes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .support import Bus, Follower, NatsServerProc, run_cli

UP_FLAGS = (
    "--allow",
    "--no-sandbox",
    "--config",
    "--state-dir",
    "--ephemeral",
    "--pool-size",
    "--tag",
    "--name",
    "--internal-port",
    "--heartbeat-interval",
    "--handshake-timeout",
    "--lameduck-deadline",
    "--log-level",
    "--server",
)


@pytest.mark.parametrize(("script", "expected"), [("nex", "up"), ("nex-agent", "agent")])
def test_console_script_prints_help(script: str, expected: str) -> None:
    path = shutil.which(script)
    assert path is not None, f"{script} is not installed: run pip install -e ."
    result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout


def test_up_help_documents_every_flag() -> None:
    result = run_cli("up", "--help")
    assert result.returncode == 0
    for flag in UP_FLAGS:
        line = next((ln for ln in result.stdout.splitlines() if re.search(rf"{flag}\b", ln)), None)
        assert line is not None, f"{flag} missing from nex up --help"
        description = line.split(flag, 1)[1].strip(" │-")
        assert len(description) > 10, f"{flag} has no description: {line!r}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("up", "--tag", "novalue"), "--tag 'novalue': give KEY=VALUE"),
        (("up", "--heartbeat-interval", "soon"), "--heartbeat-interval: 'soon' is not a duration"),
        (("ls", "--timeout", "forever"), "--timeout: 'forever' is not a duration"),
        (("run", "/bin/true", "--env", "NOEQUALS"), "--env 'NOEQUALS': give KEY=VALUE"),
        (("run", "/bin/true", "--name", "two words"), "--name: 'two words' is not a workload name"),
        (("run", "/no/such/file"), "cannot read /no/such/file: No such file or directory"),
        (("logs", "--timeout", "later"), "--timeout: 'later' is not a duration"),
        (("up", "--allow", "10.0.0.1:http"), "--allow 10.0.0.1:http: the port must be a number"),
        (("up", "--allow", "gateway:4222"), "an opening's cidr must be an IP network such as 192.168.127.1/32"),
    ],
)
def test_bad_flags_exit_2_and_say_why(args: tuple[str, ...], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.integration
def test_no_nodes_is_said_plainly(tmp_path: Path) -> None:
    server = NatsServerProc(tmp_path, jetstream=False).start()
    try:
        table = run_cli("ls", "-s", server.url, "--timeout", "300ms")
        assert table.returncode == 0
        assert "No nodes discovered" in table.stdout
        as_json = run_cli("ls", "--json", "-s", server.url, "--timeout", "300ms")
        assert as_json.stdout.strip() == "[]"
        info = run_cli("info", "-s", server.url, "--timeout", "300ms")
        assert info.returncode == 1
        assert "no nodes answered on $NEX.PING" in info.stderr
    finally:
        server.stop()


def test_an_unreachable_server_is_a_clear_client_error() -> None:
    result = run_cli("ls", "-s", "nats://127.0.0.1:1")
    assert result.returncode == 1
    assert "cannot connect to NATS at nats://127.0.0.1:1: connection refused" in result.stderr


@pytest.mark.integration
def test_a_follower_rides_out_a_restart_of_its_server(tmp_path: Path) -> None:
    """As ``nats sub`` does: a server restarted (or a node that brought its own back) loses no follower."""
    server = NatsServerProc(tmp_path, jetstream=False).start()
    probe = b'{"specversion":"1.0","id":"","source":"probe","type":"probe","time":""}'
    bus = Bus(server.url)
    follower = Follower(["events", "--follow", "-s", server.url], {})
    try:
        follower.until_listening(bus, "$NEX.events.default.probe", probe)
        bus.close()
        server.stop()
        follower.wait_for(lambda line: "lost the connection to NATS" in line and "reconnecting" in line)
        server.start()  # the same port
        follower.wait_for(lambda line: "reconnected to NATS" in line)
        bus = Bus(server.url)
        event = b'{"specversion":"1.0","id":"","source":"again","type":"after_restart","time":""}'
        bus.run(bus.nc.publish("$NEX.events.default.after_restart", event))
        follower.wait_for(lambda line: "after_restart" in line)
        assert follower.interrupt() == 0
    finally:
        bus.close()
        server.stop()
        if follower.proc.poll() is None:
            follower.proc.kill()
