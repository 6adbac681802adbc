"""A QMP client on Trio, over one end of a socketpair whose other end the qemu process inherited.

QMP is line-delimited JSON: a greeting, then ``qmp_capabilities``, then commands, each answered by a
``return`` or an ``error``, with asynchronous ``event``\\ s in between. One command runs at a time
(a lock); events are kept (bounded) for :meth:`Qmp.wait_event`. A descriptor can go along with a
command (``getfd``), which is how a migration is written to a file this process opened.
"""

from __future__ import annotations

import array
import socket
from collections import deque
from typing import Any

import msgspec
import trio

MAX_LINE = 1 << 20
EVENTS_KEPT = 64


class QmpError(Exception):
    """qemu answered a command with an error, or the monitor went away."""


class Qmp:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = trio.socket.from_stdlib_socket(sock)
        self._buffer = b""
        self._lock = trio.Lock()
        self._events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        self.greeting: dict[str, Any] = {}

    async def handshake(self) -> None:
        self.greeting = await self._read()
        await self.execute("qmp_capabilities")

    async def execute(self, command: str, fd: int | None = None, **arguments: object) -> Any:
        """Run ``command``; its ``return`` value. ``fd`` is passed along (SCM_RIGHTS).

        Raises:
            QmpError: qemu refused it, or the monitor closed.
        """
        message: dict[str, object] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        data = msgspec.json.encode(message) + b"\n"
        async with self._lock:
            if fd is None:
                await self._sock.send(data)
            else:
                fds = array.array("i", [fd])
                await self._sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
            while True:
                answer = await self._read()
                if "event" in answer:
                    self._events.append(answer)
                    continue
                if "error" in answer:
                    error = answer["error"]
                    raise QmpError(f"{command}: {error.get('desc', error)}")
                return answer.get("return")

    async def wait_event(self, *names: str) -> dict[str, Any]:
        """The first event (kept, or arriving) named one of ``names``; bound it with a deadline."""
        while True:
            for event in list(self._events):
                if event.get("event") in names:
                    self._events.remove(event)
                    return event
            async with self._lock:
                answer = await self._read()
            if "event" in answer:
                self._events.append(answer)

    async def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            chunk = await self._sock.recv(65536)
            if not chunk:
                raise QmpError("qemu closed its monitor")
            self._buffer += chunk
            if len(self._buffer) > MAX_LINE:
                raise QmpError("qemu sent an overlong monitor line")
        line, self._buffer = self._buffer.split(b"\n", 1)
        decoded: dict[str, Any] = msgspec.json.decode(line)
        return decoded

    def close(self) -> None:
        self._sock.close()
