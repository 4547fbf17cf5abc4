"""Level-triggered `any` routing (routes.sweep_any, Dispatcher.sweep) on both databases:
a task whose agent has been offline longer than the relocation delay moves whether or
not an `agent.offline` was ever seen."""
from __future__ import annotations

import signal
from datetime import timedelta

import pytest_twisted
import sqlalchemy as sa
import treq

from taskd.db import models as m
from taskd.timeutil import utcnow
from tests.integration.agent_client import connect_agent
from tests.integration.daemons import ServerProcess
from tests.integration.harness import ADMIN_KEY, start_server, stop_server

TASK = {"config": {}, "interval": 60, "metrics": {}, "route": {"type": "any"}}


def add_agent(engine, name: str, *, online: bool, changed_ago: float) -> int:
    now = utcnow()
    with engine.begin() as conn:
        return conn.execute(sa.insert(m.agent).values(
            org_id=1, name=name, enabled=True, public=False, online=online,
            online_change=now - timedelta(seconds=changed_ago), created=now, updated=now)).inserted_primary_key[0]


def assign(engine, task_id: int, agent_id: int) -> None:
    """What a server that died before relocating left: the task on an offline agent."""
    with engine.begin() as conn:
        conn.execute(sa.delete(m.route_by_any_index).where(m.route_by_any_index.c.task_id == task_id))
        conn.execute(sa.insert(m.route_by_any_index).values(task_id=task_id, agent_id=agent_id, created=utcnow()))


def assignee(engine, task_id: int) -> int | None:
    with engine.connect() as conn:
        return conn.execute(sa.select(m.route_by_any_index.c.agent_id)
                            .where(m.route_by_any_index.c.task_id == task_id)).scalar()


@pytest_twisted.ensureDeferred
async def test_sweep_moves_enabled_tasks_off_agents_offline_longer_than_the_delay(api):
    engine = api.server.engine
    gone = add_agent(engine, "gone", online=False, changed_ago=60)
    brief = add_agent(engine, "brief", online=False, changed_ago=0)  # may still come back
    here = add_agent(engine, "here", online=True, changed_ago=60)
    on_gone = await api.ok("POST", "/api/v1/tasks", json_body={**TASK, "name": "on-gone", "enabled": True})
    on_brief = await api.ok("POST", "/api/v1/tasks", json_body={**TASK, "name": "on-brief", "enabled": True})
    disabled = await api.ok("POST", "/api/v1/tasks", json_body={**TASK, "name": "disabled", "enabled": False})
    assign(engine, on_gone["id"], gone)
    assign(engine, on_brief["id"], brief)
    assign(engine, disabled["id"], gone)
    with engine.begin() as conn:  # and one nobody holds
        conn.execute(sa.insert(m.task).values(
            org_id=1, name="orphan", task_type="", config={}, interval=60, route={"type": "any"}, enabled=True,
            created=utcnow(), updated=utcnow()))
    moved, assigned = await api.server.db.routes.sweep_any(5.0)
    assert [(t.id, new) for t, new in moved] == [(on_gone["id"], here)]
    assert [t.name for t in assigned] == ["orphan"]
    assert assignee(engine, on_gone["id"]) == here
    assert assignee(engine, on_brief["id"]) == brief and assignee(engine, disabled["id"]) == gone
    again = await api.server.db.routes.sweep_any(5.0)
    assert again == ([], [])  # level-triggered: nothing left to do


@pytest_twisted.ensureDeferred
async def test_a_task_left_on_a_dead_agent_without_any_offline_event_reaches_a_connected_agent(db_config):
    running = await start_server(*db_config, task_list_interval=0.5, relocate_delay=0.2)
    client = None
    try:
        engine = running.server.engine
        gone = add_agent(engine, "gone", online=False, changed_ago=60)
        client = connect_agent(running.base, "alive", ADMIN_KEY)
        await client.opened
        await client.next("taskList")
        with engine.begin() as conn:  # written behind the server's back: no event at all
            task_id = conn.execute(sa.insert(m.task).values(
                org_id=1, name="stranded", task_type="", config={}, interval=60, route={"type": "any"},
                enabled=True, created=utcnow(), updated=utcnow())).inserted_primary_key[0]
        assign(engine, task_id, gone)
        added = await client.next("taskAdd", timeout=10, predicate=lambda t: t["id"] == task_id)
        assert added["name"] == "stranded"
        [alive_id] = [a["id"] for a in await running.ok("GET", "/api/v1/agents?name=alive")]
        assert assignee(engine, task_id) == alive_id
    finally:
        if client is not None:
            await client.disconnect()
        await stop_server(running)


@pytest_twisted.ensureDeferred
async def test_a_lone_sqlite_server_sigkilled_and_restarted_moves_the_task_of_an_agent_that_stays_away(tmp_path):
    """At start-up the server marks its previous run's agents offline before its
    dispatcher runs (their agent.offline reaches no one); the sweep still moves the `any`
    task of the agent that does not come back to the one that does."""
    keys = {"db-type": "sqlite3", "db-connect-str": str(tmp_path / "lone.db"), "admin-key": ADMIN_KEY,
            "relocate-delay": "0.2s", "server-heartbeat-interval": "0.2s", "server-dead-after": "1s"}
    first = await ServerProcess(tmp_path, "lone", **keys).start()
    clients = []
    restarted = None
    try:
        away = connect_agent(first.base, "away", ADMIN_KEY)
        clients.append(away)
        await away.opened
        await away.next("taskList")
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        resp = await treq.post(first.base + "/api/v1/tasks", json={**TASK, "name": "solo", "enabled": True},
                               headers=headers)
        task = (await resp.json())["body"]
        assert (await away.next("taskAdd"))["id"] == task["id"]
        back = connect_agent(first.base, "back", ADMIN_KEY)
        clients.append(back)
        await back.opened
        await back.next("taskList")
        first.proc.send_signal(signal.SIGKILL)
        await away.closed
        await back.closed

        restarted = await ServerProcess(tmp_path, "lone", **keys).start()
        again = connect_agent(restarted.base, "back", ADMIN_KEY)
        clients.append(again)
        await again.opened
        listed = await again.next("taskList")  # holds the task if the sweep moved it before `back` connected
        if task["id"] not in [t["id"] for t in listed]:
            await again.next("taskAdd", timeout=10, predicate=lambda t: t["id"] == task["id"])
        resp = await treq.get(restarted.base + "/api/v1/agents?name=away", headers=headers)
        assert (await resp.json())["body"][0]["online"] is False
    finally:
        for client in clients:
            if not client.closed.called and client.protocol is not None:
                client.protocol.dropConnection(abort=True)
        if restarted is not None:
            await restarted.stop()
        await first.stop()
    assert "Traceback" not in first.log(), first.log()
