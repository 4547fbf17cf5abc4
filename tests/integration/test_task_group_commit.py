"""POST /api/v1/tasks under concurrency: creates arriving while a transaction runs are
written together in the next one, and each request still gets its own answer (a taken
name or a bad route fails only that request)."""
from __future__ import annotations

import pytest
import pytest_twisted
import sqlalchemy as sa
from twisted.internet.defer import Deferred, gatherResults

from taskd.db import models
from taskd.db import routes as routes_db
from taskd.db import tasks as task_db

TASK = {"metrics": {"/a/*": 0}, "config": {"/a": {"k": "v"}}, "interval": 60, "enabled": True,
        "route": {"type": "byTags", "config": {"tags": ["x"]}}}


@pytest_twisted.ensureDeferred
async def test_concurrent_creates_share_transactions_and_fail_alone(api):
    await api.ok("POST", "/api/v1/tasks", json_body={**TASK, "name": "taken"})
    store = api.server.tasks.tasks
    before = store.create_transactions
    bodies = [{**TASK, "name": f"t{i:02d}"} for i in range(12)]
    bodies[3] = {**TASK, "name": "taken"}
    bodies[7] = {**TASK, "name": "bad-route", "route": {"type": "byIds", "config": {"ids": [987654]}}}
    bodies[9] = {**TASK, "name": "t08"}  # the same name twice in one batch: only one wins
    replies = await gatherResults([Deferred.fromCoroutine(api.request("POST", "/api/v1/tasks", json_body=b))
                                   for b in bodies])
    statuses = [r.status for r in replies]
    assert statuses[3] == 409 and "taken" in replies[3].meta["message"]
    assert statuses[7] == 400 and "987654" in replies[7].meta["message"]
    assert sorted([statuses[8], statuses[9]]) == [200, 409]
    ok = [r.body for r in replies if r.status == 200]
    assert len(ok) == 9, [(r.status, r.meta) for r in replies]
    assert store.create_transactions - before < len(bodies)  # some shared a transaction
    for created in ok:  # what each request was answered is what was stored
        got = await api.ok("GET", f"/api/v1/tasks/{created['id']}")
        assert {k: got[k] for k in created} == created
    names = sorted(t["name"] for t in await api.ok("GET", "/api/v1/tasks", params={"limit": 100}))
    assert names == sorted(["taken"] + [b["name"] for i, b in enumerate(bodies) if i not in (3, 7, 9)])


@pytest_twisted.ensureDeferred
async def test_an_any_task_is_written_with_its_assignment_in_one_transaction(api, monkeypatch):
    agent = await api.ok("POST", "/api/v1/agents", json_body={"name": "anyone-agent", "enabled": True})
    with api.server.engine.begin() as conn:
        conn.execute(sa.update(models.agent).where(models.agent.c.id == agent["id"]).values(online=True))
    seen = []  # the connection each step ran on
    real_create, real_assign = task_db._create, routes_db.ensure_any_assignment

    def create(conn, *args):
        seen.append(("create", conn))
        return real_create(conn, *args)

    def assign(conn, task):
        seen.append(("assign", conn))
        return real_assign(conn, task)

    monkeypatch.setattr(task_db, "_create", create)
    monkeypatch.setattr(routes_db, "ensure_any_assignment", assign)
    created = await api.ok("POST", "/api/v1/tasks", json_body={**TASK, "name": "anyone", "route": {"type": "any"}})
    assert [step for step, _ in seen] == ["create", "assign"]
    assert seen[0][1] is seen[1][1]  # one connection, one transaction
    got = await api.ok("GET", f"/api/v1/tasks/{created['id']}")
    assert got["agents"] == [agent["id"]]


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest_twisted.ensureDeferred
async def test_a_batch_inserts_its_tasks_in_one_statement_on_mariadb(api):
    """On MariaDB (INSERT ... RETURNING) a group-commit batch writes all its tasks, and
    each kind of child row, in one statement each; sqlite inserts its tasks one by one."""
    agent = await api.ok("POST", "/api/v1/agents", json_body={"name": "one-statement", "enabled": True})
    store = api.server.tasks.tasks
    inserts: list[str] = []

    def seen(conn, cursor, statement, params, context, executemany):
        if statement.startswith(("INSERT INTO task ", "INSERT INTO task_metric", "INSERT INTO route_by_id_index")):
            inserts.append(statement.split(" (")[0])

    sa.event.listen(api.server.engine, "before_cursor_execute", seen)
    try:
        before = store.create_transactions
        bodies = [{**TASK, "name": f"many{i:02d}", "route": {"type": "byIds", "config": {"ids": [agent["id"]]}}}
                  for i in range(10)]
        replies = await gatherResults([Deferred.fromCoroutine(api.request("POST", "/api/v1/tasks", json_body=b))
                                       for b in bodies])
    finally:
        sa.event.remove(api.server.engine, "before_cursor_execute", seen)
    assert [r.status for r in replies] == [200] * 10
    transactions = store.create_transactions - before
    assert transactions < len(bodies)  # some were batched
    task_inserts = inserts.count("INSERT INTO task")
    if api.server.engine.dialect.name == "mysql":
        assert task_inserts == transactions
        assert inserts.count("INSERT INTO task_metric") == transactions
        assert inserts.count("INSERT INTO route_by_id_index") == transactions
    else:
        assert task_inserts == len(bodies)
    for created, body in zip((r.body for r in replies), bodies):  # each answer names its own task
        got = await api.ok("GET", f"/api/v1/tasks/{created['id']}")
        assert got["name"] == body["name"] == created["name"] and got["route"] == body["route"]
