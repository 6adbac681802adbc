"""One node per state directory: the ``flock`` on ``node.lock`` (nex.node.node._StateDirLock).

The holder removes the file as it lets go. A node that had opened the file just before that is then
granted a lock on a file no longer at the path, and a third node creates a new file and locks it too:
two nodes on one state directory. The interleaving is made exact by letting the first node go between
the second one's ``open`` and its ``flock`` (the test's own hook on ``flock``, no sleep).
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from nex.node import node as node_module
from nex.node.node import NodeError, _StateDirLock


def _holds_the_path(lock: _StateDirLock) -> bool:
    """Whether ``lock``'s file is the one at its path (not one removed since)."""
    try:
        return os.path.samestat(os.fstat(lock._fd), os.stat(lock.path))
    except FileNotFoundError:
        return False


def test_a_lock_granted_on_a_removed_file_is_not_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _StateDirLock(tmp_path).__enter__()
    released = []

    def flock(fd: int, operation: int) -> None:
        if not released:  # the second node has opened the file the first holds: the first lets go now
            first.__exit__(None, None, None)
            released.append(fd)
        fcntl.flock(fd, operation)

    monkeypatch.setattr(
        node_module, "fcntl", SimpleNamespace(flock=flock, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB)
    )
    second = _StateDirLock(tmp_path).__enter__()
    monkeypatch.undo()
    try:
        assert released, "the first node let go between the second one's open and its flock"
        assert _holds_the_path(second), "the second node's lock is on the file at the path"
        with pytest.raises(NodeError, match=f"pid {os.getpid()}"):
            _StateDirLock(tmp_path).__enter__()  # a third node is refused
    finally:
        second.__exit__(None, None, None)
    assert not second.path.exists()


def test_a_node_in_another_process_is_refused_until_it_exits(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys
                from pathlib import Path
                from nex.node.node import _StateDirLock
                with _StateDirLock(Path({str(tmp_path)!r})):
                    print("locked", flush=True)
                    sys.stdin.read()
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None
    assert holder.stdout is not None
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(NodeError, match=f"pid {holder.pid}"):
            _StateDirLock(tmp_path).__enter__()
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    assert not (tmp_path / "node.lock").exists(), "removed as the holder let go"
    with _StateDirLock(tmp_path) as lock:
        assert _holds_the_path(lock)
        assert (tmp_path / "node.lock").read_text() == f"{os.getpid()}\n"
