"""Metrics (client registry and the server's /metrics) and telemetry events, against a real server."""

from __future__ import annotations

import json
import logging
import math
import re

import httpx
import pytest

import tinkex
from tinkex import types
from tinkex.client import metrics, telemetry
from tinkex.client.metrics import MetricsRegistry, request_kind

from ..conftest import ALICE
from ._http import RecordingProxy
from .conftest import MODEL, sft_datum

_SAMPLE_LINE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? '
                          r'(-?[0-9.e+-]+|\+Inf|-Inf|NaN)$')


def _check_prometheus(text: str) -> dict[str, float]:
    """Parse the exposition format strictly enough to catch malformed output; return the samples."""
    samples: dict[str, float] = {}
    typed: set[str] = set()
    for line in text.strip().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge", "histogram") and name not in typed
            typed.add(name)
        elif line.startswith("# HELP "):
            continue
        else:
            assert _SAMPLE_LINE.match(line), line
            series, value = line.rsplit(" ", 1)
            samples[series] = float(value)
    return samples


def test_every_request_kind_is_recorded_with_latency_percentiles(service_client):
    before = metrics.snapshot()
    trainer = service_client.create_lora_training_client(MODEL, rank=4, seed=11).result(60)
    for _ in range(3):
        trainer.forward_backward([sft_datum(list(range(5, 30)))], "cross_entropy").result(60)
        trainer.optim_step(types.AdamParams(learning_rate=1e-3)).result(60)
    sampler = trainer.save_weights_and_get_sampling_client().result(60)
    sampler.sample(types.ModelInput.from_ints([5, 6, 7]), 2, types.SamplingParams(max_tokens=3)).result(60)
    service_client.create_rest_client().list_checkpoints(trainer.model_id).result(30)
    snap = metrics.snapshot()

    def grew(series: str) -> float:
        return snap["counters"].get(series, 0) - before["counters"].get(series, 0)

    for kind in ("create_model", "forward_backward", "optim_step", "save_weights_for_sampler", "asample",
                 "retrieve_future", "training_runs/:id/checkpoints"):
        method = "GET" if kind.startswith("training_runs") else "POST"
        assert grew(f'tinkex_http_requests_total{{kind="{kind}",method="{method}",status="200"}}') >= 1, kind
        hist = snap["histograms"][f'tinkex_http_request_duration_seconds{{kind="{kind}"}}']
        assert hist["count"] >= 1
        assert hist["min"] <= hist["p50"] <= hist["p95"] <= hist["p99"] <= hist["max"]
        assert math.isclose(hist["mean"], hist["sum"] / hist["count"])
        assert hist["buckets"]["+Inf"] == hist["count"]
    fb = snap["histograms"]['tinkex_future_duration_seconds{outcome="ok",request_type="ForwardBackward"}']
    assert fb["count"] >= 3 and fb["min"] > 0
    assert snap["gauges"]['tinkex_http_requests_in_flight{kind="forward_backward"}'] == 0

    text = metrics.to_prometheus()
    samples = _check_prometheus(text)
    assert "# TYPE tinkex_http_request_duration_seconds histogram" in text
    assert "# HELP tinkex_http_requests_total HTTP attempts sent by the SDK" in text
    series = 'tinkex_http_request_duration_seconds_bucket{kind="forward_backward",le="+Inf"}'
    assert samples[series] == samples['tinkex_http_request_duration_seconds_count{kind="forward_backward"}']
    buckets = [v for k, v in samples.items()
               if k.startswith('tinkex_http_request_duration_seconds_bucket{kind="forward_backward"')]
    assert buckets == sorted(buckets)  # cumulative
    assert json.loads(metrics.to_json())["counters"]


