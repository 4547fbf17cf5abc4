"""Tasks over real HTTP: the notes' walkthrough, CRUD, listing, validation, routing indexes.

Every test talks to a real task-server (sqlite file and MariaDB) through its socket;
route-index and task_metric rows are read straight from the database afterwards.
"""
from __future__ import annotations

import copy
import re
from datetime import datetime
from typing import Any

import pytest
import pytest_twisted
import sqlalchemy as sa

from taskd.db import models
from tests.integration.harness import ADMIN_KEY, ORG2_KEY, assert_error
from tests.notes_requests import NOTES_TASK


TASK_FIELDS = {"id", "name", "taskType", "orgId", "config", "interval", "route",
               "metrics", "enabled", "created", "updated"}


# -- helpers --------------------------------------------------------------------------

def task_body(name: str = "example-task-1", **fields: Any) -> dict[str, Any]:
    """The notes' task under another name, with some fields replaced."""
    body = copy.deepcopy(NOTES_TASK)
    body["name"] = name
    body.update(fields)
    return body


async def create_task(api, name: str = "example-task-1", *, key: str = ADMIN_KEY, **fields: Any) -> dict:
    return await api.ok("POST", "/api/v1/tasks", key=key, json_body=task_body(name, **fields))


async def create_agent(api, name: str, *, key: str = ADMIN_KEY, **fields: Any) -> dict:
    return await api.ok("POST", "/api/v1/agents", key=key, json_body={"name": name, **fields})


async def get_task(api, task_id: int, key: str = ADMIN_KEY) -> dict:
    """GET /tasks/:id without its `agents` (the ids it is routed to: none here, no agent is online),
    `unrouted` (why named agents do not get it: test_routes_checked_at_use.py) and `status`
    (what agents reported: none here)."""
    task = await api.ok("GET", f"/api/v1/tasks/{task_id}", key=key)
    assert task.pop("agents") == [], task
    assert isinstance(task.pop("unrouted"), list), task
    assert task.pop("status") == [], task
    return task


async def list_tasks(api, key: str = ADMIN_KEY, **params: Any) -> list[dict]:
    return await api.ok("GET", "/api/v1/tasks", key=key, params=params or None)


async def names(api, key: str = ADMIN_KEY, **params: Any) -> list[str]:
    return [t["name"] for t in await list_tasks(api, key, **params)]




def when(stamp: str) -> datetime:
    assert stamp.endswith("Z"), stamp
    return datetime.fromisoformat(stamp[:-1] + "+00:00")


def rows(api, table: sa.Table, *columns: str, task_id: int) -> set[tuple]:
    """The rows of a per-task table, as tuples of `columns`."""
    with api.server.engine.connect() as conn:
        result = conn.execute(
            sa.select(*(table.c[c] for c in columns)).where(table.c.task_id == task_id))
        return {tuple(r) for r in result}


def id_routes(api, task_id: int) -> set[int]:
    return {a for (a,) in rows(api, models.route_by_id_index, "agent_id", task_id=task_id)}


def tag_routes(api, task_id: int) -> set[tuple[int, str]]:
    return rows(api, models.route_by_tag_index, "org_id", "tag", task_id=task_id)


def task_metrics(api, task_id: int) -> set[tuple[str, int]]:
    return rows(api, models.task_metric, "namespace", "version", task_id=task_id)


# -- the notes' walkthrough -------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_notes_task_is_created_without_any_agent(api):
    reply = await api.request("POST", "/api/v1/tasks", json_body=NOTES_TASK,
                              headers={"Content-Type": "application/json"})
    assert reply.status == 200, reply.raw
    assert reply.meta == {"code": 200, "message": "success", "type": "task"}
    task = reply.body
    assert set(task) == TASK_FIELDS
    assert isinstance(task["id"], int) and task["id"] > 0
    assert task["name"] == "example-task-1"
    assert task["taskType"] == ""
    assert task["orgId"] == 1
    assert task["config"] == {"/example-task": {"param1": "value1", "param2": "value2"}}
    assert task["interval"] == 300
    assert task["route"] == {"type": "any", "config": {}}
    assert task["metrics"] == {"/example-task/*": 0}
    assert task["enabled"] is True
    assert when(task["created"]) <= when(task["updated"])
    assert task_metrics(api, task["id"]) == {("/example-task/*", 0)}


