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
    def __init__(self, pool: DBPool) -> None:
        # `pool` is for this package and for tests that inspect the database; the
        # server's code calls the stores.
        self.pool = pool
        self.tasks = TaskStore(pool)
        self.agents = AgentStore(pool)
        self.catalog = CatalogStore(pool)
        self.sessions = SessionStore(pool)
        self.status = StatusStore(pool)
        self.routes = RouteStore(pool)
        self.servers = ServerStore(pool)

    @classmethod
    def open(cls, engine: Engine, reactor: Any, *, max_threads: int | None = None,
             timeout: float | None = DEFAULT_TIMEOUT) -> "Database":
        """A connector over a new pool (started by `start`); `timeout`: db-timeout."""
        return cls(DBPool(engine, reactor, max_threads=max_threads, timeout=timeout))

    def health(self) -> dict[str, Any]:
        """The database's last-known state, at once, and a background probe to keep it
        current (for `GET /`, which must answer while the database is stalled)."""
        self.pool.probe()
        return self.pool.availability.state()

    def start(self) -> None:
        self.pool.start()

    def stop(self) -> None:
        self.pool.stop()
