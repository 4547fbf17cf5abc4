"""Who gets which task, end to end: byTags, byIds, catalogs, `any`, relocation.

Real server, real sockets, real SQL (sqlite and MariaDB). Timers are shortened through
setting overrides so relocation and heartbeats happen within a test's patience; tests
wait for frames with deadlines (`client.next`) and poll the API, and only sleep inside
`nothing_more` windows that prove something does *not* happen.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable

import pytest
import pytest_twisted

from tests.integration.agent_client import AgentClient, connect_agent
from tests.integration.harness import ADMIN_KEY, ORG2_KEY, start_server, stop_server
from tests.waiting import until

AGENTS = "/api/v1/agents"
TASKS = "/api/v1/tasks"

BASE_TASK = {
    "name": "t",
    "metrics": {"/example-task/*": 0},
    "config": {"/example-task": {"param1": "value1"}},
    "interval": 60,
    "enabled": True,
}


# -- helpers ---------------------------------------------------------------------------

def task_body(name: str, route: dict, **fields: Any) -> dict:
    return {**BASE_TASK, "name": name, "route": route, **fields}


def by_ids(*ids: int) -> dict:
    return {"type": "byIds", "config": {"ids": list(ids)}}


def by_tags(*tags: str) -> dict:
    return {"type": "byTags", "config": {"tags": list(tags)}}


ANY = {"type": "any"}


async def register(api, name: str, key: str = ADMIN_KEY, **fields: Any) -> dict:
    return await api.ok("POST", AGENTS, key=key, json_body={"name": name, **fields})


async def online(api, name: str, key: str = ADMIN_KEY) -> AgentClient:
    """Connect `name` and wait for its first taskList (the session is then registered)."""
    client = connect_agent(api.base, name, key)
    await client.opened
    await client.next("taskList")
    return client


async def agent_id(api, name: str, key: str = ADMIN_KEY) -> int:
    [agent] = await api.ok("GET", AGENTS, key=key, params={"name": name})
    return agent["id"]


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll an async `check` until it returns something truthy."""
    return await until(check, timeout, what, interval=0.05)


async def routed(api, task_id: int, key: str = ADMIN_KEY) -> list[int]:
    return (await api.ok("GET", f"{TASKS}/{task_id}", key=key))["agents"]


async def advertise(api, client: AgentClient, ident: int, records: list[dict]) -> None:
    """Send a catalog frame and wait until the server has stored it."""
    client.send("catalog", records)
    wanted = sorted((r["namespace"], r.get("version", 0)) for r in records)

    async def stored():
        got = await api.ok("GET", f"{AGENTS}/{ident}/metrics")
        return sorted((m["namespace"], m["version"]) for m in got) == wanted

    await eventually(stored, what=f"catalog {wanted} stored")


def holds(client: AgentClient, task_id: int) -> bool:
    """Did the agent get the task, in a taskList or as a taskAdd?"""
    for frame in client.frames:
        if frame.event == "taskAdd" and frame.payload["id"] == task_id:
            return True
        if frame.event == "taskList" and task_id in [t["id"] for t in frame.payload or []]:
            return True
    return False


async def receives(client: AgentClient, task_id: int, timeout: float = 5.0) -> None:
    async def check():
        return holds(client, task_id)

    await eventually(check, timeout, what=f"task {task_id} reaching the agent")


async def which_got(clients: dict[str, AgentClient], task_id: int, timeout: float = 5.0) -> str:
    """Name of the (first) agent that got a taskAdd for `task_id`."""
    async def check():
        return next((n for n, c in clients.items()
                     if any(p["id"] == task_id for p in c.events("taskAdd"))), None)

    return await eventually(check, timeout, what=f"a taskAdd for {task_id}")


def is_task(task_id: int) -> Callable[[Any], bool]:
    return lambda payload: payload["id"] == task_id


@pytest_twisted.async_yield_fixture
async def fast(db_config):
    """A server whose relocation and heartbeats are quick."""
    running = await start_server(*db_config, relocate_delay=0.2, heartbeat_interval=0.5)
    yield running
    await stop_server(running)