@pytest_twisted.ensureDeferred
async def test_get_task_by_id_returns_what_create_returned(api):
    task = await create_task(api)
    assert await get_task(api, task["id"]) == task


# -- listing ---------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_list_defaults_to_name_order(api):
    for name in ("bravo", "charlie", "alpha"):
        await create_task(api, name)
    assert await names(api) == ["alpha", "bravo", "charlie"]


@pytest_twisted.ensureDeferred
async def test_list_default_limit_is_50(api):
    for i in range(51):
        await create_task(api, f"task-{i:02d}")
    assert await names(api) == [f"task-{i:02d}" for i in range(50)]
    assert await names(api, page=2) == ["task-50"]


@pytest_twisted.ensureDeferred
async def test_list_limit_and_page(api):
    for name in ("a", "b", "c", "d", "e"):
        await create_task(api, name)
    assert await names(api, limit=2) == ["a", "b"]
    assert await names(api, limit=2, page=2) == ["c", "d"]
    assert await names(api, limit=2, page=3) == ["e"]
    assert await names(api, limit=2, page=4) == []


@pytest_twisted.ensureDeferred
async def test_list_empty_is_an_empty_array(api):
    reply = await api.request("GET", "/api/v1/tasks")
    assert reply.status == 200 and reply.meta["type"] == "tasks"
    assert reply.body == []


@pytest_twisted.ensureDeferred
async def test_list_filter_name_exact_and_wildcard(api):
    for name in ("web-check", "web-check-2", "db-check"):
        await create_task(api, name)
    assert await names(api, name="web-check") == ["web-check"]
    assert await names(api, name="web-*") == ["web-check", "web-check-2"]
    assert await names(api, name="*check") == ["db-check", "web-check"]
    assert await names(api, name="web") == []


@pytest_twisted.ensureDeferred
async def test_list_filter_metric_wildcard(api):
    await create_task(api, "cpu", metrics={"/os/cpu/usage": 0})
    await create_task(api, "mem", metrics={"/os/mem/free": 2})
    await create_task(api, "ping", metrics={"/net/ping/*": 0, "/os/cpu/load": 1})
    assert await names(api, metric="/os/cpu/usage") == ["cpu"]
    assert await names(api, metric="/os/cpu/*") == ["cpu", "ping"]
    assert await names(api, metric="/os/*") == ["cpu", "mem", "ping"]
    assert await names(api, metric="/net/*") == ["ping"]
    assert await names(api, metric="/disk/*") == []


@pytest_twisted.ensureDeferred
async def test_list_filter_enabled(api):
    await create_task(api, "on", enabled=True)
    await create_task(api, "off", enabled=False)
    assert await names(api, enabled="true") == ["on"]
    assert await names(api, enabled="false") == ["off"]
    assert await names(api) == ["off", "on"]


@pytest_twisted.ensureDeferred
async def test_list_order_by_known_columns(api):
    await create_task(api, "b", interval=10)
    await create_task(api, "a", interval=30)
    await create_task(api, "c", interval=20)
    assert await names(api, orderBy="interval") == ["b", "c", "a"]
    assert await names(api, orderBy="-interval") == ["a", "c", "b"]
    assert await names(api, orderBy="interval desc") == ["a", "c", "b"]
    assert await names(api, orderBy="id") == ["b", "a", "c"]
    assert await names(api, orderBy="created") == ["b", "a", "c"]
    assert await names(api, orderBy="name desc") == ["c", "b", "a"]
    for column in ("taskType", "task_type", "enabled", "updated"):
        assert sorted(await names(api, orderBy=column)) == ["a", "b", "c"]


@pytest.mark.parametrize("order_by", ["config", "org_id", "orgId", "route", "name;", "1", "interval sideways"])
@pytest_twisted.ensureDeferred
async def test_list_order_by_unknown_column_is_400(api, order_by):
    await create_task(api, "a")
    reply = await api.request("GET", "/api/v1/tasks", params={"orderBy": order_by})
    assert_error(reply, 400, "orderBy")


