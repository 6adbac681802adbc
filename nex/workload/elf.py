"""Is this artifact a static ELF executable for this machine? (pyelftools reads the headers.)

nex's agent only refused binaries with a ``PT_INTERP`` program header, and only in sandboxed mode. Here
every native workload must be an ELF file (not a script), built for this machine's architecture, and
statically linked, and the reason for a refusal says what to change.
"""

from __future__ import annotations

import io
import platform

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import InterpSegment

#: Python's machine names to the ELF e_machine values pyelftools reports
MACHINES = {"x86_64": "EM_X86_64", "amd64": "EM_X86_64", "aarch64": "EM_AARCH64", "arm64": "EM_AARCH64"}


class NotRunnable(ValueError):
    """The artifact cannot run as a native workload here; the message says why."""


def check_static_executable(data: bytes, machine: str | None = None) -> None:
    """Raise :class:`NotRunnable` unless ``data`` is a static ELF executable for ``machine``."""
    machine = (machine or platform.machine()).lower()
    if not data.startswith(b"\x7fELF"):
        start = data[:16].decode("ascii", errors="replace").splitlines()[0] if data else ""
        hint = " (a script: build a static executable instead)" if data.startswith(b"#!") else ""
        raise NotRunnable(f"not an ELF executable{hint}; it starts with {start!r}")
    try:
        elf = ELFFile(io.BytesIO(data))
        kind = elf["e_type"]
        found = elf["e_machine"]
        interpreters = [seg for seg in elf.iter_segments() if seg["p_type"] == "PT_INTERP"]
    except (ELFError, ValueError, KeyError) as exc:
        raise NotRunnable(f"a damaged ELF file: {exc}") from None
    wanted = MACHINES.get(machine)
    if wanted is not None and found != wanted:
        raise NotRunnable(f"built for {found.removeprefix('EM_').lower()}, but this node runs {machine}")
    if kind not in ("ET_EXEC", "ET_DYN"):
        raise NotRunnable(f"not an executable (ELF type {kind})")
    if interpreters:
        segment = interpreters[0]
        interpreter = segment.get_interp_name() if isinstance(segment, InterpSegment) else "an interpreter"
        raise NotRunnable(
            f"dynamically linked (it needs {interpreter}); only static executables run here: build with -static"
        )
