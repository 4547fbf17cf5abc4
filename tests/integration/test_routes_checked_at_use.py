"""Routes checked where they are used (issue 12 item 7), on both databases: a `byIds` task
follows the visibility of the agents it names at every routing read, not only when it
was written, and its API answer says why a named agent does not get it; agent ids are
never reused, so a task naming a deleted agent cannot reach a newcomer."""
from __future__ import annotations

import pytest_twisted

from tests.integration.agent_client import connect_agent
from tests.integration.harness import ADMIN_KEY, ORG2_KEY, ORG3_KEY
from tests.waiting import until

AGENTS, TASKS = "/api/v1/agents", "/api/v1/tasks"
NOT_VISIBLE = "not visible to this org (deleted, or another org's agent that is no longer public)"


def by_ids(name: str, *ids: int) -> dict:
    return {"name": name, "interval": 60, "enabled": True, "route": {"type": "byIds", "config": {"ids": list(ids)}}}


async def online(api, name: str, key: str):
    client = connect_agent(api.base, name, key)
    await client.opened
    return client, await client.next("taskList")


@pytest_twisted.ensureDeferred
async def test_a_task_stops_going_to_an_agent_its_owner_made_private(api):
    probe = await api.ok("POST", AGENTS, key=ORG2_KEY, json_body={"name": "probe", "public": True})
    client, _ = await online(api, "probe", ORG2_KEY)
    assert client.headers.get("x-taskd-agent-public") == "true"
    task = await api.ok("POST", TASKS, key=ADMIN_KEY, json_body=by_ids("org1-check", probe["id"]))
    assert (await client.next("taskAdd"))["id"] == task["id"]
    detail = await api.ok("GET", f"{TASKS}/{task['id']}", key=ADMIN_KEY)
    assert (detail["agents"], detail["unrouted"]) == ([probe["id"]], [])

    await api.ok("PUT", AGENTS, key=ORG2_KEY, json_body={"id": probe["id"], "public": False})
    assert (await client.next("taskRemove"))["id"] == task["id"]  # re-routed at once
    await until(lambda: client.closed.called, what="the connection closed for the flag change")
    assert (client.close_code, client.close_reason) == (4002, "this agent was made private; reconnect")

    detail = await api.ok("GET", f"{TASKS}/{task['id']}", key=ADMIN_KEY)
    assert detail["agents"] == [] and detail["unrouted"] == [{"id": probe["id"], "reason": NOT_VISIBLE}]
    again, task_list = await online(api, "probe", ORG2_KEY)  # and it is not in the next taskList
    assert again.headers.get("x-taskd-agent-public") == "false"
    assert [t["id"] for t in task_list] == []
    # Made public again, it is routed again: the route itself was never changed.
    await api.ok("PUT", AGENTS, key=ORG2_KEY, json_body={"id": probe["id"], "public": True})
    await until(lambda: again.closed.called, what="the connection closed for the flag change")
    third, task_list = await online(api, "probe", ORG2_KEY)
    assert [t["id"] for t in task_list] == [task["id"]]
    await third.disconnect()


@pytest_twisted.ensureDeferred
async def test_why_a_named_agent_does_not_get_the_task(api):
    own = await api.ok("POST", AGENTS, key=ADMIN_KEY, json_body={"name": "own"})  # never connects
    task = await api.ok("POST", TASKS, key=ADMIN_KEY, json_body=by_ids("t", own["id"]))
    detail = await api.ok("GET", f"{TASKS}/{task['id']}", key=ADMIN_KEY)
    assert detail["unrouted"] == [{"id": own["id"], "reason": "offline"}]
    reply = await api.request("PUT", TASKS, key=ADMIN_KEY, json_body=detail)  # read-only: sent back as is
    assert reply.status == 200, reply.raw


@pytest_twisted.ensureDeferred
async def test_agent_ids_are_never_reused(api):
    """Org 2's public agent, named by org 1's task, is deleted; org 3's next agent does
    not get its id (sqlite reused the highest deleted id before migration 0005), so it
    cannot inherit the task."""
    old = await api.ok("POST", AGENTS, key=ORG2_KEY, json_body={"name": "old", "public": True})
    task = await api.ok("POST", TASKS, key=ADMIN_KEY, json_body=by_ids("t", old["id"]))
    await api.ok("DELETE", f"{AGENTS}/{old['id']}", key=ORG2_KEY)
    new = await api.ok("POST", AGENTS, key=ORG3_KEY, json_body={"name": "newcomer", "public": True})
    assert new["id"] > old["id"]
    client, task_list = await online(api, "newcomer", ORG3_KEY)
    assert task_list == []
    detail = await api.ok("GET", f"{TASKS}/{task['id']}", key=ADMIN_KEY)
    assert detail["agents"] == [] and detail["unrouted"] == [{"id": old["id"], "reason": NOT_VISIBLE}]
    # Task ids are not reused either.
    await api.ok("DELETE", f"{TASKS}/{task['id']}", key=ADMIN_KEY)
    later = await api.ok("POST", TASKS, key=ADMIN_KEY, json_body=by_ids("t2", new["id"]))
    assert later["id"] > task["id"]
    await client.disconnect()
