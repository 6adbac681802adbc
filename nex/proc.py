"""Child processes that die with the node, however the node dies.

Every process the node starts (nats-server, agents) is spawned through :func:`spawn`, which:

- sets ``PR_SET_PDEATHSIG`` to SIGKILL in the child, so that even a SIGKILL of the node takes the
  child down. The kernel ties that signal to the *thread* that forked the child, so spawn from the
  Trio thread, never from a worker thread (``trio.lowlevel.open_process`` forks in one, whose exit
  would kill the child: that is why this module exists);
- puts the child in its own process group, so a Ctrl-C at the terminal reaches only the node, which
  then stops its children in order (the control server must outlive the ``node_stopped`` event);
- gives the child the node's original CPU set (the node pins its own threads, see :mod:`nex.affinity`);
- waits for exit on a pidfd, without threads.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import trio

from nex import affinity, linux


def _prepare_child(parent: int, netns_fd: int) -> None:
    """Runs in the child between fork and exec: arm the death signal, then check the parent lives.

    Also gives the child every CPU back (the node pins its own threads, see :mod:`nex.affinity`),
    and enters the machine's network namespace when there is one.
    """
    affinity.unpin_current()
    linux.die_with_parent(parent)
    if netns_fd >= 0 and linux.libc.setns(netns_fd, linux.CLONE_NEWNET) != 0:
        os._exit(126)


class ChildProcess:
    """A running child; :meth:`wait` and :meth:`stop` are Trio-friendly."""

    def __init__(self, popen: subprocess.Popen[bytes], argv: Sequence[str]) -> None:
        self._popen = popen
        self.argv = list(argv)
        self.pid = popen.pid
        self._pidfd = os.pidfd_open(popen.pid)

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    @property
    def stdout(self) -> int | None:
        return self._popen.stdout.fileno() if self._popen.stdout else None

    @property
    def stderr(self) -> int | None:
        return self._popen.stderr.fileno() if self._popen.stderr else None

    async def wait(self) -> int:
        """Wait for the child to exit (and reap it); return its exit code (negative: killed by a signal)."""
        while (code := self._popen.poll()) is None:
            await trio.lowlevel.wait_readable(self._pidfd)
        self._close()
        return code

    def signal(self, sig: int) -> None:
        if self._popen.poll() is None:
            self._popen.send_signal(sig)

    async def stop(self, grace: float = 5.0) -> int:
        """SIGTERM, up to ``grace`` seconds to exit, then SIGKILL. Shielded: it finishes when cancelled."""
        with trio.CancelScope(shield=True):
            self.signal(signal.SIGTERM)
            with trio.move_on_after(grace):
                await self.wait()
            self.signal(signal.SIGKILL)  # a no-op if it has exited
            await self.wait()
        code = self._popen.returncode
        assert code is not None
        return code

    def _close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        for stream in (self._popen.stdout, self._popen.stderr):
            if stream is not None:
                stream.close()

    def __repr__(self) -> str:
        return f"<ChildProcess {self.pid} {Path(self.argv[0]).name}>"


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdout: int | None = subprocess.DEVNULL,
    stderr: int | None = subprocess.DEVNULL,
    netns: Path | None = None,
    pass_fds: Sequence[int] = (),
) -> ChildProcess:
    """Start ``argv`` tied to this process's life (see the module docstring). Call from the Trio thread.

    ``netns``: a network namespace (``/run/netns/…``) the child enters before exec.
    ``pass_fds``: descriptors the child keeps (every other one is closed).
    """
    parent = os.getpid()
    netns_fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC) if netns is not None else -1
    try:
        popen = subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            preexec_fn=lambda: _prepare_child(parent, netns_fd),
            process_group=0,
            close_fds=True,
            pass_fds=tuple(pass_fds),
        )
    finally:
        if netns_fd >= 0:
            os.close(netns_fd)
    return ChildProcess(popen, argv)
