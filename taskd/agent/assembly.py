"""Assembles the task-agent: an executor, the server connection and the status reporter.

The executor (``executor = snap``: the Snap driver; ``builtin``: collectors in this
process publishing to tsdb-gw or graphite) starts first — it keeps running whether or
not the server is reachable — and stops last; the connection hands every server frame to
the task cache, which hands the desired task set to the executor and tells the status
reporter which tasks still exist. The status reporter stops before the connection, so
its final flush still reaches the server. On every (re)connection the agent re-sends its
catalog and every task status, since the server on the other end may be a different one.
With stats enabled, a statsd client is the first child (so it stops last) and a gauge
reporter sends running, tasks.active, snap.reachable (snap executor), published/dropped
(builtin) and server.connected every 10 s.
"""
from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import maybeDeferred, succeed
from twisted.logger import Logger

import taskd
from taskd.agent.builtin.netpolicy import NetPolicy
from taskd.agent.taskcache import TaskCache
from taskd.agent.taskstate import TaskState
from taskd.agent.connection import ServerConnection
from taskd.agent.settings import AgentSettings
from taskd.agent.statusreporter import StatusReporter
from taskd.servicetree import OrderedMultiService
from taskd.promstats import FanOutStats, PromStats, metrics_resource
from taskd.stats import AGENT_PREFIX, GaugeReporter, make_stats
from taskd.wire import framing

log = Logger(namespace="taskd.agent")

GAUGE_INTERVAL = 10.0


class ResumeSaved(Service):
    """Starts the saved task list (state-dir) once the executor runs, before any server frame."""

    def __init__(self, cache: TaskCache) -> None:
        self.cache = cache

    def startService(self) -> None:
        super().startService()
        self.cache.resume_saved()


