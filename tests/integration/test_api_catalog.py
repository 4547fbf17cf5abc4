"""The metric catalog through real HTTP: GET /api/v1/metrics and GET /api/v1/agents/<id>/metrics.

Agents' catalogs are seeded through the catalog store (what the websocket session does
when an agent advertises its metrics); everything else goes through the API. An org
sees its own metrics and those of public agents of any org.
"""
from __future__ import annotations

import re
from typing import Any

import pytest
import pytest_twisted

from tests.integration.harness import ADMIN_KEY, ORG2_KEY, ORG3_KEY, assert_error

AGENTS = "/api/v1/agents"
METRICS = "/api/v1/metrics"
METRIC_KEYS = {"namespace", "version", "policy", "public", "created"}
RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")


# -- helpers ---------------------------------------------------------------------------

async def agent_with_metrics(api, name: str, metrics: list[tuple[str, int, Any]], *,
                             key: str = ADMIN_KEY, public: bool = False) -> dict:
    agent = await api.ok("POST", AGENTS, key=key, json_body={"name": name, "public": public})
    await api.server.agents.catalog.replace_agent_catalog(agent["id"], metrics)
    return agent


async def catalog(api, key: str = ADMIN_KEY, params: Any = None) -> list[tuple[str, int]]:
    """(namespace, version) of GET /metrics, in the order returned."""
    return [(m["namespace"], m["version"]) for m in await api.ok("GET", METRICS, key=key, params=params)]


async def agent_catalog(api, agent_id: int, key: str = ADMIN_KEY) -> list[tuple[str, int]]:
    return [(m["namespace"], m["version"]) for m in await api.ok("GET", f"{AGENTS}/{agent_id}/metrics", key=key)]




async def seed_orgs(api) -> dict[str, dict]:
    """org 1: one private agent; org 2: a public and a private one; org 3: a private one."""
    return {
        "o1": await agent_with_metrics(api, "o1", [("/a/b", 1, None), ("/a/c", 0, None)]),
        "o2pub": await agent_with_metrics(api, "o2pub", [("/x/y", 1, None)], key=ORG2_KEY, public=True),
        "o2priv": await agent_with_metrics(api, "o2priv", [("/p/q", 2, None)], key=ORG2_KEY),
        "o3priv": await agent_with_metrics(api, "o3priv", [("/z/z", 1, None)], key=ORG3_KEY),
    }


# -- GET /metrics ----------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_catalog_is_an_empty_array_without_agents(api):
    reply = await api.request("GET", METRICS)
    assert reply.json == {"meta": {"code": 200, "message": "success", "type": "metrics"}, "body": []}


@pytest_twisted.ensureDeferred
async def test_catalog_shows_own_and_public_metrics(api):
    await seed_orgs(api)
    assert await catalog(api) == [("/a/b", 1), ("/a/c", 0), ("/x/y", 1)]
    assert await catalog(api, key=ORG2_KEY) == [("/p/q", 2), ("/x/y", 1)]
    assert await catalog(api, key=ORG3_KEY) == [("/x/y", 1), ("/z/z", 1)]


@pytest_twisted.ensureDeferred
async def test_catalog_entries_have_the_metric_fields(api):
    await seed_orgs(api)
    listed = {m["namespace"]: m for m in await api.ok("GET", METRICS)}
    for metric in listed.values():
        assert set(metric) == METRIC_KEYS
        assert RFC3339_UTC.match(metric["created"])
        assert metric["policy"] is None
    assert listed["/a/b"]["public"] is False
    assert listed["/x/y"]["public"] is True


@pytest_twisted.ensureDeferred
async def test_catalog_shows_the_advertised_policy(api):
    policy = {"interval": 10, "keys": ["a", "b"]}
    agent = await agent_with_metrics(api, "pol", [("/with/policy", 1, policy), ("/no/policy", 1, None)])
    listed = {m["namespace"]: m["policy"] for m in await api.ok("GET", METRICS)}
    assert listed == {"/no/policy": None, "/with/policy": policy}
    per_agent = {m["namespace"]: m["policy"] for m in await api.ok("GET", f"{AGENTS}/{agent['id']}/metrics")}
    assert per_agent == listed


