"""`GET /api/v1/agents/<id>` from the server's agent cache: no database read when the
agent is known, and every change of the agent (through the API or its connection) is
seen by the next GET. (Changes made through another server: test_multi_server.py.)"""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import pytest_twisted

from tests.integration.agent_client import connect_agent
from tests.integration.harness import ADMIN_KEY, assert_error
from tests.waiting import until

AGENTS = "/api/v1/agents"


@contextmanager
def counting_transactions(api):
    """Counts pool jobs (each one a transaction) started inside the block."""
    pool = api.server.pool
    calls: list[str] = []
    original = pool.do

    def do(fn, *args, **kwargs):
        calls.append(getattr(fn, "__name__", repr(fn)))
        return original(fn, *args, **kwargs)

    pool.do = do
    try:
        yield calls
    finally:
        del pool.do


@pytest_twisted.ensureDeferred
async def test_a_known_agent_is_answered_without_a_transaction(api):
    agent = await api.ok("POST", AGENTS, json_body={"name": "cached", "tags": ["a"]})
    first = await api.ok("GET", f"{AGENTS}/{agent['id']}")
    with counting_transactions(api) as calls:
        again = await api.ok("GET", f"{AGENTS}/{agent['id']}")
    assert again == first
    assert calls == []


@pytest_twisted.ensureDeferred
async def test_every_change_is_seen_by_the_next_get(api):
    agent = await api.ok("POST", AGENTS, json_body={"name": "changing", "tags": ["a"]})
    path = f"{AGENTS}/{agent['id']}"
    assert (await api.ok("GET", path))["tags"] == ["a"]

    # PUT: tags, enabled, public
    await api.ok("PUT", AGENTS, json_body={"id": agent["id"], "tags": ["b", "c"], "enabled": True})
    shown = await api.ok("GET", path)
    assert shown["tags"] == ["b", "c"] and shown["enabled"] is True
    await api.ok("PUT", AGENTS, json_body={"id": agent["id"], "name": "renamed"})
    assert (await api.ok("GET", path))["name"] == "renamed"

    # online: the agent connects, then goes away
    client = connect_agent(api.base, "renamed", ADMIN_KEY)
    await client.opened
    await client.next("taskList")
    shown = await api.ok("GET", path)
    assert shown["online"] is True
    await client.disconnect()
    await until(lambda: api.server.sessions.sessions == {})

    async def offline() -> bool:
        return (await api.ok("GET", path))["online"] is False

    await until_async(offline)

    # delete
    await api.ok("DELETE", path)
    assert_error(await api.request("GET", path), 404, "does not exist")


@pytest_twisted.ensureDeferred
async def test_a_connecting_agent_is_found_by_name_from_memory(api):
    agent = await api.ok("POST", AGENTS, json_body={"name": "returning"})
    first = connect_agent(api.base, "returning", ADMIN_KEY)
    await first.opened
    await first.next("taskList")
    await first.disconnect()

    async def cached_offline() -> bool:  # a GET stores it again after the offline event
        await api.ok("GET", f"{AGENTS}/{agent['id']}")
        known = api.server.agents.cache.get(agent["id"])
        return known is not None and not known.online

    await until_async(cached_offline)
    store = api.server.agents.agents
    lookups: list[str] = []
    original = store.get_many_by_name
    store.get_many_by_name = lambda keys, **kw: lookups.extend(keys) or original(keys, **kw)
    try:
        again = connect_agent(api.base, "returning", ADMIN_KEY)
        await again.opened
        await again.next("taskList")
    finally:
        del store.get_many_by_name
    assert lookups == []
    assert (await api.ok("GET", f"{AGENTS}/{agent['id']}"))["online"] is True
    await again.disconnect()


async def until_async(check, timeout: float = 5.0) -> None:
    await until(check, timeout, interval=0.05)


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
