"""OpenTelemetry metrics and traces of a node, as nex's config turns them on (off by default).

With ``otel_metrics`` the node sets up the OpenTelemetry SDK's meter provider, exporting to a
Prometheus endpoint (``http://HOST:{otel_metrics_port}/metrics``, nex's default 8085), to an OTLP/HTTP
collector (``otlp_exporter_url``), or to ``metrics.log`` in the state directory (nex's ``file``);
with ``otel_traces``, a tracer provider exporting to OTLP/HTTP or ``traces.log``. With neither,
nothing here runs and the SDK is not even imported: the instruments the workload manager and the
pool create on the OpenTelemetry API's global meter stay no-ops.

The gauges read the node's own books when a reader collects (Prometheus: on each scrape, in the
HTTP server's thread), so they are never out of date and cost nothing between scrapes. They read
what the Trio thread owns, from another thread: each callback takes a snapshot of a dict (one C
call under the GIL) before it looks at it, and reads only ints otherwise.

Instruments, by their OpenTelemetry names (Prometheus turns ``-`` into ``_``, and adds ``_total``
to counters and the unit to histograms):

- nex v0.2's: ``nex-vm-count`` (machines alive: warm and running workloads), ``nex-workload-count``
  (by ``namespace`` and ``workload_type``), ``nex-deployed-bytes-count``,
  ``nex-total-memory-allocation-mib-count``, ``nex-total-vcpu-allocation-count``;
- this node's gauges: ``nex-warm-machines``, ``nex-deploys-in-flight``; ``nex-nats-reconnects`` (by
  ``link``: control or internal);
- at their events' sites (:mod:`nex.vm.pool`, :mod:`nex.workload.manager`): ``nex-machine-warmup-time``
  and ``nex-deploy-latency`` (histograms, ms), ``nex-machine-failures``, ``nex-machine-replacements``,
  ``nex-essential-restarts``, ``nex-deploy-refusals`` (by ``reason``), ``nex-sandbox-kills`` (by
  ``reason``: ``oom``, a workload killed for memory; ``pids``, one whose forks its pids limit refused);
- ``nex-mailbox-depth`` and ``nex-mailbox-dropped`` (by ``actor``), sampled every
  :data:`MAILBOX_SAMPLE` seconds on the Trio thread (a scrape must not walk the supervision tree).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any, Protocol

import trio

from actors import TreeNode
from nex import logs
from nex.config import NodeConfig
from nex.state import NodeState
from nex.vm.pool import PoolBook
from nex.workload.manager import WorkloadBook

log = logs.get("nex.node")

SERVICE_NAME = "nex-node"  # nex's
METRICS_FILE = "metrics.log"
TRACES_FILE = "traces.log"
FILE_EXPORT_INTERVAL_MS = 3000  # nex's file exporter's
SHUTDOWN_TIMEOUT_MS = 3000
MAILBOX_SAMPLE = 2.0  # seconds between samples of the actors' mailboxes


class TelemetryError(Exception):
    """The configured exporter cannot be set up (a port in use, say)."""


class _Link(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def reconnects(self) -> int: ...


def otlp_endpoint(base: str, signal: str) -> str | None:
    """The OTLP/HTTP endpoint of ``signal`` (metrics, traces) under ``otlp_exporter_url``; None: the
    SDK's default (``OTEL_EXPORTER_OTLP_ENDPOINT``, else localhost:4318)."""
    if not base:
        return None
    if "://" not in base:
        base = f"http://{base}"
    return f"{base.rstrip('/')}/v1/{signal}"


