"""Agent sessions: which server holds which agent's websocket, and online/offline.

An agent is online while it has at least one session row on any server. Opening and
closing a session and the online flag change together in one transaction, so two
servers can never leave an agent marked online with no session (or the reverse).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred

from taskd.db import models as m
from taskd.db.pool import DBPool
from taskd.timeutil import utcnow


@dataclass(frozen=True)
class OnlineChange:
    agent_id: int
    name: str
    org_id: int
    online: bool


def _set_online(conn: Connection, agent_id: int, online: bool, now: datetime) -> OnlineChange | None:
    """Flip the flag if needed; returns the change, or None if it already was so."""
    row = conn.execute(
        sa.select(m.agent.c.name, m.agent.c.org_id, m.agent.c.online).where(m.agent.c.id == agent_id)
    ).first()
    if row is None or bool(row.online) == online:
        return None
    conn.execute(sa.update(m.agent).where(m.agent.c.id == agent_id).values(online=online, online_change=now))
    return OnlineChange(agent_id, row.name, row.org_id, online)


def _sessionless(conn: Connection, agent_id: int) -> bool:
    return conn.execute(
        sa.select(sa.func.count()).select_from(m.agent_session).where(m.agent_session.c.agent_id == agent_id)
    ).scalar() == 0


class SessionStore:
    def __init__(self, pool: DBPool, now: Callable[[], datetime] = utcnow) -> None:
        self.pool = pool
        self.now = now

    def open(self, agent_id: int, *, version: int, remote_ip: str, server: str) -> "Deferred[tuple[str, OnlineChange | None]]":
        session_id = str(uuid.uuid4())
        now = self.now()

        def thd(conn: Connection) -> tuple[str, OnlineChange | None]:
            _supersede(conn, [agent_id], server)
            conn.execute(sa.insert(m.agent_session).values(
                id=session_id, agent_id=agent_id, version=version, remote_ip=remote_ip[:64],
                server=server, created=now,
            ))
            return session_id, _set_online(conn, agent_id, True, now)

        return self.pool.do(thd)

    def open_many(self, items: Sequence[tuple[int, int, str]], *, server: str) -> "Deferred[list[tuple[str, OnlineChange | None]]]":
        """`open` for many (agent id, version, remote ip) in one transaction: one insert
        of all session rows, one update of the agents that were offline. Returns
        (session id, online change) per item, in order; an agent listed twice changes
        (at most) once; an agent that no longer exists gets no session (None). The newest
        session wins: the agents' rows on other servers go (see `_supersede`)."""
        return self.pool.do(_open_many, list(items), server, self.now())

    def close(self, session_id: str, agent_id: int) -> "Deferred[OnlineChange | None]":
        """Drop the session; the agent goes offline if it has no session left anywhere."""
        now = self.now()

        def thd(conn: Connection) -> OnlineChange | None:
            conn.execute(sa.delete(m.agent_session).where(m.agent_session.c.id == session_id))
            if _sessionless(conn, agent_id):
                return _set_online(conn, agent_id, False, now)
            return None

        return self.pool.do(thd)

    def clear_server(self, server: str) -> "Deferred[list[OnlineChange]]":
        """Forget every session `server` holds (at shutdown) and mark the agents left
        without a session offline."""
        return self.pool.do(_clear_server, server, self.now())

    def clear_server_now(self, server: str) -> list[OnlineChange]:
        """The same, blocking: for start-up, before the reactor runs."""
        return self.pool.run_sync(_clear_server, server, self.now())


def _clear_server(conn: Connection, server: str, now: datetime) -> list[OnlineChange]:
    s = m.agent_session.c
    agent_ids = conn.execute(sa.select(s.agent_id).where(s.server == server).distinct()).scalars().all()
    conn.execute(sa.delete(m.agent_session).where(s.server == server))
    changes = []
    for agent_id in agent_ids:
        if _sessionless(conn, agent_id):
            change = _set_online(conn, agent_id, False, now)
            if change:
                changes.append(change)
    # Agents marked online with no session anywhere are offline too: a session row and
    # the online flag are only ever written together, so this is left-over state.
    stray = conn.execute(
        sa.select(m.agent.c.id).where(m.agent.c.online.is_(True), ~m.agent.c.id.in_(sa.select(s.agent_id)))
    ).scalars().all()
    for agent_id in stray:
        change = _set_online(conn, agent_id, False, now)
        if change:
            changes.append(change)
    return changes


def _supersede(conn: Connection, agent_ids: Sequence[int], server: str) -> None:
    """An agent that connects here has left any other server, even one that has not
    noticed yet (a socket that died unseen): its rows there go, so that server's late
    status flushes (written only for agents with a session on it) stop at once, and its
    `agent.connected` handling closes the stale socket (taskd.server.sessions)."""
    s = m.agent_session.c
    conn.execute(sa.delete(m.agent_session).where(s.agent_id.in_(list(agent_ids)), s.server != server))


def _open_many(conn: Connection, items: list[tuple[int, int, str]], server: str,
               now: datetime) -> list[tuple[str | None, OnlineChange | None]]:
    if not items:
        return []
    ids = sorted({agent_id for agent_id, _, _ in items})
    a = m.agent.c
    # Locked (MySQL) so that an agent deleted meanwhile cannot fail the whole batch on the
    # foreign key; one deleted before is skipped (its session id is None).
    rows = {r.id: r for r in conn.execute(
        sa.select(a.id, a.name, a.org_id, a.online).where(a.id.in_(ids)).order_by(a.id).with_for_update())}
    session_ids = [str(uuid.uuid4()) if agent_id in rows else None for agent_id, _, _ in items]
    values = [
        {"id": sid, "agent_id": agent_id, "version": version, "remote_ip": remote_ip[:64], "server": server,
         "created": now}
        for sid, (agent_id, version, remote_ip) in zip(session_ids, items) if sid is not None
    ]
    if values:
        _supersede(conn, sorted(rows), server)
        conn.execute(sa.insert(m.agent_session), values)
    offline = [i for i in ids if i in rows and not rows[i].online]
    if offline:
        conn.execute(sa.update(m.agent).where(a.id.in_(offline)).values(online=True, online_change=now))
    pending = set(offline)
    out = []
    for sid, (agent_id, _, _) in zip(session_ids, items):
        change = None
        if agent_id in pending:
            pending.discard(agent_id)
            row = rows[agent_id]
            change = OnlineChange(agent_id, row.name, row.org_id, True)
        out.append((sid, change))
    return out
