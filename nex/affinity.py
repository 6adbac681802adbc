"""Keeping the node's two GIL-bound threads on one CPU.

The node's Trio thread and its asyncio thread (nats-py) hand every NATS operation to each other. They
never run Python at the same time (the GIL), so putting them on different cores buys no parallelism,
but each hand-off then costs cross-core wake-ups: measured on a 2-core VM, a bare Trio→asyncio→Trio
round trip took 119 µs across cores and 25 µs on one core, and a NATS request through the bridge went
from 1.75× to 1.2× the cost of plain nats-py. So the node pins both threads to the core it started on
(see ``bus_thread_affinity`` in the config), and every child process gets the full original CPU set
back (:func:`unpin_current`), so servers and agents still use every core.
"""

from __future__ import annotations

import os

#: the CPUs this process could use when nex was imported, before any pinning
ORIGINAL: frozenset[int] = frozenset(os.sched_getaffinity(0))


def current_cpu() -> int:
    """The CPU the calling thread is running on now."""
    with open("/proc/thread-self/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return int(fields[36])  # field 39 of stat(5), counted after the command name


def pin_current_thread(cpu: int) -> None:
    """Pin the calling thread (Linux applies sched_setaffinity(0) to the calling thread) to ``cpu``."""
    os.sched_setaffinity(0, {cpu})


def unpin_current() -> None:
    """Give the calling thread (or a forked child before exec) every CPU again: undo inherited pinning."""
    os.sched_setaffinity(0, ORIGINAL)
