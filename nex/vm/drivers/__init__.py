"""Machine drivers: how a machine's sandbox is made, started, stopped, described and recovered.

:func:`open_driver` makes the driver the config names (``driver``); the pool, the machines and the
workloads see only :class:`~nex.vm.drivers.base.Driver`.
"""

from __future__ import annotations

from nex.config import NodeConfig
from nex.net.network import Networks
from nex.sandbox.policy import Sandbox
from nex.vm.launcher import Launcher

from .base import Driver
from .process import ProcessDriver


def open_driver(config: NodeConfig, networks: Networks, launcher: Launcher, sandbox: Sandbox) -> Driver:
    """The driver ``config.driver`` names, over this node's networks, agent launcher and sandbox."""
    match config.driver:
        case "process":
            return ProcessDriver(networks, launcher, sandbox)
    raise ValueError(f"no driver {config.driver!r}")  # the config's validation names the choices