# -- byTags ----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_by_tags_reaches_exactly_the_tagged_agents_of_the_tasks_org(api):
    eu = await register(api, "eu1", tags=["eu"])
    db = await register(api, "db1", tags=["db", "x"])
    await register(api, "us1", tags=["us"])
    await register(api, "plain")
    # Same tag, another org, public: still not routed an org-1 byTags task.
    await register(api, "eu-org2", key=ORG2_KEY, tags=["eu"], public=True)
    clients = {
        "eu1": await online(api, "eu1"), "db1": await online(api, "db1"),
        "us1": await online(api, "us1"), "plain": await online(api, "plain"),
        "eu-org2": await online(api, "eu-org2", key=ORG2_KEY),
    }
    task = await api.ok("POST", TASKS, json_body=task_body("tagged", by_tags("eu", "db")))
    assert await clients["eu1"].next("taskAdd") == task
    assert await clients["db1"].next("taskAdd") == task
    for name in ("us1", "plain", "eu-org2"):
        await clients[name].nothing_more("taskAdd", 0.3)
    assert await routed(api, task["id"]) == sorted([eu["id"], db["id"]])
    for client in clients.values():
        await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_changing_an_agents_tags_adds_and_removes_its_tasks(api):
    agent = await register(api, "retag", tags=["us"])
    client = await online(api, "retag")
    task = await api.ok("POST", TASKS, json_body=task_body("eu-only", by_tags("eu")))
    await client.nothing_more("taskAdd", 0.3)
    await api.ok("PUT", AGENTS, json_body={"id": agent["id"], "tags": ["us", "eu"]})
    assert await client.next("taskAdd") == task
    assert await routed(api, task["id"]) == [agent["id"]]
    await api.ok("PUT", AGENTS, json_body={"id": agent["id"], "tags": ["us"]})
    assert (await client.next("taskRemove"))["id"] == task["id"]
    assert await routed(api, task["id"]) == []
    await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_changing_a_tasks_tags_reroutes_it(api):
    await register(api, "eu1", tags=["eu"])
    await register(api, "us1", tags=["us"])
    eu, us = await online(api, "eu1"), await online(api, "us1")
    task = await api.ok("POST", TASKS, json_body=task_body("moving", by_tags("eu")))
    await eu.next("taskAdd", predicate=is_task(task["id"]))
    moved = await api.ok("PUT", TASKS, json_body={**task, "route": by_tags("us")})
    assert await us.next("taskAdd") == moved
    assert (await eu.next("taskRemove"))["id"] == task["id"]
    both = await api.ok("PUT", TASKS, json_body={**moved, "route": by_tags("us", "eu")})
    assert await eu.next("taskAdd") == both
    assert await us.next("taskUpdate") == both  # still routed; its route changed
    await eu.disconnect(), await us.disconnect()


# -- byIds -----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_by_ids_reaches_only_the_listed_agents(api):
    one_c, two_c = await online(api, "one"), await online(api, "two")
    one, two = await agent_id(api, "one"), await agent_id(api, "two")
    task = await api.ok("POST", TASKS, json_body=task_body("listed", by_ids(two)))
    assert await two_c.next("taskAdd") == task
    await one_c.nothing_more("taskAdd", 0.3)
    assert await routed(api, task["id"]) == [two]
    both = await api.ok("PUT", TASKS, json_body={**task, "route": by_ids(one, two)})
    assert await one_c.next("taskAdd") == both
    assert await two_c.next("taskUpdate") == both
    await two_c.nothing_more("taskRemove", 0.2)
    assert await routed(api, task["id"]) == sorted([one, two])
    await one_c.disconnect(), await two_c.disconnect()


