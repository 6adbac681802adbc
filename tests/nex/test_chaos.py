"""A short chaos run against a real node: bench/chaos.py's faults and load, and its invariants asserted.

For 20 s, four clients deploy and stop real static workloads (some cancelled half way) while
agents, the internal nats-server and the control nats-server are killed or restarted under the node;
then every workload is stopped and the node with it. The run's report must hold no violation: every
deploy answered once (success then ``workload_started``, or an error with a reason), every workload
that started reported stopped, the node answering PING outside the control server's restarts, and
nothing of the node's left on the host once it exited with 0. What each invariant means exactly, and
what is not counted against the node (requests NATS could not deliver while its server was down), is
in bench/chaos.py's docstring.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest
from rich.console import Console

from nex.net import netns

from .workloads import Binaries

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench"
SECONDS = 20.0
#: four kills of the internal nats-server in the run: one restart each stays within the node's restart
#: intensity (5 in 30 s), and the faults that cascade into more restarts get their chances to show
INTERNAL_EVERY = 5.0


def chaos_module() -> ModuleType:
    """bench/chaos.py (the benchmarks import each other as top-level modules, as a script does)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import chaos

    return chaos


def test_the_node_keeps_its_promises_under_chaos(home: Path, binaries: Binaries) -> None:
    # binaries: gcc with a static libc builds workloads on this host (the fixture skips otherwise)
    if not netns.has_capabilities():
        pytest.skip("needs root: machines in their own namespaces, workloads reaching the control server")
    chaos = chaos_module()
    console = Console(width=150)

    report = chaos.run_chaos(SECONDS, home, internal_every=INTERNAL_EVERY, console=console)

    chaos.render(console, report)  # in the test's output: the counts behind a failure
    assert report.violations == [], "\n".join(str(v) for v in report.violations)
    # the faults did happen, and the load was real
    assert report.total("agents killed") >= 1, report.counts
    assert report.total("internal nats-server killed") >= 1, report.counts
    assert report.total("control nats-server restarted") >= 1, report.counts
    assert report.total("deploys cancelled (") >= 1, report.counts
    assert report.total("deploys: success") >= 10, report.counts
    assert report.total("stops: success") >= 5, report.counts
    assert report.total("pings sent") >= SECONDS, report.counts
    assert report.node_exit == 0
    assert report.leaks == {}
