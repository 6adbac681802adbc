"""How the CLI shows things: rich tables for people, JSON for programs.

What a workload or any other publisher on the bus wrote (log text, event data) reaches the operator's
terminal through ``nex logs`` and ``nex events``, so it is shown defanged: a terminal acts on control
characters (ESC starts sequences that set the window title, write the clipboard with OSC 52, erase
lines; CR returns to the start of the line, so a line can be printed over with a forged one), and
nothing a tenant wrote may act on the operator's terminal. See :func:`visible` and :func:`json_line`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import msgspec
from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from nex.api import control, events

LAMEDUCK_MARK = "*"

_CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")
"""What a terminal may act on: the C0 controls but tab (harmless, and common in output), DEL, and the
C1 controls (U+0080..U+009F: CSI, OSC and others in one character, which some terminals honour)."""
_RAW_IN_JSON = re.compile("[\x7f-\x9f]")
"""The controls JSON leaves raw in its strings (it must escape only U+0000..U+001F)."""


def to_json(value: object) -> str:
    return msgspec.json.format(msgspec.json.encode(value), indent=2).decode()


def node_table(nodes: Sequence[control.PingResponse]) -> Table | Text:
    """nex's "NATS Execution Nodes" table: ID (``*`` = lame duck), Name, Version, Uptime, Workloads."""
    if not nodes:
        return Text("No nodes discovered")
    table = Table(title="NATS Execution Nodes", box=box.ROUNDED)
    table.add_column(f"ID ({LAMEDUCK_MARK} = Lameduck Mode)", overflow="fold")
    table.add_column("Name", no_wrap=True)
    table.add_column("Version", no_wrap=True)
    table.add_column("Uptime", justify="right", no_wrap=True)
    table.add_column("Workloads", justify="right", no_wrap=True)
    for node in nodes:
        lameduck = node.tags.get("nex.lameduck") == "true"
        table.add_row(
            Text(node.node_id + (LAMEDUCK_MARK if lameduck else ""), style="yellow" if lameduck else ""),
            node.tags.get("node_name", "no-name"),
            node.version,
            node.uptime,
            str(node.running_machines),
        )
    return table


def workload_table(nodes: Sequence[control.WorkloadPingResponse]) -> Table | Text:
    """``nex ps``: every workload of the namespace, with the node that runs it."""
    rows = sorted(
        ((machine, node) for node in nodes for machine in node.running_machines),
        key=lambda row: (row[0].name, row[1].tags.get("node_name", ""), row[0].id),
    )
    if not rows:
        return Text("No workloads running")
    table = Table(title="Workloads", box=box.ROUNDED)
    table.add_column("ID", no_wrap=True)
    table.add_column("Name", no_wrap=True)
    table.add_column("Type", no_wrap=True)
    table.add_column("Node", no_wrap=True)
    table.add_column("Node ID", overflow="fold")
    for machine, node in rows:
        table.add_row(machine.id, machine.name, machine.type, node.tags.get("node_name", ""), node.node_id)
    return table


def info_view(info: control.InfoResponse, node_id: str) -> Group:
    """``nex info``: the node's facts, its memory, its machines and its actor tree."""
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="cyan", no_wrap=True)
    facts.add_column()
    lameduck = info.tags.get("nex.lameduck") == "true"
    facts.add_row("Node", node_id + ("  (lame duck)" if lameduck else ""))
    facts.add_row("Name", info.tags.get("node_name", "no-name"))
    facts.add_row("Xkey", info.public_xkey)
    facts.add_row("Version", info.version)
    facts.add_row("Uptime", info.uptime)
    facts.add_row("Workload types", ", ".join(info.supported_workload_types) or "-")
    facts.add_row("Tags", ", ".join(f"{k}={v}" for k, v in sorted(info.tags.items())))
    if info.memory is not None:
        facts.add_row(
            "Memory (kB)",
            f"total {info.memory.total:,}  free {info.memory.free:,}  available {info.memory.available:,}",
        )
    if info.sandbox is not None:
        facts.add_row("Sandbox", _sandbox(info.sandbox))
    parts: list[Table | Text] = [Text("NEX Node Information", style="bold cyan"), facts]
    parts.append(_machines(info))
    if info.actors:
        parts.append(_actors(info.actors))
    return Group(*parts)


def _sandbox(sandbox: control.SandboxInfo) -> Text:
    """The jail's layers, one per line, what is not on in yellow with the reason."""
    if sandbox.kind == "none":
        return Text("none: workloads run as root on the host, unlimited (no_sandbox)", style="bold red")
    text = Text(f"{sandbox.kind}{' (incomplete: nex.unsafe)' if sandbox.unsafe else ''}")
    if sandbox.driver and sandbox.driver != "process":
        emulated = " (emulated: no KVM here)" if sandbox.accel == "tcg" else ""
        text.append(f"\n  machines: {sandbox.driver} VMs, {sandbox.accel or 'unknown accelerator'}{emulated}")
    for layer in sandbox.protections:
        style = "" if layer.state == "on" else "yellow"
        detail = f": {layer.detail}" if layer.detail else ""
        text.append(f"\n  {layer.name} {layer.state}{detail}", style=style)
    return text


