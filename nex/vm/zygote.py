"""The zygote: a fork server that starts agents without paying for Python's start-up each time.

A fresh ``python -m nex.agent`` costs about 0.3 CPU-seconds of imports before it can say hello. The
zygote imports the agent once (and compiles the jail's seccomp filter once), then, for each machine,
forks a child that enters the machine's network namespace, points its output at the machine's files,
and runs the agent with the machine's metadata, handed over in memory (it holds the agent's nkey
seed, which must never sit in an environment). It is single-threaded, which is what makes forking it
safe. The node starts it with a minimal environment, not the operator's, and it is not dumpable.

It talks to the node over a SOCK_SEQPACKET socket: requests are JSON :class:`Spawn` messages; each is
answered by :class:`Spawned`, with the child's pidfd passed along (SCM_RIGHTS, taken before the child
can be reaped, so the pid cannot be reused under the node), or by :class:`SpawnFailed`. When a child
exits, the zygote reaps it and sends :class:`Exited` with its code. Children die with the zygote
(PR_SET_PDEATHSIG), and the zygote dies with the node, so nothing outlives the node.

Run as ``python -m nex.vm.zygote FD`` with the socket's descriptor.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import signal
import socket
import sys
import threading
import traceback

import msgspec

from nex import linux
from nex.api.agent import MachineMetadata


class Spawn(msgspec.Struct, tag=True):
    id: int
    metadata: MachineMetadata
    stdout: str
    stderr: str
    cwd: str
    netns: str = ""


class Spawned(msgspec.Struct, tag=True):
    id: int
    pid: int


class SpawnFailed(msgspec.Struct, tag=True):
    id: int
    error: str


class Exited(msgspec.Struct, tag=True):
    pid: int
    code: int


class Ready(msgspec.Struct, tag=True):
    pid: int
    threads: int  # forking is only safe from a single-threaded process: the node checks this


ToZygote = Spawn
FromZygote = Spawned | SpawnFailed | Exited | Ready

_encoder = msgspec.json.Encoder()


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    linux.set_dumpable(False)
    from nex.agent import main as agent  # the point of the zygote: imported once, shared by every child
    from nex.sandbox import seccomp

    with contextlib.suppress(seccomp.SeccompUnavailable):  # said by the node at start, and by each deploy
        seccomp.program()

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake select through the wakeup fd
    decoder = msgspec.json.Decoder(ToZygote)
    me = os.getpid()
    sock.send(_encoder.encode(Ready(pid=me, threads=threading.active_count())))
    while True:
        readable = select.select([sock.fileno(), wake_r], [], [])[0]
        if wake_r in readable:
            os.read(wake_r, 4096)
            _reap(sock)
        if sock.fileno() in readable:
            data = sock.recv(1 << 20)  # a request holds the machine's metadata: room for its mounts
            if not data:
                return  # the node closed the socket: it is gone or stopping us
            request = decoder.decode(data)
            try:
                pid = os.fork()
            except OSError as exc:
                sock.send(_encoder.encode(SpawnFailed(id=request.id, error=f"fork failed: {exc}")))
                continue
            if pid == 0:
                _child(request, me, agent.run_with, (sock, wake_r, wake_w))
            pidfd = os.pidfd_open(pid)
            try:
                sock.sendmsg(
                    [_encoder.encode(Spawned(id=request.id, pid=pid))],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pidfd]))],
                )
            finally:
                os.close(pidfd)


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sock.send(_encoder.encode(Exited(pid=pid, code=os.waitstatus_to_exitcode(status))))


def _child(request: Spawn, zygote: int, run: object, inherited: tuple[socket.socket, int, int]) -> None:
    """In the forked child: become the machine's agent. Never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        inherited[0].close()
        os.close(inherited[1])
        os.close(inherited[2])
        linux.die_with_parent(zygote)
        os.setpgid(0, 0)
        if request.netns:
            fd = os.open(request.netns, os.O_RDONLY)
            linux.setns(fd, linux.CLONE_NEWNET, f"setns({request.netns})")
            os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(request.stdout, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        err = os.open(request.stderr, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for fd, target in ((null, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request.cwd)
        assert callable(run)
        code = int(run(request.metadata))
    except BaseException:
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
