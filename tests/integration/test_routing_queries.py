"""The routing read behind every push (db.routes.routing_snapshot): the same answer as
the capability rule, in a fixed number of statements whose parameters do not grow with
the number of agents (no IN-list of every agent a server holds; bench/analysis.md)."""
from __future__ import annotations

import threading

import pytest
import pytest_twisted
import sqlalchemy as sa

from taskd.db import models as m
from taskd.db.routes import routing_snapshot
from taskd.timeutil import utcnow

TASK = {"config": {}, "interval": 60, "enabled": True}


def add_agents(engine, names_tags_online: list[tuple[str, list[str], bool]], org_id: int = 1) -> dict[str, int]:
    now = utcnow()
    ids = {}
    with engine.begin() as conn:
        for name, tags, online in names_tags_online:
            agent_id = conn.execute(sa.insert(m.agent).values(
                org_id=org_id, name=name, enabled=True, public=False, online=online, online_change=now,
                created=now, updated=now)).inserted_primary_key[0]
            for tag in tags:
                conn.execute(sa.insert(m.agent_tag).values(org_id=org_id, agent_id=agent_id, tag=tag, created=now))
            ids[name] = agent_id
    return ids


def add_catalog(engine, agent_id: int, *metrics: tuple[str, int]) -> None:
    with engine.begin() as conn:
        for ns, ver in metrics:
            conn.execute(sa.insert(m.agent_metric).values(agent_id=agent_id, namespace=ns, version=ver,
                                                          created=utcnow()))


class Statements:
    """The SELECTs run on one thread: the server's own loops (heartbeat, sweep, gauges)
    share the engine and must not be counted as the routing read's."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.seen: list[tuple[str, int]] = []
        self.thread: int | None = None

    def __enter__(self):
        sa.event.listen(self.engine, "before_cursor_execute", self.record)
        return self

    def __exit__(self, *exc):
        sa.event.remove(self.engine, "before_cursor_execute", self.record)

    def record(self, conn, cursor, statement, parameters, context, executemany):
        if threading.get_ident() != self.thread:
            return
        n = len(parameters) if isinstance(parameters, (tuple, list, dict)) else 0
        if statement.strip().upper().startswith("SELECT"):
            self.seen.append((statement, n))


@pytest.mark.parametrize("n", [5, 60])
@pytest_twisted.ensureDeferred
async def test_routing_reads_a_fixed_number_of_statements_whatever_the_number_of_agents(api, n):
    engine = api.server.engine
    spec = [(f"r{i:03d}", ["all"] + (["other"] if i % 3 == 0 else []), i % 4 != 0) for i in range(n)]
    ids = add_agents(engine, spec)
    add_agents(engine, [("foreign", ["all"], True)], org_id=2)  # tags select the task's org only
    # a catalog that does not cover the task, one that does, and agents without any
    add_catalog(engine, ids["r001"], ("/other/thing", 1))
    add_catalog(engine, ids["r002"], ("/bench/load", 3))
    task = await api.ok("POST", "/api/v1/tasks", json_body={
        **TASK, "name": "tagged", "metrics": {"/bench/*": 0}, "route": {"type": "byTags", "config": {"tags": ["all"]}}})
    with Statements(engine) as statements:
        def snapshot(conn, task_id):
            statements.thread = threading.get_ident()
            try:
                return routing_snapshot(conn, task_id)
            finally:
                statements.thread = None  # the worker thread goes on to other callers' work
        found, routed = await api.server.pool.do(snapshot, task["id"])
    want = {ids[name] for name, _, online in spec if online} - {ids["r001"]}
    assert found.id == task["id"] and routed == want
    assert len(statements.seen) <= 4, statements.seen  # task, its metrics, agents, catalogs
    assert max(count for _, count in statements.seen) <= 4, statements.seen  # no list of agent ids

    by_ids = await api.ok("POST", "/api/v1/tasks", json_body={
        **TASK, "name": "pinned", "metrics": {}, "route": {"type": "byIds", "config": {"ids": [ids["r001"], ids["r004"]]}}})
    _, routed = await api.server.pool.do(routing_snapshot, by_ids["id"])
    assert routed == {ids["r001"]}  # r004 is offline; no metrics: any catalog covers


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
