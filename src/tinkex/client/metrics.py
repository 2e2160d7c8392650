"""In-process metrics: counters, gauges and latency histograms, exported as Prometheus text or JSON.

The SDK records these by itself, in the process-wide `REGISTRY`:

| metric | kind | labels |
|---|---|---|
| `tinkex_http_requests_total` | counter | `kind` (e.g. `asample`, `retrieve_future`, `training_runs/:id`), `method`, `status` (code, `timeout` or `connection_error`) |
| `tinkex_http_request_duration_seconds` | histogram | `kind` (one observation per HTTP attempt) |
| `tinkex_http_retries_total` | counter | `kind`, `reason` |
| `tinkex_http_requests_in_flight` | gauge | `kind` |
| `tinkex_future_duration_seconds` | histogram | `request_type` (`ForwardBackward`, `Sample`, ...), `outcome`: submit to result |
| `tinkex_sample_backoffs_total` | counter | -: 429s seen by samplers |
| `tinkex_rate_limit_wait_seconds` | histogram | -: time samplers waited for the tenant's backoff and budgets |
| `tinkex_queue_state_changes_total` | counter | `kind` (`training`/`sampling`), `state` |
| `tinkex_recoveries_total` | counter | `outcome` (`recovered`, `failed_attempt`, `exhausted`) |
| `tinkex_custom_loss_duration_seconds` | histogram | -: a RegularizedLoss evaluation (client side) |
| `tinkex_download_bytes_total`, `tinkex_download_duration_seconds` | counter, histogram | -: checkpoint downloads |

Histograms keep count, sum, min and max over all observations, cumulative bucket counts, and the
most recent `max_samples` (1000) observations, from which p50/p95/p99 are taken (nearest rank).

    from tinkex.client import metrics
    snap = metrics.snapshot()
    snap["histograms"]['tinkex_http_request_duration_seconds{kind="asample"}']["p95"]
    print(metrics.to_prometheus())
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["counter", "gauge", "histogram"]
DEFAULT_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                                      120.0)
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelKey = tuple[tuple[str, str], ...]


def _label_key(labels: Mapping[str, Any]) -> LabelKey:
    for name in labels:
        if not _LABEL.match(name) or name == "le":
            raise ValueError(f"invalid label name {name!r}")
    return tuple(sorted((name, str(value)) for name, value in labels.items()))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def series_name(name: str, labels: LabelKey | Mapping[str, Any] = ()) -> str:
    """`name{a="x",b="y"}`: how a series is written in Prometheus text and keyed in snapshots."""
    key = _label_key(labels) if isinstance(labels, Mapping) else labels
    if not key:
        return name
    return name + "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in key) + "}"


def _format(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


@dataclass
class _Histogram:
    buckets: tuple[float, ...]
    max_samples: int
    count: int = 0
    total: float = 0.0
    minimum: float = math.inf
    maximum: float = -math.inf
    bucket_counts: list[int] = field(default_factory=list)
    recent: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.bucket_counts = [0] * len(self.buckets)
        self.recent = deque(maxlen=self.max_samples)

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.minimum = min(self.minimum, value)
        self.maximum = max(self.maximum, value)
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self.bucket_counts[index] += 1
                break
        self.recent.append(value)

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.recent)

        def rank(q: float) -> float | None:
            if not ordered:
                return None
            return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

        cumulative, running = {}, 0
        for bound, count in zip(self.buckets, self.bucket_counts):
            running += count
            cumulative[_format(bound)] = running
        cumulative["+Inf"] = self.count
        return {
            "count": self.count, "sum": self.total,
            "mean": self.total / self.count if self.count else None,
            "min": self.minimum if self.count else None, "max": self.maximum if self.count else None,
            "p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99),
            "buckets": cumulative,
        }


@dataclass
class _Family:
    kind: Kind
    help: str
    series: dict[LabelKey, Any] = field(default_factory=dict)


class MetricsRegistry:
    """A thread-safe set of metric families. Names follow Prometheus rules; counters end in `_total`."""

    def __init__(self, *, buckets: Iterable[float] = DEFAULT_BUCKETS, max_samples: int = 1000):
        self._lock = threading.Lock()
        self._families: dict[str, _Family] = {}
        self.buckets = tuple(sorted(float(b) for b in buckets))
        self.max_samples = max_samples
        self._collectors: list[Any] = []

    def describe(self, name: str, kind: Kind, help: str = "") -> None:
        """Declare a family (optional: the first update declares it too), with its help text."""
        with self._lock:
            self._family(name, kind).help = help or self._families[name].help

    def _family(self, name: str, kind: Kind) -> _Family:
        family = self._families.get(name)
        if family is None:
            if not _NAME.match(name):
                raise ValueError(f"invalid metric name {name!r}")
            family = self._families[name] = _Family(kind=kind, help="")
        elif family.kind != kind:
            raise ValueError(f"metric {name!r} is a {family.kind}, not a {kind}")
        return family

    # ---- updates -----------------------------------------------------------------------------

    def increment(self, name: str, value: float = 1.0, /, **labels: Any) -> None:
        if value < 0:
            raise ValueError("a counter only goes up")
        key = _label_key(labels)
        with self._lock:
            family = self._family(name, "counter")
            family.series[key] = family.series.get(key, 0.0) + value

    def set_gauge(self, name: str, value: float, /, **labels: Any) -> None:
        key = _label_key(labels)
        with self._lock:
            self._family(name, "gauge").series[key] = float(value)

    def add_gauge(self, name: str, delta: float, /, **labels: Any) -> None:
        key = _label_key(labels)
        with self._lock:
            family = self._family(name, "gauge")
            family.series[key] = family.series.get(key, 0.0) + delta

    def observe(self, name: str, value: float, /, **labels: Any) -> None:
        """Record one histogram observation (latencies in seconds)."""
        key = _label_key(labels)
        with self._lock:
            family = self._family(name, "histogram")
            histogram = family.series.get(key)
            if histogram is None:
                histogram = family.series[key] = _Histogram(self.buckets, self.max_samples)
            histogram.observe(float(value))

    def add_collector(self, collect: Any) -> None:
        """`collect(registry)` runs before every snapshot/export (to refresh gauges read on demand)."""
        self._collectors.append(collect)

    def reset(self) -> None:
        with self._lock:
            self._families.clear()

    # ---- reading -----------------------------------------------------------------------------

    def _collect(self) -> None:
        for collect in list(self._collectors):
            try:
                collect(self)
            except Exception:  # a broken collector must not break the export
                import logging

                logging.getLogger("tinkex").debug("metrics collector failed", exc_info=True)

    def value(self, name: str, /, **labels: Any) -> float | dict[str, Any] | None:
        """One series: a counter's or gauge's value, or a histogram's summary (None if absent)."""
        key = _label_key(labels)
        with self._lock:
            family = self._families.get(name)
            if family is None or key not in family.series:
                return None
            item = family.series[key]
            return item.summary() if family.kind == "histogram" else item

    def total(self, name: str, /, **labels: Any) -> float:
        """The sum of a counter or gauge over every series whose labels include `labels`."""
        want = set(_label_key(labels))
        with self._lock:
            family = self._families.get(name)
            if family is None or family.kind == "histogram":
                return 0.0
            return sum(value for key, value in family.series.items() if want <= set(key))

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """`{"counters": {series: value}, "gauges": {...}, "histograms": {series: {count, sum, mean, min,
        max, p50, p95, p99, buckets}}}`, with series written as `name{label="value"}`."""
        self._collect()
        out: dict[str, dict[str, Any]] = {"counters": {}, "gauges": {}, "histograms": {}}
        with self._lock:
            for name, family in sorted(self._families.items()):
                section = out[family.kind + "s"]
                for key, item in sorted(family.series.items()):
                    section[series_name(name, key)] = item.summary() if family.kind == "histogram" else item
        return out

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.snapshot(), **kwargs)

    def to_prometheus(self) -> str:
        """The Prometheus text exposition format (0.0.4)."""
        self._collect()
        lines: list[str] = []
        with self._lock:
            for name, family in sorted(self._families.items()):
                if family.help:
                    lines.append(f"# HELP {name} {family.help.replace(chr(92), chr(92) * 2).replace(chr(10), ' ')}")
                lines.append(f"# TYPE {name} {family.kind}")
                for key, item in sorted(family.series.items()):
                    if family.kind != "histogram":
                        lines.append(f"{series_name(name, key)} {_format(item)}")
                        continue
                    running = 0
                    for bound, count in zip(item.buckets, item.bucket_counts):
                        running += count
                        lines.append(f"{series_name(name + '_bucket', (*key, ('le', _format(bound))))} {running}")
                    lines.append(f"{series_name(name + '_bucket', (*key, ('le', '+Inf')))} {item.count}")
                    lines.append(f"{series_name(name + '_sum', key)} {_format(item.total)}")
                    lines.append(f"{series_name(name + '_count', key)} {item.count}")
        return "\n".join(lines) + "\n"


