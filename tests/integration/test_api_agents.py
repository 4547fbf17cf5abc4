"""The agents API (/api/v1/agents) through real HTTP, on sqlite and on MariaDB.

Covers creating agents from every body type the notes and operators use, the agent's
JSON shape, validation, per-org uniqueness and visibility, updates, deletes (with
their cascade), and the list endpoint's filters, ordering and paging.
"""
from __future__ import annotations

import re
from typing import Any

import pytest
import pytest_twisted
import sqlalchemy as sa

from taskd.db import models
from tests.integration.harness import ADMIN_KEY, ORG2_KEY, ORG3_KEY, Reply, assert_error

AGENTS = "/api/v1/agents"
ZERO = "0001-01-01T00:00:00Z"
AGENT_KEYS = {"id", "name", "enabled", "enabledChange", "public", "tags",
              "online", "onlineChange", "created", "updated", "failingTasks", "staleTasks"}
RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")
ORDERABLE = ("id", "name", "enabled", "enabledChange", "public", "online",
             "onlineChange", "created", "updated")


# -- helpers ---------------------------------------------------------------------------

async def create(api, name: str, key: str = ADMIN_KEY, **fields: Any) -> dict:
    return await api.ok("POST", AGENTS, key=key, json_body={"name": name, **fields})


async def post_raw(api, body: bytes, content_type: str) -> Reply:
    return await api.request("POST", AGENTS, data=body, headers={"Content-Type": content_type})


async def names(api, key: str = ADMIN_KEY, params: Any = None) -> list[str]:
    return [a["name"] for a in await api.ok("GET", AGENTS, key=key, params=params)]




def multipart(fields: list[tuple[str, str]], boundary: str = "XyZboundary42") -> tuple[bytes, str]:
    parts = b"".join(
        b"--" + boundary.encode() + b"\r\n"
        + f'Content-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields
    )
    return parts + b"--" + boundary.encode() + b"--\r\n", f"multipart/form-data; boundary={boundary}"


def agent_rows(api, table: sa.Table, agent_id: int) -> int:
    with api.server.engine.connect() as conn:
        return conn.execute(
            sa.select(sa.func.count()).select_from(table).where(table.c.agent_id == agent_id)
        ).scalar_one()


def expected_order(agents: list[dict], key: str, descending: bool) -> list[int]:
    """Ids ordered as the API must: by `key`, ties by id ascending."""
    by_id = sorted(agents, key=lambda a: a["id"])
    return [a["id"] for a in sorted(by_id, key=lambda a: a[key], reverse=descending)]


# -- create ----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_create_json_has_exactly_the_agent_fields_and_defaults(api):
    reply = await api.request("POST", AGENTS, json_body={"name": "agent1"})
    assert reply.status == 200
    assert reply.meta == {"code": 200, "message": "success", "type": "agent"}
    agent = reply.body
    assert set(agent) == AGENT_KEYS  # no orgId
    assert isinstance(agent["id"], int) and agent["id"] > 0
    assert agent["name"] == "agent1"
    assert agent["enabled"] is False and agent["enabledChange"] == ZERO
    assert agent["public"] is False and agent["tags"] == []
    assert agent["online"] is False and agent["onlineChange"] == ZERO
    assert RFC3339_UTC.match(agent["created"]) and RFC3339_UTC.match(agent["updated"])


@pytest_twisted.ensureDeferred
async def test_create_enabled_sets_enabled_change(api):
    agent = await create(api, "on-from-start", enabled=True, public=True, tags=["b", "a"])
    assert agent["enabled"] is True and agent["public"] is True
    assert agent["enabledChange"] != ZERO and RFC3339_UTC.match(agent["enabledChange"])
    assert agent["enabledChange"] == agent["created"]
    assert agent["tags"] == ["a", "b"]


@pytest_twisted.ensureDeferred
async def test_create_urlencoded_with_repeated_and_comma_separated_tags(api):
    reply = await post_raw(api, b"name=form1&enabled=true&public=false&tags=a&tags=b,c",
                           "application/x-www-form-urlencoded")
    assert reply.status == 200, reply.raw
    agent = reply.body
    assert agent["name"] == "form1" and agent["enabled"] is True and agent["public"] is False
    assert agent["enabledChange"] != ZERO
    assert agent["tags"] == ["a", "b", "c"]
    assert await api.ok("GET", f"{AGENTS}/{agent['id']}") == agent


