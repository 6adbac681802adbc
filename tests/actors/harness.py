"""Scripted children for supervisor tests: they log their lives and crash or exit on command."""

from __future__ import annotations

from collections.abc import Callable

import trio

from actors import ChildSpec, Restart


class Harness:
    """Children named by id; ``log`` records ``(event, id, virtual time)`` as they start and stop."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str, float]] = []
        self._commands: dict[str, trio.MemorySendChannel[str]] = {}
        self._changed = trio.Event()
        self.fail_start: set[str] = set()
        self.fail_once: set[str] = set()  # fail the next start only
        self.stop_takes: dict[str, float] = {}

    def spec(self, child_id: str, restart: Restart = Restart.PERMANENT, shutdown: float | None = 5.0) -> ChildSpec:
        async def start(*, task_status: trio.TaskStatus[str]) -> None:
            self.note("start", child_id)
            if child_id in self.fail_start or child_id in self.fail_once:
                self.fail_once.discard(child_id)
                self.note("start_failed", child_id)
                raise RuntimeError(f"{child_id} cannot start")
            send, receive = trio.open_memory_channel[str](10)
            self._commands[child_id] = send
            try:
                task_status.started(child_id)
                command = await receive.receive()
                if command == "crash":
                    raise RuntimeError(f"{child_id} crashed")
            finally:
                if child_id in self.stop_takes:
                    with trio.CancelScope(shield=True):
                        await trio.sleep(self.stop_takes[child_id])
                self.note("stop", child_id)

        return ChildSpec(id=child_id, start=start, restart=restart, shutdown=shutdown)

    def crash(self, child_id: str) -> None:
        self._commands[child_id].send_nowait("crash")

    def exit(self, child_id: str) -> None:
        self._commands[child_id].send_nowait("exit")

    def events(self) -> list[tuple[str, str]]:
        return [(event, child) for event, child, _ in self.log]

    def count(self, event: str, child_id: str) -> int:
        return self.events().count((event, child_id))

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 60) -> None:
        """Wait (on events, not polling) until ``condition()`` holds."""
        with trio.fail_after(timeout):
            while not condition():
                await self._changed.wait()

    async def wait_starts(self, child_id: str, n: int) -> None:
        await self.wait_for(lambda: self.count("start", child_id) >= n)

    def note(self, event: str, child_id: str) -> None:
        """Record an event (the children record theirs; tests may add their own)."""
        self.log.append((event, child_id, trio.current_time()))
        self._changed.set()
        self._changed = trio.Event()
