"""The workload's syscall filter, compiled by libseccomp (through pyseccomp) and applied last.

The filter allows by default and denies, with ``EPERM``, what Docker's default profile leaves out and
nothing a plain static program needs: the mount family and ``pivot_root``/``chroot``, every way into
or out of a namespace (``setns``, ``unshare``, ``clone`` with a namespace flag), module loading,
``kexec``, ``reboot``, clock and host-name setting, ``bpf``, ``ptrace`` and the other ways into another
process's memory or files (``process_vm_*``, ``pidfd_getfd``, ``kcmp``, ``open_by_handle_at``), the
kernel keyring, ``perf_event_open``, ``userfaultfd``, ``io_uring``, swap, ``acct``, quotas,
``iopl``/``ioperm``, ``mknod`` of device nodes, the terminal-injection ioctls (``TIOCSTI``,
``TIOCLINUX``) and the ``personality`` flags that turn address-space randomisation off. Sockets are
limited to the families a workload needs (unix, IPv4, IPv6, and netlink for routes only): not vsock,
which has no network namespaces and would reach the host's hypervisor and guests past the fence, nor
AF_ALG (the kernel's crypto API, CVE-2026-31431), nor the host's uevent stream. The core-size limit
cannot be changed (the jail sets it to 1 byte, which also stops a piped ``core_pattern`` helper from
running for the workload), nor another process's limits. ``clone3`` gets ``ENOSYS``, as under Docker,
so that the C library falls back to ``clone``, whose flags a filter can see. A syscall of another
architecture (the i386 ABI through ``int 0x80``, x32) kills the process: the filter only speaks the
native one.

Arguments the kernel reads as 32-bit are compared on their low 32 bits only (a mask), so that a value
with high bits set cannot slip past a comparison the kernel would then truncate.

A default-allow list is what the issue asks for ("at least what Docker denies"); it keeps every
language runtime working. Its limit (a syscall added by a later kernel is allowed) is written down in
docs/security.md.

The program is compiled once per process (:func:`program`; the zygote does it for every agent) and applied with one
``prctl`` (:func:`apply`), so that a workload's init pays only for the latter.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os

from nex import linux

#: denied outright with EPERM (names libseccomp does not know on this architecture are skipped)
DENIED = (
    # the mount table and the root
    "mount", "umount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr",
    # namespaces
    "setns", "unshare",
    # the kernel itself
    "init_module", "finit_module", "delete_module", "create_module", "query_module", "get_kernel_syms",
    "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd",
    "lookup_dcookie", "syslog", "vhangup", "nfsservctl", "uselib", "ustat", "sysfs", "_sysctl",
    "iopl", "ioperm", "modify_ldt", "vm86", "vm86old",
    # the host's clock and names
    "settimeofday", "stime", "clock_settime", "clock_settime64", "clock_adjtime", "clock_adjtime64", "adjtimex",
    "sethostname", "setdomainname",
    # other processes' memory and files
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "pidfd_getfd", "kcmp",
    "open_by_handle_at", "name_to_handle_at",
    # kernel attack surface a workload does not need
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "fanotify_init",
)  # fmt: skip

#: denied by number: newer than this libseccomp knows by name (the same numbers on x86_64 and aarch64)
DENIED_NUMBERS = {"lsm_set_self_attr": 460, "open_tree_attr": 467}

_NAMESPACE_FLAGS = (
    linux.CLONE_NEWNS,
    linux.CLONE_NEWCGROUP,
    linux.CLONE_NEWUTS,
    linux.CLONE_NEWIPC,
    linux.CLONE_NEWUSER,
    linux.CLONE_NEWPID,
    linux.CLONE_NEWNET,
    0x00000080,  # CLONE_NEWTIME
)
_S_IFMT, _S_IFCHR, _S_IFBLK = 0o170000, 0o020000, 0o060000
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C
#: personality(2) flags that weaken the address space: ADDR_NO_RANDOMIZE, MMAP_PAGE_ZERO,
#: ADDR_COMPAT_LAYOUT, READ_IMPLIES_EXEC, ADDR_LIMIT_32BIT, ADDR_LIMIT_3GB. Matched only with the top
#: nibble clear, so that 0xffffffff (the query of the current personality) stays allowed.
_UNSAFE_PERSONALITY = (0x0040000, 0x0100000, 0x0200000, 0x0400000, 0x0800000, 0x8000000)
_QUERY_BITS = 0xF000_0000
_LOW32 = 0xFFFF_FFFF
#: socket families a workload may not open: all but AF_UNIX (1), AF_INET (2), AF_INET6 (10) and
#: AF_NETLINK (16); 17 and above (AF_PACKET, AF_ALG 38, AF_VSOCK 40, ...) by one comparison
_DENIED_FAMILIES = (0, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15)
_FIRST_DENIED_FAMILY = 17
_AF_NETLINK = 16
_RLIMIT_CORE = 4

_SECCOMP_SET_MODE_FILTER = 1
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}.get(os.uname().machine, -1)


class SeccompUnavailable(Exception):
    """libseccomp (or its Python binding) is missing, or refuses the filter; the message says which."""


@functools.cache
def program() -> bytes:
    """The filter as a BPF program, compiled by libseccomp once per process.

    Raises:
        SeccompUnavailable: libseccomp is not installed or cannot compile it.
    """
    try:
        import pyseccomp as sc  # a ctypes binding: loading it loads libseccomp.so.2
    except ImportError as exc:
        raise SeccompUnavailable(f"the pyseccomp package is missing ({exc}); pip install pyseccomp") from None
    except (RuntimeError, OSError) as exc:
        raise SeccompUnavailable(f"libseccomp is not available ({exc}); install libseccomp2") from None
    deny = sc.ERRNO(errno.EPERM)
    try:
        rules = sc.SyscallFilter(sc.ALLOW)
        rules.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
        for name in DENIED:
            if sc.resolve_syscall(sc.Arch.NATIVE, name) != -1:  # -1: unknown here (a 32-bit-only name)
                rules.add_rule(deny, name)
        for name, number in DENIED_NUMBERS.items():
            rules.add_rule(deny, sc.resolve_syscall(sc.Arch.NATIVE, name) if _known(sc, name) else number)
        rules.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
        for flag in _NAMESPACE_FLAGS:
            rules.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
        for kind in (_S_IFCHR, _S_IFBLK):
            rules.add_rule(deny, "mknod", sc.Arg(1, sc.MASKED_EQ, _S_IFMT, kind))
            rules.add_rule(deny, "mknodat", sc.Arg(2, sc.MASKED_EQ, _S_IFMT, kind))
        for request in (_TIOCSTI, _TIOCLINUX):
            rules.add_rule(deny, "ioctl", sc.Arg(1, sc.MASKED_EQ, _LOW32, request))
        for flag in _UNSAFE_PERSONALITY:
            rules.add_rule(deny, "personality", sc.Arg(0, sc.MASKED_EQ, flag | _QUERY_BITS, flag))
        for call in ("socket", "socketpair"):  # socketpair too: it makes the family's socket before refusing
            for family in _DENIED_FAMILIES:
                rules.add_rule(deny, call, sc.Arg(0, sc.MASKED_EQ, _LOW32, family))
            rules.add_rule(deny, call, sc.Arg(0, sc.GE, _FIRST_DENIED_FAMILY))  # high bits set: also denied
        rules.add_rule(deny, "socket", sc.Arg(0, sc.MASKED_EQ, _LOW32, _AF_NETLINK), sc.Arg(2, sc.GT, 0))
        rules.add_rule(deny, "setrlimit", sc.Arg(0, sc.MASKED_EQ, _LOW32, _RLIMIT_CORE))
        rules.add_rule(deny, "prlimit64", sc.Arg(1, sc.MASKED_EQ, _LOW32, _RLIMIT_CORE), sc.Arg(2, sc.NE, 0))
        rules.add_rule(deny, "prlimit64", sc.Arg(0, sc.NE, 0), sc.Arg(2, sc.NE, 0))  # another's limits
        out = os.memfd_create("nex-seccomp", os.MFD_CLOEXEC)
        try:
            rules.export_bpf(_FileNo(out))
            return os.pread(out, 1 << 20, 0)
        finally:
            os.close(out)
    except OSError as exc:
        raise SeccompUnavailable(f"libseccomp could not compile the filter: {exc}") from None


def _known(sc: object, name: str) -> bool:
    return bool(sc.resolve_syscall(sc.Arch.NATIVE, name) != -1)  # type: ignore[attr-defined]


class _FileNo:
    """What pyseccomp's export takes: something with a ``fileno()``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def apply(bpf: bytes) -> None:
    """Install ``bpf`` (from :func:`program`) on the calling thread, inherited by all it starts.

    Needs ``no_new_privs`` (or CAP_SYS_ADMIN), which the jail sets just before.
    """
    buffer = ctypes.create_string_buffer(bpf, len(bpf))
    fprog = _SockFprog(len(bpf) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    linux.check(
        linux.libc.syscall(_SYS_SECCOMP, _SECCOMP_SET_MODE_FILTER, 0, ctypes.byref(fprog)), "install the seccomp filter"
    )
