"""A registry of live actors by name, owned by whoever builds the tree (no module-level globals).

Actors started with a registry register themselves once started and are unregistered when they exit,
however they exit; a restarting actor is absent between its crash and its next start, and
:meth:`Registry.wait_for` waits for it to come back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import trio

from .errors import NameTaken
from .ref import ActorRef


class Registry:
    """Names to :class:`ActorRef`; one per program (or per test)."""

    def __init__(self) -> None:
        self._refs: dict[str, ActorRef[Any]] = {}
        self._changed = trio.Event()

    def register(self, name: str, ref: ActorRef[Any]) -> None:
        """Register ``ref`` under ``name``. Raises :class:`NameTaken` if another live ref holds it."""
        current = self._refs.get(name)
        if current is not None and current != ref and current.alive:
            raise NameTaken(f"the name {name!r} is already registered to {current!r}")
        self._refs[name] = ref
        self._notify()

    def unregister(self, name: str, ref: ActorRef[Any] | None = None) -> None:
        """Forget ``name`` (only if it still points at ``ref``, when given)."""
        if ref is not None and self._refs.get(name) != ref:
            return
        if self._refs.pop(name, None) is not None:
            self._notify()

    @contextlib.contextmanager
    def registered(self, name: str, ref: ActorRef[Any]) -> Iterator[None]:
        """Registered for the duration of the ``with`` block, unregistered however it ends."""
        self.register(name, ref)
        try:
            yield
        finally:
            self.unregister(name, ref)

    def lookup(self, name: str) -> ActorRef[Any] | None:
        return self._refs.get(name)

    async def wait_for(self, name: str) -> ActorRef[Any]:
        """The ref registered under ``name``, waiting until there is one (use a timeout around it)."""
        while True:
            ref = self._refs.get(name)
            if ref is not None:
                return ref
            await self._changed.wait()

    def names(self) -> list[str]:
        return sorted(self._refs)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
