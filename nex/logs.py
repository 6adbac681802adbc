"""Log lines as nex prints them: a message followed by ``key=value`` fields, one event per line.

    03:12:45.120 INF Machine started vmid=cnrul21t6e8i4vc1sf6g ip=192.168.127.2

:func:`get` returns a :class:`Log` whose methods take the fields as keywords, so call sites read as
the line they print: ``log.info("Machine started", vmid=vmid, ip=ip)``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}
_SHORT = {
    logging.DEBUG: "DBG",
    logging.INFO: "INF",
    logging.WARNING: "WRN",
    logging.ERROR: "ERR",
    logging.CRITICAL: "CRT",
}


def _quote(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class KeyValueFormatter(logging.Formatter):
    """``HH:MM:SS LVL message key=value …`` with the fields passed through :class:`Log`."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        fields: dict[str, Any] = getattr(record, "fields", {})
        parts = [stamp, _SHORT.get(record.levelno, record.levelname), record.getMessage()]
        parts += [f"{k}={_quote(v)}" for k, v in fields.items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class Log:
    """A logger whose calls take ``key=value`` fields."""

    __slots__ = ("_logger",)

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def debug(self, msg: str, **fields: Any) -> None:
        if self._logger.isEnabledFor(logging.DEBUG):
            self._logger.debug(msg, extra={"fields": fields})

    def info(self, msg: str, **fields: Any) -> None:
        self._logger.info(msg, extra={"fields": fields})

    def warning(self, msg: str, **fields: Any) -> None:
        self._logger.warning(msg, extra={"fields": fields})

    def error(self, msg: str, exc: BaseException | None = None, **fields: Any) -> None:
        self._logger.error(msg, exc_info=exc, extra={"fields": fields})


def get(name: str) -> Log:
    return Log(logging.getLogger(name))


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time, so a rich progress bar can redirect it."""

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _: object) -> None:
        pass


def configure(level: str = "info") -> None:
    """Send every log line to stderr in the key=value format (called once by ``nex up``)."""
    handler = _CurrentStderr()
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
