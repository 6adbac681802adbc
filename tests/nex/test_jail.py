"""The jail on its own: a launchpad (as the agent makes one) running the hostile tenant, as root and
rootless, a step that cannot be applied, and the seccomp filter.

The node-level suite (test_sandbox.py) attacks a whole node; these pin each part where it lives, and
run in a fraction of the time. The hostile binary only ever runs inside a jail here: a jail that does
not hold is what the assertions catch, and every attack is harmless where it gets through.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from nex import linux
from nex.agent.launchpad import LaunchFailed, Launchpad
from nex.api import agent as api
from nex.sandbox import seccomp

from .workloads import Binaries, attacks

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="building a jail for another uid needs root"),
]

UID = 0x7000_0000 + 77
ESCAPES = ("read:shadow", "read:secret", "proc_pids", "proc_mem", "setns", "mount", "mknod", "unshare", "ptrace")
ESCAPES += ("sethostname", "settimeofday", "bpf", "keyctl", "write:outside", "stat:venv", "vsock", "af_alg")
ESCAPES += ("uevent", "socketpair", "core_limit", "read:init_cmdline")


def jail(**changes: object) -> api.Jail:
    settings: dict[str, object] = {"hostname": "jailtestjailtest0000", "uid": UID, "memory_mib": 64, "disk_mib": 8}
    return api.Jail(**{**settings, **changes})  # type: ignore[arg-type]


def run(spec: api.Jail | None, workdir: Path, artifact: bytes, argv: list[str], env: dict[str, str]) -> list[str]:
    async def main() -> list[str]:
        pad = Launchpad(spec, str(workdir))
        workload = await pad.launch(artifact, argv, env, limit=1 << 16)
        out = await workload.stdout.read()
        assert await workload.wait() == 0
        return out.decode().splitlines()

    return asyncio.run(main())


def escape_env(tmp_path: Path, bystander: int) -> dict[str, str]:
    secret = tmp_path / "secret"
    secret.write_text("a key")
    return {
        "READ_1": "shadow=/etc/shadow",
        "READ_2": f"secret={secret}",
        "HOST_PID": str(bystander),
        "HOST_PIDS_MIN": "10",
        "MEM_PID": str(bystander),
        "WRITE_1": f"outside={tmp_path / 'escaped'}",
        "STAT_1": f"venv={sys.prefix}",
        "READ_3": "init_cmdline=/proc/1/cmdline",
    }


def test_the_jail_keeps_a_hostile_tenant_in(tmp_path: Path, binaries: Binaries, bystander: int) -> None:
    (tmp_path / "machine").mkdir()
    found = attacks(run(jail(), tmp_path / "machine", binaries.hostile, ["escape"], escape_env(tmp_path, bystander)))
    assert {name: found[name][0] for name in ESCAPES} == dict.fromkeys(ESCAPES, "BLOCKED"), found
    cap_eff, no_new_privs, seccomp_mode, uid, pid = found["caps"][1].split()
    assert (int(cap_eff, 16), no_new_privs, seccomp_mode, uid, pid) == (0, "1", "2", "uid=0", "workload_pid=2")
    assert found["proc_pids"][1].startswith("count=2 "), "its /proc shows itself and its attack, not init"
    assert not (tmp_path / "escaped").exists()
    assert list((tmp_path / "machine").iterdir()) == [], "the jail's root was only ever mounted inside it"


def test_without_the_jail_the_same_attacks_get_through(tmp_path: Path, binaries: Binaries, bystander: int) -> None:
    """The control: the attacks are not broken. Each one is harmless where it gets through (see hostile.c)."""
    (tmp_path / "machine").mkdir()
    found = attacks(run(None, tmp_path / "machine", binaries.hostile, ["escape"], escape_env(tmp_path, bystander)))
    assert {name: found[name][0] for name in ESCAPES} == dict.fromkeys(ESCAPES, "OK"), found


def test_a_jail_without_a_user_namespace_runs_the_workload_as_the_machines_uid(
    tmp_path: Path, binaries: Binaries
) -> None:
    (tmp_path / "machine").mkdir()
    found = attacks(run(jail(user_namespace=False), tmp_path / "machine", binaries.hostile, ["escape"], {}))
    assert found["caps"][1].split()[:4] == ["0000000000000000", "1", "2", f"uid={UID}"]
    assert found["unshare_user"][0] == "BLOCKED"


def test_a_rootless_jail_holds_too(tmp_path: Path, binaries: Binaries) -> None:
    """A node without root: the jail starts from a user namespace of the node's own uid (here: nobody)."""
    workdir = Path(tempfile.mkdtemp(prefix="nex-test-rootless-"))  # pytest's own are root's only
    workdir.chmod(0o755)
    try:
        lines = _run_as_nobody(workdir, binaries.hostile)
    finally:
        workdir.rmdir()  # empty: the jail's root was mounted only in the jail's own namespace
    found = attacks(lines)
    for name in ("mount", "unshare", "ptrace", "sethostname", "bpf", "connect:loopback"):
        assert found[name][0] == "BLOCKED", (name, found[name])
    _, _, _, uid, pid = found["caps"][1].split()
    assert (uid, pid) == ("uid=0", "workload_pid=1"), "uid 0 of its user namespace, pid 1 of its PID namespace"


