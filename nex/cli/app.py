"""The ``nex`` command line (cyclopts)."""

from __future__ import annotations

import sys

from cyclopts import App

from nex import __version__

app = App(name="nex", help="NATS execution engine: run a node, list nodes, deploy workloads.", version=__version__)


@app.command
def up() -> int:
    """Start a node on this host (connects to NATS, keeps a warm pool of machines)."""
    print("nex up: the node is not built yet (see the open issues).", file=sys.stderr)
    return 1


def main() -> None:
    app()