REGISTRY = MetricsRegistry()
_DESCRIPTIONS: tuple[tuple[str, Kind, str], ...] = (
    ("tinkex_http_requests_total", "counter", "HTTP attempts sent by the SDK, by request kind and status."),
    ("tinkex_http_request_duration_seconds", "histogram", "Duration of each HTTP attempt."),
    ("tinkex_http_retries_total", "counter", "HTTP attempts that were retried, by reason."),
    ("tinkex_http_requests_in_flight", "gauge", "HTTP calls in progress (retries included)."),
    ("tinkex_future_duration_seconds", "histogram", "From submit to result of asynchronous operations."),
    ("tinkex_sample_backoffs_total", "counter", "429 answers to sample submissions (tenant-wide backoffs)."),
    ("tinkex_rate_limit_wait_seconds", "histogram", "Time samplers waited for the tenant's backoff and budgets."),
    ("tinkex_queue_state_changes_total", "counter", "Queue-state changes reported by the server."),
    ("tinkex_recoveries_total", "counter", "Training-run recovery outcomes."),
    ("tinkex_custom_loss_duration_seconds", "histogram", "Client-side time of forward_backward_custom."),
    ("tinkex_download_bytes_total", "counter", "Checkpoint bytes downloaded."),
    ("tinkex_download_duration_seconds", "histogram", "Duration of checkpoint downloads."),
)
for _name, _kind, _help in _DESCRIPTIONS:
    REGISTRY.describe(_name, _kind, _help)


