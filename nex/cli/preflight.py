"""``nex preflight`` (and ``nex node preflight``, nex's name): can a node with this config start here?

Loaded lazily by :mod:`nex.cli.app` (``app.command("nex.cli.preflight:preflight")``), so the other
commands do not import it. Exit codes: 0 when a node with this config could start, 1 when not, 2 for
bad usage or configuration.
"""

from __future__ import annotations

import functools
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from cyclopts import Parameter
from rich import box
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from . import render

if TYPE_CHECKING:
    import trio

    from nex.config import NodeConfig
    from nex.node.preflight import Report

Flag = Annotated[bool, Parameter(negative="")]


def preflight(
    *,
    config: Path | None = None,
    driver: Literal["process", "qemu", "firecracker"] | None = None,
    boot: Flag = False,
    json: Flag = False,
) -> int:
    """Check this host for a node: what the sandbox and the machine driver need, and how to get what is missing.

    Throwaway objects (a network namespace, a tap, an nftables table, probe VMs: all named nxpf…) are
    deleted before it returns.

    Parameters
    ----------
    config
        Node config file (as for nex up) [default: the built-in defaults].
    driver
        The machine driver to check for [default: the config's driver].
    boot
        Also boot the guest (kernel_path and its initramfs) under TCG and wait for it to answer: slow.
    json
        Print the report as JSON.
    """
    import trio

    from nex import config as node_config
    from nex.node import preflight as checks

    try:
        loaded = node_config.load(config)
    except node_config.ConfigError as exc:
        return _fail(str(exc), 2)
    cfg = loaded.config
    chosen = driver or cfg.machine_driver()
    kernel, rootfs, initrd = checks.guest_files(cfg)

    async def main() -> checks.Report:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_sigterm, nursery.cancel_scope)
            report = await checks.run_checks(cfg, chosen, kernel=kernel, rootfs=rootfs, initrd=initrd, boot=boot)
            nursery.cancel_scope.cancel()
        return report

    try:
        report = trio.run(main)
    except KeyboardInterrupt:
        return 130
    if json:
        print(render.to_json({"config": loaded.source, **report.as_dict()}))
    else:
        console = render.console()
        for warning in loaded.warnings:
            render.console(stderr=True).print(f"[yellow]config:[/yellow] {escape(warning)}")
        console.print(_table(report, loaded.source))
        console.print(_verdict(report))
    return 0 if report.could_start else 1


async def _cancel_on_sigterm(scope: trio.CancelScope) -> None:
    """SIGTERM ends the checks as Ctrl-C does: every probe's throwaway objects are still removed."""
    import trio

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async for _ in signals:
            scope.cancel()
            return


def _table(report: Report, source: str) -> Table:
    table = Table(title=f"nex preflight: {report.driver} driver ({source})", box=box.ROUNDED)
    for column in ("Check", "Result", "Detail", "How to fix"):
        table.add_column(column, overflow="fold")
    styles = {"✓": "green", "✗": "bold red", "!": "yellow"}
    for check in report.checks:
        mark = check.mark
        table.add_row(
            Text(check.name),
            Text(mark, style=styles[mark]),
            Text(render.visible(check.detail)),
            Text("" if check.ok else check.fix),
        )
    return table


def _verdict(report: Report) -> Text:
    if report.could_start:
        warnings = [c.name for c in report.checks if not c.ok and not c.skipped]
        extra = f" (advisory: {', '.join(warnings)})" if warnings else ""
        return Text(f"A node with this config could start here ({report.driver} driver){extra}.", style="green")
    names = ", ".join(c.name for c in report.fatal)
    return Text(f"A node with this config could NOT start here ({report.driver} driver): {names}.", style="bold red")


def start_refusal(cfg: NodeConfig) -> str | None:
    """Why ``nex up`` must not start a node with ``cfg`` (each missing requirement and how to get it),
    or None. Only a VM driver is checked, and only for what the node would not find out early itself
    (see :mod:`nex.node.preflight`): the process driver costs nothing here."""
    driver = cfg.machine_driver()
    if driver == "process":
        return None
    import trio

    from nex.node import preflight as checks

    kernel, rootfs, initrd = checks.guest_files(cfg)
    try:
        report = trio.run(
            functools.partial(checks.run_checks, cfg, driver, kernel=kernel, rootfs=rootfs, initrd=initrd, startup=True)
        )
    except KeyboardInterrupt:
        return "interrupted while checking the driver's requirements"
    return report.refusal() if report.fatal else None


def _fail(message: str, code: int) -> int:
    render.console(stderr=True).print(f"[red]error:[/red] {escape(message)}", markup=True, highlight=False)
    return code
