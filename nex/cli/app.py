"""The ``nex`` command line: run a node, find nodes, inspect one, put one in lame duck, run workloads.

Every command takes ``--server/-s`` (or ``NATS_URL``); the client commands also take ``--timeout``
(a duration: ``2s``, ``500ms``) and ``--namespace`` (or ``NEX_NAMESPACE``). ``nex node up|ls|info``
are aliases for nex users. Exit codes: 0 success, 1 failure, 2 bad usage or configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from cyclopts import App, Parameter
from nats.aio.msg import Msg
from rich.markup import escape

from nex import __version__
from nex.api import control, subjects
from nex.client import NexClient, NexError, RequesterKeys, deploy_body, parse_duration
from nex.workload.names import NAME_RULE
from nex.workload.target import goarch

from . import render

T = TypeVar("T")

Flag = Annotated[bool, Parameter(negative="")]
"""A switch with no ``--no-`` form."""
Follow = Annotated[bool, Parameter(name=["--follow", "-f"], negative="")]

app = App(
    name="nex",
    help="NATS execution engine: run a node, list and inspect nodes, run workloads and watch them.",
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
    """Namespace of the workloads to run, stop or show."""


def _fail(message: str, code: int = 1) -> int:
    text = f"[red]error:[/red] {escape(message)}"  # a message may hold brackets: [/PREFIX], $.x[0]
    render.console(stderr=True).print(text, markup=True, highlight=False)
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


def _show(value: T, json: bool, view: Callable[[T], Any]) -> int:
    """Print ``value`` as JSON, or as ``view`` renders it; the exit code."""
    if json:
        print(render.to_json(value))
    else:
        render.console().print(view(value))
    return 0


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
    allow: list[str] | None = None,
    no_sandbox: bool = False,
    driver: Literal["process", "qemu", "firecracker"] | None = None,
    log_level: Literal["debug", "info", "warn", "error"] = "info",
    log_format: Literal["text", "json"] = "text",
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
    allow
        Let machines reach ADDRESS[/PREFIX][:PORT] through the network fence (sandbox.allow), e.g.
        192.168.127.1:4222 for a NATS server on the host; repeat for more. By default machines reach only
        the node's internal NATS server.
    no_sandbox
        Run workloads without any jail, limit or fence: as root, on this host (no_sandbox). Only for
        code you trust.
    driver
        What a machine is (driver): a jailed process, a QEMU microvm, or a Firecracker VM [default:
        qemu when the config names a kernel or rootfs, else process].
    log_level
        Least severe log lines to print.
    log_format
        Log lines as text (key=value; without their time under systemd, whose journal stamps them) or
        one JSON object each.
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
            allow=allow or [],
            no_sandbox=no_sandbox,
            driver=driver,
            log_level=log_level,
            log_format=log_format,
            server=conn.server,
        )
    )


def _opening(text: str) -> dict[str, Any]:
    """``ADDRESS[/PREFIX][:PORT]`` as a fence opening (TCP; port 0: any); IPv6 as ``[ADDRESS]:PORT``."""
    if text.startswith("["):  # [v6]:port or [v6/prefix]:port
        address, _, port = text[1:].partition("]")
        port = port.removeprefix(":") or "0"
    elif text.count(":") == 1:
        address, _, port = text.partition(":")
    else:
        address, port = text, "0"
    if not port.isdigit():
        raise _UsageError(f"--allow {text}: the port must be a number (ADDRESS[/PREFIX][:PORT])")
    single = "/128" if ":" in address else "/32"
    return {"cidr": address if "/" in address else address + single, "port": int(port)}


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
    allow: list[str],
    no_sandbox: bool,
    driver: str | None,
    log_level: str,
    log_format: str,
    server: str | None,
) -> int:
    import trio

    from nex import config as node_config
    from nex import logs
    from nex.node.node import Node, NodeError

    overrides: dict[str, Any] = {f"tags.{key}": value for key, value in _pairs("--tag", tag).items()}
    simple = {
        "machine_pool_size": pool_size,
        "internal_node_port": internal_port,
        "tags.node_name": name,
        "driver": driver,
    }
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
    if no_sandbox:
        overrides["no_sandbox"] = True

    logs.configure(log_level, log_format)
    log = logs.get("nex.cli")
    try:
        loaded = node_config.load(config, overrides, openings=[_opening(text) for text in allow])
    except node_config.ConfigError as exc:
        return _fail(str(exc), 2)
    for warning in loaded.warnings:
        log.warning(f"config: {warning}")
    cfg = loaded.config
    from .preflight import start_refusal  # a VM driver's requirements, checked before anything starts

    if (refusal := start_refusal(cfg)) is not None:
        return _fail(refusal)
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
    json: Flag = False,
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
        Wait (up to --timeout) until this many nodes have answered, asking again every 250 ms
        (nodes still starting are found), and return then.
    """

    def run() -> int:
        return _show(_client_command(conn, query, lambda client: client.ping(expect)), json, render.node_table)

    return _guard(run)


