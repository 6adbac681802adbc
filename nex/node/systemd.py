"""Telling systemd how the node is doing: ``sd_notify``'s protocol, spoken directly.

Under a unit with ``Type=notify``, systemd passes ``NOTIFY_SOCKET`` (a datagram socket's path, or an
abstract name starting with ``@``) and waits for ``READY=1`` before it counts the service as started;
``STOPPING=1`` says a stop has begun, ``STATUS=…`` is the line ``systemctl status`` shows, and with
``WatchdogSec=`` set it passes ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``) and restarts the service when
``WATCHDOG=1`` stops coming for that long. Each message is one datagram of ``KEY=VALUE`` lines.

Without ``NOTIFY_SOCKET`` (not under systemd) every call is a no-op. A send that fails is logged once
and otherwise ignored: systemd's bookkeeping is never a reason for the node to fail.
"""

from __future__ import annotations

import os
import socket

import trio

from nex import logs

log = logs.get("nex.node")


class Notifier:
    """The node's side of ``sd_notify``, from the environment it was started with."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog = _watchdog_interval(env)
        self._failed = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, **fields: str) -> bool:
        """Send ``KEY=VALUE`` lines (``ready="1"`` becomes ``READY=1``) in one datagram; False if not sent."""
        if not self.address:
            return False
        text = "\n".join(f"{key.upper()}={value.replace(chr(10), ' ')}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(text.encode(), self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("Cannot notify systemd", socket=self.address.replace("\0", "@"), error=str(exc))
            self._failed = True
            return False
        return True

    def ready(self, status: str) -> None:
        self.send(ready="1", status=status)

    def status(self, status: str) -> None:
        self.send(status=status)

    def stopping(self, status: str) -> None:
        self.send(stopping="1", status=status)

    async def keep_watchdog_fed(self) -> None:
        """``WATCHDOG=1`` at half the interval systemd asked for, for as long as the node runs (a node
        whose Trio loop is stuck stops feeding it, which is what the watchdog is for)."""
        if self.watchdog is None or not self.address:
            return
        while True:
            self.send(watchdog="1")
            await trio.sleep(self.watchdog / 2)


def _watchdog_interval(env: dict[str, str] | os._Environ[str]) -> float | None:
    """Seconds from ``WATCHDOG_USEC``, if it is meant for this process (``WATCHDOG_PID``, when set)."""
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        pid = int(env.get("WATCHDOG_PID", "0") or 0)
    except ValueError:
        return None
    if usec <= 0 or (pid and pid != os.getpid()):
        return None
    return usec / 1_000_000
