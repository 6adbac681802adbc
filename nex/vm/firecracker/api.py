"""Firecracker's HTTP API over its unix socket: the request bodies this node sends, and a client.

The bodies are the definitions of Firecracker's swagger document (``src/firecracker/swagger/
firecracker.yaml``, API 1.17.0-dev; a copy is ``tests/nex/data/firecracker-api.yaml``), field for
field: a field the spec makes optional is left out unless it is set (``omit_defaults`` with ``None``),
so Firecracker's own default applies. ``tests/nex/test_firecracker_api.py`` validates every body the
driver makes against that document, with unknown fields forbidden.

:class:`Client` speaks HTTP/1.1 through ``h11`` on one connection (Firecracker serves a few
connections at most, flintlock #266: one per VM, kept open, is what it expects). A status other than
2xx raises :class:`ApiError` with Firecracker's ``fault_message``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import h11
import msgspec
import trio

_encoder = msgspec.json.Encoder()

LogLevel = Literal["Error", "Warning", "Info", "Debug", "Trace", "Off"]


class Logger(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``PUT /logger``."""

    log_path: str | None = None
    level: LogLevel | None = None
    show_level: bool | None = None
    show_log_origin: bool | None = None
    module: str | None = None


class Metrics(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``PUT /metrics``: newline-delimited JSON, flushed every minute and on ``FlushMetrics``."""

    metrics_path: str
    emit_id: bool | None = None


class MachineConfiguration(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``PUT /machine-config``."""

    vcpu_count: int  # 1 or an even number, at most 32
    mem_size_mib: int
    smt: bool | None = None
    track_dirty_pages: bool | None = None
    huge_pages: Literal["None", "Transparent", "2M"] | None = None


class BootSource(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``PUT /boot-source``."""

    kernel_image_path: str
    boot_args: str | None = None
    initrd_path: str | None = None


class Drive(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``PUT /drives/{drive_id}`` (a virtio-block drive)."""

    drive_id: str
    is_root_device: bool
    path_on_host: str | None = None
    is_read_only: bool | None = None
    cache_type: Literal["Unsafe", "Writeback"] | None = None
    io_engine: Literal["Sync", "Async"] | None = None
    partuuid: str | None = None


class NetworkInterface(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``PUT /network-interfaces/{iface_id}``: ``host_dev_name`` is an existing tap."""

    iface_id: str
    host_dev_name: str
    guest_mac: str | None = None
    mtu: int | None = None


class MmdsConfig(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``PUT /mmds/config`` (pre-boot, after the interfaces it names)."""

    network_interfaces: list[str]
    version: Literal["V1", "V2"] | None = None
    ipv4_address: str | None = None
    imds_compat: bool | None = None


class InstanceActionInfo(msgspec.Struct, kw_only=True):
    """``PUT /actions``."""

    action_type: Literal["FlushMetrics", "InstanceStart", "SendCtrlAltDel"]


class Vm(msgspec.Struct, kw_only=True):
    """``PATCH /vm``: pause or resume the vCPUs."""

    state: Literal["Paused", "Resumed"]


class SnapshotCreateParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``PUT /snapshot/create`` (the VM paused)."""

    snapshot_path: str
    mem_file_path: str
    snapshot_type: Literal["Full", "Diff"] | None = None


class NetworkOverride(msgspec.Struct, kw_only=True):
    """A restored interface's new tap."""

    iface_id: str
    host_dev_name: str


class MemoryBackend(msgspec.Struct, kw_only=True):
    backend_type: Literal["File", "Uffd"]
    backend_path: str


class SnapshotLoadParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``PUT /snapshot/load`` on a fresh process (only the logger and metrics set before it)."""

    snapshot_path: str
    mem_backend: MemoryBackend | None = None
    resume_vm: bool | None = None
    track_dirty_pages: bool | None = None
    network_overrides: list[NetworkOverride] | None = None
    clock_realtime: bool | None = None


class VmConfig(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The whole configuration in one document (the spec's ``FullVmConfiguration``, the shape of
    ``--config-file``): what the driver writes to ``firecracker.cfg`` and then applies call by call."""

    boot_source: BootSource = msgspec.field(name="boot-source")
    machine_config: MachineConfiguration = msgspec.field(name="machine-config")
    drives: list[Drive] = []
    network_interfaces: list[NetworkInterface] = msgspec.field(name="network-interfaces", default_factory=list)
    mmds_config: MmdsConfig | None = msgspec.field(name="mmds-config", default=None)
    logger: Logger | None = None
    metrics: Metrics | None = None


def body(value: object) -> bytes:
    """A request body as Firecracker reads it (JSON)."""
    return _encoder.encode(value)


class ApiError(Exception):
    """Firecracker refused a request (or the connection failed); ``fault_message`` is its reason."""

    def __init__(self, method: str, path: str, status: int, fault_message: str) -> None:
        super().__init__(f"{method} {path}: {status} {fault_message}".rstrip())
        self.method = method
        self.path = path
        self.status = status
        self.fault_message = fault_message


class _Fault(msgspec.Struct):
    fault_message: str = ""


async def wait_for_socket(path: Path, timeout: float, alive: Callable[[], bool] | None = None) -> None:
    """Until ``path`` is a socket, at most ``timeout`` seconds; ``alive()`` false (the process that
    was to make it exited) ends the wait early with an error.

    This polls: the socket is another process's file, made when Firecracker is ready, and neither its
    process nor the directory offers an event we could wait on without inotify (which the node does
    not otherwise use). Firecracker makes it within ~12 ms (its SPECIFICATION.md), so 5 ms steps.
    """
    with trio.fail_after(timeout):
        while True:
            try:
                if stat.S_ISSOCK(os.stat(path).st_mode):  # a stat: no worker thread for that
                    return
            except OSError:
                pass
            if alive is not None and not alive():
                raise ApiError("CONNECT", str(path), 0, "the process exited before its API socket appeared")
            await trio.sleep(0.005)


SUN_PATH_MAX = 107  # bytes of a unix socket's path (sun_path less its NUL)


async def _connect(path: str) -> trio.SocketStream:
    """A connection to the unix socket at ``path``, however long the path: a longer one than
    ``sun_path`` holds is reached through its directory's descriptor (``/proc/self/fd/N/name``)."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        return await trio.open_unix_socket(path)
    folder = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return await trio.open_unix_socket(f"/proc/self/fd/{folder}/{os.path.basename(path)}")
    finally:
        os.close(folder)


class Client:
    """One HTTP/1.1 connection to a Firecracker API socket, reopened when the server closes it.

    Requests are serialised (one in flight at a time); use it as an async context manager, or call
    :meth:`aclose`.
    """

    def __init__(self, socket_path: Path | str, *, timeout: float = 10.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self._stream: trio.SocketStream | None = None
        self._conn: h11.Connection | None = None
        self._lock = trio.Lock()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        stream, self._stream, self._conn = self._stream, None, None
        if stream is not None:
            await stream.aclose()

    async def put(self, path: str, value: object) -> bytes:
        return await self.request("PUT", path, value)

    async def patch(self, path: str, value: object) -> bytes:
        return await self.request("PATCH", path, value)

    async def get(self, path: str) -> bytes:
        return await self.request("GET", path)

    async def request(self, method: str, path: str, value: object = None) -> bytes:
        """Send one request; the response's body (empty for 204). Raises :class:`ApiError`."""
        payload = b"" if value is None and method == "GET" else body(value)
        async with self._lock:
            try:
                with trio.fail_after(self.timeout):
                    status, data, reusable = await self._exchange(method, path, payload)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
                await self.aclose()
                raise ApiError(method, path, 0, f"the API socket failed: {exc!r}") from exc
            except trio.TooSlowError:
                await self.aclose()
                raise ApiError(method, path, 0, f"no answer within {self.timeout:g} s") from None
            if not reusable:
                await self.aclose()
        if 200 <= status < 300:
            return data
        try:
            fault = msgspec.json.decode(data, type=_Fault).fault_message
        except msgspec.DecodeError:
            fault = data.decode(errors="replace")
        raise ApiError(method, path, status, fault)

    async def _exchange(self, method: str, path: str, payload: bytes) -> tuple[int, bytes, bool]:
        if self._stream is None or self._conn is None:
            self._stream = await _connect(self.socket_path)
            self._conn = h11.Connection(h11.CLIENT)
        conn, stream = self._conn, self._stream
        headers = [("Host", "localhost"), ("Accept", "application/json")]
        if payload or method != "GET":
            headers += [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
        out = conn.send(h11.Request(method=method, target=path, headers=headers))
        if payload:
            out = (out or b"") + (conn.send(h11.Data(data=payload)) or b"")
        out = (out or b"") + (conn.send(h11.EndOfMessage()) or b"")
        await stream.send_all(out)
        status, data = 0, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                chunk = await stream.receive_some(65536)
                if not chunk and conn.their_state is not h11.DONE:
                    raise OSError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))
                conn.receive_data(chunk)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                data += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise OSError(errno.ECONNRESET, "Firecracker closed the API connection mid-answer")
        reusable = conn.our_state is h11.DONE and conn.their_state is h11.DONE
        if reusable:
            conn.start_next_cycle()
        return status, bytes(data), reusable


async def create_snapshot(client: Client, snapshot_path: Path | str, mem_path: Path | str) -> None:
    """Pause the VM and write a full snapshot of it: its state to ``snapshot_path``, its memory to
    ``mem_path`` (paths as Firecracker sees them). The VM stays paused: a template is then stopped."""
    await client.patch("/vm", Vm(state="Paused"))
    await client.put(
        "/snapshot/create",
        SnapshotCreateParams(snapshot_path=str(snapshot_path), mem_file_path=str(mem_path), snapshot_type="Full"),
    )


async def load_snapshot(
    client: Client,
    snapshot_path: Path | str,
    mem_path: Path | str,
    *,
    taps: dict[str, str] | None = None,
    resume: bool = True,
) -> None:
    """Restore a snapshot into a fresh Firecracker (only its logger and metrics set), its interfaces
    moved to ``taps`` (interface id to tap name: each clone has its own), and resume it.

    MMDS contents are not part of a snapshot: put the clone's own after this.
    """
    overrides = [NetworkOverride(iface_id=iface, host_dev_name=tap) for iface, tap in (taps or {}).items()]
    await client.put(
        "/snapshot/load",
        SnapshotLoadParams(
            snapshot_path=str(snapshot_path),
            mem_backend=MemoryBackend(backend_type="File", backend_path=str(mem_path)),
            resume_vm=resume,
            network_overrides=overrides or None,
        ),
    )