# -- update and delete -----------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_put_replaces_fields_and_advances_updated(api):
    old = await create_task(api)
    new_body = {
        "id": old["id"], "name": "renamed", "taskType": "snap", "interval": 60,
        "config": {"/other": {"k": 1}}, "metrics": {"/other/*": 3},
        "route": {"type": "byTags", "config": {"tags": ["eu"]}}, "enabled": False,
    }
    new = await api.ok("PUT", "/api/v1/tasks", json_body=new_body)
    assert new["id"] == old["id"] and new["orgId"] == 1
    assert {k: new[k] for k in new_body} == {**new_body, "route": {"type": "byTags", "config": {"tags": ["eu"]}}}
    assert new["created"] == old["created"]
    assert when(new["updated"]) > when(old["updated"])
    assert await get_task(api, old["id"]) == new
    assert task_metrics(api, old["id"]) == {("/other/*", 3)}


@pytest_twisted.ensureDeferred
async def test_put_omitted_optional_fields_are_reset_not_kept(api):
    old = await create_task(api)
    new = await api.ok("PUT", "/api/v1/tasks", json_body={
        "id": old["id"], "name": old["name"], "interval": 300, "route": {"type": "any"}})
    assert new["config"] == {} and new["metrics"] == {} and new["enabled"] is False
    assert task_metrics(api, old["id"]) == set()


@pytest_twisted.ensureDeferred
async def test_put_of_a_got_task_round_trips(api):
    created = await create_task(api)
    got = await api.ok("GET", f"/api/v1/tasks/{created['id']}")
    put = await api.ok("PUT", "/api/v1/tasks", json_body=got)
    del got["agents"], got["unrouted"], got["status"]  # shown by GET only; accepted and ignored by PUT
    assert {k: v for k, v in put.items() if k != "updated"} == {k: v for k, v in got.items() if k != "updated"}
    assert when(put["updated"]) > when(got["updated"])


@pytest_twisted.ensureDeferred
async def test_put_ignores_read_only_fields(api):
    created = await create_task(api)
    body = {**created, "orgId": 2, "created": "2000-01-01T00:00:00Z", "updated": "2000-01-01T00:00:00Z"}
    put = await api.ok("PUT", "/api/v1/tasks", json_body=body)
    assert put["orgId"] == 1 and put["created"] == created["created"]
    assert when(put["updated"]) > when(created["updated"])
    assert [t["id"] for t in await list_tasks(api, ORG2_KEY)] == []


@pytest_twisted.ensureDeferred
async def test_put_unknown_id_is_404(api):
    reply = await api.request("PUT", "/api/v1/tasks", json_body=task_body(id=4242))
    assert_error(reply, 404, "4242")


@pytest_twisted.ensureDeferred
async def test_put_without_id_is_400(api):
    await create_task(api)
    reply = await api.request("PUT", "/api/v1/tasks", json_body=task_body())
    assert_error(reply, 400, "id")


@pytest_twisted.ensureDeferred
async def test_delete_then_get_is_404(api):
    task = await create_task(api)
    reply = await api.request("DELETE", f"/api/v1/tasks/{task['id']}")
    assert reply.status == 200 and reply.meta["type"] == "task" and reply.body is None
    assert_error(await api.request("GET", f"/api/v1/tasks/{task['id']}"), 404, str(task["id"]))
    assert_error(await api.request("DELETE", f"/api/v1/tasks/{task['id']}"), 404)
    assert await list_tasks(api) == []


@pytest_twisted.ensureDeferred
async def test_duplicate_name_is_409_in_the_same_org(api):
    await create_task(api)
    reply = await api.request("POST", "/api/v1/tasks", json_body=NOTES_TASK)
    assert_error(reply, 409, "example-task-1")
    assert await names(api) == ["example-task-1"]


@pytest_twisted.ensureDeferred
async def test_put_renaming_onto_an_existing_name_is_409(api):
    await create_task(api, "first")
    second = await create_task(api, "second")
    reply = await api.request("PUT", "/api/v1/tasks", json_body=task_body("first", id=second["id"]))
    assert_error(reply, 409, "first")
    assert await names(api) == ["first", "second"]