class Agent:
    def __init__(self, settings: AgentSettings, reactor: Any = None, *, snap_intervals: dict | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.settings = settings
        self.service = OrderedMultiService()
        # statsd (stats-enabled) and Prometheus (metrics-addr), as one (taskd.promstats)
        self.prom = PromStats("taskd_agent") if settings.metrics_addr not in ("", "off") else None
        self.stats = FanOutStats(make_stats(settings, AGENT_PREFIX, reactor), *([self.prom] if self.prom else []))
        self.status = StatusReporter(send=self._send, clock=reactor, interval=settings.status_interval,
                                     stats=self.stats)
        self.publisher: Any = None
        self.netpolicy = NetPolicy(settings.blocked_nets)
        if settings.executor == "builtin":
            self.driver = self._builtin(settings, reactor)
        else:
            from taskd.agent.snap import SnapDriver

            self.driver = SnapDriver(
                snap_url=settings.snap_url, agent_name=settings.agent_name, tsdb_url=settings.tsdb_url,
                api_key=settings.api_key, clock=reactor, send_catalog=self.send_catalog, stats=self.stats,
                report_status=self.status.report, status_interval=settings.status_interval,
                **(snap_intervals or {}),
            )
        state = TaskState(settings.state_dir) if settings.state_dir else None
        self.cache = TaskCache(self._apply, stats=self.stats, state=state, run_once=self._run_once)
        self.connection = ServerConnection(
            url=settings.socket_url, api_key=settings.api_key, reactor=reactor, on_frame=self.cache.handle,
            on_connected=self._connected, on_handshake=self._handshake, max_backoff=settings.reconnect_max_backoff,
            heartbeat_interval=settings.heartbeat_interval, ca_bundle=settings.ca_bundle, stats=self.stats,
        )
        self.stats.setServiceParent(self.service)
        if self.publisher is not None:
            self.publisher.setServiceParent(self.service)  # stops after the executor: final flush
        self.driver.setServiceParent(self.service)
        ResumeSaved(self.cache).setServiceParent(self.service)  # after the executor, before the server
        self.connection.setServiceParent(self.service)
        self.status.setServiceParent(self.service)
        if self.prom is not None:
            self.prom.live(self.live_rows, ("running", "tasks.active", "server.connected", "metrics.published",
                                            "metrics.dropped", "metrics.queued"))
            from twisted.application import strports
            from twisted.web.server import Site

            site = Site(metrics_resource(self.prom.registry))
            site.noisy = False
            strports.service(settings.metrics_addr, site, reactor=reactor).setServiceParent(self.service)
            log.info("Prometheus metrics at {addr} (GET /metrics)", addr=settings.metrics_addr)
        if self.stats.enabled:
            GaugeReporter(self.stats, reactor, self.gauges, GAUGE_INTERVAL).setServiceParent(self.service)
        if self.stats.statsd_enabled:
            log.info("sending metrics to statsd at {addr} ({flavour}), prefix {prefix}", addr=settings.statsd_addr,
                     flavour=settings.statsd_type, prefix=self.stats.prefix)

    def _builtin(self, settings: AgentSettings, reactor: Any) -> Any:
        from taskd.agent.builtin.collector import load_collectors
        from taskd.agent.builtin.executor import BuiltinExecutor

        if settings.publisher == "graphite":
            from taskd.agent.builtin.graphite import GraphitePublisher

            self.publisher = GraphitePublisher(addr=settings.graphite_addr, queue_size=settings.tsdb_queue_size,
                                               reactor=reactor, stats=self.stats)
        else:
            from taskd.agent.builtin.tsdbgw import TsdbGwPublisher

            self.publisher = TsdbGwPublisher(
                url=settings.tsdb_url, key=settings.tsdb_bearer, snappy=settings.tsdb_snappy,
                batch_size=settings.tsdb_batch_size, flush_interval=settings.tsdb_flush_interval,
                queue_size=settings.tsdb_queue_size, max_backoff=settings.tsdb_max_backoff,
                timeout=settings.tsdb_timeout, reactor=reactor, stats=self.stats)
        collectors = load_collectors(reactor=reactor, settings=settings, netpolicy=self.netpolicy)
        if self.prom is not None:  # every collector's series exist from the start (alert rules need them)
            for collector in collectors:
                for name in ("builtin.runs", "builtin.failures", "builtin.skipped"):
                    self.prom.declare("incr", name, {"collector": collector})
        log.info("built-in executor with collector(s) {names}; publishing to {where}",
                 names=", ".join(sorted(collectors)) or "(none)",
                 where=settings.graphite_addr if settings.publisher == "graphite" else settings.tsdb_url)
        return BuiltinExecutor(collectors=collectors, publisher=self.publisher, clock=reactor,
                               send_catalog=self.send_catalog, report_status=self.status.report, stats=self.stats,
                               max_run_lateness=settings.max_run_lateness)

    def _apply(self, tasks: dict[int, dict]) -> None:
        self.driver.set_tasks(tasks)
        self.status.retain(tasks)

    def _run_once(self, request_id: str, task: dict) -> None:
        """An ad-hoc run: the executor runs the task once; its answer goes back as runResult."""
        run = getattr(self.driver, "run_once", None)
        if run is None:
            d = succeed({"outcome": "unsupported", "error": f"the {self.settings.executor} executor cannot"
                                                            " run a task once", "duration": None, "metrics": []})
        else:
            d = maybeDeferred(run, task)

        def answer(result: dict) -> None:
            self.connection.send(framing.RUN_RESULT, {"requestId": request_id, "taskId": task["id"], **result})

        def failed(failure: Any) -> None:
            answer({"outcome": "error", "error": f"{failure.type.__name__}: {failure.getErrorMessage()}",
                    "duration": None, "metrics": []})

        d.addCallbacks(answer, failed)

    def _handshake(self, headers: dict) -> None:
        was = self.netpolicy.public
        self.netpolicy.server_said(headers)
        if self.netpolicy.public != was and self.netpolicy.setting == "auto":
            log.info("the server says this agent is {what}: the built-in collectors {rule}",
                     what={True: "public", False: "private", None: "(not said)"}[self.netpolicy.public],
                     rule="block nothing" if not self.netpolicy.active else
                     "block loopback, private, link-local, CGNAT and ULA networks (blocked-nets = auto)")

    def _connected(self) -> None:
        self.driver.resend_catalog()
        self.status.connected()

    def _send(self, event: str, value: Any) -> bool:
        return self.connection.send(event, value)

    def gauges(self) -> dict[str, int]:
        values = {"tasks.active": len(self.cache.tasks), "server.connected": int(self.connection.connected)}
        if self.publisher is not None:
            values.update({"metrics.published": self.publisher.published, "metrics.dropped": self.publisher.dropped})
        else:
            values["snap.reachable"] = int(self.driver.snap_reachable)
        return values

    def live_rows(self) -> list[tuple[str, str, float, dict]]:
        """Read at each Prometheus scrape (taskd.promstats)."""
        rows: list[tuple[str, str, float, dict]] = [
            ("gauge", "running", 1, {}),
            ("gauge", "tasks.active", len(self.cache.tasks), {}),
            ("gauge", "server.connected", int(self.connection.connected), {}),
        ]
        if self.publisher is not None:
            rows += [("counter", "metrics.published", self.publisher.published, {}),
                     ("counter", "metrics.dropped", self.publisher.dropped, {}),
                     ("gauge", "metrics.queued", self.publisher.queued, {})]
        return rows

    def send_catalog(self, records: list[dict]) -> None:
        if self.connection.send(framing.CATALOG, records):
            log.info("sent catalog of {n} metric(s) to the server", n=len(records))


def make_service(settings: AgentSettings) -> OrderedMultiService:
    log.info("taskd task-agent {version} starting as {name}; server {url}; executor {executor}{snap}",
             version=taskd.__version__, name=settings.agent_name, url=settings.socket_url,
             executor=settings.executor, snap=f" (snap {settings.snap_url})" if settings.executor == "snap" else "")
    if settings.config_file_missing:
        log.info("no config file at {path}; using defaults, flags and environment", path=settings.config_path)
    if not settings.api_key:
        log.warn("api-key is empty: the server will refuse this agent")
    return Agent(settings).service