@pytest_twisted.ensureDeferred
async def test_catalog_filter_namespace_exact_and_wildcard(api):
    await seed_orgs(api)
    await agent_with_metrics(api, "under", [("/a_b/x", 1, None)])
    assert await catalog(api, params={"namespace": "/a/b"}) == [("/a/b", 1)]
    assert await catalog(api, params={"namespace": "/a/*"}) == [("/a/b", 1), ("/a/c", 0)]
    assert await catalog(api, params={"namespace": "*/y"}) == [("/x/y", 1)]
    assert await catalog(api, params={"namespace": "/a_*"}) == [("/a_b/x", 1)]
    assert await catalog(api, params={"namespace": "/z/*"}) == []  # org 3's private metric


@pytest_twisted.ensureDeferred
async def test_catalog_filter_version(api):
    await seed_orgs(api)
    assert await catalog(api, params={"version": "1"}) == [("/a/b", 1), ("/x/y", 1)]
    assert await catalog(api, params={"version": "0"}) == [("/a/c", 0)]
    assert await catalog(api, params={"version": "7"}) == []
    assert await catalog(api, params={"version": "1", "namespace": "/a/*"}) == [("/a/b", 1)]


@pytest_twisted.ensureDeferred
async def test_catalog_order_limit_and_page(api):
    await seed_orgs(api)
    assert await catalog(api, params={"orderBy": "-namespace"}) == [("/x/y", 1), ("/a/c", 0), ("/a/b", 1)]
    assert await catalog(api, params={"orderBy": "version"}) == [("/a/c", 0), ("/a/b", 1), ("/x/y", 1)]
    by_public = await catalog(api, params={"orderBy": "public desc"})
    assert by_public[0] == ("/x/y", 1) and sorted(by_public[1:]) == [("/a/b", 1), ("/a/c", 0)]
    assert await catalog(api, params={"limit": "2"}) == [("/a/b", 1), ("/a/c", 0)]
    assert await catalog(api, params={"limit": "2", "page": "2"}) == [("/x/y", 1)]
    assert await catalog(api, params={"limit": "2", "page": "3"}) == []


@pytest.mark.parametrize("params, words", [
    ({"orderBy": "bogus"}, ("orderBy", "namespace", "version", "created", "public")),
    ({"version": "abc"}, ("version",)),
    ({"version": "-1"}, ("version",)),
    ({"limit": "0"}, ("limit",)),
    ({"page": "0"}, ("page",)),
    ({"name": "x"}, ("name",)),
], ids=["orderBy", "version-abc", "version-negative", "limit-0", "page-0", "unknown-param"])
@pytest_twisted.ensureDeferred
async def test_catalog_rejects_bad_query_parameters(api, params, words):
    await seed_orgs(api)
    assert_error(await api.request("GET", METRICS, params=params), 400, *words)


# -- GET /agents/<id>/metrics ----------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_agent_metrics_of_own_agent(api):
    agents = await seed_orgs(api)
    reply = await api.request("GET", f"{AGENTS}/{agents['o1']['id']}/metrics")
    assert reply.status == 200 and reply.meta["type"] == "metrics"
    assert [(m["namespace"], m["version"], m["public"]) for m in reply.body] == \
        [("/a/b", 1, False), ("/a/c", 0, False)]
    assert all(set(m) == METRIC_KEYS and RFC3339_UTC.match(m["created"]) for m in reply.body)


@pytest_twisted.ensureDeferred
async def test_agent_metrics_empty_array_for_an_agent_without_catalog(api):
    agent = await api.ok("POST", AGENTS, json_body={"name": "silent"})
    assert await api.ok("GET", f"{AGENTS}/{agent['id']}/metrics") == []


