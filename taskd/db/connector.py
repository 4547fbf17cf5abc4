"""The one object the rest of taskd holds for the database (as Buildbot's `master.db`).

It owns the thread pool and one store per aggregate — `tasks`, `agents`, `catalog`,
`sessions`, `status`, `routes`, `servers` — so every query runs through a store method returning
dataclasses, and `pool.do` stays private to this package: the server's services and
sessions never compose SQL functions themselves, and a fake of the stores is a fake of
the whole database.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine

from taskd.db.agents import AgentStore
from taskd.db.catalog import CatalogStore
from taskd.db.pool import DEFAULT_TIMEOUT, DBPool
from taskd.db.routes import RouteStore
from taskd.db.servers import ServerStore
from taskd.db.sessions import SessionStore
from taskd.db.taskstatus import StatusStore
from taskd.db.tasks import TaskStore


class Database:
    def __init__(self, pool: DBPool, heartbeat_pool: DBPool | None = None) -> None:
        # `pool` is for this package and for tests that inspect the database; the
        # server's code calls the stores. `heartbeat_pool`: the servers store's own
        # thread and connection (see `open`).
        self.pool = pool
        self.heartbeat_pool = heartbeat_pool
        self.tasks = TaskStore(pool)
        self.agents = AgentStore(pool)
        self.catalog = CatalogStore(pool)
        self.sessions = SessionStore(pool)
        self.status = StatusStore(pool)
        self.routes = RouteStore(pool)
        self.servers = ServerStore(heartbeat_pool or pool)

    @classmethod
    def open(cls, engine: Engine, reactor: Any, *, max_threads: int | None = None,
             timeout: float | None = DEFAULT_TIMEOUT, own_heartbeat_connection: bool = False) -> "Database":
        """A connector over a new pool (started by `start`); `timeout`: db-timeout.

        `own_heartbeat_connection`: the server liveness heartbeat (the `servers` store)
        gets a thread and connection of its own, so that a busy server — hundreds of
        API reads, or the event backlog after a broker reconnect, queued in the main
        pool — still beats on time and is not reaped by its peers as dead while it
        serves. The engine must then hold one connection more than `max_threads`."""
        pool = DBPool(engine, reactor, max_threads=max_threads, timeout=timeout)
        beats = None
        if own_heartbeat_connection:
            beats = DBPool(engine, reactor, max_threads=1, timeout=timeout)
            beats.availability = pool.availability  # one outage, reported once
        return cls(pool, beats)

    def health(self) -> dict[str, Any]:
        """The database's last-known state, at once, and a background probe to keep it
        current (for `GET /`, which must answer while the database is stalled)."""
        self.pool.probe()
        return self.pool.availability.state()

    def start(self) -> None:
        self.pool.start()
        if self.heartbeat_pool is not None:
            self.heartbeat_pool.start()

    def stop(self) -> None:
        if self.heartbeat_pool is not None:
            self.heartbeat_pool.stop()
        self.pool.stop()
