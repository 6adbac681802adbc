"""A workload's output, line by line, however long its lines are and whatever goes wrong passing it on.

A line is passed on in pieces of at most the agent's line limit (64 KiB): a log message must fit in
a NATS message (1 MiB by default, on the node's control server too) with room for its JSON escapes.
A 2 MiB line used to go out as 1 MiB pieces, the first publish failed, the pump died without a word,
and the workload then blocked forever on its full pipe.

The runs are real: the agent's launchpad and pump, and a whole :class:`~nex.agent.runner.Runner`
against a real nats-server with the test playing the node (as in test_log_budget.py), running
``chatty`` (workloads/chatty.c, ``gcc -static``), whose WIDTH argument pads a line to any length.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nex.agent.launchpad import Launchpad
from nex.agent.output import LogGate, pump
from nex.agent.runner import LINE_LIMIT
from nex.api import agent as api

from .support import NatsServerProc
from .test_log_budget import UNLIMITED, PlayedNode, chatty, numbered

__all__ = ["chatty"]  # the fixture, shared with test_log_budget.py

pytestmark = pytest.mark.integration

LONG = 2 << 20  # a line of 2 MiB: twice what a NATS message holds by default


def test_the_line_limit_leaves_room_for_json_escapes_within_a_nats_message() -> None:
    """The worst case of a piece as JSON: every byte a control character (``\\u0001``, 6 bytes)."""
    assert LINE_LIMIT * 6 + 1024 <= 1 << 20


def test_2_mib_lines_go_out_in_pieces_and_the_workload_ends_normally(
    chatty: bytes, nats_server: NatsServerProc, tmp_path: Path
) -> None:
    """Two lines of 2 MiB, then a short one: more than the agent's reader and the pipe hold, so a pump
    that died on the first piece left the workload blocked for good (no workload_stopped)."""
    workdir = tmp_path / "agent"
    workdir.mkdir()
    played = PlayedNode(nats_server.url, workdir, "dc16longline00000001")
    run = asyncio.run(played.deploy(chatty, ["2", str(LONG)], UNLIMITED))
    assert run.stopped is not None
    assert run.stopped.code == 0, run.stopped.message
    lines = run.lines[api.LEVEL_INFO]
    assert lines[-1] == "DONE", "the line after the long ones arrived, last"
    per_line = LONG // LINE_LIMIT
    assert len(lines) == 2 * per_line + 1
    assert all(len(piece.encode()) == LINE_LIMIT for piece in lines[:-1])
    for n, first in ((1, 0), (2, per_line)):
        whole = "".join(lines[first : first + per_line])
        assert whole == numbered(n, n, width=LONG)[0], f"line {n} arrived whole, in order"
    first, summary = [line for line in run.said if "longer than" in line]
    assert "wrote a line longer than 64 KiB on its stdout: such lines go out in pieces of 64 KiB" in first
    assert "wrote 2 lines longer than 64 KiB, which went out in pieces of 64 KiB" in summary
    assert not [line for line in run.said if "could not" in line], run.said


def test_a_failure_to_pass_a_line_on_is_said_and_the_rest_still_goes(tmp_path: Path) -> None:
    """An error passing one line on (a failed publish, say) loses that line, says so once, and the
    pump reads on: the workload is never left blocked on a pipe nobody reads."""
    script = 'printf "first\\nboom\\n"; i=0; while [ $i -lt 20000 ]; do echo "line $i"; i=$((i+1)); done; echo last'
    shell = Path("/bin/sh").read_bytes()

    async def main() -> tuple[list[str], list[BaseException], LogGate, int]:
        pad = Launchpad(None, str(tmp_path))
        workload = await pad.launch(shell, ["-c", script], {}, limit=LINE_LIMIT)
        out: list[str] = []
        errors: list[BaseException] = []
        gate = LogGate(UNLIMITED)

        async def emit(text: str) -> None:
            if text == "boom":
                raise ConnectionError("the bus went away")
            out.append(text)

        await asyncio.wait_for(pump(workload.stdout, LINE_LIMIT, gate, emit, on_error=errors.append), 30)
        code = await asyncio.wait_for(workload.wait(), 30)
        return out, errors, gate, code

    out, errors, gate, code = asyncio.run(main())
    assert code == 0
    assert out == ["first", *(f"line {i}" for i in range(20000)), "last"]
    assert [str(e) for e in errors] == ["the bus went away"]
    assert gate.failed_lines == 1
