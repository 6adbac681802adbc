"""A workload's output budget: a flood of lines is slowed at its agent, by backpressure, and nothing is lost.

The token bucket is tested on its own with an injected clock. The rest runs real pieces: the agent's
launchpad and pump, and a whole :class:`~nex.agent.runner.Runner` against a real nats-server with the
test playing the node, deploying ``chatty`` (workloads/chatty.c, ``gcc -static``), which prints
numbered lines as fast as it can and then ``DONE``. A run under a budget must take at least the time
the budget implies (the one place a time bound is the behaviour under test: a lower bound, with a
margin), and the same run with a budget far too large to matter is the control that shows the bound
can fail.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.msg import Msg
from nats.js.api import ObjectStoreConfig, StorageType

from nex.agent.launchpad import Launchpad
from nex.agent.output import LogGate, TokenBucket, pump
from nex.agent.runner import Runner
from nex.api import agent as api

from .support import NatsServerProc

MARGIN = 0.8  # of the time a budget implies: timers and scheduling only ever make a run slower
UNLIMITED = api.LogBudget(lines_per_second=10**9, bytes_per_second=10**12, burst_lines=10**9, burst_bytes=10**12)


# -- the token bucket, on an injected clock ---------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_burst_goes_at_once_then_lines_wait_for_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(api.LogBudget(lines_per_second=10, burst_lines=3, bytes_per_second=0), clock)
    assert [bucket.take(1, 10) for _ in range(3)] == [0, 0, 0]
    assert bucket.take(1, 10) == pytest.approx(0.1), "in debt by one line: a tenth of a second"
    clock.now += 0.1
    assert bucket.take(1, 10) == pytest.approx(0.1), "repaid, and in debt by the next one"
    clock.now += 60
    assert [bucket.take(1, 10) for _ in range(3)] == [0, 0, 0], "a long pause refills to the burst, no more"
    assert bucket.take(1, 10) == pytest.approx(0.1)


def test_the_debt_of_concurrent_takers_adds_up() -> None:
    """stdout and stderr share one bucket: each waits for the debt taken before it, so together they
    go no faster than the rate."""
    clock = Clock()
    bucket = TokenBucket(api.LogBudget(lines_per_second=100, burst_lines=0, bytes_per_second=0), clock)
    assert [bucket.take(1, 1) for _ in range(4)] == pytest.approx([0.01, 0.02, 0.03, 0.04])
    clock.now += 0.025
    assert bucket.take(1, 1) == pytest.approx(0.025)


def test_bytes_have_their_own_rate_and_a_piece_larger_than_the_burst_still_goes() -> None:
    clock = Clock()
    budget = api.LogBudget(lines_per_second=1000, burst_lines=1000, bytes_per_second=1000, burst_bytes=500)
    bucket = TokenBucket(budget, clock)
    assert bucket.take(1, 500) == 0
    assert bucket.take(1, 2000) == pytest.approx(2.0), "the larger of the two waits: bytes here"
    clock.now += 2.0
    assert bucket.take(1, 0) == 0, "the debt is repaid once its time is over"


def test_a_rate_of_zero_lifts_that_limit() -> None:
    clock = Clock()
    bucket = TokenBucket(api.LogBudget(lines_per_second=0, bytes_per_second=1, burst_bytes=10**9), clock)
    assert all(bucket.take(1, 1) == 0 for _ in range(100_000))
    bucket = TokenBucket(api.LogBudget(lines_per_second=1, burst_lines=1, bytes_per_second=0), clock)
    assert bucket.take(1, 10**12) == 0
    assert bucket.take(1, 1) == pytest.approx(1.0)


def test_every_machine_has_a_budget_by_default() -> None:
    meta = msgspec.json.decode(b'{"vmid":"v","node_nats_host":"h","node_nats_port":1}', type=api.MachineMetadata)
    assert meta.log_budget == api.LogBudget(
        lines_per_second=100, bytes_per_second=256 << 10, burst_lines=100, burst_bytes=256 << 10
    )
    assert b"log_budget" not in msgspec.json.encode(meta), "the defaults are not written out"
    with pytest.raises(msgspec.ValidationError, match="lines_per_second"):
        msgspec.json.decode(b'{"lines_per_second": -1}', type=api.LogBudget)


# -- the chatty workload ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chatty(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """workloads/chatty.c, built static; run only as a workload (the agent's launchpad runs it)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("cannot build the test workloads: gcc is not installed (apt-get install gcc libc6-dev)")
    out = tmp_path_factory.mktemp("chatty") / "chatty"
    source = Path(__file__).parent / "workloads" / "chatty.c"
    built = subprocess.run([gcc, "-static", "-O2", "-o", str(out), str(source)], capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"cannot build chatty (a static libc is needed): {built.stderr.strip()}")
    return out.read_bytes()


def numbered(first: int, last: int, step: int = 1, width: int = 0) -> list[str]:
    """chatty's lines ``first..last``, as it pads them."""
    return [str(n).ljust(width, ".") for n in range(first, last + 1, step)]


# -- the launchpad and the pump, without NATS ------------------------------------------------------


@pytest.mark.integration
def test_lines_longer_than_the_reader_limit_go_out_whole_in_pieces(tmp_path: Path) -> None:
    """A line over the limit is passed on in pieces of the limit, in order; a UTF-8 character cut by
    a piece boundary stays whole; a last line without a newline is not lost."""
    limit = 1000  # 1000 is not a multiple of 3: pieces of "€" (3 bytes) are cut mid-character
    script = 'e=€; i=0; while [ $i -lt 12 ]; do e=$e$e; i=$((i+1)); done; printf "short\\n%s\\nafter\\nlast" "$e"'

    shell = Path("/bin/sh").read_bytes()

    async def main() -> list[str]:
        pad = Launchpad(None, str(tmp_path))
        workload = await pad.launch(shell, ["-c", script], {}, limit=limit)
        out: list[str] = []

        async def emit(text: str) -> None:
            out.append(text)

        await asyncio.wait_for(pump(workload.stdout, limit, LogGate(UNLIMITED), emit), 30)
        assert await asyncio.wait_for(workload.wait(), 30) == 0
        return out

    out = asyncio.run(main())
    long = "€" * 4096  # 12288 bytes
    assert out[0] == "short"
    assert out[-2:] == ["after", "last"]
    pieces = out[1:-2]
    assert "".join(pieces) == long, "nothing lost, nothing replaced"
    assert len(pieces) == 13, "12288 bytes in pieces of at most 1000 (a cut character moves to the next)"
    assert all(len(piece.encode()) <= limit + 2 for piece in pieces)


# -- a whole runner against a real nats-server, the test playing the node --------------------------


@dataclass
class Run:
    """What the node saw of one workload: its lines by level, its stop, and the agent's own log."""

    lines: dict[int, list[str]] = field(default_factory=lambda: {api.LEVEL_INFO: [], api.LEVEL_ERROR: []})
    stopped: api.WorkloadStatus | None = None
    elapsed: float = 0.0  # from the deploy to the last DONE
    said: list[str] = field(default_factory=list)
    undeploy_took: float = 0.0


class PlayedNode:
    """The node's side of one agent: a store with the artifact, a deploy, and everything the agent says."""

    def __init__(self, url: str, workdir: Path, vmid: str) -> None:
        self.url, self.workdir, self.vmid = url, workdir, vmid
        self.run = Run()
        self.stopped = asyncio.Event()
        self.lines_seen = asyncio.Event()
        self.expect_done = 1
        self.wanted_lines = 0

    def _on_agent(self, msg: Msg) -> None:
        if msg.subject == api.logs(self.vmid):
            entry = msgspec.json.decode(msg.data, type=api.LogEntry)
            self.run.lines[entry.level].append(entry.text)
            received = sum(map(len, self.run.lines.values()))
            if self.wanted_lines and received >= self.wanted_lines:
                self.lines_seen.set()
            if entry.text == "DONE":
                self.expect_done -= 1
                if self.expect_done == 0:
                    self.run.elapsed = time.monotonic() - self.started
        elif msg.subject == api.events(self.vmid, "workload_stopped"):
            self.run.stopped = msgspec.json.decode(msg.data, type=api.WorkloadStatus)
            self.stopped.set()

    async def deploy(
        self, artifact: bytes, argv: list[str], budget: api.LogBudget, *, streams: int = 1, stop_after: int = 0
    ) -> Run:
        """Deploy ``artifact`` to a Runner with ``budget``; wait for its stop (or undeploy it once
        ``stop_after`` lines have arrived, with a short grace)."""
        self.expect_done, self.wanted_lines = streams, stop_after
        agent = await nats.connect(self.url)
        node = await nats.connect(self.url)
        finished = asyncio.Event()
        runner = Runner(agent, self.vmid, finished, self.run.said.append, workdir=str(self.workdir), log_budget=budget)
        store = None
        try:

            async def on_agent(msg: Msg) -> None:
                self._on_agent(msg)

            await node.subscribe(f"{api.PREFIX}.{self.vmid}.>", cb=on_agent)  # one subscription: in order
            await agent.subscribe(api.deploy(self.vmid), cb=runner.on_deploy)
            await agent.subscribe(api.undeploy(self.vmid), cb=runner.on_undeploy)
            store = await node.jetstream().create_object_store(
                api.bucket(self.vmid), config=ObjectStoreConfig(storage=StorageType.MEMORY)
            )
            runner.prepare()
            await store.put(api.ARTIFACT_KEY, artifact)
            request = api.AgentDeployRequest(
                workload_name="chatty",
                namespace="default",
                hash=hashlib.sha256(artifact).hexdigest(),
                total_bytes=len(artifact),
                argv=argv,
            )
            self.started = time.monotonic()
            reply = await node.request(api.deploy(self.vmid), msgspec.json.encode(request), timeout=10)
            answer = msgspec.json.decode(reply.data, type=api.DeployResponse)
            assert answer.accepted, answer.message
            if stop_after:
                await asyncio.wait_for(self.lines_seen.wait(), 30)
                began = time.monotonic()
                grace = msgspec.json.encode(api.UndeployRequest(grace_ms=300))
                await node.request(api.undeploy(self.vmid), grace, timeout=20)
                self.run.undeploy_took = time.monotonic() - began
            await asyncio.wait_for(self.stopped.wait(), 60)
            await asyncio.wait_for(finished.wait(), 10)
            return self.run
        finally:
            await runner.terminate(0)  # a test that failed half-way leaves no workload behind
            runner.close()
            if store is not None:
                await node.jetstream().delete_object_store(api.bucket(self.vmid))
            await agent.close()
            await node.close()


@pytest.fixture
def played(nats_server: NatsServerProc, tmp_path: Path) -> PlayedNode:
    workdir = tmp_path / "agent"
    workdir.mkdir()
    return PlayedNode(nats_server.url, workdir, "dc16logbudget0000001")


def held_back(run: Run) -> list[str]:
    return [line for line in run.said if "wrote faster than its log budget" in line]


@pytest.mark.integration
def test_a_flood_is_slowed_to_the_budget_and_every_line_arrives_in_order(
    chatty: bytes, played: PlayedNode, nats_server: NatsServerProc, tmp_path: Path
) -> None:
    count, rate, burst = 20_000, 5000, 100
    budget = api.LogBudget(lines_per_second=rate, burst_lines=burst, bytes_per_second=0)
    run = asyncio.run(played.deploy(chatty, [str(count)], budget))
    assert run.stopped is not None
    assert run.stopped.code == 0
    assert run.lines[api.LEVEL_INFO] == [*numbered(1, count), "DONE"], "every line, in order"
    implied = (count + 1 - burst) / rate
    assert run.elapsed >= MARGIN * implied, f"{count} lines in {run.elapsed:.2f} s: faster than {rate} lines/s"
    [said] = held_back(run)  # once
    seconds = float(said.rsplit("for ", 1)[1].split(" s")[0])
    assert seconds >= MARGIN * implied, said
    assert "log budget of 5000 lines/s with a burst of 100:" in said

    # The control: the same run with a budget far too large to matter is much faster, so the bound
    # above is the budget's doing (and the test could fail).
    workdir = tmp_path / "control"
    workdir.mkdir()
    control = asyncio.run(
        PlayedNode(nats_server.url, workdir, "dc16logbudget0000002").deploy(chatty, [str(count)], UNLIMITED)
    )
    assert control.lines[api.LEVEL_INFO] == [*numbered(1, count), "DONE"]
    assert control.elapsed < MARGIN * implied, f"unbudgeted, {count} lines took {control.elapsed:.2f} s"
    assert held_back(control) == []
    print(f"\n{count} lines: {run.elapsed:.2f} s at {rate} lines/s (implied {implied:.2f} s)")
    print(f"{count} lines: {control.elapsed:.2f} s unbudgeted")


@pytest.mark.integration
def test_stdout_and_stderr_share_one_budget(chatty: bytes, played: PlayedNode) -> None:
    count, rate, burst = 10_000, 5000, 100
    budget = api.LogBudget(lines_per_second=rate, burst_lines=burst, bytes_per_second=0)
    run = asyncio.run(played.deploy(chatty, [str(count), "0", "2"], budget, streams=2))
    assert run.lines[api.LEVEL_INFO] == [*numbered(1, count, 2), "DONE"]
    assert run.lines[api.LEVEL_ERROR] == [*numbered(2, count, 2), "DONE"]
    implied = (count + 2 - burst) / rate  # a budget per stream would let them through in half that
    assert run.elapsed >= MARGIN * implied, f"{count} lines on two streams in {run.elapsed:.2f} s"
    print(f"\n{count} lines on stdout and stderr: {run.elapsed:.2f} s at {rate} lines/s (implied {implied:.2f} s)")


@pytest.mark.integration
def test_bytes_are_budgeted_too(chatty: bytes, played: PlayedNode) -> None:
    count, width, rate, burst = 64, 16383, 512 << 10, 64 << 10  # 64 lines of 16 KiB, newline included
    budget = api.LogBudget(lines_per_second=0, bytes_per_second=rate, burst_bytes=burst)
    run = asyncio.run(played.deploy(chatty, [str(count), str(width)], budget))
    assert run.lines[api.LEVEL_INFO] == [*numbered(1, count, width=width), "DONE"]
    implied = (count * (width + 1) + 5 - burst) / rate
    assert run.elapsed >= MARGIN * implied, f"1 MiB in {run.elapsed:.2f} s: faster than 512 KiB/s"
    print(f"\n1 MiB in lines of 16 KiB: {run.elapsed:.2f} s at 512 KiB/s (implied {implied:.2f} s)")


@pytest.mark.integration
def test_a_stop_does_not_wait_for_the_budget_and_says_what_it_dropped(chatty: bytes, played: PlayedNode) -> None:
    """Undeployed while most of its output is held back (at 2000 lines/s, a million lines take 500 s),
    the workload is stopped within its grace: what had not gone out is dropped and counted. It was
    still running when stopped: blocked on its own writes, far from its end (the backpressure)."""
    count = 1_000_000  # about 6.9 MB: more than the agent's reader and the pipe hold
    budget = api.LogBudget(lines_per_second=2000, burst_lines=100, bytes_per_second=0)
    run = asyncio.run(played.deploy(chatty, [str(count)], budget, stop_after=500))
    assert run.undeploy_took < 20, "the undeploy was answered (its request's deadline)"
    assert run.stopped is not None
    assert run.stopped.code == -15, f"SIGTERM found it still writing: {run.stopped.message}"
    received = run.lines[api.LEVEL_INFO]
    assert 500 <= len(received) < count
    assert received == numbered(1, len(received)), "what did arrive arrived in order, without a gap"
    [dropped] = [line for line in run.said if "dropped" in line]
    assert "lines" in dropped
    assert len(held_back(run)) == 1
    print(f"\nstopped after {len(received)} lines: {dropped}")
