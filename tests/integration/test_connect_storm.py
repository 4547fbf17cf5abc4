"""Many agents connecting at once (a reconnect storm after a restart): each ends online
with its correct first taskList, and the server records them in batches, not one
transaction per agent. Real server, sockets and SQL (sqlite and MariaDB)."""
from __future__ import annotations

import pytest
import pytest_twisted
import sqlalchemy as sa
from twisted.internet.defer import Deferred, gatherResults

from taskd.db import models
from taskd.db.sessions import SessionStore
from tests.integration.agent_client import connect_agent
from tests.integration.harness import ADMIN_KEY
from tests.waiting import until

N = 40
TASK = {"metrics": {}, "config": {}, "interval": 60, "enabled": True}


@pytest_twisted.ensureDeferred
async def test_agents_connecting_at_once_are_recorded_in_batches_with_correct_task_lists(api):
    names = [f"storm{i:02d}" for i in range(N)]
    ids = {}
    for i, name in enumerate(names):
        tags = ["even"] if i % 2 == 0 else ["odd"]
        ids[name] = (await api.ok("POST", "/api/v1/agents", json_body={"name": name, "tags": tags}))["id"]
    even = await api.ok("POST", "/api/v1/tasks", json_body={**TASK, "name": "even", "route": {
        "type": "byTags", "config": {"tags": ["even"]}}})
    one = await api.ok("POST", "/api/v1/tasks", json_body={**TASK, "name": "one", "route": {
        "type": "byIds", "config": {"ids": [ids["storm07"]]}}})
    anywhere = await api.ok("POST", "/api/v1/tasks", json_body={**TASK, "name": "anywhere", "route": {"type": "any"}})

    batches: list[int] = []
    store = api.server.sessions.store
    original = store.open_many
    store.open_many = lambda items, **kw: batches.append(len(items)) or original(items, **kw)
    try:
        clients = [connect_agent(api.base, name, ADMIN_KEY) for name in names]
        lists = await gatherResults([Deferred.fromCoroutine(c.next("taskList", timeout=30)) for c in clients])
    finally:
        del store.open_many

    assert sum(batches) == N and len(batches) < N, batches
    holders = []
    for i, (name, listed) in enumerate(zip(names, lists)):
        got = sorted(t["id"] for t in listed)
        want = ([even["id"]] if i % 2 == 0 else []) + ([one["id"]] if name == "storm07" else [])
        if anywhere["id"] in got:
            holders.append(name)
            got.remove(anywhere["id"])
        assert got == sorted(want), name
    # the `any` task was waiting for an agent: exactly one of them got it, in its first list
    assert len(holders) == 1
    shown = await api.ok("GET", f"/api/v1/tasks/{anywhere['id']}")
    assert shown["agents"] == [ids[holders[0]]]
    listed = await api.ok("GET", "/api/v1/agents", params={"limit": 1000})
    assert all(a["online"] for a in listed if a["name"] in names)
    for client in clients:
        await client.disconnect()
    await until(lambda: api.server.sessions.sessions == {})


@pytest_twisted.ensureDeferred
async def test_open_many_records_sessions_and_online_changes_in_one_go(api):
    a1 = await api.ok("POST", "/api/v1/agents", json_body={"name": "m1"})
    a2 = await api.ok("POST", "/api/v1/agents", json_body={"name": "m2"})
    store = SessionStore(api.server.pool)
    results = await store.open_many([(a1["id"], 1, "10.0.0.1"), (a2["id"], 2, "10.0.0.2"),
                                     (a1["id"], 1, "10.0.0.3"), (999999, 1, "10.0.0.4")], server="srv-x")
    (s1, c1), (s2, c2), (s3, c3), (s4, c4) = results
    assert c1.agent_id == a1["id"] and c1.online and c1.name == "m1"
    assert c2.agent_id == a2["id"]
    assert c3 is None  # the same agent changes once
    assert s4 is None and c4 is None  # no such agent: no session
    assert len({s1, s2, s3}) == 3
    with api.server.engine.connect() as conn:
        rows = conn.execute(sa.select(models.agent_session.c.id, models.agent_session.c.server,
                                      models.agent_session.c.remote_ip)).all()
        online = dict(conn.execute(sa.select(models.agent.c.name, models.agent.c.online)).all())
    assert sorted((r.id, r.server, r.remote_ip) for r in rows) == sorted(
        [(s1, "srv-x", "10.0.0.1"), (s2, "srv-x", "10.0.0.2"), (s3, "srv-x", "10.0.0.3")])
    assert online == {"m1": True, "m2": True}
    again = await store.open_many([(a2["id"], 1, "10.0.0.5")], server="srv-x")
    assert again[0][1] is None  # already online
    await store.clear_server("srv-x")


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
