"""The qemu command line of a nex VM: ``-M microvm``, a read-only root, a tap, a private agent channel.

Every VM of a node has the same devices in the same order, so that a clone can restore the snapshot
of a template VM (a migration carries device state, and both ends must have the same devices; only
their backends may differ: the template's network is a hub port going nowhere, a clone's a tap).

The monitor (QMP) and the agent's channel (a virtio-serial port) are sockets the qemu process
inherits (``fd=``): no socket file exists that another user of the host could open, and nothing of
the machine's identity is on the command line, which every user can read in ``/proc``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

GUEST_MAC = "52:54:00:6e:78:01"
"""Every VM's MAC: a clone's is its template's anyway (the device state is restored), and each VM
is alone on its link in its own network namespace, where the host learns it by ARP."""

AGENT_PORT = "nex.agent"  # the virtio-serial port's name, which the guest looks for
TB_MIB = 32  # TCG's translation cache: qemu's default (1 GiB) costs ~45 MiB more per VM at no gain here
SECCOMP = "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"
"""qemu's own seccomp filter (``-sandbox``): no obsolete system calls, no processes, no scheduler or
affinity changes. ``elevateprivileges`` must allow the one ``setuid`` of ``-runas``, which happens
after the filter is in place; once qemu runs as its machine's uid it has no privilege to regain."""


@dataclass(frozen=True)
class VmSpec:
    """What every VM of a node shares; a snapshot fits a VM only if this and qemu's version match."""

    qemu: str
    kernel: Path
    initrd: Path | None
    rootfs: Path
    memory_mib: int
    vcpus: int
    accel: str  # "kvm" or "tcg"
    tsc_khz: int  # TCG's microvm has no timer to calibrate the TSC against: the kernel must be told

    def kernel_args(self) -> str:
        args = ["console=ttyS0", "quiet", "panic=-1", "reboot=t"]
        if self.accel == "tcg":
            args.append(f"tsc_early_khz={self.tsc_khz}")
        return " ".join(args)

    def snapshot_key(self, qemu_version: str, image_digest: str) -> str:
        """Names a snapshot: the image, qemu's version and everything of the command line but the
        per-VM descriptors and paths."""
        shape = argv(self, qmp_fd=0, agent_fd=0, console=Path("-"), tap=None, incoming=False)
        text = "\0".join([qemu_version, image_digest, *shape])
        return hashlib.sha256(text.encode()).hexdigest()[:24]


def argv(
    spec: VmSpec,
    *,
    qmp_fd: int,
    agent_fd: int,
    console: Path,
    tap: str | None,
    incoming: bool,
    runas: int | None = None,
) -> list[str]:
    """The command line; ``tap``: the VM's tap in its namespace (None: a hub port going nowhere, for
    a template); ``incoming``: wait for a migration (``migrate-incoming`` over QMP) instead of booting;
    ``runas``: the unprivileged uid (and gid) qemu becomes once it has opened its files and tap."""
    accel = "kvm" if spec.accel == "kvm" else f"tcg,tb-size={TB_MIB}"
    netdev = f"tap,id=n0,ifname={tap},script=no,downscript=no" if tap else "hubport,id=n0,hubid=0"
    command = [
        spec.qemu,
        *("-M", "microvm", "-accel", accel, "-cpu", "host" if spec.accel == "kvm" else "max"),
        *("-m", str(spec.memory_mib), "-smp", str(spec.vcpus)),
        *("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"),
        *("-kernel", str(spec.kernel)),
        *(("-initrd", str(spec.initrd)) if spec.initrd is not None else ()),
        *("-append", spec.kernel_args() + ("" if spec.initrd is not None else " root=/dev/vda ro")),
        *("-drive", f"id=root,file={spec.rootfs},format=raw,if=none,readonly=on"),
        *("-device", "virtio-blk-device,drive=root"),
        *("-netdev", netdev, "-device", f"virtio-net-device,netdev=n0,mac={GUEST_MAC}"),
        *("-chardev", f"socket,id=qmp,fd={qmp_fd},server=off", "-mon", "chardev=qmp,mode=control"),
        *("-chardev", f"socket,id=agent,fd={agent_fd},server=off"),
        *("-device", "virtio-serial-device", "-device", f"virtserialport,chardev=agent,name={AGENT_PORT}"),
        *("-chardev", f"file,id=console,path={console},append=on", "-serial", "chardev:console"),
    ]
    command += ["-sandbox", SECCOMP]
    if runas is not None:
        command += ["-runas", f"{runas}:{runas}"]
    if incoming:
        command += ["-incoming", "defer"]
    return command
