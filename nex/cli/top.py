"""``nex top``: a full-screen live view of the nodes on the bus, one node's machines, and the events.

Nodes are found once by ``$NEX.PING`` and then kept fresh from events alone (``heartbeat``,
``node_started``, ``node_stopped``, ``node_entered_lameduck`` on ``$NEX.events.system``): nothing is
polled. The selected node's machines come from ``$NEX.INFO.{ns}.{node}``, asked again when the node is
picked, when one of its workloads starts or stops, and at its heartbeat. Keys: up/down pick a node
(tab moves to the machines, where up/down pick a workload), ``l`` follows the workload's logs, ``s``
stops it (after asking; signed with your issuer key, as ``nex stop`` does), ``q`` quits.

Textual is imported only here, when the command runs: the CLI's other commands do not pay for it.
Everything that came off the bus is shown as plain text, defanged (:func:`render.visible`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec

from nex.api import control, events, subjects
from nex.client import NexClient, NexError, RequesterKeys

from . import render
from .app import Connection, Keys, Query, _client_command, _guard

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from textual.app import App

EVENTS = f"{subjects.EVENTS_PREFIX}.>"
EVENT_LINES = 1000  # kept in the event pane
LOG_LINES = 2000  # kept in the log pane


@dataclass
class NodeView:
    """What the view knows of a node: from its ping answer, then from its events."""

    node_id: str
    name: str
    version: str
    uptime: str
    workloads: int
    lameduck: bool = False
    seen: float = field(default_factory=time.monotonic)

    @classmethod
    def from_ping(cls, ping: control.PingResponse | events.HeartbeatData) -> NodeView:
        node_id = ping.node_id
        return cls(
            node_id=node_id,
            name=ping.tags.get("node_name", "no-name"),
            version=ping.version,
            uptime=ping.uptime,
            workloads=ping.running_machines,
            lameduck=ping.tags.get("nex.lameduck") == "true",
        )


@dataclass(frozen=True)
class Selected:
    """A workload picked in the machines pane."""

    node_id: str
    machine_id: str
    name: str
    namespace: str


def top(
    *,
    keys: Keys = Keys(),  # noqa: B008
    conn: Connection = Connection(),  # noqa: B008
    query: Query = Query(),  # noqa: B008
) -> int:
    """A live, full-screen view of the nodes, the selected node's machines and workloads, and the events.

    Refreshed from events and heartbeats, not by polling. Keys: up/down pick a node; tab moves to the
    machines, where up/down pick a workload; l follows its logs; s stops it (asking first; signed with
    your issuer key, as `nex stop`); q quits.
    """

    def run() -> int:
        async def body(client: NexClient) -> None:
            await make_app(client, keys.load).run_async()

        _client_command(conn, query, body)
        return 0

    return _guard(run)


def make_app(client: NexClient, requester: Callable[[], RequesterKeys]) -> App[None]:
    """The Textual app over a connected ``client``; ``requester`` gives the keys that sign a stop."""
    from rich.text import Text
    from textual import on
    from textual.app import App, ComposeResult
    from textual.binding import Binding
    from textual.containers import Horizontal, Vertical
    from textual.screen import ModalScreen
    from textual.widgets import Button, DataTable, Footer, Header, Label, RichLog, Static

    def cell(value: object) -> Text:
        return Text(render.visible(str(value)), no_wrap=True)  # never markup: it came off the bus

    class ConfirmStop(ModalScreen[bool]):
        """Stop this workload? y / n."""

        BINDINGS: ClassVar[list[Any]] = [
            Binding("y", "answer(True)", "Stop it"),
            Binding("n,escape", "answer(False)", "Keep it"),
        ]
        DEFAULT_CSS = """
        ConfirmStop { align: center middle; }
        ConfirmStop > Vertical { width: 64; height: auto; border: thick $error; padding: 1 2; background: $surface; }
        ConfirmStop Horizontal { height: auto; margin-top: 1; }
        ConfirmStop Button { margin-right: 2; }
        """

        def __init__(self, question: str) -> None:
            super().__init__()
            self.question = question

        def compose(self) -> ComposeResult:
            with Vertical():
                yield Label(Text(self.question))
                with Horizontal():
                    yield Button("Stop it (y)", variant="error", id="yes")
                    yield Button("Keep it (n)", id="no")

        def action_answer(self, answer: bool) -> None:
            self.dismiss(answer)

        @on(Button.Pressed)
        def pressed(self, event: Button.Pressed) -> None:
            self.dismiss(event.button.id == "yes")

    class Top(App[None]):
        TITLE = "nex top"
        BINDINGS: ClassVar[list[Any]] = [
            Binding("q", "quit", "Quit"),
            Binding("l", "follow_logs", "Follow logs"),
            Binding("s", "stop_workload", "Stop workload"),
        ]
        CSS = """
        #nodes { height: auto; max-height: 12; }
        #machines { height: 1fr; }
        #panes { height: 2fr; }
        #events, #logs { width: 1fr; border: round $primary; }
        #status { height: 1; color: $warning; }
        DataTable { border: round $primary; }
        """

        def __init__(self) -> None:
            super().__init__()
            self.client = client
            self.nodes: dict[str, NodeView] = {}
            self.machines: dict[str, Selected] = {}  # machine id -> workload, for the selected node
            self.following: Selected | None = None
            self.status = ""
            self._logs_sub: Subscription | None = None
            self._events_sub: Subscription | None = None
            self.listening = False  # the event subscription is in place (and the first ping done)

        # -- layout ---------------------------------------------------------------------------------

        def compose(self) -> ComposeResult:
            yield Header()
            nodes: DataTable[Text] = DataTable(id="nodes", cursor_type="row")
            nodes.border_title = "Nodes (* = lame duck)"
            yield nodes
            machines: DataTable[Text] = DataTable(id="machines", cursor_type="row")
            machines.border_title = "Machines"
            yield machines
            with Horizontal(id="panes"):
                event_log = RichLog(id="events", max_lines=EVENT_LINES, markup=False)
                event_log.border_title = f"Events ({EVENTS})"
                yield event_log
                log_pane = RichLog(id="logs", max_lines=LOG_LINES, markup=False)
                log_pane.border_title = "Logs (l: follow the selected workload)"
                yield log_pane
            yield Static(id="status")
            yield Footer()

        async def on_mount(self) -> None:
            self.sub_title = f"{client.url}  namespace {client.namespace}"
            nodes = self.query_one("#nodes", DataTable)
            for key, label in (
                ("id", "ID"),
                ("name", "Name"),
                ("version", "Version"),
                ("uptime", "Uptime"),
                ("workloads", "Workloads"),
                ("seen", "Seen"),
            ):
                nodes.add_column(label, key=key)
            machines = self.query_one("#machines", DataTable)
            for label in ("ID", "State", "Workload", "Namespace", "IP", "Sandbox", "Uptime"):
                machines.add_column(label, key=label.lower())
            nodes.focus()
            self.set_interval(1.0, self._tick)
            self.run_worker(self._start(), group="start")

        async def _start(self) -> None:
            # A follower's patience: a live view rides out a restarted server (as `nex events --follow`).
            client.nc.options["max_reconnect_attempts"] = -1
            client.nc.options["reconnect_time_wait"] = 0.1
            # Subscribe before asking: a node that starts meanwhile is seen by its node_started.
            self._events_sub = await client.nc.subscribe(EVENTS, cb=self._on_event)
            await client.nc.flush()
            try:
                found = await client.ping()
            except NexError as exc:
                self._say(str(exc))
                found = []
            for ping in found:
                self._put_node(NodeView.from_ping(ping))
            self.listening = True
            if not found:
                self._say(f"no node answered on {subjects.PING}; waiting for node_started or heartbeat events")

        # -- nodes ----------------------------------------------------------------------------------

        def _put_node(self, node: NodeView) -> None:
            table = self.query_one("#nodes", DataTable)
            known = node.node_id in self.nodes
            self.nodes[node.node_id] = node
            row = {
                "id": node.node_id + ("*" if node.lameduck else ""),
                "name": node.name,
                "version": node.version,
                "uptime": node.uptime,
                "workloads": node.workloads,
                "seen": "now",
            }
            if known:
                for column, value in row.items():
                    table.update_cell(node.node_id, column, cell(value))
            else:
                table.add_row(*(cell(v) for v in row.values()), key=node.node_id)
                if len(self.nodes) == 1:
                    self._select(node.node_id)

        def _drop_node(self, node_id: str) -> None:
            if self.nodes.pop(node_id, None) is None:
                return
            table = self.query_one("#nodes", DataTable)
            table.remove_row(node_id)
            if self.selected_node() is None or self.selected_node() == node_id:
                self._show_machines(None, None)
            if self.nodes:
                self._select(self.selected_node() or next(iter(self.nodes)))

        def selected_node(self) -> str | None:
            table = self.query_one("#nodes", DataTable)
            if not self.nodes or table.row_count == 0:
                return None
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
            return key if key in self.nodes else None

        def _select(self, node_id: str) -> None:
            self.refresh_machines(node_id)

        @on(DataTable.RowHighlighted, "#nodes")
        def _node_picked(self, event: DataTable.RowHighlighted) -> None:
            if event.row_key.value is not None:
                self.refresh_machines(event.row_key.value)

        def _tick(self) -> None:
            table = self.query_one("#nodes", DataTable)
            now = time.monotonic()
            for node in self.nodes.values():
                age = int(now - node.seen)
                table.update_cell(node.node_id, "seen", cell("now" if age < 1 else f"{age}s ago"))
            connected = client.nc.is_connected
            self.sub_title = f"{client.url}  namespace {client.namespace}" + ("" if connected else "  (reconnecting…)")

        async def _ask_ping(self, node_id: str) -> None:
            try:
                ping = await client.find(node_id)
            except NexError as exc:
                self._say(f"{node_id[:12]}…: {exc}")
                return
            if node_id in self.nodes:
                self._put_node(NodeView.from_ping(ping))

        # -- machines -------------------------------------------------------------------------------

        def refresh_machines(self, node_id: str) -> None:
            """Ask the node for its machines ($NEX.INFO), replacing any question still out."""
            self.run_worker(self._ask_info(node_id), group="info", exclusive=True)

        async def _ask_info(self, node_id: str) -> None:
            try:
                details = await client.info(node_id)
            except NexError as exc:
                self._say(f"{node_id[:12]}…: {exc}")
                return
            if node_id == self.selected_node():
                self._show_machines(node_id, details)

        def _show_machines(self, node_id: str | None, details: control.InfoResponse | None) -> None:
            table = self.query_one("#machines", DataTable)
            keep = self.selected_workload()
            table.clear()
            self.machines = {}
            if node_id is None or details is None:
                table.border_title = "Machines"
                return
            name = details.tags.get("node_name", "no-name")
            table.border_title = f"Machines of {render.visible(name)} ({node_id[:12]}…)"
            for machine in details.machines:
                namespace = machine.namespace or client.namespace
                self.machines[machine.id] = Selected(node_id, machine.id, machine.workload.name, namespace)
                ip, sandbox = machine.ip or "-", machine.sandbox or "-"
                values = (machine.id, "running", machine.workload.name, namespace, ip, sandbox, machine.uptime)
                table.add_row(*(cell(v) for v in values), key=machine.id)
            for member in details.pool:
                state, ip, sandbox = f"{member.state} (warm pool)", member.ip or "-", member.sandbox or "-"
                values = (member.id, state, "-", "-", ip, sandbox, "-")
                table.add_row(*(cell(v) for v in values), key=member.id)
            if keep is not None and keep.machine_id in self.machines:
                table.move_cursor(row=table.get_row_index(keep.machine_id))

        def selected_workload(self) -> Selected | None:
            table = self.query_one("#machines", DataTable)
            if table.row_count == 0:
                return None
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
            return self.machines.get(key or "")

        # -- events ---------------------------------------------------------------------------------

        async def _on_event(self, msg: Msg) -> None:
            line = render.event_line(msg.data, False)
            if line is None:
                return
            self.query_one("#events", RichLog).write(Text(line))
            try:
                event = msgspec.json.decode(msg.data, type=events.CloudEvent)
            except msgspec.DecodeError:
                return
            data = event.data if isinstance(event.data, dict) else {}
            try:
                self._apply(event, data)
            except (msgspec.ValidationError, TypeError):  # a malformed event changes nothing
                return

        def _apply(self, event: events.CloudEvent, data: dict[str, Any]) -> None:
            if event.type == events.HEARTBEAT:
                beat = msgspec.convert(data, events.HeartbeatData)
                self._put_node(NodeView.from_ping(beat))
                if beat.node_id == self.selected_node():
                    self.refresh_machines(beat.node_id)  # the pool's state, once a heartbeat
            elif event.type == events.NODE_STARTED:
                started = msgspec.convert(data, events.NodeStartedData)
                view = NodeView(started.id, started.tags.get("node_name", "no-name"), started.version, "0s", 0)
                self._put_node(view)
            elif event.type == events.NODE_STOPPED:
                self._drop_node(msgspec.convert(data, events.NodeStoppedData).id)
            elif event.type == events.NODE_ENTERED_LAMEDUCK:
                node = self.nodes.get(msgspec.convert(data, events.LameDuckData).id)
                if node is not None:
                    node.lameduck = True
                    node.seen = time.monotonic()
                    self._put_node(node)
            elif event.type in (events.WORKLOAD_STARTED, events.WORKLOAD_STOPPED):
                if event.source in self.nodes:  # its workload count: asked of it alone, not counted here
                    self.run_worker(self._ask_ping(event.source), group=f"ping-{event.source}", exclusive=True)
                if event.source == self.selected_node():
                    self.refresh_machines(event.source)

        # -- keys -----------------------------------------------------------------------------------

        async def action_follow_logs(self) -> None:
            chosen = self.selected_workload()
            if chosen is None:
                self._say("pick a workload first (tab to the machines, then up/down)")
                return
            if self._logs_sub is not None:
                await self._logs_sub.unsubscribe()
                self._logs_sub = None
            pane = self.query_one("#logs", RichLog)
            pane.clear()
            pattern = f"{subjects.LOGS_PREFIX}.{chosen.namespace}.{chosen.node_id}.{chosen.name}.>"
            pane.border_title = render.visible(f"Logs of {chosen.name} {chosen.machine_id}")

            async def show(msg: Msg) -> None:
                line = render.log_line(msg.subject, msg.data, False)
                if line is not None:
                    pane.write(Text(line))

            self._logs_sub = await client.nc.subscribe(pattern, cb=show)
            await client.nc.flush()
            self.following = chosen
            self._say(f"following {pattern}")

        def action_stop_workload(self) -> None:
            chosen = self.selected_workload()
            if chosen is None:
                self._say("pick a workload first (tab to the machines, then up/down)")
                return

            def answered(stop: bool | None) -> None:
                if stop:
                    self.run_worker(self._stop(chosen), group="stop")

            question = f"Stop workload '{chosen.name}' ({chosen.machine_id}) on node {chosen.node_id[:12]}…?"
            self.push_screen(ConfirmStop(render.visible(question)), answered)

        async def _stop(self, chosen: Selected) -> None:
            self._say(f"stopping {chosen.name} ({chosen.machine_id})…")
            try:
                keys = requester()
                response = await client.stop(chosen.machine_id, keys.issuer)
            except NexError as exc:
                self._say(f"could not stop {chosen.machine_id}: {exc}")
                return
            self._say(f"Workload '{response.name}' stopped.")

        def _say(self, text: str) -> None:
            self.status = render.visible(text)
            self.query_one("#status", Static).update(Text(self.status))

    return Top()
