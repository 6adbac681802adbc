"""Turning nats-py's exceptions into short reasons for operators."""

from __future__ import annotations

import nats.errors

AUTHORIZATION = "the server refuses the link's credentials (authorization violation)"


def reason(exc: BaseException) -> str:
    """``connection refused``, ``timed out``, or the error's own text without nats-py's prefix."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (TimeoutError, nats.errors.TimeoutError)):
        return "timed out"
    if is_authorization(exc):
        return AUTHORIZATION
    return (str(exc) or type(exc).__name__).removeprefix("nats: ")


def is_authorization(exc: BaseException) -> bool:
    """The server refused the client's credentials: while connected (nats-py's ``AuthorizationError``)
    or in answer to its CONNECT (a plain error carrying the server's ``Authorization Violation``)."""
    return isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in str(exc).lower()


def closed_reason(final: BaseException | None, last: BaseException | None) -> str:
    """Why nats-py closed a connection for good, from its final error and the last one it reported.

    Running out of reconnect attempts ends on a generic ``NoServersError``; the last error reported
    (``connection refused``, …) says why the attempts failed.
    """
    if isinstance(final, nats.errors.NoServersError) or final is None:
        cause = f" ({reason(last)})" if last is not None else ""
        return ("reconnect attempts exhausted" if final is not None else "closed by the client") + cause
    return reason(final)