class Telemetry:
    """The node's meter and tracer providers, their exporters, and the Prometheus endpoint."""

    def __init__(self, config: NodeConfig, state_dir: Path) -> None:
        self.config = config
        self.state_dir = state_dir
        self._closers: list[Callable[[], None]] = []
        self.metrics_address = ""  # host:port of the Prometheus endpoint, once served
        # the actors' mailboxes, by actor: (depth, dropped), sampled on the Trio thread (see sample_mailboxes)
        self.mailboxes: dict[str, tuple[int, int]] = {}

    @property
    def enabled(self) -> bool:
        return self.config.otel_metrics or self.config.otel_traces

    def start(self, state: NodeState, pool: PoolBook, workloads: WorkloadBook, links: Iterable[_Link] = ()) -> None:
        """Set up what the config asks for (nothing unless ``otel_metrics`` or ``otel_traces``).

        Raises:
            TelemetryError: an exporter cannot be set up.
        """
        if not self.enabled:
            return
        from opentelemetry.sdk.resources import Resource

        resource = Resource.create(
            {"service.name": SERVICE_NAME, "service.version": state.version, "node_pub_key": state.node_id}
        )
        try:
            if self.config.otel_traces:
                self._start_traces(resource)
            if self.config.otel_metrics:
                self._start_metrics(resource, state, pool, workloads, list(links))
        except BaseException:
            self.shutdown()
            raise

    def _start_traces(self, resource: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

        exporter: SpanExporter
        if self.config.otel_traces_exporter == "file":
            out = self._open(TRACES_FILE)
            exporter = ConsoleSpanExporter(out=out)
            where = str(self.state_dir / TRACES_FILE)
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            endpoint = otlp_endpoint(self.config.otlp_exporter_url, "traces")
            exporter = OTLPSpanExporter(endpoint=endpoint)
            where = endpoint or "the OTLP default endpoint"
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        self._closers.append(lambda: provider.shutdown())
        log.info("Traces", exporter=self.config.otel_traces_exporter, to=where)

    def _start_metrics(
        self, resource: Any, state: NodeState, pool: PoolBook, workloads: WorkloadBook, links: list[_Link]
    ) -> None:
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader

        exporter = self.config.otel_metrics_exporter
        reader: MetricReader
        if exporter == "prometheus":
            reader = self._serve_prometheus()
            where = f"http://{self.metrics_address}/metrics"
        elif exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            endpoint = otlp_endpoint(self.config.otlp_exporter_url, "metrics")
            reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint))
            where = endpoint or "the OTLP default endpoint"
        else:
            from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

            out = self._open(METRICS_FILE)
            reader = PeriodicExportingMetricReader(
                ConsoleMetricExporter(out=out), export_interval_millis=FILE_EXPORT_INTERVAL_MS
            )
            where = str(self.state_dir / METRICS_FILE)
        provider = MeterProvider(metric_readers=[reader], resource=resource)
        # the global one: the pool's and the workload manager's instruments (made on the API's global
        # meter when their modules were imported) start recording now
        metrics.set_meter_provider(provider)
        self._closers.append(lambda: provider.shutdown(timeout_millis=SHUTDOWN_TIMEOUT_MS))
        _observe(provider.get_meter("nex.node"), state, pool, workloads, links)
        _observe_mailboxes(provider.get_meter("nex.node"), self)
        log.info("Metrics", exporter=exporter, to=where)

    def _serve_prometheus(self) -> Any:
        import prometheus_client
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        registry = prometheus_client.CollectorRegistry()
        reader = PrometheusMetricReader(registry=registry)
        port = self.config.otel_metrics_port
        try:
            server, thread = prometheus_client.start_http_server(port, addr="0.0.0.0", registry=registry)
        except OSError as exc:
            raise TelemetryError(
                f"cannot serve metrics on port {port}: {exc.strerror} (set otel_metrics_port to a free port)"
            ) from None
        self.metrics_address = f"0.0.0.0:{server.server_port}"

        def close() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=SHUTDOWN_TIMEOUT_MS / 1000)

        self._closers.append(close)
        return reader

    def _open(self, name: str) -> IO[str]:
        out = (self.state_dir / name).open("a", encoding="utf-8")
        self._closers.append(out.close)
        return out

    def shutdown(self) -> None:
        """Flush and stop everything :meth:`start` set up (bounded: an unreachable collector costs
        at most a few seconds). Harmless when nothing was."""
        closers, self._closers = self._closers, []
        for close in reversed(closers):  # the providers flush before their files and server close
            try:
                close()
            except Exception as exc:
                log.warning("Telemetry did not shut down cleanly", error=str(exc))