@pytest_twisted.ensureDeferred
async def test_agent_metrics_of_another_orgs_public_agent(api):
    agents = await seed_orgs(api)
    assert await agent_catalog(api, agents["o2pub"]["id"]) == [("/x/y", 1)]
    assert await agent_catalog(api, agents["o2pub"]["id"], key=ORG3_KEY) == [("/x/y", 1)]


@pytest_twisted.ensureDeferred
async def test_agent_metrics_of_another_orgs_private_agent_is_404(api):
    agents = await seed_orgs(api)
    assert_error(await api.request("GET", f"{AGENTS}/{agents['o2priv']['id']}/metrics"), 404)
    assert_error(await api.request("GET", f"{AGENTS}/{agents['o1']['id']}/metrics", key=ORG3_KEY), 404)
    assert_error(await api.request("GET", f"{AGENTS}/999999/metrics"), 404)
    assert_error(await api.request("GET", f"{AGENTS}/abc/metrics"), 400)


# -- changes -------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_replacing_a_catalog_removes_gone_metrics_everywhere(api):
    agents = await seed_orgs(api)
    await api.server.agents.catalog.replace_agent_catalog(
        agents["o1"]["id"], [("/a/b", 1, None), ("/a/d", 3, None)])
    assert await agent_catalog(api, agents["o1"]["id"]) == [("/a/b", 1), ("/a/d", 3)]
    assert await catalog(api) == [("/a/b", 1), ("/a/d", 3), ("/x/y", 1)]

    await api.server.agents.catalog.replace_agent_catalog(agents["o2pub"]["id"], [])
    assert await agent_catalog(api, agents["o2pub"]["id"]) == []
    assert await catalog(api) == [("/a/b", 1), ("/a/d", 3)]
    assert await catalog(api, key=ORG3_KEY) == [("/z/z", 1)]


@pytest_twisted.ensureDeferred
async def test_a_metric_stays_while_another_agent_of_the_org_still_has_it(api):
    first = await agent_with_metrics(api, "first", [("/shared", 1, None), ("/only/first", 1, None)])
    await agent_with_metrics(api, "second", [("/shared", 1, None)])
    await api.server.agents.catalog.replace_agent_catalog(first["id"], [])
    assert await catalog(api) == [("/shared", 1)]


@pytest_twisted.ensureDeferred
async def test_making_an_agent_public_publishes_its_metrics(api):
    agents = await seed_orgs(api)
    o1 = agents["o1"]["id"]
    assert await catalog(api, key=ORG2_KEY) == [("/p/q", 2), ("/x/y", 1)]
    assert_error(await api.request("GET", f"{AGENTS}/{o1}/metrics", key=ORG2_KEY), 404)

    await api.ok("PUT", AGENTS, json_body={"id": o1, "public": True})
    assert await catalog(api, key=ORG2_KEY) == [("/a/b", 1), ("/a/c", 0), ("/p/q", 2), ("/x/y", 1)]
    assert all(m["public"] for m in await api.ok("GET", METRICS, key=ORG2_KEY, params={"namespace": "/a/*"}))
    assert await agent_catalog(api, o1, key=ORG2_KEY) == [("/a/b", 1), ("/a/c", 0)]

    await api.ok("PUT", AGENTS, json_body={"id": o1, "public": False})
    assert await catalog(api, key=ORG2_KEY) == [("/p/q", 2), ("/x/y", 1)]
    assert_error(await api.request("GET", f"{AGENTS}/{o1}/metrics", key=ORG2_KEY), 404)


@pytest_twisted.ensureDeferred
async def test_deleting_an_agent_removes_its_metrics_from_the_catalog(api):
    agents = await seed_orgs(api)
    await api.ok("DELETE", f"{AGENTS}/{agents['o2pub']['id']}", key=ORG2_KEY)
    assert await catalog(api) == [("/a/b", 1), ("/a/c", 0)]
    assert await catalog(api, key=ORG2_KEY) == [("/p/q", 2)]
