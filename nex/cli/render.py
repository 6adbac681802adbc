"""How the CLI shows things: rich tables for people, JSON for programs."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from nex.api import control, events

LAMEDUCK_MARK = "*"


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


def log_line(subject: str, data: bytes, as_json: bool) -> str | None:
    """One ``$NEX.logs.{ns}.{node}.{workload}.{vmid}`` message as a line (None if it is not one)."""
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
        return msgspec.json.encode(emitted).decode()
    return f"{_now()[11:23]} {workload} {vmid} {raw.level:<5} {raw.text}"


def event_line(data: bytes, as_json: bool) -> str | None:
    """One CloudEvent as a line: time, source node, type and its data (None if it is not one)."""
    try:
        event = msgspec.json.decode(data, type=events.CloudEvent)
    except msgspec.DecodeError:
        return None
    if as_json:
        return data.decode(errors="replace")
    details = event.data if isinstance(event.data, dict) else {}
    summary = " ".join(f"{k}={v}" for k, v in details.items() if not isinstance(v, dict | list))
    return f"{event.time[11:23]} {event.source[:12]}… {event.type:<22} {summary}"


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