def _observe(meter: Any, state: NodeState, pool: PoolBook, workloads: WorkloadBook, links: list[_Link]) -> None:
    """The observable instruments, reading the node's books when a reader collects."""
    from opentelemetry.metrics import CallbackOptions, Observation

    template = state.config.machine_template
    namespaces: set[str] = {"default"}  # each one seen keeps a series, down to 0
    lock = threading.Lock()

    def running() -> list[Any]:
        return [w for w in list(workloads.workloads.values()) if not w.deploying]

    def gauge(name: str, description: str, value: Callable[[], float | int], unit: str = "") -> None:
        def callback(_: CallbackOptions) -> list[Observation]:
            return [Observation(value())]

        meter.create_observable_gauge(name, callbacks=[callback], description=description, unit=unit)

    def workload_count(_: CallbackOptions) -> list[Observation]:
        counts: dict[str, int] = {}
        for workload in running():
            counts[workload.spec.namespace] = counts.get(workload.spec.namespace, 0) + 1
        with lock:
            namespaces.update(counts)
            seen = sorted(namespaces)
        return [Observation(counts.get(ns, 0), {"namespace": ns, "workload_type": "native"}) for ns in seen]

    def reconnects(_: CallbackOptions) -> list[Observation]:
        return [Observation(link.reconnects, {"link": link.name}) for link in links]

    gauge("nex-vm-count", "Machines alive: warm in the pool and running workloads", lambda: _machines(pool, workloads))
    meter.create_observable_gauge(
        "nex-workload-count", callbacks=[workload_count], description="Workloads running, by namespace"
    )
    gauge(
        "nex-deployed-bytes-count",
        "Bytes of the running workloads' artifacts",
        lambda: sum(len(w.spec.artifact) for w in running()),
    )
    gauge(
        "nex-total-memory-allocation-mib-count",
        "Memory of the machines running workloads, MiB",
        lambda: len(running()) * template.memsize_mib,
    )
    gauge(
        "nex-total-vcpu-allocation-count",
        "vCPUs of the machines running workloads",
        lambda: len(running()) * template.vcpu_count,
    )
    gauge(
        "nex-warm-machines",
        "Machines ready in the warm pool",
        lambda: sum(1 for m in list(pool.members.values()) if m.state == "ready"),
    )
    gauge("nex-deploys-in-flight", "Deploys being checked or launched", lambda: max(0, workloads.reserved_slots))
    meter.create_observable_counter(
        "nex-nats-reconnects", callbacks=[reconnects], description="Reconnects of the node's NATS connections"
    )


def _observe_mailboxes(meter: Any, telemetry: Telemetry) -> None:
    from opentelemetry.metrics import CallbackOptions, Observation

    def depth(_: CallbackOptions) -> list[Observation]:
        return [Observation(d, {"actor": name}) for name, (d, _dropped) in list(telemetry.mailboxes.items())]

    def dropped(_: CallbackOptions) -> list[Observation]:
        return [Observation(n, {"actor": name}) for name, (_depth, n) in list(telemetry.mailboxes.items())]

    meter.create_observable_gauge("nex-mailbox-depth", callbacks=[depth], description="Messages waiting, by actor")
    meter.create_observable_counter(
        "nex-mailbox-dropped", callbacks=[dropped], description="Messages a full mailbox dropped, by actor"
    )


async def sample_mailboxes(telemetry: Telemetry, tree: Callable[[], TreeNode], every: float = MAILBOX_SAMPLE) -> None:
    """Every ``every`` seconds, the actors' mailbox depths and drops, read on the Trio thread that owns
    the actors (a scrape runs in the exporter's thread, which must not walk the supervision tree)."""
    if not telemetry.config.otel_metrics:
        return
    while True:
        with contextlib.suppress(AssertionError):  # the tree is not up yet
            telemetry.mailboxes = _mailboxes(tree())
        await trio.sleep(every)  # a sampling cadence


def _mailboxes(root: TreeNode) -> dict[str, tuple[int, int]]:
    found: dict[str, tuple[int, int]] = {}
    stack = [root]
    while stack:
        node = stack.pop()
        if node.mailbox_depth is not None:
            found[node.name] = (node.mailbox_depth, node.dropped)
        stack.extend(node.children)
    return found


def _machines(pool: PoolBook, workloads: WorkloadBook) -> int:
    return len(set(pool.members) | set(workloads.workloads))  # a taken machine may be in both a moment
