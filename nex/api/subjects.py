"""Every NATS subject of the control API and the event and log streams, in one place.

Wire-compatible with nex v0.2.2/v0.2.7 (see the reference, §1.1 and §7). ``{node}`` is the node's
public nkey (``N…``), ``{ns}`` a namespace.
"""

from __future__ import annotations

API_PREFIX = "$NEX"
EVENTS_PREFIX = "$NEX.events"
LOGS_PREFIX = "$NEX.logs"
SYSTEM_NAMESPACE = "system"

PING = f"{API_PREFIX}.PING"
AUCTION = f"{API_PREFIX}.AUCTION"  # nex v0.2.7: who would take a workload like this one


def ping(node: str) -> str:
    return f"{API_PREFIX}.PING.{node}"


def info(namespace: str, node: str) -> str:
    return f"{API_PREFIX}.INFO.{namespace}.{node}"


def deploy(namespace: str, node: str) -> str:
    return f"{API_PREFIX}.DEPLOY.{namespace}.{node}"


def stop(namespace: str, node: str) -> str:
    return f"{API_PREFIX}.STOP.{namespace}.{node}"


def lameduck(node: str) -> str:
    return f"{API_PREFIX}.LAMEDUCK.{node}"


def wping(namespace: str, workload: str | None = None) -> str:
    base = f"{API_PREFIX}.WPING.{namespace}"
    return base if workload is None else f"{base}.{workload}"


def event(namespace: str, event_type: str) -> str:
    return f"{EVENTS_PREFIX}.{namespace}.{event_type}"


def log(namespace: str, node: str, workload: str, vmid: str) -> str:
    """The documented token order (nex's agent relay swapped the last two; see reference §7.3)."""
    return f"{LOGS_PREFIX}.{namespace}.{node}.{workload}.{vmid}"


def control_subscriptions(node: str) -> list[str]:
    """The node's own questions: ping, auction, info, lame duck (answered by the control API)."""
    return [PING, AUCTION, ping(node), info("*", node), lameduck(node)]


def workload_subscriptions(node: str) -> list[str]:
    """Requests about workloads: deploy, stop, workload ping (answered by the workload manager)."""
    return [deploy("*", node), stop("*", node), f"{API_PREFIX}.WPING.>"]


def namespace_of(subject: str) -> str | None:
    """The namespace token of ``$NEX.{VERB}.{ns}.…`` (nex's ``extractNamespace``: the third token)."""
    tokens = subject.split(".")
    return tokens[2] if len(tokens) >= 3 and tokens[2] else None
