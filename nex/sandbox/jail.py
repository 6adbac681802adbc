"""The jail a workload runs in, built by its init before the workload is known.

The agent's launchpad forks the workload's init (pid 1 of a PID namespace of its own, in the
machine's network namespace and cgroup). Init calls :func:`build`, which applies the steps below in
this order, each failing closed with :class:`JailError` naming the step; then it waits for the deploy,
writes the artifact through the descriptor :func:`build` kept open, and starts it. So everything but
that write and the exec happens while the machine is still warm, off the deploy's path.

As root (the node's normal case), after nsjail and Firecracker's jailer:

1. **namespaces**: mount, UTS, IPC and cgroup namespaces of its own (PID and network exist already);
2. **root**: a tmpfs root holding ``/app/workload`` (opened for writing now, through a bind mount that
   is detached at once, so that the root itself can be read-only), a ``/dev`` with null, zero, full,
   random, urandom and tty bind-mounted read-only from the host and ``/dev/shm``, a fresh ``/proc`` of
   its PID namespace (``hidepid=invisible``: init is not there to read), ``/etc`` (passwd, group, hosts,
   resolv.conf), the operator's read-only bind mounts, and
   one size-limited tmpfs for everything writable (``/tmp``, the working directory ``/work`` and
   ``/dev/shm`` are bind mounts of it, so one size bounds them all); then ``pivot_root``, the old root
   detached, and the root remounted read-only;
3. **hostname** set to the machine's id; **rlimits** (open files, core size 1 byte: none is ever
   written, not even through a piped ``core_pattern``); a session of its own (no controlling
   terminal: CVE-2017-5226);
4. **identity**: the capability bounding set emptied, supplementary groups dropped, and the
   machine's own host uid and gid taken; then, where the kernel allows, a **user namespace** in which
   that uid is 0. Every namespace but that one belongs to the host's user namespace, so uid 0 there owns
   nothing: it cannot even mount in its own mount namespace;
5. **capabilities**: the bounding set emptied again (a new user namespace starts full), securebits
   locked so that uid 0 never regains any on exec, every set cleared;
6. ``PR_SET_NO_NEW_PRIVS``; then **seccomp** (:mod:`.seccomp`), last.

Without root (``rootless``: an unprivileged node), the user namespace comes first, mapping uid 0 to
the node's own uid as bubblewrap does, and the other steps run inside it, a PID namespace among them
(the workload is its pid 1: it shares its uid with the node and the operator, and must not be able to
signal them); the workload also gets a network namespace with only loopback (``own_network``: no
veth can be made without root), and no ``/proc`` (a proc mount takes the PID namespace of whoever
mounts it, and init is not in the workload's).

Init applies the same jail to itself: by the time the workload exists, its parent has nothing the
workload lacks. Init and every later step are single-threaded: no step may start a thread.
"""

from __future__ import annotations

import errno
import os
import resource
from dataclasses import dataclass

from nex import linux
from nex.api import agent as api

from . import seccomp

ARTIFACT = "/app/workload"
WORKDIR = "/work"
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
_DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
)
_RO = linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV
_SCRATCH = (("tmp", 0o1777, "/tmp"), ("work", 0o700, WORKDIR), ("shm", 0o1777, "/dev/shm"))


class JailError(OSError):
    """A step of the jail could not be applied; the message names the step and the reason."""


@dataclass
class Built:
    """A finished jail, ready for its workload: where its artifact goes."""

    artifact_fd: int


