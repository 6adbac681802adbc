"""Metrics and traces: a real node's Prometheus endpoint, scraped while it deploys and stops a real
workload, and its deploy spans; the config's telemetry keys and their errors."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nex import config as nex_config
from nex.workload import request as workload_request

from .support import Bus, NatsServerProc, NodeProcess
from .test_workloads import config_file, echo_env, echo_request, needs_namespaces, reach
from .workloads import Binaries, Requester, started

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> Samples:
    """Every sample the node's endpoint serves now."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when there is none)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


def wait_metrics(port: int, check: Callable[[Samples], bool], what: str, timeout: float = 20) -> Samples:
    """Scrape until ``check`` holds (the gauges are read at each scrape, so this polls the node's state)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            samples = scrape(port)
        except OSError:  # not serving yet
            samples = {}
        if samples and check(samples):
            return samples
        if time.monotonic() > deadline:
            shown = "\n".join(f"{n}{dict(labels)} {v}" for (n, labels), v in sorted(samples.items()) if "nex" in n)
            raise AssertionError(f"metrics never showed {what} within {timeout}s:\n{shown}")
        time.sleep(0.05)  # between polls of a deadline, not a synchronisation


def spans_in(path: Path) -> list[dict[str, Any]]:
    """The spans the file exporter wrote (JSON objects one after another)."""
    text, decoder, spans, at = path.read_text(), json.JSONDecoder(), [], 0
    while (at := _skip_space(text, at)) < len(text):
        span, at = decoder.raw_decode(text, at)
        spans.append(span)
    return spans


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at


@pytest.mark.integration
def test_the_prometheus_endpoint_follows_a_deploy_and_its_stop_and_a_deploy_is_traced(
    home: Path, open_nats_server: NatsServerProc, obus: Bus, binaries: Binaries
) -> None:
    needs_namespaces()
    port = free_port()
    settings = {
        "otel_metrics": True,
        "otel_metrics_port": port,
        "otel_traces": True,
        "otel_traces_exporter": "file",
    }
    config = config_file(home, **settings)
    node = NodeProcess(home, "--config", config, *reach(open_nats_server), server=open_nats_server.url).start(obus)
    alice = Requester(obus)
    target = node.ping(obus)
    echo = alice.upload(binaries.echo, "echo")
    script = alice.upload(binaries.script, "script")

    before = wait_metrics(port, lambda s: value(s, "nex_warm_machines") == 1, "a warm machine")
    assert value(before, "nex_workload_count") == 0
    assert value(before, "nex_deployed_bytes_count") == 0
    assert value(before, "nex_vm_count") == 1
    assert value(before, "nex_machine_warmup_time_milliseconds_count") >= 1
    assert value(before, "nex_deploy_latency_milliseconds_count") == 0

    workload = started(
        alice.deploy(node.node_id, alice.deploy_body(target, echo, "echo", echo_env(open_nats_server, "echo.metrics")))
    )
    assert echo_request(obus, "echo.metrics", b"x") == b"x"

    running = wait_metrics(port, lambda s: value(s, "nex_workload_count") == 1, "the workload running")
    assert value(running, "nex_workload_count", namespace="default", workload_type="native") == 1
    assert value(running, "nex_deployed_bytes_count") == len(binaries.echo)
    assert value(running, "nex_total_memory_allocation_mib_count") == 256  # the default machine_template
    assert value(running, "nex_total_vcpu_allocation_count") == 1
    assert value(running, "nex_deploy_latency_milliseconds_count", outcome="started") == 1
    assert value(running, "nex_deploy_latency_milliseconds_sum", outcome="started") > 0

    def has(samples: Samples, name: str, actor: str) -> bool:
        return any(n == name and ("actor", actor) in have for n, have in samples)

    sampled = wait_metrics(port, lambda s: has(s, "nex_mailbox_depth", "workloads"), "the mailboxes sampled")
    assert has(sampled, "nex_mailbox_dropped_total", "control-api"), "drops, by actor"
    assert value(sampled, "nex_mailbox_dropped_total", actor="workloads") == 0
    # the taken machine is replaced: one more warm-up, and two machines alive
    refilled = wait_metrics(port, lambda s: value(s, "nex_warm_machines") == 1, "the pool refilled")
    assert value(refilled, "nex_machine_replacements_total") >= 1
    assert value(refilled, "nex_vm_count") == 2

    # a JWT claiming another file's hash: refused at the artifact, and counted so
    lying = alice.deploy_body(target, type(echo)(location=echo.location, hash=script.hash, size=echo.size), "liar")
    assert "sha256" in (alice.deploy(node.node_id, lying).error or "")
    refused = wait_metrics(port, lambda s: value(s, "nex_deploy_refusals_total") == 1, "a refusal")
    assert value(refused, "nex_deploy_refusals_total", reason="artifact") == 1
    assert value(refused, "nex_deploy_latency_milliseconds_count", outcome="refused") == 1
    assert value(refused, "nex_workload_count") == 1

    later = int(time.time()) + 1  # a stop issued in the deploy's second would look replayed
    stop = workload_request.stop_request(workload.id, "echo", node.node_id, alice.keys.issuer, issued_at=later)
    assert alice.stop(node.node_id, stop).error is None
    after = wait_metrics(port, lambda s: value(s, "nex_workload_count") == 0, "the workload stopped")
    assert value(after, "nex_deployed_bytes_count") == 0
    assert value(after, "nex_total_memory_allocation_mib_count") == 0
    assert value(after, "nex_nats_reconnects_total", link="control") == 0
    assert value(after, "nex_essential_restarts_total") == 0
    assert node.stop() == 0

    spans = spans_in(node.state_dir / "traces.log")  # flushed when the node stopped
    deploys = [s for s in spans if s["name"] == "deploy" and s["attributes"].get("nex.workload.id") == workload.id]
    assert len(deploys) == 1, [s["name"] for s in spans]
    root = deploys[0]["context"]
    children = {
        s["name"]: s
        for s in spans
        if s["context"]["trace_id"] == root["trace_id"] and s["parent_id"] == root["span_id"]
    }
    assert set(children) == {"checks", "machine", "staging", "agent", "started"}, sorted(children)
    starts = [children[n]["start_time"] for n in ("checks", "machine", "staging", "agent", "started")]
    assert starts == sorted(starts), "the stages in the order a deploy runs them"
    checks = children["checks"]["context"]["span_id"]
    assert [s["name"] for s in spans if s["parent_id"] == checks] == ["artifact"]  # the download is a check


def test_metrics_are_off_unless_asked_for_and_the_telemetry_keys_are_checked(tmp_path: Path) -> None:
    defaults = nex_config.load(None).config
    assert (defaults.otel_metrics, defaults.otel_traces) == (False, False)
    assert (defaults.otel_metrics_exporter, defaults.otel_metrics_port) == ("prometheus", 8085)

    def problems(settings: dict[str, object]) -> list[str]:
        path = tmp_path / "node.json"
        path.write_text(json.dumps(settings))
        with pytest.raises(nex_config.ConfigError) as caught:
            nex_config.load(path)
        return caught.value.problems

    assert problems({"otel_metrics": "yes"}) == ["Expected `bool`, got `str` at $.otel_metrics"]
    assert problems({"otel_metrics_port": "8085"}) == ["Expected `int`, got `str` at $.otel_metrics_port"]
    assert problems(
        {"otel_metrics_exporter": "statsd", "otel_metrics_port": 70000, "otel_traces_exporter": "grpc"}
    ) == [
        "otel_metrics_exporter must be one of prometheus, otlp, file, not 'statsd', at $.otel_metrics_exporter",
        "otel_metrics_port must be between 1 and 65535 at $.otel_metrics_port",
        "otel_traces_exporter grpc is not supported by this node: use http (OTLP over HTTP, a collector's port "
        "4318) at $.otel_traces_exporter",
    ]
    assert problems({"otlp_exporter_url": "not a url"}) == [
        "otlp_exporter_url must be a URL such as http://127.0.0.1:4318, not 'not a url', at $.otlp_exporter_url"
    ]
    path = tmp_path / "node.json"
    path.write_text(json.dumps({"otel_metrics": True, "otel_metrics_exporter": "otlp", "otlp_exporter_url": "h:4318"}))
    loaded = nex_config.load(path)
    assert loaded.warnings == [], "applied now, not only accepted"
    assert (loaded.config.otel_metrics, loaded.config.otel_metrics_exporter) == (True, "otlp")


def test_a_taken_metrics_port_stops_the_node_with_a_clear_error(home: Path, nats_server: NatsServerProc) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = config_file(home, otel_metrics=True, otel_metrics_port=port)
        node = NodeProcess(home, "--config", config, server=nats_server.url)
        node.start()
        assert node.wait() == 1
    assert f"cannot serve metrics on port {port}" in node.log()
