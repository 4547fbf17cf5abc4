"""Task status end to end, on sqlite and MariaDB: an agent's `taskStatus` frames reach
GET /tasks/<id> (`status`) and GET /agents (`failingTasks`) after a flush; only tasks the
agent was sent count; bad input costs a log line, never the socket; bursts are written
in one transaction; and the store's SQL behaves the same on both databases.
"""
from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import pytest
import pytest_twisted
import sqlalchemy as sa
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from taskd.db import models
from taskd.db import taskstatus as status_db
from taskd.db.taskstatus import TaskStatusRow
from taskd.wire import framing
from tests.integration.agent_client import AgentClient, connect_agent
from tests.integration.harness import ADMIN_KEY, ORG2_KEY, start_server, stop_server
from tests.waiting import until, value_of

AGENTS, TASKS = "/api/v1/agents", "/api/v1/tasks"
RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
T0 = datetime(2026, 1, 2, 3, 4, 5)
FLUSH = 0.2


def status(task_id: int, **over: Any) -> dict:
    entry = {"taskId": task_id, "executor": "snap", "outcome": "ok", "error": "", "lastRun": 1767323045.25,
             "duration": 0.5, "metrics": None, "runs": 3, "failures": 0, "skipped": 0}
    entry.update(over)
    return entry


def count(engine: sa.Engine, *where: Any) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(models.task_status).where(*where)).scalar()