@pytest_twisted.ensureDeferred
async def test_create_multipart(api):
    body, ctype = multipart([("name", "mp1"), ("enabled", "true"), ("tags", "x"), ("tags", "y,z")])
    reply = await post_raw(api, body, ctype)
    assert reply.status == 200, reply.raw
    agent = reply.body
    assert set(agent) == AGENT_KEYS
    assert agent["name"] == "mp1" and agent["enabled"] is True
    assert agent["tags"] == ["x", "y", "z"]


@pytest.mark.parametrize("body", [
    {},
    {"name": ""},
    {"name": "has space"},
    {"name": "slash/name"},
    {"name": "dötted"},
    {"name": "x" * 256},
    {"name": 42},
], ids=["missing", "empty", "space", "slash", "non-ascii", "too-long", "not-a-string"])
@pytest_twisted.ensureDeferred
async def test_create_rejects_bad_names(api, body):
    assert_error(await api.request("POST", AGENTS, json_body=body), 400, "name")
    assert await api.ok("GET", AGENTS) == []


@pytest_twisted.ensureDeferred
async def test_create_accepts_the_full_name_alphabet_up_to_255_chars(api):
    assert (await create(api, "Az09_-"))["name"] == "Az09_-"
    long_name = "n" * 255
    assert (await create(api, long_name))["name"] == long_name


@pytest_twisted.ensureDeferred
async def test_duplicate_name_in_same_org_conflicts_but_other_org_is_fine(api):
    first = await create(api, "dup")
    assert_error(await api.request("POST", AGENTS, json_body={"name": "dup"}), 409, "dup")
    other = await create(api, "dup", key=ORG2_KEY)
    assert other["id"] != first["id"]
    assert await names(api, params={"name": "dup", "public": "false"}) == ["dup"]


# -- get -------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_get_by_id_returns_the_created_agent(api):
    agent = await create(api, "getme", tags=["t1"])
    reply = await api.request("GET", f"{AGENTS}/{agent['id']}")
    assert reply.status == 200 and reply.meta["type"] == "agent"
    assert reply.body == agent


@pytest_twisted.ensureDeferred
async def test_get_unknown_id_is_404_envelope(api):
    assert_error(await api.request("GET", f"{AGENTS}/999999"), 404, "999999")


@pytest.mark.parametrize("raw_id", ["abc", "0", "-1", "1.5", "99999999999"])
@pytest_twisted.ensureDeferred
async def test_get_non_numeric_or_out_of_range_id_is_400(api, raw_id):
    assert_error(await api.request("GET", f"{AGENTS}/{raw_id}"), 400, "id")


# -- update ----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_put_changes_fields_and_replaces_tags(api):
    agent = await create(api, "upd", tags=["a", "b"])
    new = await api.ok("PUT", AGENTS, json_body={
        "id": agent["id"], "name": "upd2", "enabled": True, "public": True, "tags": ["c"],
    })
    assert new["id"] == agent["id"] and new["name"] == "upd2"
    assert new["enabled"] is True and new["public"] is True
    assert new["tags"] == ["c"]
    assert new["created"] == agent["created"]
    assert new["updated"] > agent["updated"]
    assert await api.ok("GET", f"{AGENTS}/{agent['id']}") == new
    assert await names(api, params={"tag": "a"}) == []


@pytest_twisted.ensureDeferred
async def test_put_keeps_omitted_fields(api):
    agent = await create(api, "keep", enabled=True, public=True, tags=["x", "y"])
    new = await api.ok("PUT", AGENTS, json_body={"id": agent["id"], "name": "kept"})
    assert new["name"] == "kept"
    assert (new["enabled"], new["public"], new["tags"]) == (True, True, ["x", "y"])
    assert new["enabledChange"] == agent["enabledChange"]


@pytest_twisted.ensureDeferred
async def test_put_empty_tags_clears_them(api):
    agent = await create(api, "clear", tags=["x"])
    new = await api.ok("PUT", AGENTS, json_body={"id": agent["id"], "tags": []})
    assert new["tags"] == []


@pytest_twisted.ensureDeferred
async def test_put_accepts_back_what_get_returned(api):
    agent = await create(api, "roundtrip", tags=["t"])
    again = await api.ok("PUT", AGENTS, json_body=agent)
    assert {k: again[k] for k in ("id", "name", "enabled", "public", "tags", "enabledChange")} == \
        {k: agent[k] for k in ("id", "name", "enabled", "public", "tags", "enabledChange")}