def _run_as_nobody(workdir: Path, hostile: bytes) -> list[str]:
    def as_nobody() -> str:
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)
        spec = jail(rootless=True, own_network=True, uid=0)  # as the policy makes it for a rootless node
        return "\n".join(run(spec, workdir, hostile, ["escape"], {"CONNECT_1": "loopback=127.0.0.1:9"}))

    return in_a_child(as_nobody).splitlines()


def in_a_child(work: Callable[[], str]) -> str:
    """``work()`` in a forked child (for what changes the process: its uid, a seccomp filter); what it
    returned, or the error it raised, which fails the test."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 1
        try:
            os.close(read)
            os.write(write, work().encode())
            code = 0
        except BaseException as exc:
            os.write(write, repr(exc).encode())
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        said = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, said
    return said


def test_a_jail_step_that_cannot_be_applied_refuses_the_workload(tmp_path: Path, binaries: Binaries) -> None:
    (tmp_path / "machine").mkdir()
    spec = jail(mounts=[api.BindMount(source=str(tmp_path / "missing"), target="/data")])

    async def main() -> int:
        pad = Launchpad(spec, str(tmp_path / "machine"))
        with pytest.raises(LaunchFailed, match=r"jail step 'root filesystem' failed: .*missing does not exist"):
            await pad.launch(binaries.hostile, ["escape"], {}, limit=1024)
        return pad.pid

    pid = asyncio.run(main())
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # init is gone, reaped


def test_operator_mounts_are_read_only(tmp_path: Path, binaries: Binaries) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "data").write_text("readable")
    (tmp_path / "machine").mkdir()
    spec = jail(mounts=[api.BindMount(source=str(shared), target="/srv/shared")])
    env = {"READ_1": "data=/srv/shared/data", "WRITE_1": "into=/srv/shared/new"}
    found = attacks(run(spec, tmp_path / "machine", binaries.hostile, ["escape"], env))
    assert found["read:data"][0] == "OK"
    assert found["write:into"] == ("BLOCKED", "open: EROFS (Read-only file system)")


def test_the_seccomp_filter_denies_what_it_lists_and_lets_a_program_run() -> None:
    program = seccomp.program()

    def filtered() -> str:
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")
        seccomp.apply(program)
        results = []
        for call, args in (("unshare", (linux.CLONE_NEWNS,)), ("syscall", (435, 0, 0))):  # 435: clone3
            result = getattr(linux.libc, call)(*args)
            results.append(f"{result}:{ctypes.get_errno()}")
        child = os.fork()
        if child == 0:
            os._exit(7)
        results.append(str(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])))
        return " ".join(results)

    assert in_a_child(filtered).split() == [f"-1:{errno.EPERM}", f"-1:{errno.ENOSYS}", "7"]