class Logs:
    """What the server says about an agent's status frames: taskd.server.statusintake at
    info and above, and the bad-frame complaints (taskd.server.badframes) at warn."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, event: dict) -> None:
        level = event.get("log_level")
        namespace = event.get("log_namespace", "")
        if level is None:
            return
        if (namespace.startswith("taskd.server.statusintake") and level >= LogLevel.info) or \
                (namespace.startswith("taskd.server.badframes") and level >= LogLevel.warn):
            self.lines.append(formatEvent(event))

    def __enter__(self) -> "Logs":
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        globalLogPublisher.removeObserver(self)


@pytest_twisted.async_yield_fixture
async def api(db_config):
    running = await start_server(*db_config, status_flush_interval=FLUSH)
    yield running
    await stop_server(running)


async def online(api, name: str, key: str = ADMIN_KEY) -> tuple[AgentClient, int]:
    client = connect_agent(api.base, name, key)
    await client.opened
    await client.next("taskList")
    [agent] = await api.ok("GET", AGENTS, key=key, params={"name": name})
    return client, agent["id"]


async def task_for(api, client: AgentClient, agent_id: int, name: str, key: str = ADMIN_KEY) -> int:
    """A task routed to the agent, once the agent has been sent it."""
    task = await api.ok("POST", TASKS, key=key, json_body={
        "name": name, "interval": 60, "enabled": True, "route": {"type": "byIds", "config": {"ids": [agent_id]}}})
    await client.next("taskAdd", predicate=lambda t: t["id"] == task["id"])
    return task["id"]


async def task_status(api, task_id: int, key: str = ADMIN_KEY) -> list[dict]:
    return (await api.ok("GET", f"{TASKS}/{task_id}", key=key))["status"]


async def until_api(fetch: Any, check: Any, what: str, timeout: float = 10.0) -> Any:
    """Poll an API read until `check(result)` holds; returns the result."""
    return await value_of(fetch, check, timeout, what, interval=0.05)


async def still_open(client: AgentClient) -> None:
    seen = len(client.events("heartbeat"))
    await until(lambda: len(client.events("heartbeat")) >= seen + 2 or client.closed.called, what="2 heartbeats")
    assert not client.closed.called, (client.close_code, client.close_reason)


# -- the API shows what agents report --------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_an_error_shows_on_the_task_and_counts_on_the_agent_until_ok(api):
    client, agent_id = await online(api, "reporter")
    other, other_id = await online(api, "quiet")
    task_id = await task_for(api, client, agent_id, "watched")
    assert await task_status(api, task_id) == []

    client.send(framing.TASK_STATUS, [status(task_id, outcome="error", error="collector timed out", runs=4,
                                             failures=1, metrics=7)])
    [row] = await until_api(lambda: task_status(api, task_id), bool, "a status")
    assert row == {
        "agentId": agent_id, "agentName": "reporter", "executor": "snap", "outcome": "error",
        "error": "collector timed out", "lastRun": "2026-01-02T03:04:05.250000Z", "duration": 0.5, "metrics": 7,
        "runs": 4, "failures": 1, "skipped": 0, "updated": row["updated"],
    }
    assert RFC3339_UTC.match(row["updated"])
    agent = await api.ok("GET", f"{AGENTS}/{agent_id}")
    assert agent["failingTasks"] == 1 and agent["name"] == "reporter" and agent["online"] is True
    listed = {a["name"]: a["failingTasks"] for a in await api.ok("GET", AGENTS)}
    assert listed == {"reporter": 1, "quiet": 0}

    # What GET returned can be PUT back: the read-only fields are accepted and ignored.
    task = await api.ok("GET", f"{TASKS}/{task_id}")
    assert (await api.ok("PUT", TASKS, json_body={**task, "interval": 30}))["interval"] == 30
    renamed = await api.ok("PUT", AGENTS, json_body={**agent, "tags": ["dc1"]})
    assert renamed["tags"] == ["dc1"]

    client.send(framing.TASK_STATUS, [status(task_id, outcome="ok", runs=5, failures=1, lastRun=None)])
    await until_api(lambda: api.ok("GET", f"{AGENTS}/{agent_id}"), lambda a: a["failingTasks"] == 0,
                    "failingTasks back to 0")
    [row] = await task_status(api, task_id)
    assert (row["outcome"], row["runs"], row["lastRun"], row["error"]) == ("ok", 5, None, "")
    await client.disconnect()
    await other.disconnect()


@pytest_twisted.ensureDeferred
async def test_statuses_for_tasks_not_sent_to_the_agent_are_ignored(api):
    client, agent_id = await online(api, "honest")
    own = await task_for(api, client, agent_id, "own")
    # Another org's task, running on that org's own agent.
    stranger, stranger_id = await online(api, "stranger", key=ORG2_KEY)
    foreign = await task_for(api, stranger, stranger_id, "foreign", key=ORG2_KEY)
    # A task of the same org that is routed elsewhere.
    elsewhere = await task_for(api, stranger, stranger_id, "elsewhere")

    client.send(framing.TASK_STATUS, [status(foreign, outcome="error"), status(elsewhere, outcome="error"),
                                      status(own), status(999999)])
    await until_api(lambda: task_status(api, own), bool, "the agent's own status")
    assert await task_status(api, foreign, key=ORG2_KEY) == []
    assert await task_status(api, elsewhere) == []
    assert count(api.server.engine) == 1
    assert (await api.ok("GET", f"{AGENTS}/{agent_id}"))["failingTasks"] == 0
    await still_open(client)
    await client.disconnect()
    await stranger.disconnect()


@pytest_twisted.ensureDeferred
async def test_a_removal_marker_deletes_the_agents_status(api):
    client, agent_id = await online(api, "remover")
    kept, dropped = await task_for(api, client, agent_id, "kept"), await task_for(api, client, agent_id, "dropped")
    client.send(framing.TASK_STATUS, [status(kept), status(dropped, outcome="error")])
    await until(lambda: count(api.server.engine) == 2, what="two status rows")
    client.send(framing.TASK_STATUS, [{"taskId": dropped, "removed": True}])
    await until_api(lambda: task_status(api, dropped), lambda s: s == [], "the status removed")
    assert len(await task_status(api, kept)) == 1
    assert (await api.ok("GET", f"{AGENTS}/{agent_id}"))["failingTasks"] == 0
    await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_deleting_a_task_or_an_agent_deletes_their_statuses(api):
    engine = api.server.engine
    one, one_id = await online(api, "one")
    two, two_id = await online(api, "two")
    first, second = await task_for(api, one, one_id, "first"), await task_for(api, one, one_id, "second")
    shared = await api.ok("POST", TASKS, json_body={
        "name": "shared", "interval": 60, "enabled": True,
        "route": {"type": "byIds", "config": {"ids": [one_id, two_id]}}})
    await one.next("taskAdd", predicate=lambda t: t["id"] == shared["id"])
    await two.next("taskAdd", predicate=lambda t: t["id"] == shared["id"])
    one.send(framing.TASK_STATUS, [status(first), status(second), status(shared["id"], outcome="error")])
    two.send(framing.TASK_STATUS, [status(shared["id"], outcome="error")])
    await until(lambda: count(engine) == 4, what="four status rows")
    assert [s["agentName"] for s in await task_status(api, shared["id"])] == ["one", "two"]

    await api.ok("DELETE", f"{TASKS}/{first}")
    assert count(engine, models.task_status.c.task_id == first) == 0 and count(engine) == 3
    await two.disconnect()
    await api.ok("DELETE", f"{AGENTS}/{two_id}")
    assert count(engine, models.task_status.c.agent_id == two_id) == 0 and count(engine) == 2
    assert [s["agentName"] for s in await task_status(api, shared["id"])] == ["one"]
    await one.disconnect()


@pytest.mark.parametrize("payload, says", [
    pytest.param(b"{not json", "taskStatus payload is not JSON", id="not-json"),
    pytest.param(b'{"taskId": 1}', "must be a JSON array", id="not-an-array"),
    pytest.param(b"", "must be a JSON array", id="empty"),
])
@pytest_twisted.ensureDeferred
async def test_a_bad_payload_is_logged_and_the_socket_stays(api, payload, says):
    client, agent_id = await online(api, "sloppy")
    task_id = await task_for(api, client, agent_id, "t1")
    with Logs() as logs:
        client.send_raw(framing.encode(framing.TASK_STATUS, payload))
        await until(lambda: logs.lines, what="a log line")
    [line] = logs.lines
    assert f"agent sloppy ({agent_id}) sent a bad taskStatus" in line and says in line, line
    await still_open(client)
    client.send(framing.TASK_STATUS, [status(task_id)])  # later frames still count
    await until_api(lambda: task_status(api, task_id), bool, "a status after the bad one")
    await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_bad_entries_are_logged_once_and_the_good_ones_kept(api):
    client, agent_id = await online(api, "mixed")
    task_id = await task_for(api, client, agent_id, "t1")
    with Logs() as logs:
        client.send(framing.TASK_STATUS, [{"taskId": task_id, "outcome": "bogus", "executor": "snap"},
                                          status(task_id, runs=-5), "junk", status(task_id, runs=8)])
        await until_api(lambda: task_status(api, task_id), bool, "the good entry")
    assert (await task_status(api, task_id))[0]["runs"] == 8
    [line] = logs.lines
    assert f"agent mixed ({agent_id}) sent 3 bad taskStatus entries, ignored" in line
    assert "outcome must be one of ok, error, pending" in line and "runs must be an integer" in line
    await still_open(client)
    await client.disconnect()


# -- bulk --------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_three_thousand_statuses_are_one_flush(api):
    engine, pool = api.server.engine, api.server.pool
    agent = await api.ok("POST", AGENTS, json_body={"name": "busy", "enabled": True})
    with engine.begin() as conn:
        first = conn.execute(sa.select(sa.func.coalesce(sa.func.max(models.task.c.id), 0))).scalar() + 1
        ids = list(range(first, first + 3000))
        conn.execute(sa.insert(models.task), [
            {"id": i, "org_id": 1, "name": f"bulk-{i}", "task_type": "", "config": {}, "interval": 60,
             "route": {"type": "byIds", "config": {"ids": [agent["id"]]}}, "enabled": True,
             "created": T0, "updated": T0} for i in ids])
        conn.execute(sa.insert(models.route_by_id_index),
                     [{"task_id": i, "agent_id": agent["id"], "created": T0} for i in ids])
    client = connect_agent(api.base, "busy", ADMIN_KEY)
    await client.opened
    assert len(await client.next("taskList", timeout=30)) == 3000

    applied: list[int] = []
    inserts: list[str] = []
    real_do = pool.do

    def counting_do(fn: Any, *args: Any, **kw: Any):
        if fn is status_db.apply:
            applied.append(len(args[0]))
        return real_do(fn, *args, **kw)

    def statement(conn: Any, cursor: Any, stmt: str, *rest: Any) -> None:
        if stmt.lstrip().upper().startswith("INSERT INTO TASK_STATUS"):
            inserts.append(stmt)

    service = api.server.status
    flushes = service.flushes
    pool.do = counting_do
    sa.event.listen(engine, "before_cursor_execute", statement)
    try:
        client.send(framing.TASK_STATUS, [status(i, outcome="error" if i % 3 == 0 else "ok") for i in ids])
        await until(lambda: service.rows_written >= 3000, timeout=30, what="3000 statuses written")
    finally:
        pool.do = real_do
        sa.event.remove(engine, "before_cursor_execute", statement)
    assert applied == [3000] and service.flushes == flushes + 1
    assert len(inserts) == 6  # 500 rows per statement
    assert count(engine) == 3000
    failing = sum(1 for i in ids if i % 3 == 0)
    assert (await api.ok("GET", f"{AGENTS}/{agent['id']}"))["failingTasks"] == failing
    await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_stopping_the_server_writes_what_is_buffered(db_config):
    api = await start_server(*db_config, status_flush_interval=3600)
    engine = api.server.engine
    try:
        client, agent_id = await online(api, "last-words")
        task_id = await task_for(api, client, agent_id, "t1")
        client.send(framing.TASK_STATUS, [status(task_id, outcome="error")])
        await until(lambda: api.server.status.pending, what="the status buffered")
        assert count(engine) == 0
    finally:
        await stop_server(api)
    try:
        assert count(engine, models.task_status.c.outcome == "error") == 1
    finally:
        engine.dispose()


# -- the store's SQL on each database ---------------------------------------------------

def _row(task_id: int, agent_id: int, **over: Any) -> TaskStatusRow:
    values = {"executor": "snap", "outcome": "ok", "updated": T0, **over}
    return TaskStatusRow(task_id=task_id, agent_id=agent_id, **values)


@pytest_twisted.ensureDeferred
async def test_store_upserts_skips_the_deleted_and_counts_failures(api):
    engine = api.server.engine
    with engine.begin() as conn:
        conn.execute(sa.insert(models.agent), [
            {"id": i, "org_id": org, "name": f"a{i}", "enabled": True, "public": public, "online": False,
             "created": T0, "updated": T0} for i, org, public in ((1, 1, False), (2, 2, False), (3, 2, True))])
        conn.execute(sa.insert(models.task), [
            {"id": i, "org_id": 1, "name": f"t{i}", "task_type": "", "config": {}, "interval": 60,
             "route": {"type": "any"}, "enabled": True, "created": T0, "updated": T0} for i in (1, 2)])
    with engine.begin() as conn:
        written = status_db.upsert_many(conn, [
            _row(1, 1, outcome="error", error="é" * 4096, runs=2**62, duration=1.0 / 3),
            _row(1, 2, outcome="error"), _row(1, 3, outcome="pending"), _row(2, 1),
            _row(99, 1), _row(1, 99),  # a task and an agent deleted meanwhile
        ])
    assert written == 4
    with engine.begin() as conn:
        status_db.upsert_many(conn, [_row(2, 1, outcome="error", last_run=datetime(2026, 1, 2, 3, 4, 5, 123456))])
        assert status_db.failing_counts(conn, [1, 2, 3, 4]) == {1: 2, 2: 1, 3: 0, 4: 0}
        rows = status_db.for_task(conn, 1)
        assert [(r.agent_id, r.agent_name, r.outcome) for r in rows] == [(1, "a1", "error"), (2, "a2", "error"),
                                                                          (3, "a3", "pending")]
        assert rows[0].error == "é" * 4096 and rows[0].runs == 2**62 and rows[0].duration == pytest.approx(1.0 / 3)
        # An org sees its own agents and public ones: org 1 does not see agent 2.
        assert [r.agent_id for r in status_db.for_task(conn, 1, visible_to=1)] == [1, 3]
        assert status_db.for_task(conn, 2)[0].last_run == datetime(2026, 1, 2, 3, 4, 5, 123456)
        status_db.delete(conn, [(1, 1), (1, 3), (2, 7)])
        assert [r.agent_id for r in status_db.for_task(conn, 1)] == [2]


@pytest_twisted.ensureDeferred
async def test_store_writes_only_for_agents_held_here_and_drops_what_the_database_refuses(api):
    engine = api.server.engine
    with engine.begin() as conn:
        conn.execute(sa.insert(models.agent), [
            {"id": i, "org_id": 1, "name": f"a{i}", "enabled": True, "public": False, "online": True,
             "created": T0, "updated": T0} for i in (1, 2, 3)])
        conn.execute(sa.insert(models.task), [
            {"id": i, "org_id": 1, "name": f"t{i}", "task_type": "", "config": {}, "interval": 60,
             "route": {"type": "any"}, "enabled": True, "created": T0, "updated": T0} for i in (1, 2, 3)])
        conn.execute(sa.insert(models.agent_session), [
            {"id": f"s{i}", "agent_id": i, "version": 1, "remote_ip": "10.0.0.1", "server": server, "created": T0}
            for i, server in ((1, "srv-a"), (2, "srv-b"))])  # agent 3 has no session
    with engine.begin() as conn:
        status_db.upsert_many(conn, [_row(3, 1), _row(3, 2, runs=7)])  # written before
    with engine.begin() as conn:
        written, refused = status_db.apply(conn, [
            _row(1, 1), _row(2, 1, error="\ud800"), _row(1, 2), _row(1, 3), _row(3, 2, runs=1),
        ], [(3, 1), (3, 2)], "srv-a")
    assert written == 1
    assert [(r.task_id, r.agent_id) for r, _ in refused] == [(2, 1)]
    with engine.connect() as conn:
        rows = {(r.task_id, r.agent_id): r.runs for r in conn.execute(sa.select(models.task_status))}
    # srv-b's agent 2 keeps what its own server wrote; agent 3 (no session) gets nothing.
    assert rows == {(1, 1): 0, (3, 2): 7}


@pytest_twisted.ensureDeferred
async def test_a_flush_after_the_agent_left_this_server_writes_nothing(db_config):
    api = await start_server(*db_config, status_flush_interval=3600)
    engine = api.server.engine
    try:
        client, agent_id = await online(api, "moved-on")
        task_id = await task_for(api, client, agent_id, "t1")
        client.send(framing.TASK_STATUS, [status(task_id, outcome="error")])
        await until(lambda: api.server.status.pending, what="the status buffered")
        await client.disconnect()
        await until(lambda: not api.server.sessions.sessions, what="the session closed")
        await until_api(lambda: api.ok("GET", f"{AGENTS}/{agent_id}"), lambda a: not a["online"], "offline")
        await api.server.status.flush()
        assert count(engine) == 0 and api.server.status.pending == {}
        assert api.server.status.failed_flushes == 0
    finally:
        await stop_server(api)
        engine.dispose()