# -- catalogs --------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_catalog_frame_is_stored_for_the_agent_and_in_the_org_catalog(api):
    client = await online(api, "cat")
    ident = await agent_id(api, "cat")
    await advertise(api, client, ident, [
        {"namespace": "/a/b", "version": 1, "policy": []},
        {"namespace": "/a/c", "version": 2, "policy": None, "extra": "ignored"},
    ])
    org = {(m["namespace"], m["version"]) for m in await api.ok("GET", "/api/v1/metrics")}
    assert {("/a/b", 1), ("/a/c", 2)} <= org
    # A later catalog replaces the earlier one (gone metrics are removed).
    await advertise(api, client, ident, [{"namespace": "/a/c", "version": 2, "policy": []}])
    org = {(m["namespace"], m["version"]) for m in await api.ok("GET", "/api/v1/metrics")}
    assert ("/a/b", 1) not in org and ("/a/c", 2) in org
    await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_tasks_go_only_to_agents_whose_catalog_covers_their_metrics(api):
    clients = {n: await online(api, n) for n in ("narrow", "empty", "covering")}
    ids = {n: await agent_id(api, n) for n in clients}
    await advertise(api, clients["narrow"], ids["narrow"], [{"namespace": "/a/b", "version": 1, "policy": []}])
    await advertise(api, clients["covering"], ids["covering"],
                    [{"namespace": "/example-task/foo", "version": 1, "policy": []}])
    task = await api.ok("POST", TASKS, json_body=task_body("needs-example", by_ids(*ids.values())))
    assert await clients["empty"].next("taskAdd") == task
    assert await clients["covering"].next("taskAdd") == task
    await clients["narrow"].nothing_more("taskAdd", 0.3)
    assert await routed(api, task["id"]) == sorted([ids["empty"], ids["covering"]])

    # A catalog that newly covers the task brings it; one that stops covering takes it away.
    clients["narrow"].send("catalog", [{"namespace": "/a/b", "version": 1, "policy": []},
                                       {"namespace": "/example-task/bar", "version": 3, "policy": []}])
    assert await clients["narrow"].next("taskAdd") == task
    clients["narrow"].send("catalog", [{"namespace": "/a/b", "version": 1, "policy": []}])
    assert (await clients["narrow"].next("taskRemove"))["id"] == task["id"]
    clients["covering"].send("catalog", [{"namespace": "/other/thing", "version": 1, "policy": []}])
    assert (await clients["covering"].next("taskRemove"))["id"] == task["id"]
    assert await routed(api, task["id"]) == [ids["empty"]]
    # And a reconnect's taskList agrees with what the catalog allows.
    await clients["narrow"].disconnect()
    again = await online(api, "narrow")
    assert again.events("taskList") == [[]]
    for client in (again, clients["empty"], clients["covering"]):
        await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_metric_version_zero_matches_any_version_and_others_must_match(api):
    clients = {n: await online(api, n) for n in ("v1", "v2")}
    ids = {n: await agent_id(api, n) for n in clients}
    await advertise(api, clients["v1"], ids["v1"], [{"namespace": "/v/x", "version": 1, "policy": []}])
    await advertise(api, clients["v2"], ids["v2"], [{"namespace": "/v/x", "version": 2, "policy": []}])
    anyver = await api.ok("POST", TASKS, json_body=task_body("anyver", by_ids(ids["v1"], ids["v2"]),
                                                             metrics={"/v/x": 0}))
    ver2 = await api.ok("POST", TASKS, json_body=task_body("ver2", by_ids(ids["v1"], ids["v2"]),
                                                           metrics={"/v/x": 2}))
    assert await clients["v1"].next("taskAdd") == anyver
    assert await clients["v2"].next("taskAdd", predicate=is_task(anyver["id"])) == anyver
    assert await clients["v2"].next("taskAdd", predicate=is_task(ver2["id"])) == ver2
    await clients["v1"].nothing_more("taskAdd", 0.3)
    assert await routed(api, anyver["id"]) == sorted(ids.values())
    assert await routed(api, ver2["id"]) == [ids["v2"]]
    for client in clients.values():
        await client.disconnect()


# -- any -------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_any_task_goes_to_exactly_one_online_agent(api):
    clients = {n: await online(api, n) for n in ("a1", "a2")}
    ids = {n: await agent_id(api, n) for n in clients}
    task = await api.ok("POST", TASKS, json_body=task_body("anywhere", ANY))
    holder = await which_got(clients, task["id"])
    other = next(n for n in clients if n != holder)
    await clients[other].nothing_more("taskAdd", 0.3)
    assert await routed(api, task["id"]) == [ids[holder]]
    for client in clients.values():
        await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_any_task_moves_to_another_agent_when_its_agent_goes_offline(fast):
    api = fast
    clients = {n: await online(api, n) for n in ("x", "y")}
    ids = {n: await agent_id(api, n) for n in clients}
    task = await api.ok("POST", TASKS, json_body=task_body("mover", ANY))
    x = await which_got(clients, task["id"])
    y = next(n for n in clients if n != x)
    await clients[x].disconnect()
    assert await clients[y].next("taskAdd", timeout=5) == task
    assert await routed(api, task["id"]) == [ids[y]]
    await clients[y].disconnect()


@pytest_twisted.ensureDeferred
async def test_any_task_stays_when_its_agent_reconnects_within_the_relocate_delay(db_config):
    api = await start_server(*db_config, relocate_delay=1.5)
    try:
        clients = {n: await online(api, n) for n in ("x", "y")}
        ids = {n: await agent_id(api, n) for n in clients}
        task = await api.ok("POST", TASKS, json_body=task_body("sticky", ANY))
        x = await which_got(clients, task["id"])
        y = next(n for n in clients if n != x)
        offline: list[int] = []
        api.server.events.subscribe(
            lambda e: offline.append(e.payload["id"]) if e.type == "agent.offline" else None)
        await clients[x].disconnect()
        await until(lambda: offline == [ids[x]], what="agent.offline published")
        back = connect_agent(api.base, x, ADMIN_KEY)
        await back.opened
        assert [t["id"] for t in await back.next("taskList")] == [task["id"]]
        await clients[y].nothing_more("taskAdd", 2.5)
        assert await routed(api, task["id"]) == [ids[x]]
        await back.disconnect(), await clients[y].disconnect()
    finally:
        await stop_server(api)


