"""Server liveness: each task-server's heartbeat row, and reaping the ones gone silent.

A server killed with SIGKILL, or whose host is lost, cannot delete its session rows;
without this its agents would stay online (and their `any` tasks unmoved) for ever.
So every running server keeps a row whose `last_seen` it refreshes, and any server
that finds a row silent for too long reaps it: the row, the dead server's sessions and
the online flag of agents left without a session go in one transaction.

Exactly one reaper wins: the transaction starts by deleting the instance row by its
per-start id *and* the cutoff it judged by, and only the one whose delete hit the row
goes on. Two reapers racing (or the silent server coming back and beating) can never
both clear the sessions, on MySQL (the row lock orders them) or on sqlite (one writer).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred

from taskd.db import models as m
from taskd.db.pool import DBPool
from taskd.db.sessions import OnlineChange, _clear_server
from taskd.timeutil import utcnow


@dataclass(frozen=True)
class ServerInstance:
    """One run of one server. `name` is what its session rows carry (its instance-id);
    `agents` is how many session rows it holds (filled in by `live`)."""

    id: str
    name: str
    hostname: str
    addr: str
    version: str
    started: datetime
    last_seen: datetime
    agents: int = 0


@dataclass(frozen=True)
class Reaped:
    """A silent instance this server removed, and the agents that went offline with it."""

    instance: ServerInstance
    changes: list[OnlineChange]


def _instance(row: sa.Row) -> ServerInstance:
    return ServerInstance(row.id, row.name, row.hostname, row.addr, row.version, row.started, row.last_seen)


class ServerStore:
    def __init__(self, pool: DBPool, now: Callable[[], datetime] = utcnow) -> None:
        self.pool = pool
        self.now = now

    def take_over_now(self, name: str) -> tuple[list[ServerInstance], list[OnlineChange]]:
        """At start-up, blocking, before any agent can connect: forget every previous run
        of the server called `name` (its instance rows, whatever their hostname, and its
        sessions); returns those runs and the agents that went offline."""
        return self.pool.run_sync(_take_over, name, self.now())

    def register(self, instance: ServerInstance) -> "Deferred[None]":
        def thd(conn: Connection) -> None:
            conn.execute(sa.insert(m.server_instance).values(
                id=instance.id, name=instance.name[:255], hostname=instance.hostname[:255],
                addr=instance.addr[:255], version=instance.version[:64], started=instance.started,
                last_seen=instance.last_seen))

        return self.pool.do(thd)

    def beat(self, instance_id: str) -> "Deferred[bool]":
        """Refresh `last_seen`; False when the row is gone (another server reaped this one)."""
        now = self.now()

        def thd(conn: Connection) -> bool:
            res = conn.execute(sa.update(m.server_instance).where(m.server_instance.c.id == instance_id)
                               .values(last_seen=now))
            return res.rowcount == 1

        return self.pool.do(thd)

    def silent(self, cutoff: datetime, *, exclude: str) -> "Deferred[list[ServerInstance]]":
        """Instances last seen before `cutoff`, other than `exclude` (the caller's own)."""
        s = m.server_instance.c

        def thd(conn: Connection) -> list[ServerInstance]:
            rows = conn.execute(sa.select(m.server_instance).where(s.last_seen < cutoff, s.id != exclude)
                                .order_by(s.last_seen))
            return [_instance(r) for r in rows]

        return self.pool.do(thd)

    def reap(self, instance: ServerInstance, cutoff: datetime) -> "Deferred[Reaped | None]":
        """Remove `instance` if it is still silent since before `cutoff`; None when
        another server reaped it first or it beat meanwhile."""
        return self.pool.do(_reap, instance, cutoff, self.now())

    def unregister(self, instance_id: str) -> "Deferred[None]":
        """At a clean stop (after the sessions were cleared)."""
        def thd(conn: Connection) -> None:
            conn.execute(sa.delete(m.server_instance).where(m.server_instance.c.id == instance_id))

        return self.pool.do(thd)

    def live(self, cutoff: datetime) -> "Deferred[list[ServerInstance]]":
        """Instances seen since `cutoff`, by name, each with the sessions it holds."""
        s, sess = m.server_instance.c, m.agent_session.c
        held = (sa.select(sess.server, sa.func.count().label("n")).group_by(sess.server).subquery())

        def thd(conn: Connection) -> list[ServerInstance]:
            rows = conn.execute(
                sa.select(m.server_instance, held.c.n)
                .select_from(m.server_instance.outerjoin(held, held.c.server == s.name))
                .where(s.last_seen >= cutoff).order_by(s.name, s.started))
            return [replace(_instance(r), agents=int(r.n or 0)) for r in rows]

        return self.pool.do(thd)


def _take_over(conn: Connection, name: str, now: datetime) -> tuple[list[ServerInstance], list[OnlineChange]]:
    s = m.server_instance.c
    previous = [_instance(r) for r in conn.execute(sa.select(m.server_instance).where(s.name == name))]
    conn.execute(sa.delete(m.server_instance).where(s.name == name))
    return previous, _clear_server(conn, name, now)


def _reap(conn: Connection, instance: ServerInstance, cutoff: datetime, now: datetime) -> Reaped | None:
    s = m.server_instance.c
    hit = conn.execute(sa.delete(m.server_instance).where(s.id == instance.id, s.last_seen < cutoff)).rowcount
    if hit != 1:
        return None
    # A newer run under the same name (restarted, or re-registered after being reaped
    # itself) owns the sessions carrying that name now: they are not the dead run's.
    successor = conn.execute(sa.select(sa.func.count()).select_from(m.server_instance)
                             .where(s.name == instance.name)).scalar()
    changes = [] if successor else _clear_server(conn, instance.name, now)
    return Reaped(instance, changes)
