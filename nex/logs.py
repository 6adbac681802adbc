"""Log lines as nex prints them: a message followed by ``key=value`` fields, one event per line.

    03:12:45.120 INF Machine started vmid=cnrul21t6e8i4vc1sf6g ip=192.168.127.2

:func:`get` returns a :class:`Log` whose methods take the fields as keywords, so call sites read as
the line they print: ``log.info("Machine started", vmid=vmid, ip=ip)``.
"""

from __future__ import annotations

import json
import logging
import os
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
    """``HH:MM:SS LVL message key=value …`` with the fields passed through :class:`Log`; without the
    time (``stamp=False``) where journald timestamps every line itself."""

    def __init__(self, stamp: bool = True) -> None:
        super().__init__()
        self.stamp = stamp

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        parts = [_SHORT.get(record.levelno, record.levelname), record.getMessage()]
        if self.stamp:
            parts.insert(0, time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}")
        parts += [f"{k}={_quote(v)}" for k, v in fields.items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (RFC 3339, UTC), ``level``, ``logger``, ``msg``, then the
    fields (``error`` with the traceback, if any): for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        line: dict[str, Any] = {"time": stamp, "level": record.levelname.lower(), "logger": record.name}
        line["msg"] = record.getMessage()
        for key, value in getattr(record, "fields", {}).items():
            line.setdefault(key, value if isinstance(value, int | float | bool) or value is None else str(value))
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


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


def configure(level: str = "info", fmt: str = "text") -> None:
    """Send every log line to stderr (called once by ``nex up``): ``text``, the key=value lines, with
    their time unless journald is reading them (``JOURNAL_STREAM``: it stamps each line), or ``json``."""
    handler = _CurrentStderr()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(KeyValueFormatter(stamp=not _to_journald()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])


def _to_journald() -> bool:
    """Whether stderr is the journal stream systemd gave this process (``JOURNAL_STREAM``: its
    device and inode, as systemd.exec documents)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        stat = os.fstat(sys.stderr.fileno())
        return bool(device) and (stat.st_dev, stat.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):
        return False
