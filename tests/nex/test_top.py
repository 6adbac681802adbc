"""``nex top`` against a real node and a real nats-server, driven headless by Textual's Pilot.

The view finds the node by ping, shows the echo workload once its ``workload_started`` arrives (the
machines asked again of the node by ``$NEX.INFO``), shows the events, follows the workload's logs, and
stops it when asked and confirmed, with the stop signed by the same issuer key that ``nex run`` used.
Every wait is on a condition with a deadline (Pilot's ``pause`` lets the app run meanwhile).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from textual.pilot import Pilot
from textual.screen import ModalScreen
from textual.widgets import DataTable, RichLog

from nex.api import control
from nex.bus.server import free_port
from nex.cli.top import make_app
from nex.client import NexClient, RequesterKeys

from .support import Bus, NatsServerProc, NodeProcess, run_cli
from .test_workloads import echo_env, echo_request, needs_namespaces, reach
from .workloads import Binaries

pytestmark = pytest.mark.integration


async def until(pilot: Pilot[Any], condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Let the app run until ``condition`` holds, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"nex top did not show {what} within {timeout}s")
        await pilot.pause(0.05)


def pane(app: Any, selector: str) -> list[str]:
    """The lines a RichLog pane shows."""
    return [strip.text for strip in app.query_one(selector, RichLog).lines]


def node_with_echo(home: Path, server: NatsServerProc, bus: Bus, binaries: Binaries) -> NodeProcess:
    """A node whose workloads reach ``server``, and the echo workload in ``home/bin`` for ``nex run``."""
    needs_namespaces()
    node = NodeProcess(home, *reach(server), server=server.url).start(bus)
    (home / "bin").mkdir()
    (home / "bin" / "echo").write_bytes(binaries.echo)
    return node


def test_top_shows_the_node_its_workload_and_events_follows_logs_and_stops_it_when_confirmed(
    home: Path, open_nats_server: NatsServerProc, obus: Bus, binaries: Binaries
) -> None:
    url = open_nats_server.url
    node = node_with_echo(home, open_nats_server, obus, binaries)
    workload_events = obus.collect("$NEX.events.default.*")
    user = {"HOME": str(home / "user"), "NATS_URL": url}
    env = echo_env(open_nats_server, "top.echo")
    keys_dir = home / "user" / ".nex"

    async def scenario() -> None:
        async with NexClient.connect(url, timeout=1.0) as client:
            app: Any = make_app(client, lambda: RequesterKeys.load_or_create(keys_dir))
            async with app.run_test(size=(200, 50)) as pilot:
                await until(pilot, lambda: app.listening and node.node_id in app.nodes, "the node")
                nodes = app.query_one("#nodes", DataTable)
                assert nodes.get_row(node.node_id)[0].plain == node.node_id
                assert app.selected_node() == node.node_id
                await until(pilot, lambda: app.query_one("#machines", DataTable).row_count > 0, "the warm pool")
                assert app.machines == {}  # only pool members so far: nothing to stop

                run = await asyncio.to_thread(
                    run_cli,
                    "run",
                    str(home / "bin" / "echo"),
                    *[f"--env={k}={v}" for k, v in env.items()],
                    "--json",
                    env=user,
                )
                assert run.returncode == 0, run.stderr
                response = msgspec.json.decode(run.stdout, type=control.RunResponse)

                await until(pilot, lambda: response.id in app.machines, "the workload after workload_started")
                assert app.selected_workload().name == "echo"
                await until(
                    pilot, lambda: any("workload_started" in line for line in pane(app, "#events")), "the event"
                )
                await until(
                    pilot, lambda: nodes.get_row(node.node_id)[4].plain == "1", "the node's workload count of 1"
                )

                await pilot.press("tab", "l")  # to the machines, then follow the workload's logs
                await until(pilot, lambda: app.following is not None, "the log pane following")
                assert app.following.machine_id == response.id
                assert await asyncio.to_thread(echo_request, obus, "top.echo", b"ping") == b"ping"
                await until(pilot, lambda: any("echo: answered 4 bytes" in ln for ln in pane(app, "#logs")), "a log")

                await pilot.press("s")
                await until(pilot, lambda: isinstance(app.screen, ModalScreen), "the confirmation")
                assert workload_events.pending("workload_stopped") == []  # nothing stops before the answer
                await pilot.press("y")
                ended = await asyncio.to_thread(
                    workload_events.wait, "default.workload_stopped", source=node.node_id, timeout=20
                )
                assert ended["data"]["id"] == response.id
                assert ended["data"]["code"] == 0, ended  # SIGTERM, a clean exit: the signed stop was accepted
                await until(pilot, lambda: response.id not in app.machines, "the workload gone")
                await until(pilot, lambda: "Workload 'echo' stopped." in app.status, "the stop's answer")
                await until(
                    pilot, lambda: any("workload_stopped" in line for line in pane(app, "#events")), "the stop event"
                )

                await pilot.press("q")
                await until(pilot, lambda: app.return_code is not None, "the exit")
            assert app.return_code == 0

    asyncio.run(scenario())
    assert node.stop() == 0


def test_top_asks_before_stopping_and_keeps_the_workload_on_no(
    home: Path, open_nats_server: NatsServerProc, obus: Bus, binaries: Binaries
) -> None:
    url = open_nats_server.url
    node = node_with_echo(home, open_nats_server, obus, binaries)
    user = {"HOME": str(home / "user"), "NATS_URL": url}
    env = [f"--env={k}={v}" for k, v in echo_env(open_nats_server, "top.keep").items()]
    run = run_cli("run", str(home / "bin" / "echo"), *env, "--json", env=user)
    assert run.returncode == 0, run.stderr
    response = msgspec.json.decode(run.stdout, type=control.RunResponse)

    async def scenario() -> None:
        async with NexClient.connect(url, timeout=1.0) as client:
            app: Any = make_app(client, lambda: RequesterKeys.load_or_create(home / "user" / ".nex"))
            async with app.run_test(size=(200, 50)) as pilot:
                await until(pilot, lambda: response.id in app.machines, "the running workload (from INFO)")
                await pilot.press("s")
                await until(pilot, lambda: isinstance(app.screen, ModalScreen), "the confirmation")
                await pilot.press("n")
                await until(pilot, lambda: not isinstance(app.screen, ModalScreen), "the confirmation gone")
                assert "stopping" not in app.status  # no stop was sent
                await pilot.press("q")

    asyncio.run(scenario())
    # the node still runs it: a stop would have been answered before the view was closed
    assert node.ping(obus).running_machines == 1
    assert echo_request(obus, "top.keep", b"still") == b"still"
    assert run_cli("stop", response.id, env=user).returncode == 0
    assert node.stop() == 0


def test_top_takes_the_global_options_and_says_when_it_cannot_connect() -> None:
    shown = run_cli("top", "--help")
    assert shown.returncode == 0, shown.stderr
    for flag in ("--server", "--timeout", "--namespace", "--keys"):
        assert flag in shown.stdout, f"{flag} missing from nex top --help"

    nobody = f"nats://127.0.0.1:{free_port('127.0.0.1')}"
    failed = run_cli("top", "--server", nobody, "--timeout", "500ms", "--namespace", "other")
    assert failed.returncode == 1
    assert f"cannot connect to NATS at {nobody}" in failed.stderr
    assert "\x1b[?1049h" not in failed.stdout  # the full screen never started
