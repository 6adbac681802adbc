"""``nex image``: build and list the microVM guest images (see :mod:`nex.vm.image`).

Registered lazily from :mod:`nex.cli.app`, so that the other commands do not import the builder.
Exit codes as everywhere in nex: 0 success, 1 failure (one line on stderr saying what failed).
"""

from __future__ import annotations

import json as jsonlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from cyclopts import App, Parameter
from rich.markup import escape

from nex import config
from nex.vm import image as images

from . import render

Flag = Annotated[bool, Parameter(negative="")]

image_app = App(name="image", help="The microVM guest image: its kernel, stage-1 initramfs and root filesystem.")


def _fail(message: str) -> int:
    render.console(stderr=True).print(f"[red]error:[/red] {escape(message)}", markup=True, highlight=False)
    return 1


def _progress(started: float) -> Callable[[str], None]:
    """Progress lines on stderr, with the time since the start: stdout carries only the result."""

    def say(line: str) -> None:
        render.console(stderr=True).print(
            f"[{time.monotonic() - started:5.1f} s] {line}", markup=False, highlight=False
        )

    return say


@image_app.command
def build(*, state_dir: Path | None = None, force: Flag = False, json: Flag = False) -> int:
    """Build the guest image for this nex and the packages the registries offer now, or reuse it.

    Needs root, apt-get, dpkg-deb and mkfs.ext4; downloads (about 40 MB, once) go to caches in the
    images directory. The image is named by a hash of everything that went in, so a new nex or a
    security update of a package makes a new one.

    Parameters
    ----------
    state_dir
        The node's state directory; images go to its images/ [default: /var/lib/nex as root, else
        $XDG_STATE_HOME/nex].
    force
        Build again even if the image for these inputs exists.
    json
        Print the image's manifest (what went in, and the paths) as JSON.
    """
    directory = state_dir or config.default_state_dir()
    started = time.monotonic()
    try:
        inputs = images.image_inputs()
        cached = None if force else images.cached_image(directory, inputs)
        image = cached or images.build_image(directory, force=force, say=_progress(started), inputs=inputs)
    except images.ImageError as exc:
        return _fail(str(exc))
    seconds = time.monotonic() - started
    manifest = image.manifest()
    if json:
        print(jsonlib.dumps({**manifest, "reused": cached is not None, "seconds": round(seconds, 1)}, indent=2))
        return 0
    what = "Reused" if cached is not None else f"Built in {seconds:.1f} s:"
    print(f"{what} guest image {image.digest}")
    _show(image)
    return 0


def _show(image: images.GuestImage) -> None:
    sizes = {path: f"{path.stat().st_size / 2**20:.1f} MiB" for path in (image.kernel, image.rootfs)}
    print(f"  kernel  {image.kernel}  ({sizes[image.kernel]})")
    if image.initrd is not None:
        print(f"  initrd  {image.initrd}")
    print(f"  rootfs  {image.rootfs}  ({sizes[image.rootfs]})")
    print("Use it in the node's config (the initrd.img beside the kernel is found by itself):")
    print(f'  "kernel_path": "{image.kernel}",')
    print(f'  "rootfs_path": "{image.rootfs}"')


@image_app.command
def ls(*, state_dir: Path | None = None, json: Flag = False) -> int:
    """List the images built in a state directory, newest first.

    Parameters
    ----------
    state_dir
        The node's state directory [default: /var/lib/nex as root, else $XDG_STATE_HOME/nex].
    json
        Print each image's manifest with its paths, as a JSON list.
    """
    found = images.list_images(state_dir or config.default_state_dir())
    if json:
        print(jsonlib.dumps([image.manifest() for image in found], indent=2))
        return 0
    for image in found:
        manifest = image.manifest()
        print(f"{image.digest}  {manifest.get('built_at', '?')}  kernel {manifest.get('kernel_release', '?')}")
        print(f"  {image.rootfs.parent}")
    if not found:
        print("No guest images (build one with: nex image build)")
    return 0


@image_app.command
def prune(*, state_dir: Path | None = None) -> int:
    """Remove every image but the one for the current inputs (the download caches stay).

    A node configured with a removed image's paths cannot start new VMs: run it after the nodes of
    this state directory use the current image.

    Parameters
    ----------
    state_dir
        The node's state directory [default: /var/lib/nex as root, else $XDG_STATE_HOME/nex].
    """
    try:
        current = images.image_inputs().digest
        removed = images.remove_images(state_dir or config.default_state_dir(), keep={current})
    except images.ImageError as exc:
        return _fail(str(exc))
    print(f"Removed {len(removed)} image(s); kept {current} (the current one, if built)")
    return 0
