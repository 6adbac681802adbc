"""What the node knows about itself: identity, tags, uptime, lame duck, and how to ask it to stop.

One :class:`NodeState` per node, created before the supervision tree and read by its actors (the
control API answers from it, the heartbeat reports it). It is touched only from the Trio thread.
Changes that matter to others happen through its methods (:meth:`NodeState.enter_lameduck`,
:meth:`NodeState.request_stop`), which is where their rules live.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec
import trio

from nex import __version__, sysinfo
from nex.api.control import SandboxInfo
from nex.config import NodeConfig
from nex.crypto import NodeIdentity


class NodeState:
    def __init__(
        self,
        identity: NodeIdentity,
        config: NodeConfig,
        *,
        sandbox: SandboxInfo | None = None,
        version: str = __version__,
    ) -> None:
        self.identity = identity
        self.config = config
        self.version = version
        self.started = time.monotonic()
        self.sandbox = sandbox or SandboxInfo(kind="none", unsafe=True)
        name = config.tags.get("node_name") or sysinfo.node_name(identity.node_id)
        self._tags = {"node_name": name, **config.tags, **sysinfo.host_tags()}
        # nex's "unsafe": workloads run without their sandbox; which one, and whether whole, is said too
        self._tags["nex.sandbox"] = self.sandbox.kind
        self._tags["nex.unsafe"] = "true" if self.sandbox.unsafe else "false"
        self.lameduck = False
        self.lameduck_deadline: float | None = None
        self.lameduck_entered = trio.Event()
        self.on_lameduck: list[Callable[[], None]] = []  # told when the node enters lame duck
        self._workloads_changed = trio.Event()
        self.stop_requested = trio.Event()
        self.stop_reason = ""
        self.failure: BaseException | None = None
        self.running_workloads: Callable[[], int] = lambda: 0

    def machines_are(self, driver: str, kind: str, accel: str = "") -> None:
        """What the node's machines are, once its driver is open: in ``nex info`` and the tags
        (``nex.driver``, ``nex.accel`` for VMs, and ``nex.sandbox`` as the whole isolation)."""
        self.sandbox = msgspec.structs.replace(self.sandbox, kind=kind, driver=driver, accel=accel)
        self._tags["nex.sandbox"] = kind
        self._tags["nex.driver"] = driver
        if accel:
            self._tags["nex.accel"] = accel

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    @property
    def name(self) -> str:
        return self._tags["node_name"]

    def tags(self) -> dict[str, str]:
        """The node's tags as nex reports them, ``nex.lameduck`` included."""
        return {**self._tags, "nex.lameduck": "true" if self.lameduck else "false"}

    def uptime(self) -> str:
        return sysinfo.format_uptime(time.monotonic() - self.started)

    def enter_lameduck(self, deadline: float) -> bool:
        """Refuse new work from now on; stop once idle or after ``deadline`` seconds. False if already in."""
        if self.lameduck:
            return False
        self.lameduck = True
        self.lameduck_deadline = trio.current_time() + deadline
        self.lameduck_entered.set()
        for callback in self.on_lameduck:
            callback()
        return True

    def workloads_changed(self) -> None:
        """Called by whoever starts or ends workloads: wakes :meth:`wait_workloads_changed`."""
        self._workloads_changed.set()
        self._workloads_changed = trio.Event()

    async def wait_workloads_changed(self) -> None:
        await self._workloads_changed.wait()

    def request_stop(self, reason: str, failure: BaseException | None = None) -> None:
        """Ask the node to stop (the first reason wins); ``failure`` makes the exit code non-zero."""
        if not self.stop_requested.is_set():
            self.stop_reason = reason
            self.failure = failure
            self.stop_requested.set()
