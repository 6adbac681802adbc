"""The few Linux calls nex makes through libc, which Python 3.11's ``os`` lacks: death signals and
namespaces. One place for their constants and for the one delicate step, :func:`die_with_parent`."""

from __future__ import annotations

import ctypes
import os
import signal

libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

PR_SET_PDEATHSIG = 1
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000


def die_with_parent(parent: int | None = None) -> None:
    """Be SIGKILLed when the parent dies (for the kernel: the *thread* that forked this process).

    With ``parent`` (its pid, read before the fork), exit at once if it died before the signal was
    armed. A parent outside this process's PID namespace reads as 0 and counts as alive: who forks an
    init cannot be checked this way, and notices a dead parent otherwise (see nex.agent.launchpad).
    """
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() not in (parent, 0):
        os._exit(1)


def setns(fd: int, nstype: int, what: str) -> None:
    """Move the calling thread into the namespace ``fd`` refers to.

    Raises:
        OSError: with ``what`` and the reason.
    """
    if libc.setns(fd, nstype) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
