"""A snapshot of a supervision tree: who is running, in what state, how busy, how often restarted.

Supervisors build it (:meth:`actors.Supervisor.tree`); it is a plain msgspec Struct so that it can be
sent as JSON (``nex info --json``) or rendered as text (:func:`render_tree`).
"""

from __future__ import annotations

import enum

import msgspec


class ChildState(enum.Enum):
    """The life of one child slot under a supervisor."""

    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class TreeNode(msgspec.Struct, frozen=True):
    """One node of the tree: an actor, a plain task or a supervisor with ``children``."""

    name: str
    kind: str  # "supervisor", "dynamic_supervisor", "actor" or "task"
    state: str
    restarts: int = 0
    mailbox_depth: int | None = None
    mailbox_capacity: int | None = None
    dropped: int = 0
    dead_letters: int = 0
    children: list[TreeNode] = msgspec.field(default_factory=list)

    def walk(self) -> list[TreeNode]:
        """This node and all its descendants, depth first."""
        nodes = [self]
        for child in self.children:
            nodes.extend(child.walk())
        return nodes

    def find(self, name: str) -> TreeNode | None:
        return next((node for node in self.walk() if node.name == name), None)


def render_tree(root: TreeNode) -> str:
    """An indented text rendering, one line per node: ``name [kind] state  mailbox 3/64  restarts 1``."""
    lines: list[str] = []

    def visit(node: TreeNode, prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└─ " if last else "├─ ")
        details = [node.state]
        if node.mailbox_depth is not None:
            details.append(f"mailbox {node.mailbox_depth}/{node.mailbox_capacity}")
        if node.restarts:
            details.append(f"restarts {node.restarts}")
        if node.dropped:
            details.append(f"dropped {node.dropped}")
        lines.append(f"{prefix}{branch}{node.name} [{node.kind}] {'  '.join(details)}")
        child_prefix = prefix if top else prefix + ("   " if last else "│  ")
        for i, child in enumerate(node.children):
            visit(child, child_prefix, i == len(node.children) - 1, False)

    visit(root, "", True, True)
    return "\n".join(lines)