def _machines(info: control.InfoResponse) -> Table | Text:
    if not info.machines and not info.pool:
        return Text("No machines")
    table = Table(title="Machines", box=box.SIMPLE_HEAD, title_justify="left")
    for column in ("ID", "State", "IP", "Sandbox", "Workload", "Namespace", "Uptime"):
        table.add_column(column, no_wrap=True)
    for machine in info.machines:
        workload, namespace = machine.workload.name, machine.namespace or "-"
        table.add_row(
            machine.id, "running", machine.ip or "-", machine.sandbox or "-", workload, namespace, machine.uptime
        )
    for member in info.pool:
        table.add_row(member.id, f"{member.state} (warm pool)", member.ip or "-", member.sandbox or "-", "-", "-", "-")
    return table


def _actors(rows: Sequence[control.ActorSummary]) -> Table:
    table = Table(title="Actors", box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("Name", no_wrap=True)
    table.add_column("Kind")
    table.add_column("State")
    table.add_column("Mailbox", justify="right")
    table.add_column("Restarts", justify="right")
    for row in rows:
        style = "" if row.state == "running" else "yellow"
        table.add_row(
            "  " * row.depth + row.name, row.kind, Text(row.state, style=style), row.mailbox or "-", str(row.restarts)
        )
    return table


def visible(text: str) -> str:
    """``text`` with every control character a terminal would act on shown as ``\\xNN`` instead.

    Tab stays as it is, and a backslash is not doubled: a workload printing ``\\x1b`` literally
    looks like one that printed ESC, which is harmless (the point is that nothing it prints acts on
    the terminal, not that the output can be decoded back). Newlines are escaped too, so one message
    is always one line, and no message can start a line of its own that looks like someone else's.
    """
    return _CONTROLS.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def json_line(value: object) -> str:
    """``value`` as one line of JSON that is safe to print on a terminal.

    JSON escapes U+0000..U+001F in strings but leaves DEL and the C1 controls raw; they are escaped
    here as ``\\u00NN``, which any JSON parser reads back as the same string. Outside strings the
    encoder writes no whitespace at all, so the line has no control character anywhere.
    """
    text = msgspec.json.encode(value).decode()
    return _RAW_IN_JSON.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def log_line(subject: str, data: bytes, as_json: bool) -> str | None:
    """One ``$NEX.logs.{ns}.{node}.{workload}.{vmid}`` message as a line (None if it is not one).

    In text mode every field is shown through :func:`visible` (the subject's tokens and the level
    come off the bus too, not only the workload's text); in JSON mode through :func:`json_line`.
    """
    tokens = subject.split(".")
    try:
        raw = msgspec.json.decode(data, type=control.RawLog)
    except msgspec.DecodeError:
        return None
    if len(tokens) != 6:
        return None
    namespace, node_id, workload, vmid = tokens[2:6]
    if as_json:
        emitted = control.EmittedLog(
            namespace=namespace,
            node_id=node_id,
            workload_name=workload,
            workload_id=vmid,
            timestamp=_now(),
            text=raw.text,
            level=raw.level,
            id=raw.id,
        )
        return json_line(emitted)
    return visible(f"{_now()[11:23]} {workload} {vmid} {raw.level:<5} {raw.text}")


def event_line(data: bytes, as_json: bool) -> str | None:
    """One CloudEvent as a line: time, source node, type and its data (None if it is not one).

    JSON mode prints the event re-encoded (:func:`json_line`), not the bytes as they came: JSON lets
    a publisher put CR and LF between tokens and DEL or C1 controls raw in strings, and each would
    reach the terminal. Re-encoded, it is the same JSON value (keys in their order) on one line.
    """
    try:
        event = msgspec.json.decode(data, type=events.CloudEvent)
    except msgspec.DecodeError:
        return None
    if as_json:
        return json_line(msgspec.json.decode(data))
    details = event.data if isinstance(event.data, dict) else {}
    summary = " ".join(f"{k}={v}" for k, v in details.items() if not isinstance(v, dict | list))
    return visible(f"{event.time[11:23]} {event.source[:12]}… {event.type:<22} {summary}")


def _now() -> str:
    return events.now_rfc3339()


def console(*, stderr: bool = False) -> Console:
    """A console for tables (stdout) or messages (stderr, never wrapped mid-line).

    Not on a terminal, rich would assume 80 columns, too few for a node id and its neighbours;
    piped output gets 160.
    """
    probe = Console(stderr=stderr)
    width = None if probe.is_terminal else 160
    return Console(stderr=stderr, highlight=False, soft_wrap=stderr, width=width)
