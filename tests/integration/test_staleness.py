"""Stale tasks (issue 14 item 5) through the API, on sqlite and MariaDB: a routed task
whose online agent has reported no run of it for max(3 intervals, 60 s) reads `stale` in
GET /tasks/<id> and counts in the agent's failingTasks and staleTasks; a fresh report
clears it. The clock is not waited on: the stored times are moved back instead."""
from __future__ import annotations

import time
from datetime import timedelta

import pytest_twisted
import sqlalchemy as sa

from taskd.db import models
from taskd.timeutil import utcnow
from tests.integration.agent_client import connect_agent
from tests.integration.harness import ADMIN_KEY, start_server, stop_server
from tests.integration.test_task_status import FLUSH, online, status, task_for, task_status, until_api
from taskd.wire import framing

AGENTS = "/api/v1/agents"


@pytest_twisted.async_yield_fixture
async def api(db_config):
    running = await start_server(*db_config, status_flush_interval=FLUSH)
    yield running
    await stop_server(running)


def age(api, agent_id: int, task_ids: list[int], seconds: float, *, runs: bool = True) -> None:
    """Move the agent's coming online, the tasks' last change and (with `runs`) its
    reported runs `seconds` into the past."""
    past = utcnow() - timedelta(seconds=seconds)
    with api.server.engine.begin() as conn:
        conn.execute(sa.update(models.agent).where(models.agent.c.id == agent_id).values(online_change=past))
        conn.execute(sa.update(models.task).where(models.task.c.id.in_(task_ids)).values(updated=past))
        if runs:
            conn.execute(sa.update(models.task_status).where(models.task_status.c.agent_id == agent_id)
                         .values(last_run=past))


async def agent_counts(api, agent_id: int) -> tuple[int, int]:
    agent = await api.ok("GET", f"{AGENTS}/{agent_id}")
    return agent["failingTasks"], agent["staleTasks"]


@pytest_twisted.ensureDeferred
async def test_a_task_the_agent_stopped_reporting_is_stale_until_it_reports_again(api):
    client, agent_id = await online(api, "quiet")
    task_id = await task_for(api, client, agent_id, "t1")  # interval 60: stale after 180 s
    client.send(framing.TASK_STATUS, [status(task_id, lastRun=time.time())])
    await until_api(lambda: task_status(api, task_id), lambda s: s and s[0]["outcome"] == "ok", "the first status")
    age(api, agent_id, [task_id], 170)
    assert (await task_status(api, task_id))[0]["outcome"] == "ok"  # inside the window
    age(api, agent_id, [task_id], 200)
    [entry] = await task_status(api, task_id)
    assert entry["outcome"] == "stale" and entry["agentId"] == agent_id
    assert entry["error"].startswith("no run reported for 200s (expected every 60s; stale after 180s)"), entry
    assert await until_api(lambda: agent_counts(api, agent_id), lambda c: c == (1, 1), "the agent's counts") == (1, 1)

    client.send(framing.TASK_STATUS, [status(task_id, lastRun=time.time(), runs=4)])
    await until_api(lambda: task_status(api, task_id), lambda s: s[0]["outcome"] == "ok", "ok again")
    assert await until_api(lambda: agent_counts(api, agent_id), lambda c: c == (0, 0), "counts cleared") == (0, 0)
    await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_a_task_never_reported_is_stale_after_the_window_and_only_while_routed(api):
    client, agent_id = await online(api, "half")
    reported = await task_for(api, client, agent_id, "reported")
    silent = await task_for(api, client, agent_id, "silent")
    client.send(framing.TASK_STATUS, [status(reported, lastRun=time.time())])
    await until_api(lambda: task_status(api, reported), bool, "the reported task's status")
    age(api, agent_id, [reported, silent], 500, runs=False)  # the reported one ran just now
    [entry] = await task_status(api, silent)
    assert (entry["outcome"], entry["executor"], entry["agentName"], entry["runs"]) == ("stale", "", "half", 0)
    assert (await task_status(api, reported))[0]["outcome"] == "ok"
    assert await until_api(lambda: agent_counts(api, agent_id), lambda c: c == (1, 1), "one stale") == (1, 1)
    # Disabled, it is not stale (not routed to anyone).
    task = await api.ok("GET", f"/api/v1/tasks/{silent}")
    await api.ok("PUT", "/api/v1/tasks", json_body={**task, "enabled": False})
    assert await task_status(api, silent) == []
    await client.disconnect()
    # Offline: nothing of it is stale.
    await until_api(lambda: api.ok("GET", f"{AGENTS}/{agent_id}"), lambda a: not a["online"], "offline")
    assert await until_api(lambda: agent_counts(api, agent_id), lambda c: c == (0, 0), "no stale offline") == (0, 0)


@pytest_twisted.ensureDeferred
async def test_an_agent_that_never_reports_statuses_is_not_judged(api):
    """An agent older than the taskStatus event (the Go task-agent) reports nothing."""
    client = connect_agent(api.base, "old-go-agent", ADMIN_KEY)
    await client.opened
    await client.next("taskList")
    [agent] = await api.ok("GET", AGENTS, params={"name": "old-go-agent"})
    task_id = await task_for(api, client, agent["id"], "t")
    age(api, agent["id"], [task_id], 1000, runs=False)
    assert await task_status(api, task_id) == []
    assert await agent_counts(api, agent["id"]) == (0, 0)
    await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_the_counts_for_tens_of_thousands_of_held_agents_are_read_in_bounded_statements(api):
    """The stale gauge asks for every agent a server holds: one IN list of every id
    passes sqlite's variable limit (32,766 by default) and MariaDB's packet size at some
    fleet size; chunks of CHUNK ids never do."""
    import threading

    from taskd.db.staleness import counts
    from taskd.db.taskstatus import CHUNK

    client, agent_id = await online(api, "among-many")
    task_id = await task_for(api, client, agent_id, "t1")
    client.send(framing.TASK_STATUS, [status(task_id, lastRun=time.time())])
    await until_api(lambda: task_status(api, task_id), lambda s: s and s[0]["outcome"] == "ok", "the first status")
    age(api, agent_id, [task_id], 200)
    many = list(range(10**6, 10**6 + 20_000)) + [agent_id]  # (ids of no agent, and the real one)
    sizes: list[int] = []
    mine: list[int] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        if threading.get_ident() in mine:  # (the server's own loops share the engine)
            sizes.append(len(parameters) if isinstance(parameters, (tuple, list, dict)) else 0)

    def counted(conn, ids, now):
        mine.append(threading.get_ident())
        try:
            return counts(conn, ids, now)
        finally:
            mine.clear()

    sa.event.listen(api.server.engine, "before_cursor_execute", record)
    try:
        got = await api.server.pool.do(counted, many, utcnow())
    finally:
        sa.event.remove(api.server.engine, "before_cursor_execute", record)
    assert len(got) == len(many) and got[agent_id] == (1, 1) and got[10**6] == (0, 0)
    assert sizes and max(sizes) <= 2 * CHUNK + 2, max(sizes)
    await client.disconnect()
