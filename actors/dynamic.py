"""A supervisor of children started on demand (OTP's ``DynamicSupervisor``), such as machines.

It starts empty; :meth:`DynamicSupervisor.start_child` adds a child and returns its started value,
:meth:`DynamicSupervisor.terminate_child` stops one for good. Restarts are one-for-one, by each
child's restart type, within the supervisor's intensity. On shutdown all children are stopped at
once, each within its own deadline, in no defined order: as OTP's ``simple_one_for_one`` does,
because a dynamic supervisor may have many children and stopping them one by one would add up.
"""

from __future__ import annotations

import functools

import trio

from .errors import TooManyChildren, UnknownChild
from .spec import ChildSpec
from .supervisor import SupervisorBase
from .tree import ChildState


class DynamicSupervisor(SupervisorBase):
    """Children started on demand, at most ``max_children`` at a time (``None``: no limit)."""

    kind = "dynamic_supervisor"

    def __init__(self, name: str, *, max_children: int | None = None, intensity: int = 3, period: float = 5.0) -> None:
        super().__init__(name, intensity=intensity, period=period)
        if max_children is not None and max_children < 1:
            raise ValueError("max_children must be >= 1 (or None for no limit)")
        self.max_children = max_children

    def __len__(self) -> int:
        """How many children are alive (starting, running or restarting)."""
        return sum(1 for child in self._children if child.state is not ChildState.STOPPED)

    async def _shutdown_children(self) -> None:
        children = list(self._children)
        async with trio.open_nursery() as nursery:
            for child in children:
                nursery.start_soon(functools.partial(self._terminate, [child], final=True))

    async def start_child(self, spec: ChildSpec) -> object:
        """Start a child and return what it passed to ``started``; raise what its start raised.

        Raises:
            TooManyChildren: ``max_children`` are already alive.
            DuplicateChild: a child with this id is alive.
            SupervisorNotRunning: the supervisor is not (or no longer) running.
        """
        if self.max_children is not None and len(self) >= self.max_children:
            raise TooManyChildren(f"supervisor {self.name!r} already runs its maximum of {self.max_children}")
        return (await self._start(spec)).value

    async def terminate_child(self, child_id: str) -> None:
        """Stop the child ``child_id`` within its shutdown deadline; it is not restarted."""
        child = next((c for c in self._children if c.spec.id == child_id), None)
        if child is None:
            raise UnknownChild(f"supervisor {self.name!r} has no child {child_id!r}")
        try:
            await self._terminate([child], final=True)
        finally:
            self._forget(child)  # also when the caller is cancelled: the child is on its way out
