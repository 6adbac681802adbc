"""What an executable is built for, from its first bytes: what nex's CLI sniffs (``bin_validator.go``)
to ask an auction for nodes that can run it. No ELF library: the CLI reads 20 bytes."""

from __future__ import annotations

#: ELF e_machine numbers to Go's architecture names, which nodes tag themselves with (``nex.arch``)
GOARCH_OF_MACHINE = {0x3E: "amd64", 0xB7: "arm64", 0x03: "386", 0x28: "arm", 0xF3: "riscv64"}


def goarch(data: bytes) -> str | None:
    """The architecture an ELF file is built for, in Go's names (what nex's CLI sniffs to ask an
    auction for the right nodes); None if ``data`` is no ELF file or its machine is not one of those."""
    if len(data) < 20 or not data.startswith(b"\x7fELF") or data[5] not in (1, 2):
        return None
    machine = int.from_bytes(data[18:20], "little" if data[5] == 1 else "big")
    return GOARCH_OF_MACHINE.get(machine)
