"""Machine drivers: how a machine's sandbox is made, started, stopped, described and recovered.

:func:`open_driver` makes the driver the config names (``driver``, see
:meth:`~nex.config.NodeConfig.machine_driver`); the pool, the machines and the workloads see only
:class:`~nex.vm.drivers.base.Driver`.
"""

from __future__ import annotations

from pathlib import Path

from nex.config import NodeConfig
from nex.net.network import Networks
from nex.sandbox.policy import Sandbox
from nex.vm.launcher import Launcher
from nex.vm.qemu.boot import BootImage
from nex.vm.qemu.command import VmSpec

from .base import Driver
from .firecracker import FirecrackerDriver, Jailer
from .firecracker_template import FirecrackerTemplate
from .process import ProcessDriver
from .qemu import QemuDriver


def open_driver(
    config: NodeConfig,
    networks: Networks,
    sandbox: Sandbox,
    *,
    launcher: Launcher | None = None,
    image: BootImage | None = None,
    accel: str = "tcg",
    tsc_khz: int = 0,
    snapshot_root: Path | None = None,
) -> Driver:
    """The driver the config names, over this node's networks and sandbox; a process driver needs the
    agent ``launcher``, a VM driver the ``image`` it boots and its accelerator; VM snapshots are kept
    under ``snapshot_root`` (None: none)."""
    snapshots = snapshot_root / image.digest if image and snapshot_root and config.vm_snapshots else None
    match config.machine_driver():
        case "process":
            assert launcher is not None, "the process driver starts agents with a launcher"
            return ProcessDriver(networks, launcher, sandbox)
        case "qemu":
            assert image is not None, "a VM driver boots an image"
            spec = VmSpec(
                qemu=config.qemu_path,
                kernel=image.kernel,
                initrd=image.initrd,
                rootfs=image.rootfs,
                memory_mib=config.machine_template.memsize_mib,
                vcpus=config.machine_template.vcpu_count,
                accel=accel,
                tsc_khz=tsc_khz,
            )
            return QemuDriver(
                networks,
                sandbox,
                spec,
                image_digest=image.digest,
                snapshot_dir=snapshots,
                boot_timeout=config.vm_boot_timeout_ms / 1000,
            )
        case "firecracker":
            assert image is not None, "a VM driver boots an image"
            template = FirecrackerTemplate(
                firecracker=config.firecracker_path,
                kernel=image.kernel,
                rootfs=image.rootfs,
                initrd=image.initrd,
                template=config.machine_template,
                image_digest=image.digest,
            )
            boot_timeout = config.vm_boot_timeout_ms / 1000
            return FirecrackerDriver(
                networks,
                sandbox,
                kernel=image.kernel,
                rootfs=image.rootfs,
                initrd=image.initrd,
                template=config.machine_template,
                firecracker=config.firecracker_path,
                jailer=Jailer(config.jailer_path) if config.jailer_path else None,
                snapshots=template.snapshots(snapshots, boot_timeout) if snapshots else None,
                boot_timeout=boot_timeout,
            )
    raise ValueError(f"no driver {config.machine_driver()!r}")  # the config's validation names the choices