@pytest_twisted.ensureDeferred
async def test_enabled_change_moves_only_when_enabled_flips(api):
    agent = await create(api, "flip")
    same = await api.ok("PUT", AGENTS, json_body={"id": agent["id"], "enabled": False, "tags": ["n"]})
    assert same["enabledChange"] == ZERO
    assert same["updated"] > agent["updated"]

    on = await api.ok("PUT", AGENTS, json_body={"id": agent["id"], "enabled": True})
    assert on["enabledChange"] != ZERO and on["enabledChange"] == on["updated"]

    still_on = await api.ok("PUT", AGENTS, json_body={"id": agent["id"], "enabled": True, "public": True})
    assert still_on["enabledChange"] == on["enabledChange"]
    assert still_on["updated"] > on["updated"]

    off = await api.ok("PUT", AGENTS, json_body={"id": agent["id"], "enabled": False})
    assert off["enabledChange"] > on["enabledChange"]


@pytest_twisted.ensureDeferred
async def test_put_without_id_is_400(api):
    await create(api, "noid")
    assert_error(await api.request("PUT", AGENTS, json_body={"name": "noid", "enabled": True}), 400, "id")


@pytest_twisted.ensureDeferred
async def test_put_unknown_id_is_404(api):
    assert_error(await api.request("PUT", AGENTS, json_body={"id": 999999, "name": "x"}), 404)


@pytest_twisted.ensureDeferred
async def test_put_to_a_taken_name_conflicts_and_changes_nothing(api):
    await create(api, "taken")
    mine = await create(api, "mine")
    assert_error(await api.request("PUT", AGENTS, json_body={"id": mine["id"], "name": "taken"}), 409, "taken")
    assert (await api.ok("GET", f"{AGENTS}/{mine['id']}"))["name"] == "mine"


@pytest_twisted.ensureDeferred
async def test_put_rejects_a_bad_name(api):
    agent = await create(api, "goodname")
    assert_error(await api.request("PUT", AGENTS, json_body={"id": agent["id"], "name": "bad name"}), 400, "name")


# -- ownership -------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_other_org_may_read_but_not_change_a_public_agent(api):
    agent = await create(api, "pub", public=True)
    assert await api.ok("GET", f"{AGENTS}/{agent['id']}", key=ORG2_KEY) == agent
    put = await api.request("PUT", AGENTS, key=ORG2_KEY, json_body={"id": agent["id"], "name": "stolen"})
    assert_error(put, 403)
    assert_error(await api.request("DELETE", f"{AGENTS}/{agent['id']}", key=ORG2_KEY), 403)
    assert await api.ok("GET", f"{AGENTS}/{agent['id']}") == agent


@pytest_twisted.ensureDeferred
async def test_other_org_cannot_see_a_private_agent_at_all(api):
    agent = await create(api, "secret")
    missing = assert_error(await api.request("GET", f"{AGENTS}/999999", key=ORG2_KEY), 404)
    for reply in (
        await api.request("GET", f"{AGENTS}/{agent['id']}", key=ORG2_KEY),
        await api.request("PUT", AGENTS, key=ORG2_KEY, json_body={"id": agent["id"], "name": "x"}),
        await api.request("DELETE", f"{AGENTS}/{agent['id']}", key=ORG2_KEY),
        await api.request("GET", f"{AGENTS}/{agent['id']}/metrics", key=ORG2_KEY),
    ):
        message = assert_error(reply, 404)
        # Same answer as for an id that does not exist: nothing leaks.
        assert message.replace(str(agent["id"]), "N") == missing.replace("999999", "N")
    assert await api.ok("GET", f"{AGENTS}/{agent['id']}") == agent


# -- delete ----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_delete_then_get_is_404(api):
    agent = await create(api, "gone")
    reply = await api.request("DELETE", f"{AGENTS}/{agent['id']}")
    assert reply.status == 200 and reply.meta == {"code": 200, "message": "success", "type": "agent"}
    assert_error(await api.request("GET", f"{AGENTS}/{agent['id']}"), 404)
    assert_error(await api.request("DELETE", f"{AGENTS}/{agent['id']}"), 404)
    assert await api.ok("GET", AGENTS) == []