@pytest_twisted.ensureDeferred
async def test_unassigned_any_task_is_assigned_when_an_agent_connects(api):
    task = await api.ok("POST", TASKS, json_body=task_body("waiting", ANY))
    assert await routed(api, task["id"]) == []
    late = connect_agent(api.base, "late", ADMIN_KEY)
    await late.opened
    # Assigned before the first taskList is sent, so it is already in it.
    assert [t["id"] for t in await late.next("taskList")] == [task["id"]]
    await late.nothing_more("taskAdd", 0.3)
    ident = await agent_id(api, "late")
    assert await routed(api, task["id"]) == [ident]
    await late.disconnect()


@pytest_twisted.ensureDeferred
async def test_any_task_nobody_online_can_run_waits_for_a_covering_agent(api):
    # "capable" advertises /c/d once, then goes away; its catalog stays on record.
    capable = await online(api, "capable")
    capable_id = await agent_id(api, "capable")
    await advertise(api, capable, capable_id, [{"namespace": "/c/d", "version": 1, "policy": []}])
    await capable.disconnect()

    async def offline():
        return not (await api.ok("GET", f"{AGENTS}/{capable_id}"))["online"]

    await eventually(offline, what="capable offline")
    narrow = await online(api, "narrow")
    await advertise(api, narrow, await agent_id(api, "narrow"), [{"namespace": "/a/b", "version": 1, "policy": []}])
    task = await api.ok("POST", TASKS, json_body=task_body("needs-cd", ANY, metrics={"/c/d": 0}))
    assert await routed(api, task["id"]) == []
    await narrow.nothing_more("taskAdd", 0.3)
    again = connect_agent(api.base, "capable", ADMIN_KEY)
    await again.opened
    await receives(again, task["id"])
    assert await routed(api, task["id"]) == [capable_id]
    assert not holds(narrow, task["id"])
    await again.disconnect(), await narrow.disconnect()


# -- agent state -----------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_disabled_agents_still_connect_and_get_routed_tasks(api):
    agent = await register(api, "agent1", tags=["t"])
    assert agent["enabled"] is False
    client = await online(api, "agent1")
    by_id = await api.ok("POST", TASKS, json_body=task_body("by-id", by_ids(agent["id"])))
    assert await client.next("taskAdd", predicate=is_task(by_id["id"])) == by_id
    by_tag = await api.ok("POST", TASKS, json_body=task_body("by-tag", by_tags("t")))
    assert await client.next("taskAdd", predicate=is_task(by_tag["id"])) == by_tag
    anywhere = await api.ok("POST", TASKS, json_body=task_body("anywhere", ANY))
    assert await client.next("taskAdd", predicate=is_task(anywhere["id"])) == anywhere
    assert (await api.ok("GET", f"{AGENTS}/{agent['id']}"))["enabled"] is False
    await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_deleting_an_agent_closes_its_socket_and_moves_its_any_task(fast):
    api = fast
    clients = {n: await online(api, n) for n in ("x", "y")}
    ids = {n: await agent_id(api, n) for n in clients}
    task = await api.ok("POST", TASKS, json_body=task_body("orphan", ANY))
    x = await which_got(clients, task["id"])
    y = next(n for n in clients if n != x)
    await api.ok("DELETE", f"{AGENTS}/{ids[x]}")
    await clients[x].closed
    assert clients[x].close_code == 1000
    assert await clients[y].next("taskAdd", timeout=5) == task
    assert await routed(api, task["id"]) == [ids[y]]
    await clients[y].disconnect()


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest_twisted.ensureDeferred
async def test_any_task_moves_when_its_agent_stops_covering_its_metrics(api):
    """Found in review: an agent whose new catalog no longer covers its `any` task used to
    keep the assignment (and so nobody ran the task)."""
    x = await online(api, "x")
    task = await api.ok("POST", TASKS, json_body=task_body("covered", ANY, metrics={"/m/*": 0}))
    x_id = await agent_id(api, "x")
    assert await routed(api, task["id"]) == [x_id]
    y = await online(api, "y")
    y_id = await agent_id(api, "y")
    await advertise(api, x, x_id, [{"namespace": "/other/thing", "version": 1}])
    assert (await x.next("taskRemove"))["id"] == task["id"]
    assert (await y.next("taskAdd"))["id"] == task["id"]
    assert await routed(api, task["id"]) == [y_id]
    await x.disconnect(), await y.disconnect()
