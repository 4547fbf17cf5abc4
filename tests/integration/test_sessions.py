"""Agent websocket sessions end to end: a real server, real sockets, a framing client."""
from __future__ import annotations

import pytest
import pytest_twisted
import sqlalchemy as sa
import treq

from taskd.db import models
from tests.integration.agent_client import connect_agent
from tests.integration.harness import ADMIN_KEY, ORG2_KEY
from tests.notes_requests import NOTES_TASK
from tests.waiting import until



async def connected(api, name="agent1", key=ADMIN_KEY):
    client = connect_agent(api.base, name, key)
    await client.opened
    return client


@pytest_twisted.ensureDeferred
async def test_notes_walkthrough_agent_receives_task_add(api):
    """Register agent1 (enabled: false), connect it, create example-task-1: taskAdd."""
    agent = await api.ok("POST", "/api/v1/agents", data={"name": "agent1"})
    assert agent["enabled"] is False
    client = await connected(api)
    assert await client.next("taskList") == []
    shown = await api.ok("GET", f"/api/v1/agents/{agent['id']}")
    assert shown["online"] is True and shown["onlineChange"] != "0001-01-01T00:00:00Z"
    task = await api.ok("POST", "/api/v1/tasks", json_body=NOTES_TASK)
    added = await client.next("taskAdd")
    assert added == task
    got = await api.ok("GET", f"/api/v1/tasks/{task['id']}")
    assert got["agents"] == [agent["id"]]
    await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_update_disable_delete_reach_the_agent(api):
    client = await connected(api)
    await client.next("taskList")
    task = await api.ok("POST", "/api/v1/tasks", json_body=NOTES_TASK)
    await client.next("taskAdd")
    changed = await api.ok("PUT", "/api/v1/tasks", json_body={**task, "interval": 60})
    assert (await client.next("taskUpdate"))["interval"] == 60 == changed["interval"]
    await api.ok("PUT", "/api/v1/tasks", json_body={**changed, "enabled": False})
    assert (await client.next("taskRemove"))["id"] == task["id"]
    await api.ok("PUT", "/api/v1/tasks", json_body={**changed, "enabled": True})
    await client.next("taskAdd")
    await api.ok("DELETE", f"/api/v1/tasks/{task['id']}")
    assert (await client.next("taskRemove"))["id"] == task["id"]
    await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_task_goes_only_to_the_routed_agent(api):
    one = await connected(api, "one")
    two = await connected(api, "two")
    await one.next("taskList"), await two.next("taskList")
    agents = {a["name"]: a for a in await api.ok("GET", "/api/v1/agents")}
    task = await api.ok("POST", "/api/v1/tasks", json_body={
        **NOTES_TASK, "route": {"type": "byIds", "config": {"ids": [agents["two"]["id"]]}}})
    assert (await two.next("taskAdd"))["id"] == task["id"]
    await one.nothing_more("taskAdd")
    # Re-routing to "one" is a taskRemove for "two" and a taskAdd for "one".
    await api.ok("PUT", "/api/v1/tasks", json_body={
        **task, "route": {"type": "byIds", "config": {"ids": [agents["one"]["id"]]}}})
    assert (await one.next("taskAdd"))["id"] == task["id"]
    assert (await two.next("taskRemove"))["id"] == task["id"]
    await one.disconnect(), await two.disconnect()


@pytest_twisted.ensureDeferred
async def test_reconnect_gets_task_list_matching_database(api):
    client = await connected(api)
    await client.next("taskList")
    t1 = await api.ok("POST", "/api/v1/tasks", json_body=NOTES_TASK)
    t2 = await api.ok("POST", "/api/v1/tasks", json_body={**NOTES_TASK, "name": "second", "enabled": False})
    await client.next("taskAdd")
    await client.disconnect()
    again = await connected(api)
    listed = await again.next("taskList")
    assert [t["id"] for t in listed] == [t1["id"]]  # the disabled one is not in the list
    assert t2["id"] not in [t["id"] for t in listed]
    await again.disconnect()


@pytest_twisted.ensureDeferred
async def test_unknown_agent_is_autocreated_enabled_and_public(api):
    client = await connected(api, "newcomer")
    await client.next("taskList")
    [agent] = await api.ok("GET", "/api/v1/agents", params={"name": "newcomer"})
    assert agent["enabled"] is True and agent["public"] is True and agent["online"] is True
    await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_autocreate_off_refuses_unknown_agents_with_an_envelope(db_config):
    from tests.integration.harness import start_server, stop_server

    running = await start_server(*db_config, agent_autocreate=False)
    try:
        resp = await treq.get(f"{running.base}/api/v1/socket/ghost/1", pool=running.pool, headers={
            "Authorization": f"Bearer {ADMIN_KEY}", "Upgrade": "websocket", "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"})
        body = await resp.json()
        assert resp.code == 404 and body["meta"]["code"] == 404 and "ghost" in body["meta"]["message"]
    finally:
        await stop_server(running)


@pytest_twisted.ensureDeferred
async def test_upgrade_without_key_is_refused_before_the_socket_opens(api):
    resp = await treq.get(f"{api.base}/api/v1/socket/agent1/1", pool=api.pool, headers={
        "Upgrade": "websocket", "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"})
    body = await resp.json()
    assert resp.code == 401 and body["meta"]["type"] == "error"


@pytest_twisted.ensureDeferred
async def test_agent_belongs_to_the_keys_org(api):
    client = await connected(api, "shared-name", key=ORG2_KEY)
    await client.next("taskList")
    org1 = await api.ok("GET", "/api/v1/agents", params={"name": "shared-name", "public": "false"})
    org2 = await api.ok("GET", "/api/v1/agents", key=ORG2_KEY, params={"name": "shared-name", "public": "false"})
    assert org1 == [] and len(org2) == 0  # autocreated agents are public
    everyone = await api.ok("GET", "/api/v1/agents", params={"name": "shared-name"})
    assert len(everyone) == 1
    with api.server.engine.connect() as conn:
        assert conn.execute(sa.select(models.agent.c.org_id).where(models.agent.c.name == "shared-name")).scalar() == 2
    await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_session_row_records_version_server_and_ip(api):
    client = await connected(api)
    await client.next("taskList")
    with api.server.engine.connect() as conn:
        row = conn.execute(sa.select(models.agent_session)).one()
    assert row.version == 1 and row.server == api.server.instance_id and row.remote_ip == "127.0.0.1"
    await client.disconnect()
    await until(lambda: _count(api, models.agent_session) == 0)
    [agent] = await api.ok("GET", "/api/v1/agents")
    assert agent["online"] is False


@pytest_twisted.ensureDeferred
async def test_heartbeats_arrive(api):
    client = await connected(api)
    await client.next("heartbeat", timeout=10)
    await client.disconnect()


def _count(api, table) -> int:
    with api.server.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
