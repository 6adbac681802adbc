"""The ``nex`` command line: run a node, find nodes, inspect one, put one in lame duck.

Every command takes ``--server/-s`` (or ``NATS_URL``); the client commands also take ``--timeout``
(a duration: ``2s``, ``500ms``) and ``--namespace`` (or ``NEX_NAMESPACE``). ``nex node up|ls|info``
are aliases for nex users. Exit codes: 0 success, 1 failure, 2 bad usage or configuration.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from cyclopts import App, Parameter

from nex import __version__
from nex.client import NexClient, NexError, parse_duration

from . import render

T = TypeVar("T")

app = App(
    name="nex",
    help="NATS execution engine: run a node, list nodes, inspect one, put one in lame duck.",
    version=__version__,
)
node_app = App(name="node", help="Node commands (the same as the top-level ones, as in nex).")
app.command(node_app)


@Parameter(name="*")
@dataclass
class Connection:
    server: Annotated[str | None, Parameter(name=["--server", "-s"], env_var="NATS_URL")] = None
    """NATS server URL [default: nats://127.0.0.1:4222]."""


@Parameter(name="*")
@dataclass
class Query:
    timeout: str = "2s"
    """How long to wait for answers (2s, 500ms, …)."""
    namespace: Annotated[str, Parameter(env_var="NEX_NAMESPACE")] = "default"
    """Namespace of workloads to show."""


def _fail(message: str, code: int = 1) -> int:
    render.console(stderr=True).print(f"[red]error:[/red] {message}", markup=True, highlight=False)
    return code


def _duration(flag: str, text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise _UsageError(f"{flag}: {exc}") from None


class _UsageError(Exception):
    pass


def _client_command(conn: Connection, query: Query, body: Callable[[NexClient], Awaitable[T]]) -> T:
    timeout = _duration("--timeout", query.timeout)

    async def main() -> T:
        async with NexClient.connect(conn.server, timeout=timeout, namespace=query.namespace) as client:
            return await body(client)

    return asyncio.run(main())


def _guard(fn: Callable[[], int]) -> int:
    try:
        return fn()
    except _UsageError as exc:
        return _fail(str(exc), 2)
    except NexError as exc:
        return _fail(str(exc))


@app.command
def up(
    *,
    config: Path | None = None,
    state_dir: Path | None = None,
    ephemeral: bool = False,
    pool_size: int | None = None,
    tag: list[str] | None = None,
    name: str | None = None,
    internal_port: int | None = None,
    heartbeat_interval: str | None = None,
    handshake_timeout: str | None = None,
    lameduck_deadline: str | None = None,
    log_level: Literal["debug", "info", "warn", "error"] = "info",
    conn: Connection = Connection(),  # noqa: B008  (cyclopts reads the defaults from here)
) -> int:
    """Run a node on this host.

    With no --server and nothing answering at nats://127.0.0.1:4222, the node starts its own
    nats-server there (JetStream on). Flags override the config file.

    Parameters
    ----------
    config
        Node config file (nex's JSON format; nex's sample machineconfig.json loads as it is).
    state_dir
        Where the node keeps its keys and servers' files [default: /var/lib/nex as root, else
        $XDG_STATE_HOME/nex].
    ephemeral
        Use a fresh node key and xkey for this run only (not read from nor written to the state dir).
    pool_size
        Warm machines to keep ready (machine_pool_size).
    tag
        A node tag as KEY=VALUE; repeat for more.
    name
        The node's name (the node_name tag) [default: derived from the node id].
    internal_port
        Port of the agents' internal nats-server; 0 picks a free one (internal_node_port) [default: 9222].
    heartbeat_interval
        Time between heartbeat events, e.g. 30s (heartbeat_interval_ms).
    handshake_timeout
        How long a new machine's agent has to say hello, e.g. 5s (agent_handshake_timeout_ms).
    lameduck_deadline
        How long lame duck waits for workloads before stopping anyway, e.g. 10m (lameduck_deadline_ms).
    log_level
        Least severe log lines to print.
    """
    return _guard(
        lambda: _up(
            config=config,
            state_dir=state_dir,
            ephemeral=ephemeral,
            pool_size=pool_size,
            tag=tag or [],
            name=name,
            internal_port=internal_port,
            heartbeat_interval=heartbeat_interval,
            handshake_timeout=handshake_timeout,
            lameduck_deadline=lameduck_deadline,
            log_level=log_level,
            server=conn.server,
        )
    )


def _up(
    *,
    config: Path | None,
    state_dir: Path | None,
    ephemeral: bool,
    pool_size: int | None,
    tag: list[str],
    name: str | None,
    internal_port: int | None,
    heartbeat_interval: str | None,
    handshake_timeout: str | None,
    lameduck_deadline: str | None,
    log_level: str,
    server: str | None,
) -> int:
    import trio

    from nex import config as node_config
    from nex import logs
    from nex.node.node import Node, NodeError

    overrides: dict[str, Any] = {}
    for item in tag:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _UsageError(f"--tag {item!r}: give tags as KEY=VALUE")
        overrides[f"tags.{key}"] = value
    simple = {"machine_pool_size": pool_size, "internal_node_port": internal_port, "tags.node_name": name}
    overrides.update({k: v for k, v in simple.items() if v is not None})
    for flag, key, text in (
        ("--heartbeat-interval", "heartbeat_interval_ms", heartbeat_interval),
        ("--handshake-timeout", "agent_handshake_timeout_ms", handshake_timeout),
        ("--lameduck-deadline", "lameduck_deadline_ms", lameduck_deadline),
    ):
        if text is not None:
            overrides[key] = int(_duration(flag, text) * 1000)
    if state_dir is not None:
        overrides["state_dir"] = str(state_dir)

    logs.configure(log_level)
    log = logs.get("nex.cli")
    try:
        loaded = node_config.load(config, overrides)
    except node_config.ConfigError as exc:
        return _fail(str(exc), 2)
    for warning in loaded.warnings:
        log.warning(f"config: {warning}")
    cfg = loaded.config
    node = Node(
        cfg,
        state_dir=Path(cfg.state_dir) if cfg.state_dir else node_config.default_state_dir(),
        server=server,
        ephemeral=ephemeral,
    )
    try:
        return trio.run(node.run)
    except NodeError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:  # before the node's own signal handling was in place
        return 130


@app.command
def ls(
    *,
    json: Annotated[bool, Parameter(negative="")] = False,
    expect: int | None = None,
    conn: Connection = Connection(),  # noqa: B008
    query: Query = Query(),  # noqa: B008
) -> int:
    """List the nodes that answer on this NATS (scatter/gather on $NEX.PING).

    Parameters
    ----------
    json
        Print the nodes' ping responses as JSON.
    expect
        Return as soon as this many nodes have answered.
    """

    def run() -> int:
        nodes = _client_command(conn, query, lambda client: client.ping(expect))
        if json:
            print(render.to_json(nodes))
        else:
            render.console().print(render.node_table(nodes))
        return 0

    return _guard(run)


@app.command
def info(
    node_id: str | None = None,
    /,
    *,
    json: Annotated[bool, Parameter(negative="")] = False,
    conn: Connection = Connection(),  # noqa: B008
    query: Query = Query(),  # noqa: B008
) -> int:
    """Show one node: keys, version, uptime, tags, memory, machines and its actor tree.

    Parameters
    ----------
    node_id
        The node's id (or a unique prefix of it); optional when exactly one node answers.
    json
        Print the node's info response as JSON.
    """

    async def body(client: NexClient) -> tuple[str, Any]:
        target = await client.resolve(node_id)
        return target, await client.info(target)

    def run() -> int:
        target, details = _client_command(conn, query, body)
        if json:
            print(render.to_json(details))
        else:
            render.console().print(render.info_view(details, target))
        return 0

    return _guard(run)


@app.command
def lameduck(
    node_id: str | None = None,
    /,
    *,
    deadline: str | None = None,
    conn: Connection = Connection(),  # noqa: B008
    query: Query = Query(),  # noqa: B008
) -> int:
    """Put a node in lame duck: it refuses new work and exits once its workloads end.

    Parameters
    ----------
    node_id
        The node's id (or a unique prefix of it); optional when exactly one node answers.
    deadline
        Stop anyway after this long, e.g. 5m [default: the node's lameduck_deadline_ms].
    """

    def run() -> int:
        seconds = _duration("--deadline", deadline) if deadline is not None else None

        async def body(client: NexClient) -> str:
            target = await client.resolve(node_id)
            await client.lameduck(target, seconds)
            return target

        target = _client_command(conn, query, body)
        print(f"Command to enter lame duck mode issued to {target}")
        return 0

    return _guard(run)


node_app.command(up, name="up")
node_app.command(ls, name="ls")
node_app.command(info, name="info")


def main() -> None:
    app()