def snapshot() -> dict[str, dict[str, Any]]:
    """The SDK's metrics (see `MetricsRegistry.snapshot`)."""
    return REGISTRY.snapshot()


def to_prometheus() -> str:
    return REGISTRY.to_prometheus()


def to_json(**kwargs: Any) -> str:
    return REGISTRY.to_json(**kwargs)


def reset() -> None:
    """Forget every recorded value (the descriptions stay)."""
    REGISTRY.reset()
    for name, kind, help in _DESCRIPTIONS:
        REGISTRY.describe(name, kind, help)


_ID_LIKE = re.compile(r"[0-9a-f]{8,}|.*[:=.].*|.*\d{3,}.*", re.IGNORECASE)
_RESOURCES = frozenset({
    "training_runs", "checkpoints", "sessions", "samplers", "publish", "ttl", "archive", "external_weights_urls",
    "metrics", "downloads", "finish", "project", "trace_export", "search", "weights", "sampler_weights",
    "external_weights", "client", "config", "dynamic_config", "auth", "token", "apikey", "me", "upload",
})


def request_kind(path: str) -> str:
    """A low-cardinality name for an API path: `/api/v1/asample` -> `asample`,
    `/api/v1/training_runs/<id>/checkpoints/weights/<name>/archive` -> `training_runs/:id/checkpoints/weights/:id/archive`."""
    if "://" in path:
        path = "/" + path.split("://", 1)[1].split("/", 1)[-1]
    path = path.split("?", 1)[0]
    parts = [part for part in path.split("/") if part]
    if parts[:2] == ["api", "v1"]:
        parts = parts[2:]
    out: list[str] = []
    for index, part in enumerate(parts):
        literal = part in _RESOURCES or (index == 0 and not _ID_LIKE.fullmatch(part))
        name = part if literal else ":id"
        if not (name == ":id" and out and out[-1] == ":id"):
            out.append(name)
    return "/".join(out) or "/"
