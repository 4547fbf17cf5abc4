"""Assembles the task-server: one MultiService whose children start and stop in order.

Start-up work that may fail for operator reasons (bad database URL, unreachable MySQL,
a schema to migrate) runs in `make_service`, before twistd daemonises and before the
reactor runs, so the operator sees one clear line on the terminal (or in journald) and
the process exits non-zero instead of serving half a server.
"""
from __future__ import annotations

import os
import socket as socket_module
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

import taskd
from taskd.daemon import StartupError
from taskd.db import migrate, sealing
from taskd.db.availability import DatabaseUnavailable
from taskd.db.connector import Database
from taskd.db.engine import create_engine
from taskd.db.pool import DBPool
from taskd.server.adhoc import AdhocRuns, TaskRuns
from taskd.server.agenttokens import AgentTokens
from taskd.server.api.app import Api
from taskd.server.api.site import TaskdSite
from taskd.server.auth import Authenticator
from taskd.server.events import EventBus
from taskd.server.dispatch import Dispatcher
from taskd.server.domain import AgentService, TaskService
from taskd.server.liveness import Liveness
from taskd.server.sessions import SessionManager
from taskd.server.statusintake import StatusService
from taskd.server.websocket import SocketEndpoint, make_factory
from taskd.servicetree import OrderedMultiService
from taskd.promstats import metrics_resource
from taskd.server.metrics import LIVE_GAUGES, live_rows, server_stats
from taskd.stats import GaugeReporter

log = Logger(namespace="taskd.server")

GAUGE_INTERVAL = 10.0
"""How often the periodic gauges (running, agents.connected, tasks.active/disabled) are sent."""


class DatabaseService(Service):
    """Starts and stops the connector's thread pool with the server."""

    name = "db-pool"

    def __init__(self, db: Database) -> None:
        self.db = db

    def startService(self) -> None:
        super().startService()
        self.db.start()

    def stopService(self) -> None:
        super().stopService()
        self.db.stop()


class ListenerService(Service):
    """Listens on a Twisted endpoint; `port` is the listening port once started (port 0
    in tests), and `listening` fires then."""

    name = "http"

    def __init__(self, reactor: Any, description: str, factory: Any) -> None:
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.port = None
        self.listening: Deferred = Deferred()

    def startService(self) -> None:
        super().startService()
        d = serverFromString(self.reactor, with_backlog(self.description)).listen(self.factory)

        def started(port: Any) -> Any:
            self.port = port
            host = port.getHost()
            log.info("listening on {addr}", addr=f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}")
            self.listening.callback(port)
            return port

        def failed(f: Any) -> None:
            log.critical("cannot listen on {desc}: {err}", desc=self.description, err=f.getErrorMessage())
            self.listening.errback(f)
            if self.reactor.running:
                self.reactor.stop()

        d.addCallbacks(started, failed)

    def stopService(self) -> Deferred | None:
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()
        return None


LISTEN_BACKLOG = 1024


def with_backlog(description: str) -> str:
    """Twisted listens with a backlog of 50; when thousands of agents reconnect at once
    after a restart the kernel drops their SYNs and they wait for TCP retransmits
    (bench/results.md, reconnect storm). An explicit `backlog=` in `addr` is kept."""
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "ssl") and "backlog=" not in description:
        return f"{description}:backlog={LISTEN_BACKLOG}"
    return description


@dataclass
class Server:
    """The assembled server's parts, for the plugin and for in-process tests."""

    service: MultiService
    engine: Engine
    pool: DBPool
    events: EventBus
    agents: AgentService
    tasks: TaskService
    api: Api
    listener: ListenerService
    sessions: SessionManager
    dispatcher: Dispatcher
    instance_id: str
    stats: Any = None
    status: StatusService | None = None
    db: Database | None = None  # the connector; `pool` is its pool, for tests that inspect the database
    liveness: Liveness | None = None


def describe_db(settings: Any, engine: Engine) -> str:
    if engine.dialect.name == "sqlite":
        return f"sqlite3 at {engine.url.database}"
    url = engine.url
    return f"mysql at {url.host}:{url.port}/{url.database}"


