"""The few Linux calls nex makes through libc, which Python 3.11's ``os`` lacks: death signals,
namespaces, mounts, capabilities and the process flags a jail sets. One place for their constants and
for the one delicate step, :func:`die_with_parent`.

Every wrapper raises :class:`OSError` with the errno and a message naming what was attempted, so a
jail step that fails says which step and why.
"""

from __future__ import annotations

import ctypes
import os
import signal

libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

SYS_PIVOT_ROOT = 155  # x86_64; aarch64 has 41
if os.uname().machine == "aarch64":
    SYS_PIVOT_ROOT = 41

#: securebits that keep uid 0 from meaning capabilities, for good: NOROOT (an exec as uid 0 gains
#: nothing), KEEP_CAPS off and NO_CAP_AMBIENT_RAISE, each locked (capabilities(7))
SECURE_LOCKED_NOROOT = 0b1110_0011


def check(result: int, what: str) -> None:
    """Raise the call's errno as an :class:`OSError` naming ``what`` unless ``result`` is 0."""
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def die_with_parent(parent: int | None = None) -> None:
    """Be SIGKILLed when the parent dies (for the kernel: the *thread* that forked this process).

    With ``parent`` (its pid, read before the fork), exit at once if it died before the signal was
    armed. A parent outside this process's PID namespace reads as 0 and counts as alive: who forks an
    init cannot be checked this way, and notices a dead parent otherwise (see nex.agent.launchpad).
    The kernel clears this signal whenever the process's credentials change: arm it again after.
    """
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() not in (parent, 0):
        os._exit(1)


def setns(fd: int, nstype: int, what: str) -> None:
    """Move the calling thread into the namespace ``fd`` refers to."""
    check(libc.setns(fd, nstype), what)


def unshare(flags: int, what: str) -> None:
    check(libc.unshare(flags), what)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    check(
        libc.mount(
            source.encode() if source is not None else None,
            target.encode(),
            fstype.encode() if fstype is not None else None,
            flags,
            data.encode() if data is not None else None,
        ),
        f"mount {fstype or source or ''} on {target}",
    )


def umount(target: str, flags: int = MNT_DETACH) -> None:
    check(libc.umount2(target.encode(), flags), f"unmount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    check(libc.syscall(SYS_PIVOT_ROOT, new_root.encode(), put_old.encode()), "pivot_root")


def sethostname(name: str) -> None:
    raw = name.encode()
    check(libc.sethostname(raw, len(raw)), f"sethostname {name}")


def prctl(option: int, arg: int, what: str) -> None:
    check(libc.prctl(option, arg, 0, 0, 0), what)


def set_dumpable(dumpable: bool) -> None:
    """Whether this process's memory, /proc files and core can be reached by others of its uid.

    A non-dumpable process's /proc/<pid> files belong to root and it cannot be ptraced without
    CAP_SYS_PTRACE: the node and its agents hold keys.
    """
    prctl(PR_SET_DUMPABLE, int(dumpable), "PR_SET_DUMPABLE")


def has_capabilities(*capabilities: int) -> bool:
    """Whether this process has every one of ``capabilities`` (numbers, as in capability.h) in effect."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                effective = int(line.split()[1], 16)
                return all(effective & (1 << cap) for cap in capabilities)
    return False


def last_capability() -> int:
    with open("/proc/sys/kernel/cap_last_cap", "rb") as file:
        return int(file.read())


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_CAPABILITY_V3 = 0x20080522


def drop_bounding_set(last: int) -> None:
    """Remove every capability up to ``last`` from the bounding set (needs CAP_SETPCAP): none can come
    back through an exec, even of a file with capabilities or as uid 0."""
    for cap in range(last + 1):
        prctl(PR_CAPBSET_DROP, cap, f"drop capability {cap} from the bounding set")


def clear_capabilities() -> None:
    """Empty the ambient, effective, permitted and inheritable sets."""
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "clear the ambient capabilities")
    header = _CapHeader(_CAPABILITY_V3, 0)
    data = (_CapData * 2)()
    check(libc.capset(ctypes.byref(header), data), "capset (drop every capability)")
