"""Assembles the task-agent: the Snap driver and the server connection, in order.

The driver starts first (it supervises Snap whether or not the server is reachable) and
stops last; the connection hands every server frame to the task cache, which hands the
desired task set to the driver. On every (re)connection the agent re-sends its catalog,
since the server forgets nothing but may be a different server than last time. With
stats enabled, a statsd client is the first child (so it stops last) and a gauge reporter
sends running, tasks.active, snap.reachable and server.connected every 10 s.
"""
from __future__ import annotations

from typing import Any

from twisted.logger import Logger

import taskd
from taskd.agent.cache import TaskCache
from taskd.agent.connection import ServerConnection
from taskd.agent.settings import AgentSettings
from taskd.services import OrderedMultiService
from taskd.stats import AGENT_PREFIX, GaugeReporter, make_stats
from taskd.wire import framing

log = Logger(namespace="taskd.agent")

GAUGE_INTERVAL = 10.0


class Agent:
    def __init__(self, settings: AgentSettings, reactor: Any = None, *, snap_intervals: dict | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        from taskd.agent.snap import SnapDriver

        self.settings = settings
        self.service = OrderedMultiService()
        self.stats = make_stats(settings, AGENT_PREFIX, reactor)
        self.driver = SnapDriver(
            snap_url=settings.snap_url, agent_name=settings.agent_name, tsdb_url=settings.tsdb_url,
            api_key=settings.api_key, clock=reactor, send_catalog=self.send_catalog, stats=self.stats,
            **(snap_intervals or {}),
        )
        self.cache = TaskCache(self.driver.set_tasks, stats=self.stats)
        self.connection = ServerConnection(
            url=settings.socket_url, api_key=settings.api_key, reactor=reactor, on_frame=self.cache.handle,
            on_connected=self.driver.resend_catalog, max_backoff=settings.reconnect_max_backoff,
            heartbeat_interval=settings.heartbeat_interval, ca_bundle=settings.ca_bundle, stats=self.stats,
        )
        self.stats.setServiceParent(self.service)
        self.driver.setServiceParent(self.service)
        self.connection.setServiceParent(self.service)
        if self.stats.enabled:
            GaugeReporter(self.stats, reactor, self.gauges, GAUGE_INTERVAL).setServiceParent(self.service)
            log.info("sending metrics to statsd at {addr} ({flavour}), prefix {prefix}", addr=settings.statsd_addr,
                     flavour=settings.statsd_type, prefix=self.stats.prefix)

    def gauges(self) -> dict[str, int]:
        return {"tasks.active": len(self.cache.tasks), "snap.reachable": int(self.driver.snap_reachable),
                "server.connected": int(self.connection.connected)}

    def send_catalog(self, records: list[dict]) -> None:
        if self.connection.send(framing.CATALOG, records):
            log.info("sent catalog of {n} metric(s) to the server", n=len(records))


def make_service(settings: AgentSettings) -> OrderedMultiService:
    log.info("taskd task-agent {version} starting as {name}; server {url}; snap {snap}",
             version=taskd.__version__, name=settings.agent_name, url=settings.socket_url, snap=settings.snap_url)
    if settings.config_file_missing:
        log.info("no config file at {path}; using defaults, flags and environment", path=settings.config_path)
    if not settings.api_key:
        log.warn("api-key is empty: the server will refuse this agent")
    return Agent(settings).service