@pytest_twisted.ensureDeferred
async def test_delete_removes_tags_and_metrics(api):
    agent = await create(api, "cascade", tags=["red", "blue"])
    keep = await create(api, "stays", tags=["red"])
    await api.server.agents.catalog.replace_agent_catalog(agent["id"], [("/a/b", 1, None), ("/a/c", 0, None)])
    await api.server.agents.catalog.replace_agent_catalog(keep["id"], [("/k/k", 1, None)])
    assert len(await api.ok("GET", f"{AGENTS}/{agent['id']}/metrics")) == 2

    await api.ok("DELETE", f"{AGENTS}/{agent['id']}")

    assert await names(api, params={"tag": "red"}) == ["stays"]
    assert await names(api, params={"tag": "blue"}) == []
    assert await names(api, params={"metric": "/a/*"}) == []
    assert_error(await api.request("GET", f"{AGENTS}/{agent['id']}/metrics"), 404)
    assert [m["namespace"] for m in await api.ok("GET", "/api/v1/metrics")] == ["/k/k"]
    assert agent_rows(api, models.agent_tag, agent["id"]) == 0
    assert agent_rows(api, models.agent_metric, agent["id"]) == 0
    assert agent_rows(api, models.agent_tag, keep["id"]) == 1
    assert agent_rows(api, models.agent_metric, keep["id"]) == 1


# -- list: shape, paging, ordering -----------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_list_is_an_empty_array_when_there_are_no_agents(api):
    reply = await api.request("GET", AGENTS)
    assert reply.status == 200
    assert reply.json == {"meta": {"code": 200, "message": "success", "type": "agents"}, "body": []}


@pytest_twisted.ensureDeferred
async def test_list_orders_by_name_by_default(api):
    for name in ("charlie", "alpha", "delta", "bravo"):
        await create(api, name)
    listed = await api.ok("GET", AGENTS)
    assert [a["name"] for a in listed] == ["alpha", "bravo", "charlie", "delta"]
    assert all(set(a) == AGENT_KEYS for a in listed)


@pytest_twisted.ensureDeferred
async def test_list_limit_defaults_to_50_and_pages(api):
    store = api.server.agents.agents
    for i in range(55):
        await store.create(1, f"bulk-{i:02d}", enabled=False, public=False, tags=())
    everyone = [f"bulk-{i:02d}" for i in range(55)]
    assert await names(api) == everyone[:50]
    assert await names(api, params={"page": "2"}) == everyone[50:]
    assert await names(api, params={"page": "3"}) == []
    assert await names(api, params={"limit": "20", "page": "3"}) == everyone[40:]
    assert await names(api, params={"limit": "1000"}) == everyone


@pytest_twisted.ensureDeferred
async def test_list_order_by_every_allowed_column(api):
    for name, enabled, public in (("c", True, False), ("a", False, True), ("d", True, True),
                                  ("b", False, False), ("e", False, False)):
        await create(api, name, enabled=enabled, public=public)
    everyone = await api.ok("GET", AGENTS)
    for column in ORDERABLE:
        for spec, descending in ((column, False), (f"-{column}", True),
                                 (f"{column} desc", True), (f"{column} asc", False)):
            got = [a["id"] for a in await api.ok("GET", AGENTS, params={"orderBy": spec})]
            assert got == expected_order(everyone, column, descending), spec


@pytest_twisted.ensureDeferred
async def test_list_order_by_name_desc_and_created(api):
    ids = {name: (await create(api, name))["id"] for name in ("m2", "m3", "m1")}
    assert await names(api, params={"orderBy": "-name"}) == ["m3", "m2", "m1"]
    assert await names(api, params={"orderBy": "name desc"}) == ["m3", "m2", "m1"]
    assert await names(api, params={"orderBy": "created"}) == ["m2", "m3", "m1"]
    for name in ("m3", "m2"):  # m1 never enabled: its enabledChange is the zero time
        await api.ok("PUT", AGENTS, json_body={"id": ids[name], "enabled": True})
    assert await names(api, params={"orderBy": "enabled_change"}) == ["m1", "m3", "m2"]
    assert await names(api, params={"orderBy": "-enabledChange"}) == ["m2", "m3", "m1"]


@pytest.mark.parametrize("spec", ["bogus", "name; DROP TABLE agent", "org_id", "name sideways"])
@pytest_twisted.ensureDeferred
async def test_list_unknown_order_by_is_400_naming_the_columns(api, spec):
    message = assert_error(await api.request("GET", AGENTS, params={"orderBy": spec}), 400, "orderBy")
    for column in ORDERABLE:
        assert column in message


# -- list: filters ---------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_list_filter_name_exact_and_wildcard(api):
    for name in ("web_1", "webx1", "web-2", "db1"):
        await create(api, name)
    assert await names(api, params={"name": "web_1"}) == ["web_1"]
    assert await names(api, params={"name": "web*"}) == ["web-2", "web_1", "webx1"]
    assert await names(api, params={"name": "*1"}) == ["db1", "web_1", "webx1"]
    # '_' is a literal, not SQL's any-character wildcard.
    assert await names(api, params={"name": "web_*"}) == ["web_1"]
    assert await names(api, params={"name": "web"}) == []