def test_the_server_exposes_its_own_metrics(server, service_client):
    service_client.create_rest_client().list_training_runs().result(30)
    response = httpx.get(f"{server.base_url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = _check_prometheus(response.text)
    ok = [k for k in samples if k.startswith("tinkex_server_requests_total{") and 'route="/api/v1/training_runs"' in k
          and 'status="200"' in k]
    assert ok and samples[ok[0]] >= 1
    assert any(k == 'tinkex_server_request_duration_seconds_bucket{route="/api/v1/retrieve_future",le="+Inf"}'
               for k in samples)
    for gauge in ("tinkex_server_futures_pending", "tinkex_server_sessions_active", "tinkex_server_training_runs",
                  "tinkex_server_checkpoints", "tinkex_server_uptime_seconds", "process_resident_memory_bytes"):
        assert gauge in samples, gauge
    assert samples["tinkex_server_sessions_active"] >= 1 and samples["tinkex_server_base_models"] >= 1
    # routes are templates: ids do not become labels
    assert not any(":train:" in k for k in samples)
    as_json = httpx.get(f"{server.base_url}/metrics", params={"format": "json"}).json()
    assert as_json["gauges"]["tinkex_server_uptime_seconds"] > 0


def test_registry_semantics():
    registry = MetricsRegistry(buckets=(1, 10, 100), max_samples=50)
    for value in range(1, 101):
        registry.observe("latency_seconds", value, route="/a")
    summary = registry.value("latency_seconds", route="/a")
    # count/sum/min/max over everything; percentiles over the 50 most recent observations (51..100)
    assert (summary["count"], summary["sum"], summary["min"], summary["max"]) == (100, 5050, 1, 100)
    assert (summary["p50"], summary["p95"], summary["p99"]) == (75, 98, 100)
    assert summary["buckets"] == {"1": 1, "10": 10, "100": 100, "+Inf": 100}
    registry.increment("jobs_total", kind='we"ird\nname')
    registry.increment("jobs_total", 2, kind='we"ird\nname')
    registry.set_gauge("temperature", 21.5)
    registry.add_gauge("temperature", -1.5)
    assert registry.value("jobs_total", kind='we"ird\nname') == 3 and registry.value("temperature") == 20
    assert 'jobs_total{kind="we\\"ird\\nname"} 3' in registry.to_prometheus()
    _check_prometheus(registry.to_prometheus())
    with pytest.raises(ValueError):
        registry.set_gauge("jobs_total", 1)  # a counter stays a counter
    with pytest.raises(ValueError):
        registry.increment("jobs_total", -1)
    with pytest.raises(ValueError):
        registry.increment("bad name")
    assert registry.total("jobs_total") == 3
    assert request_kind("/api/v1/training_runs/s:train:0/checkpoints/weights/step-3/publish") == \
        "training_runs/:id/checkpoints/weights/:id/publish"
    assert request_kind("https://h/api/v1/downloads/eyJ.sig") == "downloads/:id"


def test_telemetry_events_go_to_subscribers_logging_and_opentelemetry(server, caplog, monkeypatch):
    proxy = RecordingProxy(server.base_url).start()
    try:
        rest = tinkex.RestClient(base_url=proxy.base_url, api_key=ALICE)
        caplog.set_level(logging.DEBUG, logger="tinkex.telemetry")
        with telemetry.capture() as events:
            rest.list_training_runs().result(30)
        http = [e for e in events if e.name == telemetry.HTTP_REQUEST and e.attributes["kind"] == "training_runs"]
        assert http and http[-1].attributes["status"] == "200" and http[-1].duration_s > 0
        records = [r for r in caplog.records if getattr(r, "tinkex_event", None) == telemetry.HTTP_REQUEST]
        assert records and records[-1].tinkex_attributes["kind"] in ("training_runs", "client/config",
                                                                     "client/dynamic_config")

        # OpenTelemetry: a span per call, and the W3C trace context on the wire
        pytest.importorskip("opentelemetry")
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

        spans: list[FakeSpan] = []
        monkeypatch.setattr(telemetry, "_otel_tracer", FakeTracer(spans))
        telemetry.set_opentelemetry(True)
        parent = NonRecordingSpan(SpanContext(trace_id=0x1234, span_id=0x5678, is_remote=False,
                                              trace_flags=TraceFlags(1)))
        with trace.use_span(parent):
            rest.list_training_runs().result(30)
        assert any(s.name == "tinkex.http training_runs" and s.attributes["http.response.status_code"] == "200"
                   for s in spans)
        sent = proxy.requests_to("/api/v1/training_runs")[-1]
        assert sent.headers["traceparent"] == f"00-{0x1234:032x}-{0x5678:016x}-01"
        telemetry.set_opentelemetry(False)
        before = len(spans)
        rest.list_training_runs().result(30)
        assert len(spans) == before and "traceparent" not in proxy.requests_to("/api/v1/training_runs")[-1].headers
    finally:
        telemetry._otel_checked = False  # back to the environment's choice
        proxy.stop()


def test_a_failing_subscriber_does_not_break_anything(caplog):
    def broken(_event: telemetry.Event) -> None:
        raise RuntimeError("subscriber bug")

    remove = telemetry.subscribe(broken)
    try:
        with telemetry.span("tinkex.test.block", answer=42) as attrs:
            attrs["extra"] = "yes"
        with pytest.raises(KeyError):
            with telemetry.span("tinkex.test.failing"):
                raise KeyError("x")
    finally:
        remove()
    assert "telemetry handler" in caplog.text
    with telemetry.capture("tinkex.test") as events:
        telemetry.emit("tinkex.test.point", level=logging.INFO, name="attribute called name")
    assert events[0].attributes == {"name": "attribute called name"} and events[0].to_dict()["level"] == "INFO"


class FakeSpan:
    def __init__(self, name: str, attributes: dict):
        self.name, self.attributes, self.exceptions = name, dict(attributes), []

    def set_attributes(self, attributes: dict) -> None:
        self.attributes.update(attributes)

    def record_exception(self, exc: BaseException) -> None:
        self.exceptions.append(exc)

    def set_status(self, status) -> None:
        self.status = status


class FakeTracer:
    """Stands in for an SDK tracer (only opentelemetry-api is installed here)."""

    def __init__(self, spans: list[FakeSpan]):
        self.spans = spans

    def start_as_current_span(self, name: str, attributes=None, **_kwargs):
        tracer = self

        class _Manager:
            def __enter__(self):
                span = FakeSpan(name, attributes or {})
                tracer.spans.append(span)
                return span

            def __exit__(self, *_exc):
                return False

        return _Manager()