@pytest_twisted.ensureDeferred
async def test_same_name_is_fine_in_another_org(api):
    mine = await create_task(api)
    theirs = await create_task(api, key=ORG2_KEY)
    assert theirs["orgId"] == 2 and theirs["id"] != mine["id"]
    assert theirs["name"] == mine["name"]


# -- org scoping -----------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_other_org_cannot_see_or_change_a_task(api):
    task = await create_task(api)
    path = f"/api/v1/tasks/{task['id']}"
    assert_error(await api.request("GET", path, key=ORG2_KEY), 404)
    assert_error(await api.request("PUT", "/api/v1/tasks", key=ORG2_KEY,
                                   json_body=task_body("stolen", id=task["id"])), 404)
    assert_error(await api.request("DELETE", path, key=ORG2_KEY), 404)
    assert await list_tasks(api, ORG2_KEY) == []
    assert await list_tasks(api, ORG2_KEY, name="example-task-1") == []
    assert await get_task(api, task["id"]) == task


@pytest_twisted.ensureDeferred
async def test_list_shows_only_the_callers_org(api):
    await create_task(api, "org1-task")
    await create_task(api, "org2-task", key=ORG2_KEY)
    assert await names(api) == ["org1-task"]
    assert await names(api, ORG2_KEY) == ["org2-task"]
    assert {t["orgId"] for t in await list_tasks(api, ORG2_KEY)} == {2}


@pytest_twisted.ensureDeferred
async def test_config_values_may_be_lists_and_objects_for_the_builtin_collectors(api):
    """`headers` (an object) and status codes (a list) round-trip through the API and reach
    the agent as sent; bounds and nulls are in INVALID_TASKS."""
    config = {"/raintank/apps/http": {"url": "http://example.com/", "headers": {"X-Api-Key": "s3cret"},
                                      "valid_status_codes": [200, "300-399"], "nested": [{"a": [1, 2.5, True]}]}}
    created = await create_task(api, "with-lists", config=config)
    assert created["config"] == config
    assert (await get_task(api, created["id"]))["config"] == config


# -- validation ------------------------------------------------------------------------

def _without(field: str):
    return lambda body: {k: v for k, v in body.items() if k != field}


def _with(**fields: Any):
    return lambda body: {**body, **fields}


INVALID_TASKS = [
    ("no name", _without("name"), ["name is required"]),
    ("no interval", _without("interval"), ["interval is required"]),
    ("no route", _without("route"), ["route is required"]),
    ("interval 0", _with(interval=0), ["interval must"]),
    ("interval -5", _with(interval=-5), ["interval must"]),
    ("interval 1.5", _with(interval=1.5), ["interval must"]),
    ("interval string", _with(interval="300"), ["interval must"]),
    ("interval true", _with(interval=True), ["interval must"]),
    ("interval null", _with(interval=None), ["interval must"]),
    ("route not object", _with(route="any"), ["route must"]),
    ("route type unknown", _with(route={"type": "roundRobin"}), ["route.type", "roundRobin"]),
    ("route type missing", _with(route={"config": {}}), ["route.type"]),
    ("route extra key", _with(route={"type": "any", "tags": ["a"]}), ["route has unknown field 'tags'"]),
    ("any with config", _with(route={"type": "any", "config": {"tags": ["a"]}}), ['route of type "any"', "config"]),
    ("byTags no config", _with(route={"type": "byTags"}), ['route of type "byTags"', '"tags"']),
    ("byTags empty", _with(route={"type": "byTags", "config": {"tags": []}}), ['route of type "byTags"', '"tags"']),
    ("byTags extra key", _with(route={"type": "byTags", "config": {"tags": ["a"], "ids": [1]}}),
     ['route of type "byTags"', '"tags"']),
    ("byTags not list", _with(route={"type": "byTags", "config": {"tags": "a"}}), ['route of type "byTags"', '"tags"']),
    ("byTags int tag", _with(route={"type": "byTags", "config": {"tags": ["a", 7]}}), ["route.config.tags[1] must"]),
    ("byIds str id", _with(route={"type": "byIds", "config": {"ids": ["1"]}}), ["route.config.ids[0] must"]),
    ("byIds float id", _with(route={"type": "byIds", "config": {"ids": [1.5]}}), ["route.config.ids[0] must"]),
    ("byIds bool id", _with(route={"type": "byIds", "config": {"ids": [True]}}), ["route.config.ids[0] must"]),
    ("byIds empty", _with(route={"type": "byIds", "config": {"ids": []}}), ['route of type "byIds"', '"ids"']),
    ("byIds no config", _with(route={"type": "byIds"}), ['route of type "byIds"', '"ids"']),
    ("config not object", _with(config=["/a"]), ["config must"]),
    ("config string", _with(config="x"), ["config must"]),
    ("config ns not object", _with(config={"/a": "x"}), ["config['/a'] must"]),
    ("config null value", _with(config={"/a": {"k": None}}), ["config['/a']['k'] must", "not null"]),
    ("config null in a list", _with(config={"/a": {"k": [1, None]}}), ["config['/a']['k'][1] must", "not null"]),
    ("config nested too deep", _with(config={"/a": {"k": [[[[[1]]]]]}}), ["config['/a']['k']", "deeper than 4"]),
    ("config too many items", _with(config={"/a": {"k": list(range(1001))}}), ["config['/a']['k']", "more than 1000"]),
    ("metrics not object", _with(metrics=["/a"]), ["metrics must"]),
    ("metrics negative", _with(metrics={"/a": -1}), ["metrics['/a'] must"]),
    ("metrics float", _with(metrics={"/a": 1.5}), ["metrics['/a'] must"]),
    ("metrics string", _with(metrics={"/a": "1"}), ["metrics['/a'] must"]),
    ("name too long", _with(name="n" * 256), ["name must", "255"]),
    ("name empty", _with(name=""), ["name must"]),
    ("name not string", _with(name=42), ["name must"]),
    ("enabled string", _with(enabled="true"), ["enabled must"]),
    ("enabled int", _with(enabled=1), ["enabled must"]),
    ("unknown field", _with(intervall=300), ["unknown field 'intervall'"]),
]


