"""Facts about this host and this run, in the shapes nex puts on the wire."""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

from nex.api.control import MemoryStat

#: Python's machine names to Go's GOARCH, which nex reports in the ``nex.arch`` tag
GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm"}


def host_tags() -> dict[str, str]:
    """``nex.os``, ``nex.arch`` and ``nex.cpucount`` as nex's Go node sets them."""
    machine = platform.machine().lower()
    return {
        "nex.os": platform.system().lower(),
        "nex.arch": GOARCH.get(machine, machine),
        "nex.cpucount": str(os.cpu_count() or 1),
    }


def format_uptime(seconds: float) -> str:
    """nats-server's uptime format, which nex uses: ``45s``, ``3m5s``, ``2h0m5s``, ``1d2h3m4s``, ``1y…``."""
    secs = int(seconds)
    mins, hrs, days = secs // 60, secs // 3600, secs // 86400
    years = days // 365
    if years:
        return f"{years}y{days % 365}d{hrs % 24}h{mins % 60}m{secs % 60}s"
    if days:
        return f"{days}d{hrs % 24}h{mins % 60}m{secs % 60}s"
    if hrs:
        return f"{hrs}h{mins % 60}m{secs % 60}s"
    if mins:
        return f"{mins}m{secs % 60}s"
    return f"{secs}s"


def memory(path: Path = Path("/proc/meminfo")) -> MemoryStat:
    """MemTotal, MemFree and MemAvailable in kB, as nex reads them."""
    values: dict[str, int] = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemFree", "MemAvailable"):
            values[key] = int(rest.split()[0])
    return MemoryStat(
        total=values.get("MemTotal", 0), free=values.get("MemFree", 0), available=values.get("MemAvailable", 0)
    )


_ADJECTIVES = (
    "amber",
    "brave",
    "calm",
    "daring",
    "eager",
    "fancy",
    "gentle",
    "happy",
    "icy",
    "jolly",
    "keen",
    "lively",
    "mellow",
    "nimble",
    "odd",
    "proud",
    "quiet",
    "rapid",
    "shiny",
    "tidy",
    "upbeat",
    "vivid",
    "witty",
    "young",
    "zesty",
    "bold",
    "crisp",
    "dusty",
    "early",
    "fuzzy",
    "grand",
    "humble",
)
_NOUNS = (
    "otter",
    "falcon",
    "maple",
    "comet",
    "harbor",
    "lantern",
    "meadow",
    "pebble",
    "quartz",
    "raven",
    "sparrow",
    "tulip",
    "walrus",
    "willow",
    "badger",
    "cedar",
    "dolphin",
    "ember",
    "fern",
    "glacier",
    "heron",
    "iris",
    "juniper",
    "kestrel",
    "lynx",
    "marmot",
    "nebula",
    "orchid",
    "puffin",
    "river",
    "summit",
    "thistle",
)


def node_name(node_id: str) -> str:
    """A readable name derived from the node id, so a node keeps its name as long as its identity."""
    digest = hashlib.sha256(node_id.encode()).digest()
    return f"{_ADJECTIVES[digest[0] % len(_ADJECTIVES)]}-{_NOUNS[digest[1] % len(_NOUNS)]}"
