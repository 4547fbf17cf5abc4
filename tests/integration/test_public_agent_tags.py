"""An org's own tags on another org's public agent (issue 12 item 2), on both databases:
tag rows carry the tagging org, each org sees and routes by its own tags on the agent,
and every other field stays the owner's."""
from __future__ import annotations

import pytest_twisted

from tests.integration.agent_client import connect_agent
from tests.integration.harness import ADMIN_KEY, ORG2_KEY, ORG3_KEY, assert_error
from tests.waiting import until

AGENTS, TASKS = "/api/v1/agents", "/api/v1/tasks"


def by_tags(name: str, *tags: str) -> dict:
    return {"name": name, "interval": 60, "enabled": True, "route": {"type": "byTags", "config": {"tags": list(tags)}}}


async def tags_seen(api, key: str, agent_id: int) -> list[str]:
    return (await api.ok("GET", f"{AGENTS}/{agent_id}", key=key))["tags"]


@pytest_twisted.ensureDeferred
async def test_each_org_sees_and_routes_by_its_own_tags_on_a_public_agent(api):
    probe = await api.ok("POST", AGENTS, key=ORG2_KEY, json_body={"name": "probe", "public": True,
                                                                   "tags": ["owner-dc"]})
    client = connect_agent(api.base, "probe", ORG2_KEY)
    await client.opened
    await client.next("taskList")

    tagged = await api.ok("PUT", AGENTS, key=ORG3_KEY, json_body={"id": probe["id"], "tags": ["mine"]})
    assert tagged["tags"] == ["mine"]
    assert await tags_seen(api, ORG2_KEY, probe["id"]) == ["owner-dc"]  # the owner's view is unchanged
    assert await tags_seen(api, ORG3_KEY, probe["id"]) == ["mine"]
    assert await tags_seen(api, ADMIN_KEY, probe["id"]) == []  # org 1 set none
    assert [a["id"] for a in await api.ok("GET", AGENTS, key=ORG3_KEY, params={"tag": "mine"})] == [probe["id"]]
    assert await api.ok("GET", AGENTS, key=ORG2_KEY, params={"tag": "mine"}) == []

    mine = await api.ok("POST", TASKS, key=ORG3_KEY, json_body=by_tags("org3-by-own-tag", "mine"))
    assert (await client.next("taskAdd"))["id"] == mine["id"]
    theirs = await api.ok("POST", TASKS, key=ORG3_KEY, json_body=by_tags("org3-by-owner-tag", "owner-dc"))
    stranger = await api.ok("POST", TASKS, key=ADMIN_KEY, json_body=by_tags("org1-by-org3-tag", "mine"))
    for task in (theirs, stranger):  # another org's tags route nothing of this org's
        assert (await api.ok("GET", f"{TASKS}/{task['id']}", key=ORG3_KEY if task is theirs else ADMIN_KEY)
                )["agents"] == []
    await client.nothing_pending("taskAdd")

    # The owner replacing its tags leaves org 3's alone.
    await api.ok("PUT", AGENTS, key=ORG2_KEY, json_body={"id": probe["id"], "tags": ["owner-dc", "edge"]})
    assert await tags_seen(api, ORG3_KEY, probe["id"]) == ["mine"]
    assert await tags_seen(api, ORG2_KEY, probe["id"]) == ["edge", "owner-dc"]

    # Made private, the agent stops getting org 3's task and is gone from org 3's view.
    await api.ok("PUT", AGENTS, key=ORG2_KEY, json_body={"id": probe["id"], "public": False})
    assert (await client.next("taskRemove"))["id"] == mine["id"]
    assert (await api.request("GET", f"{AGENTS}/{probe['id']}", key=ORG3_KEY)).status == 404
    assert_error(await api.request("PUT", AGENTS, key=ORG3_KEY, json_body={"id": probe["id"], "tags": ["x"]}), 404)
    await until(lambda: client.closed.called, what="the connection closed for the flag change")


@pytest_twisted.ensureDeferred
async def test_other_fields_of_a_public_agent_stay_the_owners(api):
    probe = await api.ok("POST", AGENTS, key=ORG2_KEY, json_body={"name": "probe", "public": True})
    for change in ({"name": "renamed"}, {"enabled": True}, {"public": False}):
        reply = await api.request("PUT", AGENTS, key=ORG3_KEY, json_body={"id": probe["id"], "tags": ["a"], **change})
        assert_error(reply, 403, "only its owner may change", next(iter(change)),
                     "your org may set only its own tags")
    assert await tags_seen(api, ORG3_KEY, probe["id"]) == []  # nothing of a refused PUT applied
    # A GET body sent back with new tags is fine: the other fields are unchanged.
    body = await api.ok("GET", f"{AGENTS}/{probe['id']}", key=ORG3_KEY)
    assert (await api.ok("PUT", AGENTS, key=ORG3_KEY, json_body={**body, "tags": ["a", "b"]}))["tags"] == ["a", "b"]
    assert (await api.ok("GET", f"{AGENTS}/{probe['id']}", key=ORG2_KEY))["name"] == "probe"
    assert_error(await api.request("DELETE", f"{AGENTS}/{probe['id']}", key=ORG3_KEY), 403)
    assert_error(await api.request("POST", f"{AGENTS}/{probe['id']}/token", key=ORG3_KEY), 403)