@pytest_twisted.ensureDeferred
async def test_list_filter_enabled(api):
    await create(api, "on1", enabled=True)
    await create(api, "off1")
    await create(api, "on2", enabled=True)
    assert await names(api, params={"enabled": "true"}) == ["on1", "on2"]
    assert await names(api, params={"enabled": "false"}) == ["off1"]
    assert await names(api) == ["off1", "on1", "on2"]


@pytest_twisted.ensureDeferred
async def test_list_filter_public_across_orgs(api):
    await create(api, "o1-priv")
    await create(api, "o1-pub", public=True)
    await create(api, "o2-priv", key=ORG2_KEY)
    await create(api, "o2-pub", key=ORG2_KEY, public=True)
    await create(api, "o3-priv", key=ORG3_KEY)
    await create(api, "o3-pub", key=ORG3_KEY, public=True)

    assert await names(api) == ["o1-priv", "o1-pub", "o2-pub", "o3-pub"]
    assert await names(api, params={"public": "true"}) == ["o1-pub", "o2-pub", "o3-pub"]
    assert await names(api, params={"public": "false"}) == ["o1-priv"]
    assert await names(api, key=ORG2_KEY) == ["o1-pub", "o2-priv", "o2-pub", "o3-pub"]
    assert await names(api, key=ORG2_KEY, params={"public": "false"}) == ["o2-priv"]
    assert await names(api, key=ORG3_KEY, params={"public": "true"}) == ["o1-pub", "o2-pub", "o3-pub"]


@pytest_twisted.ensureDeferred
async def test_list_filter_tags_any_of(api):
    await create(api, "ta", tags=["a"])
    await create(api, "tb", tags=["b"])
    await create(api, "tc", tags=["c"])
    await create(api, "tab", tags=["a", "b"])
    await create(api, "none")
    await create(api, "other-org", key=ORG2_KEY, tags=["a"])
    assert await names(api, params={"tag": "a"}) == ["ta", "tab"]
    assert await names(api, params=[("tag", "a"), ("tag", "c")]) == ["ta", "tab", "tc"]
    assert await names(api, params={"tag": "a,c"}) == ["ta", "tab", "tc"]
    assert await names(api, params={"tag": "zzz"}) == []


@pytest_twisted.ensureDeferred
async def test_list_filter_metric(api):
    catalog = api.server.agents.catalog
    m1 = await create(api, "m1")
    m2 = await create(api, "m2")
    await create(api, "m3")
    await catalog.replace_agent_catalog(m1["id"], [("/a/b", 1, None), ("/a/c", 0, None)])
    await catalog.replace_agent_catalog(m2["id"], [("/x/y", 1, None)])
    assert await names(api, params={"metric": "/a/b"}) == ["m1"]
    assert await names(api, params={"metric": "/a/*"}) == ["m1"]
    assert await names(api, params={"metric": "/x/*"}) == ["m2"]
    assert await names(api, params={"metric": "/*"}) == ["m1", "m2"]
    assert await names(api, params={"metric": "/a"}) == []


@pytest_twisted.ensureDeferred
async def test_list_filters_combine(api):
    catalog = api.server.agents.catalog
    a = await create(api, "combo-a", enabled=True, tags=["t"])
    b = await create(api, "combo-b", enabled=False, tags=["t"])
    for agent in (a, b):
        await catalog.replace_agent_catalog(agent["id"], [("/c/d", 1, None)])
    params = {"name": "combo-*", "enabled": "true", "tag": "t", "metric": "/c/*"}
    assert await names(api, params=params) == ["combo-a"]


@pytest.mark.parametrize("params, word", [
    ({"enabled": "maybe"}, "enabled"),
    ({"public": "2"}, "public"),
    ({"limit": "0"}, "limit"),
    ({"limit": "abc"}, "limit"),
    ({"limit": "100000"}, "limit"),
    ({"limit": "-5"}, "limit"),
    ({"page": "0"}, "page"),
    ({"page": "x"}, "page"),
    ({"colour": "red"}, "colour"),
    ({"tags": "a"}, "tags"),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
@pytest_twisted.ensureDeferred
async def test_list_rejects_bad_query_parameters(api, params, word):
    await create(api, "present")
    assert_error(await api.request("GET", AGENTS, params=params), 400, word)
