"""The microVM guest image for tests: built once, kept between sessions.

A build takes 7-20 s (the downloads only the first time), so the image lives in a persistent
cache: ``$NEX_TEST_IMAGE_CACHE`` or ``~/.cache/nex-tests``, used as a state directory (the image in
``images/<digest>/``, the downloads in ``images/.debs`` and ``.wheels``). A session whose nex sources
differ builds a new image there; the few most recently used ones are kept (sessions running at the
same time on one host may each use their own), older ones removed.

Import it from a conftest: ``from .image_fixture import guest_image  # noqa: F401``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from nex.vm.image import GuestImage, RegistryError, build_image, list_images, remove_images
from nex.vm.kvm import tcg_tsc_khz
from nex.vm.qemu.command import VmSpec

#: How many images besides the session's own stay in the cache: those of concurrent sessions.
SPARE_IMAGES = 3
#: What the build runs on the host (besides pip).
BUILD_TOOLS = ("apt-get", "apt-cache", "dpkg-deb", "chroot", "mkfs.ext4")


def image_cache() -> Path:
    """The state directory that holds the tests' guest images across sessions."""
    configured = os.environ.get("NEX_TEST_IMAGE_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "nex-tests"


def build_unavailable() -> str | None:
    """Why this host cannot build the image (a missing tool, not root), or None."""
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed"
    if os.geteuid() != 0:
        return "building the guest image needs root (chroot)"
    return None


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The guest image of this checkout, built (or found) once per session.

    Skips when the host cannot build it or the registries cannot be reached; any other build
    failure is a test failure, not a skip.
    """
    reason = build_unavailable()
    if reason is not None:
        pytest.skip(f"cannot build the guest image: {reason}")
    cache = image_cache()
    try:
        image = build_image(cache, say=lambda line: print(f"guest image: {line}"))
    except RegistryError as exc:
        pytest.skip(f"cannot build the guest image: {exc}")
    os.utime(image.rootfs.parent)  # used now: the newest, for other sessions' pruning
    recent = [other.digest for other in list_images(cache)[: SPARE_IMAGES + 1]]
    remove_images(cache, keep={image.digest, *recent})
    return image


def tcg_spec(image: GuestImage) -> VmSpec:
    """How the tests run a VM of ``image`` by hand: as a node would here, under TCG, 256 MiB, 1 vCPU."""
    return VmSpec(
        qemu="qemu-system-x86_64",
        kernel=image.kernel,
        initrd=image.initrd,
        rootfs=image.rootfs,
        memory_mib=256,
        vcpus=1,
        accel="tcg",
        tsc_khz=tcg_tsc_khz(),
    )
