"""Self-metrics for Prometheus, beside (or instead of) statsd.

Operators' stacks scrape `/metrics`; taskd speaks statsd too, so both daemons keep one
place that reports a fact (`stats.incr("agents.connections_failed", tags=...)`) and
this module turns the same calls into `prometheus_client` metrics: a statsd name
`agents.connections_failed` with tags `{status: 401}` is the counter
`taskd_server_agents_connections_failed_total{status="401"}`, a gauge keeps its name,
and a timing is a histogram in seconds (`taskd_server_dispatch_latency_seconds`). So a
fact added for one is there for the other, and `FanOutStats` lets both be on.

Values that are read, not counted (agents connected, the DB pool in use, the broker's
buffer), come from a `live` callable evaluated at each scrape, never from a timer, so a
scrape is never staler than the scrape itself. Each daemon has its own
`CollectorRegistry` (tests run several in one process).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application.service import Service
from twisted.logger import Logger

Tags = Mapping[str, Any] | None

_BAD = re.compile(r"[^a-zA-Z0-9_]")
#: Seconds; from a fast dispatch (1 ms) to a check that took its whole timeout (10 s).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

log = Logger(namespace="taskd.promstats")


def metric_name(namespace: str, name: str) -> str:
    """`taskd_server` + `agents.connections_failed` -> `taskd_server_agents_connections_failed`."""
    return f"{namespace}_{_BAD.sub('_', name.replace('.', '_'))}"


def _label(key: str) -> str:
    text = _BAD.sub("_", str(key))
    return text if text and not text[0].isdigit() else f"_{text}"


class PromStats(Service):
    """The stats interface (`incr`, `gauge`, `timing`) onto a private registry."""

    name = "prometheus"
    enabled = True
    errors = dropped = 0

    def __init__(self, namespace: str, registry: CollectorRegistry | None = None) -> None:
        self.namespace = namespace
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._metrics: dict[str, tuple[Any, tuple[str, ...]]] = {}
        self._live_names: set[str] = set()
        self._warned: set[str] = set()

    # -- the stats interface -----------------------------------------------------------

    def incr(self, name: str, n: int = 1, tags: Tags = None) -> None:
        self._get(Counter, name, tags, "").inc(n)

    def gauge(self, name: str, value: float | int, tags: Tags = None) -> None:
        if name in self._live_names:  # read at scrape time instead (see `live`)
            return
        self._get(Gauge, name, tags, "").set(value)

    def timing(self, name: str, ms: float, tags: Tags = None) -> None:
        self._get(Histogram, name, tags, "_seconds").observe(ms / 1000.0)

    def flush(self) -> None:
        pass

    def declare(self, kind: str, name: str, tags: Tags = None) -> None:
        """Make a counter (`incr`) or histogram (`timing`) series exist at 0 before its
        first event, so that rules such as `increase(..._skipped_total[10m]) > 0` have a
        series to work on (Prometheus' advice for label sets known up front)."""
        if kind == "incr":
            self._get(Counter, name, tags, "")
        elif kind == "timing":
            self._get(Histogram, name, tags, "_seconds")
        else:
            raise ValueError(f"declare: {kind!r} is not incr or timing")

    # -- read at scrape time -----------------------------------------------------------

    def live(self, collect: Callable[[], Iterable[tuple[str, str, float, Mapping[str, Any]]]],
             names: Iterable[str]) -> None:
        """Register `collect`, called at every scrape, returning (kind, name, value, labels)
        rows: kind `gauge` or `counter` (a running total the daemon keeps). `names`: the
        statsd names it covers, which `gauge` then leaves alone."""
        self._live_names.update(names)
        self.registry.register(_Live(self.namespace, collect))

    # -- internals ---------------------------------------------------------------------

    def _get(self, kind: type, name: str, tags: Tags, suffix: str) -> Any:
        labels = {_label(k): str(v) for k, v in (tags or {}).items()}
        entry = self._metrics.get(name)
        if entry is None:
            keys = tuple(sorted(labels))
            full = metric_name(self.namespace, name) + suffix
            extra = {"buckets": BUCKETS} if kind is Histogram else {}
            metric = kind(full, f"taskd {name} (statsd name)", labelnames=keys, registry=self.registry, **extra)
            entry = self._metrics[name] = (metric, keys)
        metric, keys = entry
        if set(labels) != set(keys) and name not in self._warned:  # a caller's tags changed shape
            self._warned.add(name)
            log.warn("metric {name}: tags {got} differ from its first use ({want}); missing ones are empty",
                     name=name, got=sorted(labels), want=list(keys))
        return metric.labels(**{k: labels.get(k, "") for k in keys}) if keys else metric


class _Live:
    """A prometheus_client collector over a daemon's own state."""

    def __init__(self, namespace: str, collect: Callable[[], Iterable[tuple[str, str, float, Mapping[str, Any]]]]):
        self.namespace = namespace
        self.collect_rows = collect

    def describe(self) -> list:
        return []  # values are read at scrape time; nothing to check up front

    def collect(self) -> Iterable[Any]:
        try:
            rows = list(self.collect_rows())
        except Exception as exc:  # noqa: BLE001 - a scrape must never fail the daemon
            log.warn("reading live metrics failed: {err}", err=f"{type(exc).__name__}: {exc}")
            return []
        families: dict[str, Any] = {}
        for kind, name, value, labels in rows:
            full = metric_name(self.namespace, name)
            pairs = sorted((_label(k), str(v)) for k, v in labels.items())
            family = families.get(full)
            if family is None:
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                family = families[full] = cls(full, f"taskd {name}", labels=[k for k, _ in pairs])
            family.add_metric([v for _, v in pairs], float(value))
        return list(families.values())


class FanOutStats(Service):
    """Several stats sinks as one (statsd and Prometheus both on)."""

    name = "stats"

    def __init__(self, *sinks: Any) -> None:
        self.sinks = [s for s in sinks if s.enabled]
        self.enabled = bool(self.sinks)
        statsd = next((s for s in self.sinks if hasattr(s, "prefix")), None)
        self.prefix = getattr(statsd, "prefix", "")
        self.statsd_enabled = statsd is not None

    @property
    def errors(self) -> int:
        return sum(getattr(s, "errors", 0) for s in self.sinks)

    @property
    def dropped(self) -> int:
        return sum(getattr(s, "dropped", 0) for s in self.sinks)

    def incr(self, name: str, n: int = 1, tags: Tags = None) -> None:
        for sink in self.sinks:
            sink.incr(name, n, tags)

    def gauge(self, name: str, value: float | int, tags: Tags = None) -> None:
        for sink in self.sinks:
            sink.gauge(name, value, tags)

    def timing(self, name: str, ms: float, tags: Tags = None) -> None:
        for sink in self.sinks:
            sink.timing(name, ms, tags)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def startService(self) -> None:
        super().startService()
        for sink in self.sinks:
            sink.startService()

    def stopService(self) -> Any:
        super().stopService()
        from twisted.internet.defer import DeferredList, maybeDeferred

        return DeferredList([maybeDeferred(s.stopService) for s in reversed(self.sinks)])


def metrics_resource(registry: CollectorRegistry) -> Any:
    """The twisted.web resource serving `registry` in the Prometheus text format."""
    from prometheus_client.twisted import MetricsResource

    return MetricsResource(registry=registry)
