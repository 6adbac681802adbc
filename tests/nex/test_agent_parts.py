"""The agent's parts on their own: the launchpad (a pre-forked child that becomes the workload) and
the store watch (the machine's object store, received as it is written), with real processes and a
real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nats
import pytest
from nats.js.api import ObjectMeta, ObjectMetaOptions, ObjectStoreConfig, StorageType

from nex.agent.launchpad import LaunchFailed, Launchpad
from nex.agent.store_watch import StoreWatch

from .support import NatsServerProc, wait_gone

pytestmark = pytest.mark.integration


SHELL = Path("/bin/sh").read_bytes()


def test_the_launchpad_runs_the_workload_with_its_output_and_exit_code(tmp_path: Path) -> None:
    async def main() -> tuple[bytes, bytes, int]:
        pad = Launchpad(None, str(tmp_path))
        workload = await pad.launch(
            SHELL, ["-c", 'echo "out $GREETING"; pwd; echo err >&2; exit 3'], {"GREETING": "hi"}, limit=1 << 16
        )
        assert workload.pid == pad.pid, "the pre-forked child became the workload"
        out = await workload.stdout.read()
        err = await workload.stderr.read()
        return out, err, await workload.wait()

    out, err, code = asyncio.run(main())
    assert out == f"out hi\n{tmp_path}\n".encode()
    assert err == b"err\n"
    assert code == 3
    assert (tmp_path / "workload").read_bytes() == SHELL, "without a jail, the artifact lands in the agent's directory"


def test_a_launch_that_cannot_exec_says_why_and_leaves_no_child(tmp_path: Path) -> None:
    async def main() -> int:
        pad = Launchpad(None, str(tmp_path))
        with pytest.raises(LaunchFailed, match="Exec format error"):
            await pad.launch(b"\x00 not a program", [], {}, limit=1024)
        return pad.pid

    pid = asyncio.run(main())
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped already


def test_a_workload_init_cannot_start_is_a_failed_launch_not_a_run(tmp_path: Path) -> None:
    """Any error of init's (a NUL in the environment is a ValueError, not an OSError) comes back."""

    async def main() -> None:
        pad = Launchpad(None, str(tmp_path))
        with pytest.raises(LaunchFailed, match="embedded null byte"):
            await pad.launch(SHELL, ["-c", "true"], {"A": "x\0y"}, limit=1024)

    asyncio.run(main())


def test_an_artifact_is_never_written_through_a_planted_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "workload").symlink_to(victim)

    async def main() -> None:
        pad = Launchpad(None, str(tmp_path))
        with pytest.raises(LaunchFailed, match="File exists"):
            await pad.launch(SHELL, ["-c", "true"], {}, limit=1024)

    asyncio.run(main())
    assert victim.read_text() == "precious"


def test_an_unused_launchpad_goes_away_when_closed(tmp_path: Path) -> None:
    pad = Launchpad(None, str(tmp_path))
    pad.close()
    with pytest.raises(ChildProcessError):
        os.waitpid(pad.pid, os.WNOHANG)


def _agent_with_a_daemon(tmp_path: Path, prefix: list[str]) -> subprocess.Popen[str]:
    """An agent (``prefix`` runs it) whose workload leaves a daemon (setsid, backgrounded) behind."""
    agent = textwrap.dedent(
        f"""
        import asyncio
        from nex.agent.launchpad import Launchpad
        async def main():
            pad = Launchpad(None, {str(tmp_path)!r})
            script = "setsid sleep 301 & echo $!; exec sleep 300"
            workload = await pad.launch(open("/bin/sh", "rb").read(), ["-c", script], {{}}, limit=1024)
            daemon = (await workload.stdout.readline()).decode().strip()  # forked by now
            print(workload.pid, pad.contained, daemon, flush=True)
            await asyncio.sleep(300)
        asyncio.run(main())
        """
    )
    return subprocess.Popen([*prefix, sys.executable, "-c", agent], stdout=subprocess.PIPE, text=True)


def test_without_a_pid_namespace_a_daemon_outlives_its_agent(tmp_path: Path) -> None:
    """The control for the test below: an agent that may not make a PID namespace (no CAP_SYS_ADMIN)
    cannot contain what its workload starts, and that test's check sees the survivor."""
    proc = _agent_with_a_daemon(tmp_path, ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin"])
    try:
        assert proc.stdout is not None
        init, contained, daemon = proc.stdout.readline().split()
        assert contained == "False"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    try:
        assert wait_gone([int(init)], timeout=10) == [], "the workload dies with its agent"
        # the shell printed its pid at the fork: it becomes sleep 301 a moment later, whoever dies
        assert _becomes(int(daemon), b"sleep\x00301", timeout=10), "uncontained, the daemon outlives both"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(daemon), signal.SIGKILL)


def _becomes(pid: int, cmdline: bytes, timeout: float) -> bool:
    """Whether ``pid`` runs ``cmdline`` within ``timeout`` (an exec tells no one: /proc is polled)."""
    deadline = time.monotonic() + timeout
    while cmdline not in _cmdline(pid):
        if time.monotonic() > deadline or not Path(f"/proc/{pid}").exists():
            return False
        time.sleep(0.01)
    return True


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_the_workload_and_what_it_started_die_with_a_killed_agent(tmp_path: Path) -> None:
    proc = _agent_with_a_daemon(tmp_path, [])
    try:
        assert proc.stdout is not None
        init, contained, _ = proc.stdout.readline().split()
        if contained != "True":
            pytest.skip("no PID namespace could be made (needs CAP_SYS_ADMIN): what a workload starts is not contained")
        namespace = os.readlink(f"/proc/{init}/ns/pid")
        assert namespace != os.readlink("/proc/self/ns/pid"), "the workload has a PID namespace of its own"
        members = [pid for pid in _pids() if _pid_namespace(pid) == namespace]
        assert len(members) == 3, "init, the workload and its daemon"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert wait_gone(members, timeout=10) == [], "the workload or its daemon outlived its agent"


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _pid_namespace(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return ""


async def _watch_and_write(url: str) -> None:
    writer = await nats.connect(url)
    reader = await nats.connect(url)
    try:
        store = await writer.jetstream().create_object_store(
            "NEXCACHE_test", config=ObjectStoreConfig(storage=StorageType.MEMORY)
        )
        watch = StoreWatch(reader, "NEXCACHE_test")
        await watch.start()
        with pytest.raises(TimeoutError):
            await watch.read("workload", timeout=0.2)  # nothing written yet
        first = os.urandom(300_000)
        small_chunks = ObjectMeta(name="workload", options=ObjectMetaOptions(max_chunk_size=65536))
        await store.put("workload", first, meta=small_chunks)
        assert await watch.read("workload", timeout=5) == first
        second = os.urandom(1000)
        await store.put("workload", second)  # replaced: the new one is read
        assert await watch.read("workload", timeout=5) == second
        await store.delete("workload")
        await store.put("after", b"!")  # in stream order: once it is here, so is the deletion
        assert await watch.read("after", timeout=5) == b"!"
        with pytest.raises(ValueError, match="was deleted"):
            await watch.read("workload", timeout=5)
    finally:
        await writer.close()
        await reader.close()


def test_the_store_watch_has_each_object_once_it_is_written(nats_server: NatsServerProc) -> None:
    asyncio.run(_watch_and_write(nats_server.url))
