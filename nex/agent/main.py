"""``nex-agent``: entry point of the agent inside a machine."""

from __future__ import annotations

import sys

from cyclopts import App

from nex import __version__

app = App(
    name="nex-agent",
    help="The nex agent: runs inside a machine and executes one workload.",
    version=__version__,
)


@app.default
def run() -> int:
    """Connect to the node's internal NATS server and wait for a workload (not built yet)."""
    print("nex-agent: the agent is not built yet (see the open issues).", file=sys.stderr)
    return 1


def main() -> None:
    app()