@app.command
def ps(
    workload: str | None = None,
    /,
    *,
    json: Flag = False,
    conn: Connection = Connection(),  # noqa: B008
    query: Query = Query(),  # noqa: B008
) -> int:
    """List the workloads of the namespace on every node (scatter/gather on $NEX.WPING).

    Parameters
    ----------
    workload
        Only this workload (its id, or its name: every copy of it).
    json
        Print the nodes' workload ping responses as JSON.
    """

    def run() -> int:
        nodes = _client_command(conn, query, lambda client: client.probe(workload))
        nodes = sorted(nodes, key=lambda n: (n.tags.get("node_name", ""), n.node_id))
        return _show(nodes, json, render.workload_table)

    return _guard(run)


@app.command
def info(
    node_id: str | None = None,
    /,
    *,
    json: Flag = False,
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
    tag: Annotated[list[str] | None, Parameter(negative="")] = None,
    deadline: str | None = None,
    conn: Connection = Connection(),  # noqa: B008
    query: Query = Query(),  # noqa: B008
) -> int:
    """Put a node in lame duck: it refuses new work and exits once its workloads end.

    Parameters
    ----------
    node_id
        The node's id (or a unique prefix of it); optional when exactly one node answers.
    tag
        Every node with this tag, KEY=VALUE (repeat: nodes with all of them), instead of one node.
    deadline
        Stop anyway after this long, e.g. 5m [default: the node's lameduck_deadline_ms].
    """

    def run() -> int:
        seconds = _duration("--deadline", deadline) if deadline is not None else None
        wanted = _pairs("--tag", tag or [])
        if wanted and node_id is not None:
            raise _UsageError("give a node id or --tag, not both")

        async def body(client: NexClient) -> list[str]:
            if not wanted:
                targets = [await client.resolve(node_id)]
            else:
                nodes = await client.ping()
                targets = [n.node_id for n in nodes if all(n.tags.get(k) == v for k, v in wanted.items())]
                if not targets:
                    shown = ", ".join(f"{k}={v}" for k, v in wanted.items())
                    raise NexError(f"no node answering on {subjects.PING} has the tags {shown}")
            for target in targets:
                await client.lameduck(target, seconds)
            return targets

        for target in _client_command(conn, query, body):
            print(f"Command to enter lame duck mode issued to {target}")
        return 0

    return _guard(run)


@Parameter(name="*")
@dataclass
class Keys:
    keys: Annotated[Path | None, Parameter(env_var="NEX_KEYS")] = None
    """Directory of issuer.nk (account seed that signs workload JWTs) and publisher.xk (xkey that seals
    environments), created on first use [default: ~/.nex]."""

    def load(self) -> RequesterKeys:
        return RequesterKeys.load_or_create(self.keys or Path.home() / ".nex")


