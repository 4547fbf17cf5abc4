"""The agents aggregate: an agent, its tags and its advertised metrics."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from twisted.internet.defer import Deferred

from taskd.db import models as m
from taskd.db.catalog import refresh_org_catalog
from taskd.errors import Conflict, Forbidden, NotFound
from taskd.db.listing import Page, match, paginate
from taskd.db.pool import DBPool
from taskd.timeutil import utcnow


@dataclass(frozen=True)
class Agent:
    id: int
    org_id: int
    name: str
    enabled: bool
    enabled_change: datetime | None
    public: bool
    tags: tuple[str, ...]
    online: bool
    online_change: datetime | None
    created: datetime
    updated: datetime
    # Tags other orgs set on this (public) agent for their own byTags routing: (org, tag).
    # `tags` are the owner's. Each org sees and routes by its own (`tags_for`).
    org_tags: tuple[tuple[int, str], ...] = ()

    def visible_to(self, org_id: int) -> bool:
        return self.public or self.org_id == org_id

    def tags_for(self, org_id: int | None) -> tuple[str, ...]:
        """The tags `org_id` set on this agent: the owner's for the owner (or None: the
        owner's view), the org's own for another org."""
        if org_id is None or org_id == self.org_id:
            return self.tags
        return tuple(tag for org, tag in self.org_tags if org == org_id)


@dataclass(frozen=True)
class AgentFilter:
    name: str | None = None
    metric: str | None = None
    enabled: bool | None = None
    public: bool | None = None      # True: public only; False: own private; None: own + public
    tags: tuple[str, ...] = ()


ORDERABLE = {
    "id": m.agent.c.id,
    "name": m.agent.c.name,
    "enabled": m.agent.c.enabled,
    "enabledChange": m.agent.c.enabled_change,
    "public": m.agent.c.public,
    "online": m.agent.c.online,
    "onlineChange": m.agent.c.online_change,
    "created": m.agent.c.created,
    "updated": m.agent.c.updated,
}


def _tags_for(conn: Connection, owners: dict[int, int]) -> tuple[dict[int, tuple[str, ...]],
                                                                    dict[int, tuple[tuple[int, str], ...]]]:
    """(owner's tags, other orgs' (org, tag)) of each agent in `owners` (id -> org)."""
    own: dict[int, list[str]] = {i: [] for i in owners}
    other: dict[int, list[tuple[int, str]]] = {i: [] for i in owners}
    if owners:
        t = m.agent_tag.c
        rows = conn.execute(sa.select(t.agent_id, t.org_id, t.tag).where(t.agent_id.in_(list(owners)))
                            .order_by(t.org_id, t.tag))
        for agent_id, org_id, tag in rows:
            if org_id == owners[agent_id]:
                own[agent_id].append(tag)
            else:
                other[agent_id].append((org_id, tag))
    return {k: tuple(v) for k, v in own.items()}, {k: tuple(v) for k, v in other.items()}


def _agents(conn: Connection, rows: Iterable[sa.Row]) -> list[Agent]:
    rows = list(rows)
    tags, org_tags = _tags_for(conn, {r.id: r.org_id for r in rows})
    return [
        Agent(
            id=r.id,
            org_id=r.org_id,
            name=r.name,
            enabled=bool(r.enabled),
            enabled_change=r.enabled_change,
            public=bool(r.public),
            tags=tags[r.id],
            online=bool(r.online),
            online_change=r.online_change,
            created=r.created,
            updated=r.updated,
            org_tags=org_tags[r.id],
        )
        for r in rows
    ]


def load_agent(conn: Connection, agent_id: int) -> Agent | None:
    found = _agents(conn, conn.execute(sa.select(m.agent).where(m.agent.c.id == agent_id)))
    return found[0] if found else None


def load_agents(conn: Connection, agent_ids: Sequence[int]) -> dict[int, Agent]:
    """The agents of `agent_ids` that exist, by id (two queries for all of them)."""
    if not agent_ids:
        return {}
    rows = conn.execute(sa.select(m.agent).where(m.agent.c.id.in_(sorted(set(agent_ids)))))
    return {a.id: a for a in _agents(conn, rows)}


def _set_tags(conn: Connection, agent_id: int, org_id: int, tags: Sequence[str], now: datetime) -> None:
    """Replace the tags `org_id` set on the agent (other orgs' stay)."""
    conn.execute(sa.delete(m.agent_tag).where(m.agent_tag.c.agent_id == agent_id, m.agent_tag.c.org_id == org_id))
    if tags:
        conn.execute(
            sa.insert(m.agent_tag),
            [{"org_id": org_id, "agent_id": agent_id, "tag": t, "created": now} for t in sorted(set(tags))],
        )


def _name_taken(conn: Connection, org_id: int, name: str, except_id: int | None = None) -> bool:
    q = sa.select(m.agent.c.id).where(m.agent.c.org_id == org_id, m.agent.c.name == name)
    if except_id is not None:
        q = q.where(m.agent.c.id != except_id)
    return conn.execute(q).first() is not None


def _conflict(name: str) -> Conflict:
    return Conflict(f"an agent named {name!r} already exists in this org; choose another name")


class AgentStore:
    def __init__(self, pool: DBPool, now: Callable[[], datetime] = utcnow) -> None:
        self.pool = pool
        self.now = now

    def create(
        self, org_id: int, name: str, *, enabled: bool, public: bool, tags: Sequence[str],
        max_per_org: int | None = None,
    ) -> "Deferred[Agent]":
        """A new agent; Forbidden when the org already has `max_per_org` agents."""
        now = self.now()

        def thd(conn: Connection) -> Agent:
            if _name_taken(conn, org_id, name):
                raise _conflict(name)
            if max_per_org is not None:
                count = conn.execute(sa.select(sa.func.count()).select_from(m.agent)
                                     .where(m.agent.c.org_id == org_id)).scalar_one()
                if count >= max_per_org:
                    raise Forbidden(f"org {org_id} already has {count} agents, the most this server allows"
                                    " (max-agents-per-org); delete one first")
            try:
                agent_id = conn.execute(
                    sa.insert(m.agent).values(
                        org_id=org_id, name=name, enabled=enabled,
                        enabled_change=now if enabled else None, public=public,
                        online=False, online_change=None, created=now, updated=now,
                    )
                ).inserted_primary_key[0]
            except IntegrityError:
                raise _conflict(name) from None
            _set_tags(conn, agent_id, org_id, tags, now)
            return load_agent(conn, agent_id)

        return self.pool.do(thd)

    def get(self, agent_id: int) -> "Deferred[Agent | None]":
        return self.pool.do(load_agent, agent_id)

    def get_many(self, agent_ids: Sequence[int]) -> "Deferred[dict[int, Agent]]":
        """The agents of `agent_ids` that exist, by id, in one transaction."""
        return self.pool.do(load_agents, list(agent_ids))

    def get_by_name(self, org_id: int, name: str) -> "Deferred[Agent | None]":
        def thd(conn: Connection) -> Agent | None:
            rows = conn.execute(
                sa.select(m.agent).where(m.agent.c.org_id == org_id, m.agent.c.name == name)
            )
            found = _agents(conn, rows)
            return found[0] if found else None

        return self.pool.do(thd)

    def get_many_by_name(self, keys: Sequence[tuple[int, str]], *,
                         waited: float = 0.0) -> "Deferred[dict[tuple[int, str], Agent]]":
        """Agents by (org id, name), in one transaction; missing ones are left out.
        `waited`: seconds the longest-waiting caller has already waited for this read
        (queued behind another), taken off its db-timeout."""
        def thd(conn: Connection) -> dict[tuple[int, str], Agent]:
            by_org: dict[int, set[str]] = {}
            for org_id, name in keys:
                by_org.setdefault(org_id, set()).add(name)
            if not by_org:
                return {}
            a = m.agent.c
            where = sa.or_(*(sa.and_(a.org_id == org_id, a.name.in_(sorted(names)))
                             for org_id, names in sorted(by_org.items())))
            return {(agent.org_id, agent.name): agent
                    for agent in _agents(conn, conn.execute(sa.select(m.agent).where(where)))}

        if self.pool.timeout is None:
            return self.pool.do(thd)
        return self.pool.do_within(self.pool.timeout - waited, thd)

    def list(self, org_id: int, flt: AgentFilter, page: Page) -> "Deferred[list[Agent]]":
        a = m.agent.c
        stmt = sa.select(m.agent)
        if flt.public is True:
            stmt = stmt.where(a.public.is_(True))
        elif flt.public is False:
            stmt = stmt.where(a.org_id == org_id, a.public.is_(False))
        else:
            stmt = stmt.where(sa.or_(a.org_id == org_id, a.public.is_(True)))
        if flt.name is not None:
            stmt = stmt.where(match(a.name, flt.name))
        if flt.enabled is not None:
            stmt = stmt.where(a.enabled.is_(flt.enabled))
        if flt.tags:  # the tags the listing org set (on its own agents, or on public ones)
            stmt = stmt.where(
                a.id.in_(sa.select(m.agent_tag.c.agent_id).where(m.agent_tag.c.org_id == org_id,
                                                                 m.agent_tag.c.tag.in_(flt.tags)))
            )
        if flt.metric is not None:
            stmt = stmt.where(
                a.id.in_(
                    sa.select(m.agent_metric.c.agent_id).where(match(m.agent_metric.c.namespace, flt.metric))
                )
            )
        stmt = paginate(stmt, page, ORDERABLE, a.id)
        return self.pool.do(lambda conn: _agents(conn, conn.execute(stmt)))

    def update(
        self, agent_id: int, *, name: str, enabled: bool, public: bool, tags: Sequence[str]
    ) -> "Deferred[tuple[Agent, Agent]]":
        """Replace the agent's fields and tags; returns (old, new)."""
        now = self.now()

        def thd(conn: Connection) -> tuple[Agent, Agent]:
            old = load_agent(conn, agent_id)
            if old is None:
                raise NotFound(f"agent {agent_id} does not exist")
            if name != old.name and _name_taken(conn, old.org_id, name, except_id=agent_id):
                raise _conflict(name)
            values: dict = {"name": name, "enabled": enabled, "public": public, "updated": now}
            if enabled != old.enabled:
                values["enabled_change"] = now
            try:
                conn.execute(sa.update(m.agent).where(m.agent.c.id == agent_id).values(**values))
            except IntegrityError:
                raise _conflict(name) from None
            if set(tags) != set(old.tags):
                _set_tags(conn, agent_id, old.org_id, tags, now)
            if public != old.public:
                # The agent's catalog entries follow its visibility.
                refresh_org_catalog(conn, old.org_id, now)
            return old, load_agent(conn, agent_id)

        return self.pool.do(thd)

    def set_org_tags(self, agent_id: int, org_id: int, tags: Sequence[str]) -> "Deferred[tuple[Agent, Agent]]":
        """Replace the tags another org (`org_id`) set on a public agent; (old, new).
        NotFound when the agent is gone or no longer public (checked in the same
        transaction as the write)."""
        now = self.now()

        def thd(conn: Connection) -> tuple[Agent, Agent]:
            old = load_agent(conn, agent_id)
            if old is None or not old.visible_to(org_id):
                raise NotFound(f"agent {agent_id} does not exist")
            if set(tags) != set(old.tags_for(org_id)):
                _set_tags(conn, agent_id, org_id, tags, now)
            return old, load_agent(conn, agent_id)

        return self.pool.do(thd)

    def delete(self, agent_id: int) -> "Deferred[Agent | None]":
        """Delete the agent; tags, sessions, metrics and routes go with it (cascade)."""

        def thd(conn: Connection) -> Agent | None:
            old = load_agent(conn, agent_id)
            if old is not None:
                # Explicit deletes as well as ON DELETE CASCADE: sqlite files created
                # with foreign keys off, or tables from older tools, stay consistent.
                for table in (m.agent_tag, m.agent_session, m.agent_metric, m.route_by_id_index, m.route_by_any_index,
                              m.task_status, m.agent_token):
                    conn.execute(sa.delete(table).where(table.c.agent_id == agent_id))
                conn.execute(sa.delete(m.agent).where(m.agent.c.id == agent_id))
                # The org catalog is derived from agents' metrics: drop what only it gave.
                refresh_org_catalog(conn, old.org_id)
            return old

        return self.pool.do(thd)

    def set_token(self, agent_id: int, token_hash: str) -> "Deferred[bool]":
        """Make `token_hash` the agent's only token (replacing any earlier one); False
        when the agent is gone."""
        now = self.now()

        def thd(conn: Connection) -> bool:
            if conn.execute(sa.select(m.agent.c.id).where(m.agent.c.id == agent_id)).first() is None:
                return False
            conn.execute(sa.delete(m.agent_token).where(m.agent_token.c.agent_id == agent_id))
            conn.execute(sa.insert(m.agent_token).values(agent_id=agent_id, token_hash=token_hash, created=now))
            return True

        return self.pool.do(thd)

    def by_token(self, token_hash: str) -> "Deferred[Agent | None]":
        """The agent whose token hashes to `token_hash`, if any."""

        def thd(conn: Connection) -> Agent | None:
            agent_id = conn.execute(sa.select(m.agent_token.c.agent_id)
                                    .where(m.agent_token.c.token_hash == token_hash)).scalar()
            return load_agent(conn, agent_id) if agent_id is not None else None

        return self.pool.do(thd)
