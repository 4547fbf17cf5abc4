"""The task-server's Prometheus metrics: which sinks its stats go to, and the values read
at each scrape (see taskd.promstats for the naming rule).

Counted facts go through `stats.incr/timing` as they always did for statsd (connections
accepted/refused by status, dispatch latency, API requests by route and code, DB
operation latency...). What is state, not an event (agents connected, the DB pool in
use, the broker's buffer, the auth cache, status rows written so far) is read here when
Prometheus scrapes, from the objects that hold it.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from taskd.promstats import FanOutStats, PromStats
from taskd.stats import SERVER_PREFIX, make_stats

NAMESPACE = "taskd_server"
Row = tuple[str, str, float, Mapping[str, Any]]


def server_stats(settings: Any, reactor: Any) -> tuple[FanOutStats, PromStats | None]:
    """statsd (when stats-enabled) and Prometheus (unless metrics-addr = off), as one."""
    statsd = make_stats(settings, SERVER_PREFIX, reactor)
    prom = None if settings.metrics_addr == "off" else PromStats(NAMESPACE)
    if prom is not None:  # series the shipped alert rules watch exist before their first event
        for name in ("agents.autocreate_failure", "servers.reaped"):
            prom.declare("incr", name)
    return FanOutStats(statsd, *([prom] if prom is not None else [])), prom


#: statsd gauge names the live rows replace (taskd.promstats.PromStats.live).
LIVE_GAUGES = ("running", "agents.connected", "broker.connected", "broker.buffered", "broker.dropped")


def live_rows(*, sessions: Any, events: Any, pool: Any, auth: Any, status: Any, bad_frames: Any) -> Iterable[Row]:
    yield "gauge", "running", 1, {}
    yield "gauge", "agents.connected", len(sessions.sessions), {}
    transport = events.transport
    if transport is not None:
        yield "gauge", "broker.connected", int(transport.connected), {}
        yield "gauge", "broker.buffered", transport.pending, {}
        yield "counter", "broker.dropped", transport.dropped, {}
    threadpool = pool.threadpool
    yield "gauge", "db.pool_in_use", len(getattr(threadpool, "working", ())), {}
    yield "gauge", "db.pool_size", getattr(threadpool, "max", 0), {}
    yield "gauge", "db.available", int(pool.availability.available), {}
    yield "counter", "auth.cache_hits", auth.cache_hits, {}
    for outcome, n in auth.checks.items():
        yield "counter", "auth.checks", n, {"outcome": outcome}
    yield "gauge", "auth.checks_in_flight", auth.in_flight, {}
    yield "counter", "auth.refused_busy", auth.refused_busy, {}
    if status is not None:
        yield "counter", "status.rows_written", status.rows_written, {}
        yield "counter", "status.flushes", status.flushes, {}
        yield "counter", "status.failed_flushes", status.failed_flushes, {}
    yield "counter", "agents.closed_for_bad_frames", bad_frames.closed_for_it, {}
