"""``nex-agent``: the program inside each machine.

It learns its machine id, how to reach its node, its credentials and its workload's jail from its
metadata (:class:`~nex.api.agent.MachineMetadata`), which the node hands over privately: the zygote
(:mod:`nex.vm.zygote`) passes it in memory to the child it forks, ``nex-agent --metadata-fd N``
reads it from an inherited pipe. Never through the environment: it holds the agent's nkey seed.

It first makes itself unreachable to others of its uid (non-dumpable) and joins its machine's cgroup,
so that all it starts is limited, then connects to the node's internal NATS server with its own
credentials, says hello on ``agentint.{vmid}.handshake``, and then answers ``ping`` and waits for a
workload. It exits with 0 on ``undeploy`` or SIGTERM, and on its own when its node is gone (the
connection cannot be restored).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import signal
import sys
from pathlib import Path

import msgspec
import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from nex import linux
from nex.api import agent as api
from nex.sandbox import cgroups

from .runner import UNDEPLOY_GRACE, Runner

#: the running agent's workload runner (one per process; kept here for the stop path)
RUNNERS: dict[str, Runner] = {}

HANDSHAKE_ATTEMPTS = 10
HANDSHAKE_TIMEOUT = 0.5
RECONNECT_ATTEMPTS = 20  # × RECONNECT_WAIT: how long an agent outlives a silent node
RECONNECT_WAIT = 0.25
FIRST_CONNECT_ATTEMPTS = 250  # × FIRST_CONNECT_WAIT: how long an agent tries to reach its node at all
FIRST_CONNECT_WAIT = 0.02
"""Quick retries while connecting: nats-server drops a client that has not yet sent CONNECT whenever it
reloads its users ("authentication error"), and the node adds users as machines start, so an agent
starting beside others often loses its first attempt. Waiting RECONNECT_WAIT then cost 250 ms."""


class MetadataError(Exception):
    """The agent's metadata is missing or malformed."""


