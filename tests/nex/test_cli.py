"""The installed console scripts start and describe themselves."""

from __future__ import annotations

import shutil
import subprocess

import pytest


@pytest.mark.parametrize(("script", "expected"), [("nex", "up"), ("nex-agent", "agent")])
def test_console_script_prints_help(script: str, expected: str) -> None:
    path = shutil.which(script)
    assert path is not None, f"{script} is not installed: run pip install -e ."
    result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout
