"""Agent tokens on real sockets: a token opens its agent's websocket and nothing else,
is never sent to the key check, is replaced (closing what the old one opened, across
servers) and is revoked with its agent."""
from __future__ import annotations


import pytest_twisted
import treq

from tests.integration.agent_client import connect_agent
from tests.integration.daemons import ServerProcess
from tests.integration.harness import ADMIN_KEY, ORG2_KEY, assert_error
from tests.waiting import until


async def new_agent(api, name: str, key: str = ADMIN_KEY) -> dict:
    return await api.ok("POST", "/api/v1/agents", key=key, json_body={"name": name})


async def refused(api, name: str, key: str) -> str:
    client = connect_agent(api.base, name, key)
    await until(lambda: client.closed.called, what=f"{name}'s connection refused")
    client.opened.addErrback(lambda failure: None)
    return client.close_reason or ""


@pytest_twisted.ensureDeferred
async def test_a_token_opens_its_agents_websocket_and_nothing_else(api):
    agent = await new_agent(api, "probe-1")
    issued = await api.ok("POST", f"/api/v1/agents/{agent['id']}/token")
    token = issued["token"]
    assert token.startswith("taskd_agent_") and issued["agentId"] == agent["id"]
    checks_before = api.auth.requests
    client = connect_agent(api.base, "probe-1", token)
    await client.opened
    await client.next("taskList")
    # Nothing but that websocket: the REST API refuses it, and so does another agent's name.
    for method, path in (("GET", "/api/v1/agents"), ("GET", f"/api/v1/agents/{agent['id']}"),
                         ("POST", f"/api/v1/agents/{agent['id']}/token"), ("GET", "/api/v1/tasks")):
        assert_error(await api.request(method, path, key=token), 403, "agent token")
    await new_agent(api, "probe-2")
    assert "[403]" in await refused(api, "probe-2", token)
    assert "[403]" in await refused(api, "not-yet-an-agent", token)  # and never auto-creates one
    assert not await api.ok("GET", "/api/v1/agents", params={"name": "not-yet-an-agent"})
    assert api.auth.requests == checks_before  # a token is never sent to the key check
    await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_a_new_token_replaces_the_old_and_closes_what_it_opened(api):
    agent = await new_agent(api, "probe-3", key=ORG2_KEY)
    old = (await api.ok("POST", f"/api/v1/agents/{agent['id']}/token", key=ORG2_KEY))["token"]
    client = connect_agent(api.base, "probe-3", old)
    await client.opened
    await client.next("taskList")
    keyed = connect_agent(api.base, "probe-3-keyed", ORG2_KEY)  # an API-key session is not touched
    await keyed.opened
    new = (await api.ok("POST", f"/api/v1/agents/{agent['id']}/token", key=ORG2_KEY))["token"]
    assert new != old
    await until(lambda: client.closed.called, what="the old token's connection closed")
    assert client.close_code == 4001 and "token replaced" in client.close_reason
    assert "[401]" in await refused(api, "probe-3", old)
    again = connect_agent(api.base, "probe-3", new)
    await again.opened
    assert not keyed.closed.called
    # Only the owner issues tokens: another org gets 404 (it cannot see the private agent).
    assert_error(await api.request("POST", f"/api/v1/agents/{agent['id']}/token"), 404)
    await again.disconnect()
    await keyed.disconnect()


@pytest_twisted.ensureDeferred
async def test_deleting_the_agent_revokes_its_token(api):
    agent = await new_agent(api, "probe-4")
    token = (await api.ok("POST", f"/api/v1/agents/{agent['id']}/token"))["token"]
    await api.ok("DELETE", f"/api/v1/agents/{agent['id']}")
    await new_agent(api, "probe-4")  # same name again: the old token must not open it
    assert "[401]" in await refused(api, "probe-4", token)




@pytest_twisted.ensureDeferred
async def test_a_token_replaced_on_one_server_closes_the_session_on_another(tmp_path, mysql_dbs, exchange):
    common = {"db-type": "mysql", "db-connect-str": mysql_dbs.dsn(mysql_dbs.create("tokens")), "admin-key": ADMIN_KEY,
              "exchange": exchange, "rabbitmq-url": "amqp://guest:guest@127.0.0.1:5672/",
              "rabbitmq-queue-expiry": "20s"}
    a, b = ServerProcess(tmp_path, "A", **common), ServerProcess(tmp_path, "B", **common)
    await a.start()
    await b.start()
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        resp = await treq.post(a.base + "/api/v1/agents", json={"name": "roamer"}, headers=headers)
        agent = (await resp.json())["body"]
        resp = await treq.post(a.base + f"/api/v1/agents/{agent['id']}/token", headers=headers)
        token = (await resp.json())["body"]["token"]
        client = connect_agent(b.base, "roamer", token)  # the token works on B too: one database
        await client.opened
        await client.next("taskList")
        await treq.post(a.base + f"/api/v1/agents/{agent['id']}/token", headers=headers)
        await until(lambda: client.closed.called, timeout=20, what="B closing the old token's connection")
        assert client.close_code == 4001
    finally:
        await a.stop()
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_a_reset_event_arriving_after_the_agent_reconnected_with_the_new_token_leaves_it(api):
    """Across servers the reset travels over RabbitMQ and may arrive after the agent is
    already back with the new token: only connections opened with another token close."""
    from taskd.server.agenttokens import TOKEN_RESET, token_hash, token_id

    agent = await new_agent(api, "roamer")
    token = (await api.ok("POST", f"/api/v1/agents/{agent['id']}/token"))["token"]
    client = connect_agent(api.base, "roamer", token)
    await client.opened
    await client.next("taskList")
    payload = {"id": agent["id"], "name": "roamer", "orgId": 1}
    api.server.events.publish(TOKEN_RESET, {**payload, "tokenId": token_id(token_hash(token))})  # late: this token's
    await client.roundtrip()
    assert not client.closed.called
    api.server.events.publish(TOKEN_RESET, {**payload, "tokenId": "0" * 16})  # a newer token than this one
    await until(lambda: client.closed.called, what="the old token's connection closed")
    assert client.close_code == 4001