def read_metadata(fd: int) -> api.MachineMetadata:
    """The metadata written to ``fd`` (a pipe the node made), read to its end; the fd is closed."""
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError as exc:
        raise MetadataError(f"cannot read the machine metadata from descriptor {fd}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    try:
        return msgspec.json.decode(b"".join(chunks), type=api.MachineMetadata)
    except msgspec.DecodeError as exc:
        raise MetadataError(f"malformed machine metadata: {exc}") from None


def enter_machine(meta: api.MachineMetadata) -> None:
    """What the agent does before anything else: hide its memory, join its cgroup.

    Raises:
        MetadataError: the machine's cgroup cannot be joined (its workload would not be limited).
    """
    linux.set_dumpable(False)
    jail = meta.jail
    if jail is None:
        return
    if jail.cgroup:
        try:
            cgroups.join(jail.cgroup)
        except OSError as exc:
            raise MetadataError(f"cannot join the machine's cgroup {jail.cgroup[0]}: {exc}") from None
        with contextlib.suppress(OSError):  # the workload (1000) goes first when the machine is out of memory
            Path("/proc/self/oom_score_adj").write_text("-900")


def log(message: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S.%f")[:-3]
    print(f"{stamp} agent: {message}", file=sys.stderr, flush=True)


async def run(meta: api.MachineMetadata) -> int:
    """Serve as ``meta.vmid``'s agent until undeployed, signalled, or orphaned; the exit code.

    SIGTERM is honoured at any point: during start-up (connect, handshake) it cancels the start; once
    serving, it drains the connection and exits.
    """
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    starting = asyncio.ensure_future(start(meta, stopped))
    stop_requested = asyncio.ensure_future(stopped.wait())
    await asyncio.wait({starting, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
        log("stopped while starting")
        return 0
    stop_requested.cancel()
    nc = starting.result()
    if nc is None:
        return 1
    log(f"handshake accepted by the node at nats://{meta.node_nats_host}:{meta.node_nats_port}")
    await stopped.wait()
    runner = RUNNERS.pop(meta.vmid, None)
    if runner is not None:
        await runner.terminate(runner_grace())  # signalled: the workload goes first
        runner.close()
    if not nc.is_closed:
        try:
            await asyncio.wait_for(nc.drain(), 2)
        except Exception:
            await nc.close()
    return 0


async def start(meta: api.MachineMetadata, stopped: asyncio.Event) -> Client | None:
    """Connect, subscribe and handshake; the connection, or None after a logged failure."""

    async def quiet(_: Exception) -> None:
        return None

    client: list[Client] = []  # the connection, once made: why it closed is in its last error

    async def closed() -> None:
        if not stopped.is_set():
            error = client[0].last_error if client else None
            why = f"its NATS server closed the connection: {error!r}" if error else "its NATS server is gone"
            log(f"lost the node ({why}); exiting")
            stopped.set()

    options: dict[str, object] = {}
    if meta.node_nats_nkey:
        options["nkeys_seed_str"] = meta.node_nats_nkey
    url = f"nats://{meta.node_nats_host}:{meta.node_nats_port}"
    try:
        nc = await nats.connect(
            url,
            name=f"nex-agent {meta.vmid}",
            inbox_prefix=api.inbox_prefix(meta.vmid),
            max_reconnect_attempts=FIRST_CONNECT_ATTEMPTS,
            reconnect_time_wait=FIRST_CONNECT_WAIT,
            connect_timeout=2,
            no_echo=True,
            error_cb=quiet,
            closed_cb=closed,
            **options,
        )
    except Exception as exc:
        log(f"cannot connect to the node at {url}: {exc!r}")
        return None
    client.append(nc)
    # Connected: reconnects from now on are patient. nats-py reads these two per attempt.
    nc.options["max_reconnect_attempts"] = RECONNECT_ATTEMPTS
    nc.options["reconnect_time_wait"] = RECONNECT_WAIT
    runner = Runner(nc, meta.vmid, stopped, log, jail=meta.jail, workdir=os.getcwd(), log_budget=meta.log_budget)
    RUNNERS[meta.vmid] = runner
    try:

        async def on_ping(msg: Msg) -> None:
            await msg.respond(b"OK")

        await nc.subscribe(api.ping(meta.vmid), cb=on_ping)
        await nc.subscribe(api.undeploy(meta.vmid), cb=runner.on_undeploy)
        await nc.subscribe(api.deploy(meta.vmid), cb=runner.on_deploy)
        if not await handshake(nc, meta.vmid):
            await nc.close()
            return None
        runner.prepare()  # after the handshake: off the path of the machine's start
    except BaseException:
        await asyncio.shield(nc.close())
        raise
    return nc


async def handshake(nc: Client, vmid: str) -> bool:
    request = msgspec.json.encode(
        api.HandshakeRequest(
            id=vmid,
            start_time=datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z"),
            message="Host-supplied metadata",
        )
    )
    for attempt in range(1, HANDSHAKE_ATTEMPTS + 1):
        try:
            await nc.request(api.handshake(vmid), request, timeout=HANDSHAKE_TIMEOUT)
            return True
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
            log(f"handshake attempt {attempt} failed: {type(exc).__name__}")
            await asyncio.sleep(0.05)
    log(f"the node did not accept the handshake after {HANDSHAKE_ATTEMPTS} attempts")
    return False


def runner_grace() -> float:
    return UNDEPLOY_GRACE


def run_with(meta: api.MachineMetadata) -> int:
    """Enter the machine and serve as its agent; the process's exit code."""
    try:
        enter_machine(meta)
    except MetadataError as exc:
        log(str(exc))
        return 2
    return asyncio.run(run(meta))


USAGE = """nex-agent: runs inside a machine and executes one workload for its node.

The node starts it with --metadata-fd N: a descriptor to read the machine's metadata from (JSON:
vmid, node_nats_host, node_nats_port, node_nats_nkey, jail). There is nothing to run by hand."""


def main() -> None:
    # ``--machine DIR`` may follow: it only shows in ps whose agent this is
    args = sys.argv[1:]
    if args[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return
    if "--metadata-fd" not in args or args.index("--metadata-fd") + 1 >= len(args):
        log("missing --metadata-fd: the node hands an agent its metadata through a descriptor")
        sys.exit(2)
    try:
        meta = read_metadata(int(args[args.index("--metadata-fd") + 1]))
    except (MetadataError, ValueError) as exc:
        log(str(exc))
        sys.exit(2)
    sys.exit(run_with(meta))