def build(spec: api.Jail, mountpoint: str) -> Built:
    """Jail the calling process (the workload's init) as ``spec`` says; see the module docstring.

    ``mountpoint`` is an existing directory to build the new root on (the agent's working directory:
    it is only covered in this process's own mount namespace). Raises :class:`JailError`.
    """
    privileged = not spec.rootless
    step = "namespaces"
    try:
        last = linux.last_capability()  # read while the host's /proc is there
        if not privileged:
            step = "user namespace"
            _enter_user_namespace(os.geteuid(), os.getegid())
        step = "namespaces"
        flags = linux.CLONE_NEWNS | linux.CLONE_NEWUTS | linux.CLONE_NEWIPC | linux.CLONE_NEWCGROUP
        if spec.own_network:
            flags |= linux.CLONE_NEWNET  # the agent is on the host's network: the workload gets none
        if spec.rootless:
            # The agent could not make a PID namespace: the workload, init's next child, is pid 1 of
            # one made here, so that it can signal nothing of its uid outside (the node's, the
            # operator's) and what it starts ends with it.
            flags |= linux.CLONE_NEWPID
        linux.unshare(flags, "unshare the mount, UTS, IPC and cgroup namespaces")
        step = "root filesystem"
        artifact_fd = _build_root(spec, mountpoint, privileged=privileged)
        step = "hostname"
        linux.sethostname(spec.hostname)
        step = "rlimits"
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nofile = spec.nofile if privileged or hard == resource.RLIM_INFINITY else min(spec.nofile, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        if privileged:  # the uid is the machine's alone: a second bound on forks, beside its cgroup
            resource.setrlimit(resource.RLIMIT_NPROC, (spec.pids_max, spec.pids_max))
        # 1 byte, not 0: no core file can be that small, and a core_pattern that pipes to a helper
        # (systemd-coredump, apport) ignores the limit unless it is exactly 1 (fs/coredump.c); the
        # filter keeps the workload from changing it
        resource.setrlimit(resource.RLIMIT_CORE, (1, 1))
        os.setsid()
        if privileged:
            step = "identity"
            linux.drop_bounding_set(last)
            linux.prctl(linux.PR_SET_SECUREBITS, linux.SECURE_LOCKED_NOROOT, "lock the securebits")
            os.setgroups([])
            os.setresgid(spec.uid, spec.uid, spec.uid)
            os.setresuid(spec.uid, spec.uid, spec.uid)
            if spec.user_namespace:
                step = "user namespace"
                _enter_user_namespace(spec.uid, spec.uid)
        step = "capabilities"
        if not privileged or spec.user_namespace:  # a new user namespace starts with a full set
            linux.drop_bounding_set(last)
            linux.prctl(linux.PR_SET_SECUREBITS, linux.SECURE_LOCKED_NOROOT, "lock the securebits")
        linux.clear_capabilities()
        linux.set_dumpable(False)  # the workload (same uid) cannot reach into init's memory
        linux.die_with_parent()  # a change of credentials clears the death signal: arm it again
        step = "no_new_privs"
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")
        if spec.seccomp:
            step = "seccomp"
            seccomp.apply(seccomp.program())
    except Exception as exc:  # any failure (a limit the kernel refuses is a ValueError) fails closed
        raise JailError(getattr(exc, "errno", None) or errno.EPERM, f"jail step '{step}' failed: {exc}") from None
    return Built(artifact_fd=artifact_fd)


def _enter_user_namespace(outside_uid: int, outside_gid: int) -> None:
    """A new user namespace in which ``outside_uid`` is 0; the caller must *be* that uid already (or
    have CAP_SETUID above), which is what lets it write its own single-line maps. Dumpable for that:
    a process that is not has a /proc/self owned by root (set back once the capabilities are gone)."""
    linux.set_dumpable(True)
    linux.unshare(linux.CLONE_NEWUSER, "unshare the user namespace")
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {outside_uid} 1"), ("gid_map", f"0 {outside_gid} 1")):
        fd = os.open(f"/proc/self/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


def _build_root(spec: api.Jail, mountpoint: str, *, privileged: bool) -> int:
    """Make the new root on ``mountpoint`` and move into it; the artifact's write descriptor."""
    root = mountpoint
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)  # nothing of ours propagates out
    linux.mount("nex-root", root, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, f"size={spec.memory_mib}m,mode=0755")
    for name in ("app", "dev", "etc", "proc", "tmp", "work", ".scratch", ".stage"):
        os.mkdir(f"{root}/{name}", 0o755)
    artifact_fd = _artifact_descriptor(root)
    _build_dev(root)
    _build_scratch(root, spec, owner=spec.uid if privileged else None)
    _write_etc(root, spec)
    for bind in spec.mounts:
        _bind_read_only(root, bind.source, bind.target)
    if privileged:  # a /proc of its PID namespace; that namespace belongs to the host's user namespace
        # hidepid: init (not dumpable) is invisible to the workload: its command line is the agent's
        flags = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
        linux.mount("proc", f"{root}/proc", "proc", flags, "hidepid=invisible")
    os.chdir(root)
    linux.pivot_root(".", ".")  # the old root now lies under the new one, at the same place
    linux.umount(".")  # ... and is detached: nothing of the host's tree is reachable any more
    os.chdir("/")
    linux.mount(None, "/", None, _RO)
    return artifact_fd


def _artifact_descriptor(root: str) -> int:
    """Create ``/app/workload`` (0555, owned by the host's root) and keep it open for writing through
    a bind mount that is detached at once: writes through it still land, while the root's own mount can
    be made read-only (a mount with a file open for writing cannot)."""
    stage = f"{root}/.stage"
    linux.mount(root, stage, None, linux.MS_BIND)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(f"{stage}{ARTIFACT}", flags, 0o555)
    linux.umount(stage)
    os.rmdir(stage)
    return fd


def _build_dev(root: str) -> None:
    dev = f"{root}/dev"
    linux.mount("nex-dev", dev, "tmpfs", linux.MS_NOSUID | linux.MS_NOEXEC, "size=64k,mode=0755")
    for name in DEVICES:
        os.close(os.open(f"{dev}/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
        linux.mount(f"/dev/{name}", f"{dev}/{name}", None, linux.MS_BIND)
        # read-only: the device can still be written to, its host inode (times, modes) cannot
        flags = linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NOEXEC
        linux.mount(None, f"{dev}/{name}", None, flags)
    for name, target in _DEV_LINKS:
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(f"{dev}/shm", 0o1777)
    linux.mount(None, dev, None, linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NOEXEC, "mode=0755")


def _build_scratch(root: str, spec: api.Jail, owner: int | None) -> None:
    """One tmpfs of ``disk_mib`` for /tmp, /work and /dev/shm, so that filling any of them is ENOSPC
    for the workload and never the host's disk; its pages count against the machine's memory too."""
    scratch = f"{root}/.scratch"
    linux.mount("nex-scratch", scratch, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, f"size={spec.disk_mib}m,mode=0755")
    for name, mode, target in _SCRATCH:
        os.mkdir(f"{scratch}/{name}")
        os.chmod(f"{scratch}/{name}", mode)  # mkdir's mode is masked by the umask
        if owner is not None:
            os.chown(f"{scratch}/{name}", owner, owner)
        linux.mount(f"{scratch}/{name}", f"{root}{target}", None, linux.MS_BIND)
    linux.umount(scratch)
    os.rmdir(scratch)


def _write_etc(root: str, spec: api.Jail) -> None:
    user = "root:x:0:0:workload:/work:/nonexistent\n" if spec.user_namespace else ""
    user += f"workload:x:{spec.uid}:{spec.uid}:workload:/work:/nonexistent\n"
    group = ("root:x:0:\n" if spec.user_namespace else "") + f"workload:x:{spec.uid}:\n"
    files = {
        "passwd": user,
        "group": group,
        "hosts": f"127.0.0.1\tlocalhost {spec.hostname}\n::1\tlocalhost\n",
        "resolv.conf": "".join(f"nameserver {server}\n" for server in spec.nameservers),
    }
    for name, text in files.items():
        fd = os.open(f"{root}/etc/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


def _bind_read_only(root: str, source: str, target: str) -> None:
    """Bind ``source`` (a host path) read-only at ``target`` inside the new root; only this mount, not
    what is mounted below it (a recursive bind could not be made read-only as a whole)."""
    inside = os.path.normpath(f"{root}/{target}")
    if not os.path.exists(source):
        raise FileNotFoundError(errno.ENOENT, f"mount source {source} does not exist")
    os.makedirs(os.path.dirname(inside), mode=0o755, exist_ok=True)
    if os.path.isdir(source):
        os.makedirs(inside, mode=0o755, exist_ok=True)
    else:
        os.close(os.open(inside, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
    linux.mount(source, inside, None, linux.MS_BIND)
    linux.mount(None, inside, None, _RO)
