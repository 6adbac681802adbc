"""What ``nex logs`` and ``nex events`` print: nothing a workload wrote may act on the operator's terminal.

The strings are the red team's: one sets the window title and writes the clipboard (OSC 0 and OSC 52,
ended by BEL), one erases its own line and returns to its start to print a forged node message over it.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
import pytest

from nex.cli import render

TITLE_AND_CLIPBOARD = "\x1b]0;TITLE\x07\x1b]52;c;ZWNobyBwd25lZAo=\x07visible?"
FORGED_LINE = "hidden\x1b[2K\rnex: node N: all workloads verified OK"
SUBJECT = "$NEX.logs.default.NODE.echo.VMID"

#: what a terminal acts on: C0 but tab, DEL, C1
CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def log_message(text: str, level: str = "INFO") -> bytes:
    return msgspec.json.encode({"text": text, "level": level, "id": "VMID"})


def event_message(data: dict[str, Any], **fields: str) -> bytes:
    event = {"specversion": "1.0", "id": "1", "source": "NODE", "type": "workload_stopped"}
    event |= {"time": "2024-05-01T10:20:30.123456Z", **fields, "data": data}
    return msgspec.json.encode(event)


def text_log(text: str, level: str = "INFO") -> str:
    line = render.log_line(SUBJECT, log_message(text, level), as_json=False)
    assert line is not None
    return line


def test_a_log_line_cannot_set_the_title_or_write_the_clipboard() -> None:
    line = text_log(TITLE_AND_CLIPBOARD)
    assert not CONTROLS.search(line)
    assert line.endswith(r"\x1b]0;TITLE\x07\x1b]52;c;ZWNobyBwd25lZAo=\x07visible?"), "shown, escaped"


def test_a_log_line_cannot_erase_itself_and_forge_another() -> None:
    line = text_log(FORGED_LINE)
    assert not CONTROLS.search(line)
    assert line.endswith(r"hidden\x1b[2K\x0dnex: node N: all workloads verified OK")
    assert " echo VMID INFO  hidden" in line, "the forged text stays on the workload's own line"


def test_every_terminal_control_is_escaped_and_tab_and_text_are_kept() -> None:
    every = "".join(chr(c) for c in range(0xA0))
    line = text_log(every + "é€ ok")
    assert not CONTROLS.search(line)
    assert "\t" in line
    for code in (0x00, 0x07, 0x0A, 0x0D, 0x1B, 0x7F, 0x80, 0x9B, 0x9D, 0x9F):
        assert f"\\x{code:02x}" in line
    assert line.endswith("é€ ok")


def test_the_level_and_the_subject_are_escaped_too() -> None:
    line = render.log_line("$NEX.logs.default.NODE.\x1b]0;x\x07.VMID", log_message("ok", "\x1b[2K"), as_json=False)
    assert line is not None
    assert not CONTROLS.search(line)


@pytest.mark.parametrize("text", [TITLE_AND_CLIPBOARD, FORGED_LINE, "del\x7f csi\x9b[2J osc\x9d0;x\x9c"])
def test_a_json_log_line_has_no_control_and_reads_back_as_the_text(text: str) -> None:
    line = render.log_line(SUBJECT, log_message(text), as_json=True)
    assert line is not None
    assert not CONTROLS.search(line), "JSON escapes C0; DEL and C1 are escaped as \\u00NN"
    assert msgspec.json.decode(line)["text"] == text


def test_an_event_cannot_act_on_the_terminal_through_its_data() -> None:
    data = {"workload_name": TITLE_AND_CLIPBOARD, "message": FORGED_LINE, "code": 3, "\x1b[2Kkey": "v"}
    line = render.event_line(event_message(data, type="workload\x1b]0;t\x07"), as_json=False)
    assert line is not None
    assert not CONTROLS.search(line)
    assert r"message=hidden\x1b[2K\x0dnex: node N: all workloads verified OK" in line
    assert r"workload_name=\x1b]0;TITLE\x07\x1b]52;c;ZWNobyBwd25lZAo=\x07visible?" in line
    assert "code=3" in line


def test_a_json_event_is_reencoded_on_one_line_not_echoed() -> None:
    """JSON lets a publisher put CR and LF between tokens and DEL or C1 raw in strings; printed as it came,
    each reached the terminal. The line printed is the same JSON value, with none of them."""
    data = {"message": "csi\x9b[2J del\x7f", "code": 1}
    raw = event_message(data).replace(b'"id":', b'\r\n"id":')
    assert b"\r" in raw
    assert b"\xc2\x9b" in raw
    line = render.event_line(raw, as_json=True)
    assert line is not None
    assert not CONTROLS.search(line)
    assert msgspec.json.decode(line) == msgspec.json.decode(raw)


def test_what_is_not_a_log_or_an_event_is_skipped() -> None:
    assert render.log_line(SUBJECT, b"not json", as_json=False) is None
    assert render.log_line("$NEX.logs.short", log_message("x"), as_json=False) is None
    assert render.event_line(b"{}", as_json=True) is None
