"""The metric catalog: what each agent advertises, and the org-wide catalog built from it.

An org's catalog is derived: it holds exactly the (namespace, version) pairs some agent
of the org advertises, public when any such agent is public. Recomputing it from the
agents' rows inside the same transaction (rather than adding and never removing, as the
original did) keeps it from accumulating metrics nobody provides any more.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from twisted.internet.defer import Deferred

from taskd.db import models as m
from taskd.db.listing import Page, match, paginate
from taskd.db.pool import DBPool
from taskd.timeutil import utcnow


@dataclass(frozen=True)
class Metric:
    namespace: str
    version: int
    policy: Any
    public: bool
    created: datetime


@dataclass(frozen=True)
class MetricFilter:
    namespace: str | None = None
    version: int | None = None


ORDERABLE = {
    "namespace": m.metric.c.namespace,
    "version": m.metric.c.version,
    "created": m.metric.c.created,
    "public": m.metric.c.public,
}


def refresh_org_catalog(conn: Connection, org_id: int, now: datetime | None = None,
                        policies: dict[tuple[str, int], Any] | None = None) -> None:
    """Make the org's catalog rows exactly what its agents advertise.

    Two servers may refresh one org at once (two of its agents connect on two servers,
    both first to advertise a metric): both find the row missing, and the second insert
    waits for the first transaction, then fails on the unique key. Under READ COMMITTED
    the row is then visible, so the insert runs in a savepoint and, when it loses that
    race, the catalog is read again and the rest brought in line — the refresh never
    fails for it."""
    now = now or utcnow()
    policies = policies or {}
    am, ag = m.agent_metric.c, m.agent.c
    wanted: dict[tuple[str, int], bool] = {}
    rows = conn.execute(
        sa.select(am.namespace, am.version, ag.public)
        .select_from(m.agent_metric.join(m.agent, m.agent.c.id == am.agent_id))
        .where(ag.org_id == org_id)
    )
    for ns, ver, public in rows:
        wanted[(ns, ver)] = wanted.get((ns, ver), False) or bool(public)
    for attempt in range(_INSERT_RACES):
        have = {
            (r.namespace, r.version): r
            for r in conn.execute(sa.select(m.metric).where(m.metric.c.org_id == org_id))
        }
        gone = [have[key].id for key in have.keys() - wanted.keys()]
        if gone:
            conn.execute(sa.delete(m.metric).where(m.metric.c.id.in_(gone)))
        new = [{"org_id": org_id, "namespace": key[0], "version": key[1], "public": public,
                "policy": policies.get(key), "created": now}
               for key, public in sorted(wanted.items()) if key not in have]
        if not new:
            break
        try:
            with conn.begin_nested():  # one statement: PyMySQL sends it as one multi-row INSERT
                conn.execute(sa.insert(m.metric), new)
            break
        except IntegrityError:
            if attempt == _INSERT_RACES - 1:
                raise
    for key, public in wanted.items():
        row = have.get(key)
        if row is None:
            continue
        if bool(row.public) != public or key in policies:
            conn.execute(sa.update(m.metric).where(m.metric.c.id == row.id).values(
                public=public, policy=policies.get(key, row.policy),
            ))


_INSERT_RACES = 3  # concurrent refreshes of one org a refresh gives way to before it fails


class CatalogStore:
    def __init__(self, pool: DBPool, now: Callable[[], datetime] = utcnow) -> None:
        self.pool = pool
        self.now = now

    def list(self, org_id: int, flt: MetricFilter, page: Page) -> "Deferred[list[Metric]]":
        c = m.metric.c
        stmt = sa.select(m.metric).where(sa.or_(c.org_id == org_id, c.public.is_(True)))
        if flt.namespace is not None:
            stmt = stmt.where(match(c.namespace, flt.namespace))
        if flt.version is not None:
            stmt = stmt.where(c.version == flt.version)
        stmt = paginate(stmt, page, ORDERABLE, c.id)

        def thd(conn: Connection) -> list[Metric]:
            return [
                Metric(r.namespace, r.version, r.policy, bool(r.public), r.created)
                for r in conn.execute(stmt)
            ]

        return self.pool.do(thd)

    def agent_metrics(self, agent_id: int) -> "Deferred[list[Metric]]":
        am, ag, mt = m.agent_metric.c, m.agent.c, m.metric.c
        stmt = (
            sa.select(am.namespace, am.version, am.created, ag.public, mt.policy)
            .select_from(
                m.agent_metric.join(m.agent, ag.id == am.agent_id).outerjoin(
                    m.metric,
                    sa.and_(mt.org_id == ag.org_id, mt.namespace == am.namespace, mt.version == am.version),
                )
            )
            .where(am.agent_id == agent_id)
            .order_by(am.namespace, am.version)
        )

        def thd(conn: Connection) -> list[Metric]:
            return [
                Metric(r.namespace, r.version, r.policy, bool(r.public), r.created)
                for r in conn.execute(stmt)
            ]

        return self.pool.do(thd)

    def replace_agent_catalog(self, agent_id: int, records: Iterable[tuple[str, int, Any]]) -> "Deferred[int]":
        """Make the agent's metrics exactly `records` (namespace, version, policy): adds
        new ones, removes gone ones, refreshes the org catalog; returns how many it holds."""
        records = list(records)
        now = self.now()

        def thd(conn: Connection) -> int:
            agent = conn.execute(sa.select(m.agent.c.org_id).where(m.agent.c.id == agent_id)).first()
            if agent is None:
                return 0
            am = m.agent_metric.c
            wanted = {(ns, ver) for ns, ver, _ in records}
            have = {
                (r.namespace, r.version): r.id
                for r in conn.execute(sa.select(m.agent_metric).where(am.agent_id == agent_id))
            }
            gone = [have[k] for k in have.keys() - wanted]
            if gone:
                conn.execute(sa.delete(m.agent_metric).where(am.id.in_(gone)))
            new = wanted - have.keys()
            if new:
                conn.execute(sa.insert(m.agent_metric), [
                    {"agent_id": agent_id, "namespace": ns, "version": ver, "created": now} for ns, ver in sorted(new)
                ])
            policies = {(ns, ver): pol for ns, ver, pol in records if pol is not None}
            refresh_org_catalog(conn, agent.org_id, now, policies)
            return len(wanted)

        return self.pool.do(thd)
