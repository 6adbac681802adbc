"""QEMU's template snapshot (see :mod:`nex.vm.snapshots` for the cache around it).

The template VM boots with no identity and no network, its agent says ready (imports done, waiting
for an identity), and it is saved (``stop``, then ``migrate`` to a file). The snapshot is named by
:meth:`~nex.vm.qemu.command.VmSpec.snapshot_key`: the image, qemu's version and the command line.
"""

from __future__ import annotations

import time
from pathlib import Path

import trio

from nex import logs
from nex.vm.snapshots import Made, TemplateFailed, TemplateSnapshots, program_version

from .command import VmSpec
from .qmp import QmpError
from .vm import QemuVm, VmFailed, launch, save_snapshot

log = logs.get("nex.vm")
SUFFIX = ".vmstate"


def snapshots(
    spec: VmSpec, directory: Path, image_digest: str, boot_timeout: float, runas: int | None = None
) -> TemplateSnapshots:
    """The template snapshots of VMs of ``spec`` under ``directory``; the template's qemu runs as
    ``runas``."""

    def key() -> str:
        return spec.snapshot_key(program_version(spec.qemu), image_digest)

    async def make(path: Path) -> Made:
        return await make_template(spec, path, runas)

    return TemplateSnapshots(directory, key=key, make=make, suffix=SUFFIX, timeout=boot_timeout)


async def make_template(spec: VmSpec, path: Path, runas: int | None) -> Made:
    """Boot the template VM, wait for its agent to say ready, and save it to ``path``."""
    console = path.parent / "template.log"
    console.unlink(missing_ok=True)
    started: list[QemuVm] = []
    begun = time.monotonic()
    log.info("Booting the template VM for the pool's snapshot", console=str(console), accel=spec.accel)
    try:
        vm = await launch(spec, console=console, started=started, runas=runas)
        await vm.read_ready()
        booted = time.monotonic() - begun
        size = await save_snapshot(vm, path)
    except (VmFailed, QmpError) as exc:
        raise TemplateFailed(str(exc)) from None
    finally:
        with trio.CancelScope(shield=True):
            for vm in started:
                await vm.stop(grace=1.0)
    return Made(boot_s=booted, size=size)
