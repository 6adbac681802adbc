"""The node's own host objects, and the release of what a node killed outright left behind.

Two objects belong to the node rather than to a machine, both named from its state directory (so a
node restarted on the same directory finds and replaces its own, and two nodes never share one):

- the **gateway link** ``nx<10 hex>g``, a dummy link holding the gateway address, so that the
  internal nats-server listens on the gateway (where machines reach it) and not on every address;
- the **fence** (:mod:`nex.net.fence`), an nftables table that lets machines reach that server and
  the operator's openings, and nothing else of the host or of each other.

Both are journaled before they are made and released after every machine is gone.

Crash recovery (:meth:`HostObjects.recover`) acts only on records this node could have written: names
with the ``nx`` prefix and the shape the node gives them, paths under the state directory's ``vm/``,
leases of its own network. A record that fails this (the journal is outside every jail, but an
operator could still copy one in) is logged, dropped, and nothing is done with it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from actors import CleanupStack, Journal, ResourceRecord, recover
from nex import logs
from nex.bus.server import free_port
from nex.config import NodeConfig
from nex.net import netns
from nex.net.network import Networks
from nex.sandbox.policy import Sandbox
from nex.vm.drivers import firecracker, process, qemu
from nex.vm.drivers.base import STEM, NotOurs, Releaser

log = logs.get("nex.node")


def node_stem(state_dir: Path) -> str:
    """``nx`` and 10 hex characters of the state directory's path: the stem of the node's own objects."""
    return "nx" + hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:10]


def link_group(stem: str) -> int:
    """The interface group of the node's host links (what its fence matches), from its stem: never 0
    (every link's default group), below 2**31."""
    return (int(stem[2:10], 16) & 0x7FFF_FFFF) | 1


class HostObjects:
    def __init__(self, config: NodeConfig, state_dir: Path, networks: Networks, sandbox: Sandbox) -> None:
        self.config = config
        self.state_dir = state_dir
        self.networks = networks
        self.sandbox = sandbox
        self.stem = node_stem(state_dir)
        self.gateway_link = f"{self.stem}g"

    async def open(self, stack: CleanupStack, port: int) -> tuple[str, int]:
        """Make the gateway link and the fence; the internal server's address and port.

        ``port`` 0 picks a free one on the gateway. Without namespaces (no root), the internal server
        listens on loopback, where the machines' agents are.
        """
        gateway = self.networks.agent_host  # the gateway, or loopback where machines share the host's
        if not self.networks.namespaced:
            return gateway, port or free_port(gateway)
        stack.push(
            f"gateway link {self.gateway_link}",
            lambda: trio.to_thread.run_sync(netns.delete_link, self.gateway_link),
            kind="link",
            data={"link": self.gateway_link},
        )
        await trio.to_thread.run_sync(netns.create_gateway_link, self.gateway_link, gateway)
        port = port or free_port(gateway)
        if self.sandbox.fence:
            stack.push(
                f"fence {self.stem}",
                lambda: trio.to_thread.run_sync(_remove_fence, self.stem),
                kind="fence",
                data={"table": self.stem},
            )
            openings = await trio.to_thread.run_sync(self._install_fence, gateway, port)
            log.info("Network fence up", table=f"inet {self.stem}", reaches=f"{gateway}:{port}", openings=openings)
        return gateway, port

    def _install_fence(self, gateway: str, port: int) -> str:
        """Install the fence (blocking); its openings, said as an operator reads them.

        Raises:
            OSError: the kernel refused it (no nf_tables, no CAP_NET_ADMIN): the node does not start.
        """
        from nex.net import fence  # pyroute2 is slow to import: here, off the Trio thread

        wanted = self.config.sandbox
        plan = fence.FencePlan(
            table=self.stem,
            group=self.networks.group,
            gateway=gateway,
            port=port,
            subnet=str(self.networks.subnet),
            openings=tuple(
                fence.Opening(cidr=str(ipaddress.ip_network(o.cidr, strict=False)), port=o.port, protocol=o.protocol)
                for o in wanted.allow
            ),
            masquerade=wanted.masquerade,
        )
        try:
            fence.install(plan)
        except OSError as exc:  # (a plan the config let through but the fence refuses is a bug: ValueError)
            raise OSError(
                exc.errno, f"{exc.strerror} (sandbox.fence=false runs the machines without a fence)"
            ) from None
        return ", ".join(f"{o.cidr}:{o.port or '*'}/{o.protocol}" for o in plan.openings) or "none"

    async def recover(self, journal: Journal) -> list[ResourceRecord]:
        """Release, from the journal, what a node that did not stop cleanly left behind: the node's
        own objects here, its machines' by their driver's releasers."""
        releasers = {
            "dir": Releaser(self._drop_dir),
            "link": Releaser(self._drop_link, {"link": rf"{STEM}g"}),
            "fence": Releaser(self._drop_fence, {"table": STEM}),
            **process.releasers(self.networks, self.sandbox),
            **qemu.releasers(self.networks),  # whatever driver the last run had
            **firecracker.releasers(self.networks),
        }
        guarded = {kind: _only_ours(kind, releaser) for kind, releaser in releasers.items()}
        return await recover(journal, guarded)

    async def _drop_dir(self, record: ResourceRecord) -> None:
        path = Path(str(record.data.get("path", "")))
        vm_root = self.state_dir / "vm"

        def remove() -> None:
            real, root = path.resolve(), vm_root.resolve()
            if path.is_symlink() or not real.is_relative_to(root) or real == root:
                raise NotOurs(f"{path} is not a machine directory under {vm_root}")
            shutil.rmtree(path, ignore_errors=True)

        await trio.to_thread.run_sync(remove)

    async def _drop_link(self, record: ResourceRecord) -> None:
        await trio.to_thread.run_sync(netns.delete_link, str(record.data["link"]))

    async def _drop_fence(self, record: ResourceRecord) -> None:
        await trio.to_thread.run_sync(_remove_fence, str(record.data["table"]))


def _remove_fence(table: str) -> None:
    from nex.net import fence  # imported late, as in HostObjects._install_fence

    fence.remove(table)


def _only_ours(kind: str, releaser: Releaser) -> Callable[[ResourceRecord], Awaitable[None]]:
    """``releaser``'s release, for records whose names have the shape this node gives them; others
    are dropped."""
    shapes, release = releaser.shapes, releaser.release

    async def guarded(record: ResourceRecord) -> None:
        try:
            for field, shape in shapes.items():
                if not re.fullmatch(shape, str(record.data.get(field, ""))):
                    raise NotOurs(f"{field} {record.data.get(field)!r} is not a name this node gives")
            await release(record)
        except NotOurs as exc:
            log.warning("Ignored a journal record this node did not write", kind=kind, record=record.name, why=str(exc))

    return guarded
