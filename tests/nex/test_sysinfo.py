"""Host facts in nex's formats, and durations on the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from nex import sysinfo
from nex.client import parse_duration


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (45.9, "45s"),
        (60, "1m0s"),
        (185, "3m5s"),
        (7205, "2h0m5s"),
        (93784, "1d2h3m4s"),
        (365 * 86400 + 61, "1y0d0h1m1s"),
    ],
)
def test_uptime_is_formatted_like_nats_server(seconds: float, text: str) -> None:
    assert sysinfo.format_uptime(seconds) == text


def test_host_tags_use_go_names() -> None:
    tags = sysinfo.host_tags()
    assert tags["nex.os"] == "linux"
    assert tags["nex.arch"] in sysinfo.GOARCH.values()
    assert int(tags["nex.cpucount"]) >= 1


def test_memory_is_read_in_kb(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        "MemTotal:       24683656 kB\nMemFree:        24344292 kB\nMemAvailable:   24325372 kB\nBuffers: 1 kB\n"
    )
    mem = sysinfo.memory(meminfo)
    assert (mem.total, mem.free, mem.available) == (24683656, 24344292, 24325372)


def test_node_names_are_stable_for_an_id() -> None:
    assert sysinfo.node_name("NABC") == sysinfo.node_name("NABC")
    names = {sysinfo.node_name(f"N{i}") for i in range(50)}
    assert len(names) > 25
    assert all("-" in n for n in names)


@pytest.mark.parametrize(
    ("text", "seconds"), [("2s", 2), ("500ms", 0.5), ("1m30s", 90), ("1h", 3600), ("1.5", 1.5), ("0.25s", 0.25)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "2 s", "fast", "1d", "5sx"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)