@pytest.mark.parametrize("mutate,words", [c[1:] for c in INVALID_TASKS], ids=[c[0] for c in INVALID_TASKS])
@pytest_twisted.ensureDeferred
async def test_invalid_task_is_400_naming_the_field(api, mutate, words):
    reply = await api.request("POST", "/api/v1/tasks", json_body=mutate(task_body()))
    assert_error(reply, 400, *words)
    assert await list_tasks(api) == []


@pytest.mark.parametrize("mutate,words", [c[1:] for c in INVALID_TASKS], ids=[c[0] for c in INVALID_TASKS])
@pytest_twisted.ensureDeferred
async def test_invalid_put_is_400_and_changes_nothing(api, mutate, words):
    task = await create_task(api)
    reply = await api.request("PUT", "/api/v1/tasks", json_body=mutate(task_body(id=task["id"])))
    assert_error(reply, 400, *words)
    assert await get_task(api, task["id"]) == task


@pytest_twisted.ensureDeferred
async def test_name_of_255_characters_is_accepted(api):
    task = await create_task(api, "n" * 255)
    assert task["name"] == "n" * 255


@pytest_twisted.ensureDeferred
async def test_form_encoded_task_is_400_asking_for_json(api):
    reply = await api.request("POST", "/api/v1/tasks", data={"name": "t", "interval": "300"})
    assert_error(reply, 400, "JSON")
    assert await list_tasks(api) == []


# -- byIds / byTags routing ------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_by_ids_accepts_own_agents_and_public_agents_of_other_orgs(api):
    own = await create_agent(api, "own")
    public = await create_agent(api, "shared", key=ORG2_KEY, public=True)
    task = await create_task(api, route={"type": "byIds", "config": {"ids": [public["id"], own["id"]]}})
    assert task["route"] == {"type": "byIds", "config": {"ids": sorted([own["id"], public["id"]])}}
    assert id_routes(api, task["id"]) == {own["id"], public["id"]}
    assert tag_routes(api, task["id"]) == set()