@app.command
def run(
    target: str,
    /,
    *,
    name: str | None = None,
    env: Annotated[list[str] | None, Parameter(negative="")] = None,
    argv: Annotated[list[str] | None, Parameter(negative="")] = None,
    essential: Flag = False,
    description: str = "",
    node: str | None = None,
    tag: Annotated[list[str] | None, Parameter(negative="")] = None,
    arch: str | None = None,
    workload_type: str = "native",
    sandboxed: bool | None = None,
    json: Flag = False,
    keys: Keys = Keys(),  # noqa: B008
    conn: Connection = Connection(),  # noqa: B008
    query: Query = Query(),  # noqa: B008
) -> int:
    """Run a static executable on a node (nex's devrun and run in one).

    Without --node the node is placed by auction ($NEX.AUCTION): every node that matches the
    constraints (--tag, --arch, --workload-type, --sandboxed) and can take work bids, and the least
    loaded bidder runs it (ties at random).

    A FILE is uploaded to the object store NEXCLIFILES first; nats://BUCKET/key names one already
    stored. The environment is sealed to the node's xkey; the workload JWT, which carries the file's
    sha256, is signed with your issuer key.

    Parameters
    ----------
    target
        A static executable to upload, or nats://BUCKET/key.
    name
        The workload's name (letters, digits, _ and -) [default: from the file or key name].
    env
        An environment variable for the workload, KEY=VALUE; repeat for more.
    argv
        An argument for the workload; repeat for more.
    essential
        Run it again (with backoff, a few times) when it exits with an error.
    description
        Free text shown with the workload.
    node
        Run it on this node (its id, or a unique prefix of it) rather than on an auction's winner.
    tag
        Only nodes with this tag, KEY=VALUE; repeat for more.
    arch
        Only nodes of this architecture (Go's names: amd64, arm64) [default: the executable's].
    workload_type
        Only nodes that run this type of workload.
    sandboxed
        Only nodes that sandbox their workloads (--no-sandboxed: only nodes that do not).
    json
        Print the node's run response as JSON.
    """

    def run_() -> int:
        environment = _pairs("--env", env or [])
        wanted_tags = _pairs("--tag", tag or [])
        constrained = bool(wanted_tags) or arch is not None or sandboxed is not None
        if node is not None and constrained:
            raise _UsageError("--node names the node: --tag, --arch and --sandboxed choose one by auction")
        source = None if target.startswith("nats://") else Path(target)
        workload = name or _default_name(target)
        if not NAME_RULE.match(workload):
            raise _UsageError(f"--name: {workload!r} is not a workload name (letters, digits, _ and - only)")
        data = b""
        if source is not None:
            try:
                data = source.read_bytes()
            except OSError as exc:
                raise _UsageError(f"cannot read {source}: {exc.strerror}") from None
        requester = keys.load()

        auction = control.AuctionRequest(
            arch=arch or goarch(data),
            os="linux" if data.startswith(b"\x7fELF") else None,
            sandboxed=sandboxed,
            tags=wanted_tags or None,
            workload_types=[workload_type],
        )

        async def body(client: NexClient) -> tuple[control.RunResponse, control.PingResponse | control.AuctionResponse]:
            found = await (client.find(node) if node is not None else client.place(auction))
            artifact = await (client.upload(data, workload) if source is not None else client.stored(target))
            request = deploy_body(
                artifact,
                found,
                workload,
                requester,
                environment=environment,
                argv=argv,
                description=description,
                essential=essential,
                workload_type=workload_type,
            )
            return await client.deploy(found, request), found

        response, found = _client_command(conn, query, body)
        if json:
            print(render.to_json(response))
        else:
            print(
                f"🚀 Workload '{response.name}' accepted. You can now refer to this workload with ID: "
                f"{response.id} on node {found.node_id}"
            )
        return 0

    return _guard(run_)


@app.command
def stop(
    workload_id: str,
    /,
    *,
    json: Flag = False,
    keys: Keys = Keys(),  # noqa: B008
    conn: Connection = Connection(),  # noqa: B008
    query: Query = Query(),  # noqa: B008
) -> int:
    """Stop a workload: it gets SIGTERM, a grace period, then SIGKILL, and its machine is torn down.

    Only the issuer that deployed it may stop it: the stop JWT is signed with your issuer key.

    Parameters
    ----------
    workload_id
        The workload's id, as `nex run` printed it.
    json
        Print the node's stop response as JSON.
    """

    def run_() -> int:
        requester = keys.load()
        response = _client_command(conn, query, lambda client: client.stop(workload_id, requester.issuer))
        if json:
            print(render.to_json(response))
        else:
            print(f"✅ Workload '{response.name}' stopped.")
        return 0

    return _guard(run_)


