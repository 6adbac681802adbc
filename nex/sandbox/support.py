"""What this host lets the node apply of the jail, found out once at start.

Each probe returns ``None`` when the feature works, or the reason it does not, in words an operator
can act on. The node states the result at start (with what is missing) and every machine's jail is
planned from it (:mod:`.policy`).
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from nex import linux

from . import seccomp


def user_namespaces(uid: int | None) -> str | None:
    """Whether a process can make a user namespace in which ``uid`` (a machine's host uid, as root;
    ``None``: the caller's own) is uid 0, as a workload's init does. Tried for real in a child.

    Call it before the process starts threads: it forks.
    """
    reason_r, reason_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover (a child)
        code = 1  # until it has worked: a child that dies or is interrupted is a failed probe
        try:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # the parent's (trio's) handler is not ours
            os.close(reason_r)
            if uid is not None:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            linux.set_dumpable(True)  # its own /proc/self, to write its maps (the node is not dumpable)
            outside_uid, outside_gid = os.geteuid(), os.getegid()
            linux.unshare(linux.CLONE_NEWUSER, "unshare(CLONE_NEWUSER)")
            for name, text in (("setgroups", "deny"), ("uid_map", f"0 {outside_uid} 1")):
                Path(f"/proc/self/{name}").write_text(text)
            Path("/proc/self/gid_map").write_text(f"0 {outside_gid} 1")
            code = 0
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.write(reason_w, str(exc).encode())
        finally:
            os._exit(code)
    os.close(reason_w)
    try:
        reason = os.read(reason_r, 4096).decode(errors="replace")
    finally:
        os.close(reason_r)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        return None
    hint = _user_namespace_hint()
    return f"{reason or 'the probe died'}{hint}"


def _user_namespace_hint() -> str:
    for path, good, what in (
        ("/proc/sys/user/max_user_namespaces", None, "user.max_user_namespaces is 0"),
        ("/proc/sys/kernel/unprivileged_userns_clone", "1", "kernel.unprivileged_userns_clone is 0"),
        ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "0", "AppArmor restricts user namespaces"),
    ):
        with contextlib.suppress(OSError, ValueError):
            value = Path(path).read_text().strip()
            if (good is None and int(value) == 0) or (good is not None and value != good):
                return f" ({what})"
    return ""


def seccomp_filter() -> str | None:
    try:
        seccomp.program()
    except seccomp.SeccompUnavailable as exc:
        return str(exc)
    return None


def privileged() -> bool:
    """Root with the capabilities a jail is built with (CAP_SETGID, CAP_SETUID, CAP_SYS_ADMIN)."""
    return os.geteuid() == 0 and linux.has_capabilities(6, 7, 21)
