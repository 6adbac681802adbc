"""What a VM boots: the configured kernel and root filesystem, or the node's own guest image.

``kernel_path`` and ``rootfs_path`` in the config take precedence over the guest image that ``nex
image build`` makes (:mod:`nex.vm.image`). The initramfs is ``initrd_path``, else ``initrd.img``
beside the kernel when there is one (where ``nex image build`` puts it); without one the kernel must
mount ``/dev/vda`` itself (its virtio drivers built in).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from nex.config import NodeConfig

INITRD_BESIDE = "initrd.img"


class BootImage(Protocol):
    @property
    def digest(self) -> str: ...
    @property
    def kernel(self) -> Path: ...
    @property
    def initrd(self) -> Path | None: ...
    @property
    def rootfs(self) -> Path: ...


@dataclass(frozen=True)
class ConfiguredImage:
    digest: str  # of the files' names, sizes and times: a changed file names another snapshot
    kernel: Path
    initrd: Path | None
    rootfs: Path


class ImageError(Exception):
    """The configured kernel, initramfs or root filesystem cannot be used (the message says which)."""


def configured_image(config: NodeConfig) -> ConfiguredImage | None:
    """The image the config names, or None when it names neither a kernel nor a root filesystem.

    Raises:
        ImageError: it names only one of them, or a file that cannot be read.
    """
    if not config.kernel_filepath and not config.rootfs_filepath:
        return None
    if not config.kernel_filepath or not config.rootfs_filepath:
        missing = "kernel_path" if not config.kernel_filepath else "rootfs_path"
        raise ImageError(
            f"{missing} is not set: a VM needs both kernel_path and rootfs_path (or neither, for the guest "
            "image nex image build makes)"
        )
    kernel, rootfs = Path(config.kernel_filepath), Path(config.rootfs_filepath)
    initrd: Path | None = Path(config.initrd_path) if config.initrd_path else kernel.parent / INITRD_BESIDE
    if not config.initrd_path and initrd is not None and not initrd.exists():
        initrd = None
    files = [("kernel_path", kernel), ("rootfs_path", rootfs)]
    if initrd is not None:
        files.append(("initrd_path", initrd))
    digest = hashlib.sha256()
    for key, path in files:
        try:
            facts = path.stat()
            with path.open("rb"):
                pass
        except OSError as exc:
            raise ImageError(
                f"{key} {path} cannot be read: {exc.strerror} (nex image build makes a kernel and root filesystem)"
            ) from None
        digest.update(f"{path.resolve()}\0{facts.st_size}\0{facts.st_mtime_ns}\0".encode())
    return ConfiguredImage(digest=digest.hexdigest()[:24], kernel=kernel, initrd=initrd, rootfs=rootfs)


KVM_PROBE_TIMEOUT = 10.0


async def vm_accel(config: NodeConfig, image: BootImage) -> str:
    """``kvm`` or ``tcg``: the configured one, or (``auto``) KVM when /dev/kvm runs this image's
    kernel for real (a probe boot: an openable /dev/kvm is not enough, see :mod:`nex.vm.kvm`)."""
    from nex import logs
    from nex.vm import kvm

    log = logs.get("nex.vm")
    if config.vm_accel != "auto":
        return config.vm_accel
    why = kvm.kvm_api_usable()
    if why is None:
        ok, detail = await kvm.kvm_runs_guest(config.qemu_path, image.kernel, image.initrd, KVM_PROBE_TIMEOUT)
        if ok:
            return "kvm"
        why = detail
    log.info("VMs run under TCG (emulated, slower): KVM cannot run a guest here", reason=why)
    return "tcg"
