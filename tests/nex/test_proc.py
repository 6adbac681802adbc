"""The node's children (nex.proc.spawn): no Python between fork and exec, every CPU, the machine's
network namespace, and death with the node.

A spawner process plays the node: it has a second thread (the node's asyncio one), pins its own
thread to one CPU (as the node does), registers at-fork hooks (which CPython runs around a fork only
when it is to run Python in the child: ``preexec_fn``), and spawns a shell that says where it runs
and then becomes ``sleep``. The spawner is then SIGKILLed: the child must die with it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from nex import affinity, proc
from nex.net import netns

from .support import wait_gone

pytestmark = pytest.mark.integration

SPAWNER = textwrap.dedent(
    """
    import os, sys, threading
    from pathlib import Path
    from nex import affinity, proc

    hooks = []
    os.register_at_fork(before=lambda: hooks.append("before"), after_in_child=lambda: os.write(2, b"python ran\\n"))
    threading.Thread(target=threading.Event().wait, daemon=True).start()
    affinity.pin_current_thread(affinity.current_cpu())
    netns = None if sys.argv[1] == "-" else Path(sys.argv[1])
    script = 'echo "child $(readlink /proc/self/ns/net) $(grep Cpus_allowed_list /proc/self/status | cut -f2)"; '
    child = proc.spawn(["/bin/sh", "-c", script + "exec sleep 300"], stdout=1, stderr=2, netns=netns)
    print("spawner", child.pid, len(hooks), threading.active_count(), len(os.sched_getaffinity(0)), flush=True)
    sys.stdin.read()
    """
)


def cpu_list(text: str) -> set[int]:
    """``0-2,4`` (as /proc/PID/status writes CPU lists) as a set."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def read_lines(stream: int, count: int, timeout: float) -> list[str]:
    """``count`` lines from a pipe, each within ``timeout`` seconds."""
    data = b""
    while data.count(b"\n") < count:
        ready, _, _ = select.select([stream], [], [], timeout)
        assert ready, f"no line within {timeout}s; got {data!r}"
        chunk = os.read(stream, 4096)
        assert chunk, f"the pipe closed after {data!r}"
        data += chunk
    return data.decode().splitlines()


def run_spawner(namespace: Path | None) -> tuple[dict[str, list[str]], int]:
    """Run the spawner, SIGKILL it once its child has spoken; what each said, and the child's pid."""
    spawner = subprocess.Popen(
        [sys.executable, "-c", SPAWNER, str(namespace) if namespace is not None else "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert spawner.stdout is not None
    child = 0
    try:
        said = {line.split()[0]: line.split()[1:] for line in read_lines(spawner.stdout.fileno(), 2, 30)}
        child = int(said["spawner"][0])
        spawner.send_signal(signal.SIGKILL)
        assert spawner.wait(30) == -signal.SIGKILL
        assert wait_gone([child], timeout=10) == [], "the child outlived its SIGKILLed parent"
        return said, child
    finally:
        if spawner.poll() is None:
            spawner.kill()
            spawner.wait()
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        assert spawner.stdin is not None
        spawner.stdin.close()
        spawner.stdout.close()


def test_no_python_runs_in_the_child_which_gets_every_cpu_and_dies_with_its_parent() -> None:
    said, _ = run_spawner(None)
    _, hooks, threads, spawner_cpus = said["spawner"]
    assert int(threads) == 2, "spawned from a process with a second thread, as the node is"
    assert int(spawner_cpus) == 1, "from a thread pinned to one CPU, as the node's are"
    assert hooks == "0", "CPython ran its at-fork hooks: Python code ran between fork and exec (preexec_fn)"
    namespace, cpus = said["child"]
    assert namespace == os.readlink("/proc/self/ns/net"), "no netns asked: the node's own"
    assert cpu_list(cpus) == set(affinity.ORIGINAL), "the child has every CPU back"


@pytest.fixture
def machine_netns() -> Iterator[Path]:
    """A network namespace made by the node's own code, as a machine's is."""
    if not netns.has_capabilities():
        pytest.skip("needs CAP_NET_ADMIN and CAP_SYS_ADMIN (run as root)")
    name = "nx" + secrets.token_hex(5)
    block = secrets.randbelow(250) + 2
    network = netns.MachineNetwork(
        netns=name,
        host_link=f"{name}h",
        guest_link="veth0",
        address=f"198.19.{block}.2",  # 198.18.0.0/15: for tests
        prefixlen=32,
        gateway=f"198.19.{block}.1",
    )
    netns.create(network)
    try:
        yield network.netns_path
    finally:
        netns.delete(network.netns, network.host_link)


def test_the_child_starts_in_the_machines_network_namespace(machine_netns: Path) -> None:
    said, _ = run_spawner(machine_netns)
    assert said["child"][0] == f"net:[{os.stat(machine_netns).st_ino}]"
    assert said["spawner"][1] == "0", "no Python ran in the child"


def test_a_program_that_is_not_there_raises_as_popen_does(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        proc.spawn([str(tmp_path / "missing")])
    with pytest.raises(FileNotFoundError):
        proc.spawn(["nex-no-such-program"], env={"PATH": str(tmp_path)})


async def test_a_program_that_cannot_be_executed_exits_127_saying_why(tmp_path: Path) -> None:
    program = tmp_path / "not-a-program"
    program.write_bytes(b"\x00\x01 neither ELF nor script\n")
    program.chmod(0o755)
    with (tmp_path / "stderr").open("wb") as err:
        child = proc.spawn([str(program)], stderr=err.fileno())
    assert await child.wait() == 127
    assert f"nex: cannot start {program}: Exec format error" in (tmp_path / "stderr").read_text()


async def test_a_child_in_a_network_namespace_of_its_own_sees_only_its_loopback() -> None:
    if not netns.has_capabilities():
        pytest.skip("needs CAP_SYS_ADMIN (run as root)")
    read, write = os.pipe()
    try:
        script = "readlink /proc/self/ns/net; tail -n +3 /proc/self/net/dev | cut -d: -f1"
        child = proc.spawn(["sh", "-c", script], stdout=write, own_netns=True)
    finally:
        os.close(write)
    with os.fdopen(read, "rb") as out:
        said = out.read().decode().split()
    assert await child.wait() == 0
    assert said[0] != os.readlink("/proc/self/ns/net"), "not the node's namespace"
    assert said[1:] == ["lo"], "a new namespace: nothing of the host's in it"
    with pytest.raises(ValueError, match="not both"):
        proc.spawn(["true"], netns=Path("/run/netns/x"), own_netns=True)
