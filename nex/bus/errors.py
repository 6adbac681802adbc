"""Turning nats-py's exceptions into short reasons for operators."""

from __future__ import annotations

import nats.errors


def reason(exc: BaseException) -> str:
    """``connection refused``, ``timed out``, or the error's own text without nats-py's prefix."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (TimeoutError, nats.errors.TimeoutError)):
        return "timed out"
    return (str(exc) or type(exc).__name__).removeprefix("nats: ")
