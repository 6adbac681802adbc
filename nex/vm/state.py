"""A machine's state directory: ``{state_dir}/vm/{namespace}/{name}/{vmid}/`` (flintlock's layout).

    driver.json     what the driver will create: network names, address, launcher, argv
    metadata.json   what the agent is told (vmid, node_nats_host, node_nats_port, message)
    pid             "<pid> <start time>" of the agent: the start time tells a reused pid apart
    stdout, stderr  the agent's output
    log             the machine's own life, one line per step, for the operator

Each file is written before the resource it describes is created, so after a crash the directory
says what to look for. The node's machines use namespace ``system`` and the node's name.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import msgspec

_encoder = msgspec.json.Encoder()


def process_start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (stat field 22); 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0
    return int(stat.rsplit(b")", 1)[1].split()[19])


class MachineDir:
    def __init__(self, root: Path, vmid: str) -> None:
        self.path = root / vmid
        self.vmid = vmid

    @property
    def stdout(self) -> Path:
        return self.path / "stdout"

    @property
    def stderr(self) -> Path:
        return self.path / "stderr"

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=False)
        for name in ("stdout", "stderr", "log"):
            (self.path / name).touch()

    def write_json(self, name: str, value: object) -> None:
        (self.path / name).write_bytes(msgspec.json.format(_encoder.encode(value), indent=2) + b"\n")

    def write_pid(self, pid: int) -> None:
        (self.path / "pid").write_text(f"{pid} {process_start_time(pid)}\n")

    def note(self, line: str) -> None:
        with (self.path / "log").open("a") as log:
            log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
