"""Assembles the task-agent: the Snap driver and the server connection, in order.

The driver starts first (it supervises Snap whether or not the server is reachable) and
stops last; the connection hands every server frame to the task cache, which hands the
desired task set to the driver. On every (re)connection the agent re-sends its catalog,
since the server forgets nothing but may be a different server than last time.
"""
from __future__ import annotations

from typing import Any

from twisted.logger import Logger

import taskd
from taskd.agent.cache import TaskCache
from taskd.agent.connection import ServerConnection
from taskd.agent.settings import AgentSettings
from taskd.services import OrderedMultiService
from taskd.wire import framing

log = Logger(namespace="taskd.agent")


class Agent:
    def __init__(self, settings: AgentSettings, reactor: Any = None, *, snap_intervals: dict | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        from taskd.agent.snap import SnapDriver

        self.settings = settings
        self.service = OrderedMultiService()
        self.driver = SnapDriver(
            snap_url=settings.snap_url, agent_name=settings.agent_name, tsdb_url=settings.tsdb_url,
            api_key=settings.api_key, clock=reactor, send_catalog=self.send_catalog, **(snap_intervals or {}),
        )
        self.cache = TaskCache(self.driver.set_tasks)
        self.connection = ServerConnection(
            url=settings.socket_url, api_key=settings.api_key, reactor=reactor, on_frame=self.cache.handle,
            on_connected=self.driver.resend_catalog, max_backoff=settings.reconnect_max_backoff,
            heartbeat_interval=settings.heartbeat_interval, ca_bundle=settings.ca_bundle,
        )
        self.driver.setServiceParent(self.service)
        self.connection.setServiceParent(self.service)

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
