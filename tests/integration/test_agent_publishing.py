"""Who may publish agents (`public-agent-orgs`), through real HTTP and websockets on both
databases: a public agent is given every org's `any` tasks with their config, so an org
the operator did not list gets a 403 for `public: true` and private auto-created agents,
and never receives another org's task.

The harness lists orgs 1 to 3; org 4 (ORG4_KEY, "initech") is the tenant not allowed.
"""
from __future__ import annotations

import pytest_twisted
import sqlalchemy as sa

from taskd.db import models
from tests.integration.agent_client import connect_agent
from tests.integration.harness import ADMIN_KEY, ORG2_KEY, ORG4_KEY, assert_error, start_server, stop_server

AGENTS, TASKS = "/api/v1/agents", "/api/v1/tasks"


async def agents_of(api, key: str) -> list[dict]:
    return await api.ok("GET", AGENTS, key=key, params={"public": "false"})


@pytest_twisted.ensureDeferred
async def test_an_unlisted_org_may_not_create_a_public_agent(api):
    reply = await api.request("POST", AGENTS, key=ORG4_KEY, json_body={"name": "probe", "public": True})
    assert_error(reply, 403, "org 4 (initech) may not publish agents", "public-agent-orgs", "public: false")
    assert await agents_of(api, ORG4_KEY) == []  # nothing created
    # The same call without the flag works, and the agent is private.
    agent = await api.ok("POST", AGENTS, key=ORG4_KEY, json_body={"name": "probe"})
    assert agent["public"] is False


@pytest_twisted.ensureDeferred
async def test_an_unlisted_org_may_not_make_its_agent_public(api):
    agent = await api.ok("POST", AGENTS, key=ORG4_KEY, json_body={"name": "probe", "tags": ["a"]})
    reply = await api.request("PUT", AGENTS, key=ORG4_KEY,
                              json_body={"id": agent["id"], "public": True, "tags": ["b"]})
    assert_error(reply, 403, "org 4 (initech) may not publish agents")
    after = await api.ok("GET", f"{AGENTS}/{agent['id']}", key=ORG4_KEY)
    assert after["public"] is False and after["tags"] == ["a"]  # nothing of the PUT applied
    # Other fields still change; public: false is always allowed.
    changed = await api.ok("PUT", AGENTS, key=ORG4_KEY, json_body={"id": agent["id"], "public": False,
                                                                    "enabled": True})
    assert changed["enabled"] is True and changed["public"] is False


@pytest_twisted.ensureDeferred
async def test_listed_orgs_publish(api):
    for key, name in ((ADMIN_KEY, "admin-probe"), (ORG2_KEY, "acme-probe")):
        agent = await api.ok("POST", AGENTS, key=key, json_body={"name": name, "public": True})
        assert agent["public"] is True
    # ... and another org sees them, as public agents.
    seen = await api.ok("GET", AGENTS, key=ORG4_KEY, params={"public": "true"})
    assert sorted(a["name"] for a in seen) == ["acme-probe", "admin-probe"]


@pytest_twisted.ensureDeferred
async def test_auto_created_agents_are_private_unless_the_org_may_publish(api):
    hostile = connect_agent(api.base, "sneaky", ORG4_KEY)
    allowed = connect_agent(api.base, "probe", ORG2_KEY)
    for client in (hostile, allowed):
        await client.opened
        await client.next("taskList")
    [sneaky] = await api.ok("GET", AGENTS, key=ORG4_KEY, params={"name": "sneaky"})
    [probe] = await api.ok("GET", AGENTS, key=ORG2_KEY, params={"name": "probe"})
    assert sneaky["public"] is False and probe["public"] is True
    # The hostile agent is not given another org's `any` task (nor its config); the
    # published one is.
    task = await api.ok("POST", TASKS, key=ADMIN_KEY, json_body={
        "name": "secret-check", "interval": 60, "enabled": True, "config": {"/x": {"apiKey": "s3cret"}},
        "route": {"type": "any"}})
    assert (await client_tasks(allowed)) == [task["id"]]
    assert sneaky["id"] not in await assignees(api, task["id"])
    await hostile.nothing_pending("taskAdd")
    for client in (hostile, allowed):
        await client.disconnect()


async def client_tasks(client) -> list[int]:
    added = await client.next("taskAdd")
    return [added["id"]]


async def assignees(api, task_id: int) -> list[int]:
    engine = api.server.engine
    with engine.connect() as conn:
        return [r.agent_id for r in conn.execute(
            sa.select(models.route_by_any_index.c.agent_id).where(models.route_by_any_index.c.task_id == task_id))]


@pytest_twisted.ensureDeferred
async def test_an_agent_already_public_keeps_its_flag(db_config):
    """Upgrading: rows written before the setting keep `public`; the owner may still
    change the agent's other fields, sending the flag back as it is."""
    api = await start_server(*db_config, public_agent_orgs=())
    try:
        agent = await api.ok("POST", AGENTS, key=ORG2_KEY, json_body={"name": "old-probe"})
        with api.server.engine.begin() as conn:
            conn.execute(sa.update(models.agent).where(models.agent.c.id == agent["id"]).values(public=True))
        api.server.agents.cache.clear()
        changed = await api.ok("PUT", AGENTS, key=ORG2_KEY, json_body={"id": agent["id"], "public": True,
                                                                        "enabled": True})
        assert changed["public"] is True and changed["enabled"] is True
        # With no org listed, even the admin org may not publish a new one.
        assert_error(await api.request("POST", AGENTS, key=ADMIN_KEY, json_body={"name": "p", "public": True}),
                     403, "org 1", "may not publish agents")
    finally:
        await stop_server(api)