def build_server(settings: Any, reactor: Any = None) -> Server:
    """Everything but starting: connects, migrates, wires services; raises StartupError."""
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    try:
        sealer = sealing.sealer_from_setting(settings.db_encryption_key)
    except sealing.SealError as exc:
        raise StartupError(f"db-encryption-key: {exc}") from None
    try:
        # Migrations may rebuild big tables: they run without db-timeout, on their own
        # connection; serving statements are bounded by it (taskd.db.pool).
        schema_engine = create_engine(settings.db_type, settings.db_connect_str, pool_size=1)
        sealing.attach(schema_engine, sealer)
        try:
            migrate.upgrade(schema_engine)
        finally:
            schema_engine.dispose()
        # One connection more than db-pool-size on MySQL: the liveness heartbeat's own.
        engine = create_engine(settings.db_type, settings.db_connect_str,
                               pool_size=settings.db_pool_size + (settings.db_type == "mysql"),
                               timeout=settings.db_timeout)
        sealing.attach(engine, sealer)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    except Exception as exc:  # unreachable server, bad credentials, read-only file...
        first = str(getattr(exc, "orig", exc)).splitlines()[0] if str(exc) else type(exc).__name__
        raise StartupError(f"db-connect-str: cannot open the {settings.db_type} database: {first}") from None
    log.info("database {db}, schema at revision {rev}", db=describe_db(settings, engine), rev=migrate.head_revision())
    if sealer is None:
        log.warn("db-encryption-key is not set: task config (third-party API keys among it) is stored"
                 " in clear in the database")
    else:
        log.info("task config sealed at rest with key {kid} ({n} key(s) can unseal)", kid=sealer.current,
                 n=len(sealer.keys))

    mysql = engine.dialect.name == "mysql"  # (sqlite: one writer thread for everything)
    db = Database.open(engine, reactor, max_threads=settings.db_pool_size if mysql else None,
                       timeout=settings.db_timeout, own_heartbeat_connection=mysql)
    instance_id = instance_identity(settings)
    stats, prom = server_stats(settings, reactor)
    db.status.stale_floor = db.routes.stale_floor = settings.stale_min_window
    db.pool.stats = stats  # each operation's latency (db.duration)
    events = EventBus(instance_id)
    agents = AgentService(db.agents, db.catalog, events, stats=stats, status=db.status,
                          max_agents_per_org=settings.max_agents_per_org,
                          public_agent_orgs=frozenset(settings.public_agent_orgs))
    tasks = TaskService(db.tasks, events, db.routes, stats=stats)
    status = StatusService(db.status, clock=reactor, flush_interval=settings.status_flush_interval,
                           instance_id=instance_id)
    agents.failing.generation = lambda: status.flushes  # counts read before a flush are read again
    held: dict = {}  # agent id -> its session here: the manager keeps it, the dispatcher reads it
    dispatcher = Dispatcher(
        sessions=held, db=db, events=events, clock=reactor, instance_id=instance_id,
        relocate_delay=settings.relocate_delay, sweep_interval=settings.task_list_interval,
        task_list_interval=settings.task_list_interval, stats=stats, concurrent_reads=settings.db_pool_size,
    )
    sessions = SessionManager(
        db=db, events=events, listener=dispatcher, sessions=held, instance_id=instance_id,
        clock=reactor, heartbeat_interval=settings.heartbeat_interval, stats=stats, status=status,
        max_catalog_records=settings.max_catalog_records, max_bad_frames=settings.max_bad_frames,
    )
    liveness = Liveness(db=db, events=events, sessions=sessions, name=instance_id, addr=settings.addr,
                        clock=reactor, interval=settings.server_heartbeat_interval,
                        dead_after=settings.server_dead_after, stats=stats)
    try:
        liveness.take_over_sync()
    except Exception as exc:
        raise StartupError(f"cannot clear this server's stale sessions: {str(exc).splitlines()[0]}") from None
    socket = SocketEndpoint(agents, make_factory(sessions), autocreate=settings.agent_autocreate)
    auth = Authenticator(
        admin_key=settings.admin_key,
        endpoint=settings.auth_endpoint,
        valid_org_ids=settings.auth_valid_org_id,
        valid_ttl=settings.auth_valid_ttl,
        invalid_ttl=settings.auth_invalid_ttl,
        max_concurrent=settings.auth_max_concurrent,
        max_queued=settings.auth_max_queued,
        request_timeout=settings.auth_timeout,
        clock=reactor,
    )
    tokens = AgentTokens(db.agents, events)
    adhoc = AdhocRuns(events=events, sessions=held, clock=reactor, instance_id=instance_id)
    sessions.adhoc = adhoc
    metrics = metrics_resource(prom.registry) if prom is not None else None
    api = Api(agents, tasks, auth, max_body_size=settings.max_body_size, socket=socket, stats=stats, tokens=tokens,
              database=db, servers=liveness, metrics=metrics if settings.metrics_addr == "" else None,
              runs=TaskRuns(adhoc, tasks, agents, db.routes))
    site = TaskdSite(api.resource(), max_body_size=settings.max_body_size)

    root = OrderedMultiService()
    # Started in this order, stopped in reverse: the listener stops accepting first, then
    # the task statuses the agents sent until then are written, while their sessions
    # here still exist (only statuses of agents with a session on this server are
    # written: an agent that already reconnected elsewhere reports there, and this
    # server's last flush must not land on top of that); then the sessions close their
    # sockets (recording offline), then this server's liveness row goes (it counts as
    # alive while it holds sockets), then the pool; the stats client goes last, so what
    # the others report on their way down is still sent.
    stats.setServiceParent(root)
    DatabaseService(db).setServiceParent(root)
    if settings.exchange:
        from taskd.server.amqp import AmqpTransport

        transport = AmqpTransport(url=settings.rabbitmq_url, exchange=settings.exchange,
                                  instance_id=instance_id, on_event=events.receive, reactor=reactor,
                                  queue_expiry=settings.rabbitmq_queue_expiry)
        events.transport = transport
        transport.setServiceParent(root)  # stops after the sessions, so their offline events get out
    liveness.setServiceParent(root)  # beats before agents connect; stops after the sessions
    sessions.setServiceParent(root)
    status.setServiceParent(root)  # stops before the sessions (see above)
    dispatcher.setServiceParent(root)
    if prom is not None:
        prom.live(lambda: live_rows(sessions=sessions, events=events, pool=db.pool, auth=auth, status=status,
                                    bad_frames=sessions.bad_frames), LIVE_GAUGES)
    if stats.enabled:
        def gauges() -> Deferred:
            connected = len(sessions.sessions)
            broker = {} if events.transport is None else {
                "broker.connected": int(events.transport.connected),
                "broker.buffered": events.transport.pending,
                "broker.dropped": events.transport.dropped}

            def unavailable(failure: Any) -> dict:
                failure.trap(DatabaseUnavailable)  # the pool logged the outage once; no warning per interval
                return {"agents.connected": connected, **broker}

            def with_stale(values: dict) -> Any:
                # (task, agent) pairs stale on the agents this server holds: summed over the
                # servers, the fleet's (taskd.db.staleness).
                held = list(sessions.sessions)
                if not held:
                    return {**values, "tasks.stale": 0}
                return db.status.failing_counts(held).addCallback(
                    lambda found: {**values, "tasks.stale": sum(stale for _, stale in found.values())})

            return db.tasks.count_by_enabled().addCallback(lambda counts: {
                "agents.connected": connected, "tasks.active": counts[0], "tasks.disabled": counts[1],
                **broker}).addCallback(with_stale).addErrback(unavailable)

        GaugeReporter(stats, reactor, gauges, GAUGE_INTERVAL).setServiceParent(root)
    if stats.statsd_enabled:
        log.info("sending metrics to statsd at {addr} ({flavour}), prefix {prefix}", addr=settings.statsd_addr,
                 flavour=settings.statsd_type, prefix=stats.prefix)
    listener = ListenerService(reactor, settings.addr, site)
    listener.setServiceParent(root)
    if metrics is not None and settings.metrics_addr:
        from twisted.web.server import Site

        metrics_site = Site(metrics)
        metrics_site.noisy = False
        ListenerService(reactor, settings.metrics_addr, metrics_site).setServiceParent(root)
        log.info("Prometheus metrics at {addr} (GET /metrics)", addr=settings.metrics_addr)
    elif metrics is not None:
        log.info("Prometheus metrics at GET /metrics on the main port (not proxied by the nginx site)")
    if not settings.admin_key:
        log.warn("admin-key is empty: only keys accepted by {endpoint} can use the API", endpoint=settings.auth_endpoint)
    log.info("server instance {id}; events {where}", id=instance_id,
             where=f"over RabbitMQ exchange {settings.exchange}" if settings.exchange else "in-process")
    return Server(root, engine, db.pool, events, agents, tasks, api, listener, sessions, dispatcher, instance_id, stats,
                  status, db, liveness=liveness)


def instance_identity(settings: Any) -> str:
    """Names this server on its session rows. Default hostname:port, so two servers on
    one host never clear each other's sessions at start-up."""
    if getattr(settings, "instance_id", ""):
        return settings.instance_id
    port = ""
    for part in settings.addr.split(":")[1:]:
        if part.isdigit():
            port = part
            break
    if not port or port == "0":
        port = f"pid{os.getpid()}"
    return f"{socket_module.gethostname()}:{port}"


def make_service(settings: Any) -> MultiService:
    log.info("taskd task-server {version} starting", version=taskd.__version__)
    if getattr(settings, "config_file_missing", False):
        log.info("no config file at {path}; using defaults, flags and environment", path=settings.config_path)
    return build_server(settings).service