@app.command
def logs(
    *,
    workload: str | None = None,
    node: str | None = None,
    follow: Follow = False,
    json: Flag = False,
    conn: Connection = Connection(),  # noqa: B008
    query: Query = Query(),  # noqa: B008
) -> int:
    """Print workloads' output lines (stdout as INFO, stderr as ERROR) as they are published.

    Lines are not stored: without --follow this prints what arrives within --timeout and exits.

    Parameters
    ----------
    workload
        Only this workload (its name or its id).
    node
        Only workloads on this node (its full id).
    follow
        Keep printing until interrupted.
    json
        One JSON object per line.
    """
    pattern = subjects.log(query.namespace, node or "*", "*", "*")

    def keep(msg: Msg) -> bool:
        tokens = msg.subject.split(".")
        return workload is None or workload in tokens[4:6]

    return _stream(
        conn, query, [pattern], follow, keep, lambda msg: render.log_line(msg.subject, msg.data, json), "log lines"
    )


@app.command
def events(
    *,
    follow: Follow = False,
    json: Flag = False,
    conn: Connection = Connection(),  # noqa: B008
    query: Query = Query(),  # noqa: B008
) -> int:
    """Print node and workload events (CloudEvents) of the namespace and of the system namespace.

    Events are not stored: without --follow this prints what arrives within --timeout and exits.

    Parameters
    ----------
    follow
        Keep printing until interrupted.
    json
        Each event as it was published, one per line.
    """
    patterns = sorted({subjects.event(query.namespace, "*"), subjects.event(subjects.SYSTEM_NAMESPACE, "*")})
    return _stream(
        conn, query, patterns, follow, lambda _: True, lambda msg: render.event_line(msg.data, json), "events"
    )


def _stream(
    conn: Connection,
    query: Query,
    patterns: list[str],
    follow: bool,
    keep: Callable[[Msg], bool],
    show: Callable[[Msg], str | None],
    what: str,
) -> int:
    """Print what arrives on ``patterns`` (kept and shown as lines) for --timeout, or until interrupted."""

    def run_() -> int:
        duration = None if follow else _duration("--timeout", query.timeout)
        shown = 0

        async def body(client: NexClient) -> None:
            nonlocal shown
            async for msg in client.watch(patterns, duration, notice=_notice):
                line = show(msg) if keep(msg) else None
                if line is not None:
                    print(line, flush=True)
                    shown += 1

        with contextlib.suppress(KeyboardInterrupt):  # how a --follow ends
            _client_command(conn, query, body)
        if not shown and duration is not None:
            render.console(stderr=True).print(
                f"No {what} arrived within {query.timeout} (they are not stored: --follow waits for them)"
            )
        return 0

    return _guard(run_)


def _notice(text: str) -> None:
    """A follower's word about its connection, on stderr (stdout carries only what it follows)."""
    render.console(stderr=True).print(f"nex: {text}", markup=False, highlight=False)


def _pairs(flag: str, items: list[str]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _UsageError(f"{flag} {item!r}: give KEY=VALUE")
        pairs[key] = value
    return pairs


def _default_name(target: str) -> str:
    """nex devrun's rule: the file's (or key's) base name without its dots; other odd characters go too."""
    base = target.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^a-zA-Z0-9_-]", "", base.replace(".", ""))


node_app.command(up, name="up")
node_app.command(ls, name="ls")
node_app.command(info, name="info")
app.command("nex.cli.image:image_app", name="image")  # lazily: imported when run
app.command("nex.cli.preflight:preflight", name="preflight")  # lazily: imported when run
app.command("nex.cli.top:top", name="top")  # lazily: Textual is imported only when it runs
node_app.command("nex.cli.preflight:preflight", name="preflight")


def main() -> None:
    app()