@pytest_twisted.ensureDeferred
async def test_by_ids_refuses_private_agents_of_other_orgs_and_unknown_ids(api):
    own = await create_agent(api, "own")
    private = await create_agent(api, "private", key=ORG2_KEY)
    missing = private["id"] + 1000
    reply = await api.request("POST", "/api/v1/tasks", json_body=task_body(
        route={"type": "byIds", "config": {"ids": [own["id"], private["id"], missing]}}))
    message = assert_error(reply, 400, "route.config.ids")
    assert sorted(int(n) for n in re.findall(r"\d+", message)) == [private["id"], missing]
    assert await list_tasks(api) == []
    with api.server.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(models.route_by_id_index)).scalar() == 0


@pytest_twisted.ensureDeferred
async def test_by_ids_put_refuses_invisible_agent(api):
    own = await create_agent(api, "own")
    private = await create_agent(api, "private", key=ORG2_KEY)
    task = await create_task(api, route={"type": "byIds", "config": {"ids": [own["id"]]}})
    reply = await api.request("PUT", "/api/v1/tasks", json_body=task_body(
        id=task["id"], route={"type": "byIds", "config": {"ids": [private["id"]]}}))
    message = assert_error(reply, 400, "route.config.ids")
    assert re.findall(r"\d+", message) == [str(private["id"])]
    assert id_routes(api, task["id"]) == {own["id"]}


@pytest_twisted.ensureDeferred
async def test_by_tags_writes_one_index_row_per_tag(api):
    task = await create_task(api, route={"type": "byTags", "config": {"tags": ["eu", "db", "eu"]}})
    assert task["route"] == {"type": "byTags", "config": {"tags": ["db", "eu"]}}
    assert tag_routes(api, task["id"]) == {(1, "db"), (1, "eu")}
    assert id_routes(api, task["id"]) == set()


@pytest_twisted.ensureDeferred
async def test_put_changing_the_route_rewrites_the_indexes(api):
    a1 = await create_agent(api, "a1")
    a2 = await create_agent(api, "a2")
    task = await create_task(api, route={"type": "byIds", "config": {"ids": [a1["id"]]}})
    assert id_routes(api, task["id"]) == {a1["id"]}

    await api.ok("PUT", "/api/v1/tasks", json_body=task_body(
        id=task["id"], route={"type": "byIds", "config": {"ids": [a2["id"]]}}))
    assert id_routes(api, task["id"]) == {a2["id"]}

    await api.ok("PUT", "/api/v1/tasks", json_body=task_body(
        id=task["id"], route={"type": "byTags", "config": {"tags": ["x", "y"]}}))
    assert id_routes(api, task["id"]) == set()
    assert tag_routes(api, task["id"]) == {(1, "x"), (1, "y")}

    await api.ok("PUT", "/api/v1/tasks", json_body=task_body(
        id=task["id"], route={"type": "byTags", "config": {"tags": ["y", "z"]}}))
    assert tag_routes(api, task["id"]) == {(1, "y"), (1, "z")}

    await api.ok("PUT", "/api/v1/tasks", json_body=task_body(id=task["id"], route={"type": "any"}))
    assert id_routes(api, task["id"]) == set() and tag_routes(api, task["id"]) == set()


@pytest_twisted.ensureDeferred
async def test_tag_index_rows_carry_the_task_org(api):
    task = await create_task(api, key=ORG2_KEY, route={"type": "byTags", "config": {"tags": ["eu"]}})
    assert tag_routes(api, task["id"]) == {(2, "eu")}


@pytest_twisted.ensureDeferred
async def test_delete_removes_route_index_and_metric_rows(api):
    agent = await create_agent(api, "a1")
    by_ids = await create_task(api, "by-ids", route={"type": "byIds", "config": {"ids": [agent["id"]]}})
    by_tags = await create_task(api, "by-tags", route={"type": "byTags", "config": {"tags": ["eu"]}})
    assert task_metrics(api, by_ids["id"]) == {("/example-task/*", 0)}
    for task in (by_ids, by_tags):
        await api.ok("DELETE", f"/api/v1/tasks/{task['id']}")
        assert id_routes(api, task["id"]) == set()
        assert tag_routes(api, task["id"]) == set()
        assert task_metrics(api, task["id"]) == set()
    with api.server.engine.connect() as conn:
        for table in (models.task, models.task_metric, models.route_by_id_index, models.route_by_tag_index):
            assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() == 0, table.name
    assert (await api.ok("GET", f"/api/v1/agents/{agent['id']}"))["name"] == "a1"
