"""Small helpers shared by the runtime's modules."""

from __future__ import annotations


def sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception inside ``group`` (through nested groups), or ``group`` itself if several.

    Actors run their message loop inside a nursery, which wraps even a single error in a group; a
    supervisor, a log line and an operator all want the error itself.
    """
    current: BaseException = group
    while isinstance(current, BaseExceptionGroup) and len(current.exceptions) == 1:
        current = current.exceptions[0]
    return current
