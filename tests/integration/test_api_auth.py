"""API-key authentication over real HTTP, against the grafana.com key-check emulator.

`api.auth` is the emulator (tests/fakes/auth_endpoint.py): `requests` counts the key
checks taskd made, `mode` makes it fail. The admin key ("EASY") is org 1 and is never
sent to it.
"""
from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from tests.integration.harness import ADMIN_KEY, ORG2_KEY, ORG3_KEY, VIEWER_KEY, Reply, start_server, stop_server, assert_error

PROTECTED = [
    ("GET", "/api/v1/agents"),
    ("POST", "/api/v1/agents"),
    ("PUT", "/api/v1/agents"),
    ("GET", "/api/v1/agents/1"),
    ("DELETE", "/api/v1/agents/1"),
    ("GET", "/api/v1/agents/1/metrics"),
    ("GET", "/api/v1/tasks"),
    ("POST", "/api/v1/tasks"),
    ("PUT", "/api/v1/tasks"),
    ("GET", "/api/v1/tasks/1"),
    ("DELETE", "/api/v1/tasks/1"),
    ("GET", "/api/v1/metrics"),
]


# -- helpers --------------------------------------------------------------------------



def assert_401(reply: Reply, *words: str) -> str:
    message = assert_error(reply, 401, *words)
    challenge = reply.headers.getRawHeaders(b"www-authenticate")
    assert challenge and challenge[0].lower().startswith(b"bearer"), challenge
    return message


async def agent_names(api, key: str) -> list[str]:
    return [a["name"] for a in await api.ok("GET", "/api/v1/agents", key=key)]


async def task_names(api, key: str) -> list[str]:
    return [t["name"] for t in await api.ok("GET", "/api/v1/tasks", key=key)]


def task(name: str) -> dict[str, Any]:
    return {"name": name, "interval": 60, "route": {"type": "any"}}


@pytest_twisted.async_yield_fixture
async def org2_only_api(db_config):
    """A server with auth-valid-org-id = 2."""
    running = await start_server(*db_config, auth_valid_org_id=(2,))
    yield running
    await stop_server(running)


# -- missing, misspelt and unknown keys --------------------------------------------------

@pytest.mark.parametrize("method,path", PROTECTED, ids=[f"{m} {p}" for m, p in PROTECTED])
@pytest_twisted.ensureDeferred
async def test_no_header_is_401_with_www_authenticate(api, method, path):
    reply = await api.request(method, path, key=None, json_body={"name": "x"} if method != "GET" else None)
    assert_401(reply, "Authorization")
    assert api.auth.requests == 0


@pytest_twisted.ensureDeferred
async def test_401_comes_before_body_validation(api):
    reply = await api.request("POST", "/api/v1/tasks", key=None, data=b"{not json",
                              headers={"Content-Type": "application/json"})
    assert_401(reply)


@pytest_twisted.ensureDeferred
async def test_authentication_header_of_the_notes_is_401_naming_authorization(api):
    reply = await api.request("POST", "/api/v1/tasks", key=None, headers={"Authentication": "Bearer EASY"},
                              json_body=task("example-task-1"))
    message = assert_401(reply, "Authorization")
    assert "Authentication" in message
    assert await task_names(api, ADMIN_KEY) == []
    assert api.auth.requests == 0


@pytest.mark.parametrize("header", ["EASY", "Basic RUFTWTo=", "Bearer", "Bearer   ", "Token EASY"])
@pytest_twisted.ensureDeferred
async def test_malformed_authorization_header_is_401(api, header):
    reply = await api.request("GET", "/api/v1/agents", key=None, headers={"Authorization": header})
    assert_401(reply, "Authorization")
    assert api.auth.requests == 0


@pytest_twisted.ensureDeferred
async def test_bearer_scheme_is_case_insensitive(api):
    reply = await api.request("GET", "/api/v1/agents", key=None, headers={"Authorization": "bearer EASY"})
    assert reply.status == 200, reply.raw


@pytest_twisted.ensureDeferred
async def test_unknown_key_is_401(api):
    reply = await api.request("GET", "/api/v1/agents", key="no-such-key")
    message = assert_401(reply)
    assert "no-such-key" not in message
    assert api.auth.requests == 1 and api.auth.tokens == ["no-such-key"]


@pytest_twisted.ensureDeferred
async def test_unknown_key_answer_is_cached_too(api):
    assert_401(await api.request("GET", "/api/v1/agents", key="no-such-key"))
    assert_401(await api.request("GET", "/api/v1/tasks", key="no-such-key"))
    assert api.auth.requests == 1


@pytest_twisted.ensureDeferred
async def test_heartbeat_needs_no_key(api):
    for path in ("/", "/api/v1", "/api/v1/"):
        reply = await api.request("GET", path, key=None)
        assert reply.status == 200 and reply.meta["type"] == "heartbeat", (path, reply.raw)
    assert api.auth.requests == 0


# -- valid keys and org scoping -------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_org2_key_works_and_sees_only_org2_data(api):
    await api.ok("POST", "/api/v1/agents", key=ADMIN_KEY, json_body={"name": "org1-agent"})
    await api.ok("POST", "/api/v1/tasks", key=ADMIN_KEY, json_body=task("org1-task"))
    await api.ok("POST", "/api/v1/agents", key=ORG3_KEY, json_body={"name": "org3-agent"})

    agent = await api.ok("POST", "/api/v1/agents", key=ORG2_KEY, json_body={"name": "org2-agent"})
    created = await api.ok("POST", "/api/v1/tasks", key=ORG2_KEY, json_body=task("org2-task"))
    assert created["orgId"] == 2

    assert await agent_names(api, ORG2_KEY) == ["org2-agent"]
    assert await task_names(api, ORG2_KEY) == ["org2-task"]
    assert await agent_names(api, ADMIN_KEY) == ["org1-agent"]
    assert await task_names(api, ADMIN_KEY) == ["org1-task"]
    assert_error(await api.request("GET", f"/api/v1/agents/{agent['id']}", key=ADMIN_KEY), 404)
    assert_error(await api.request("GET", f"/api/v1/tasks/{created['id']}", key=ORG3_KEY), 404)


@pytest_twisted.ensureDeferred
async def test_viewer_key_of_org2_sees_org2_data(api):
    await api.ok("POST", "/api/v1/tasks", key=ORG2_KEY, json_body=task("org2-task"))
    assert await task_names(api, VIEWER_KEY) == ["org2-task"]


@pytest_twisted.ensureDeferred
async def test_valid_key_is_checked_once_then_cached(api):
    await api.ok("GET", "/api/v1/agents", key=ORG2_KEY)
    await api.ok("GET", "/api/v1/tasks", key=ORG2_KEY)
    assert api.auth.requests == 1
    assert api.auth.tokens == [ORG2_KEY]


@pytest_twisted.ensureDeferred
async def test_each_key_is_checked_separately(api):
    await api.ok("GET", "/api/v1/agents", key=ORG2_KEY)
    await api.ok("GET", "/api/v1/agents", key=ORG3_KEY)
    await api.ok("GET", "/api/v1/agents", key=ORG2_KEY)
    assert api.auth.tokens == [ORG2_KEY, ORG3_KEY]


@pytest_twisted.ensureDeferred
async def test_admin_key_never_asks_the_endpoint(api):
    agent = await api.ok("POST", "/api/v1/agents", json_body={"name": "a1"})
    created = await api.ok("POST", "/api/v1/tasks", json_body=task("t1"))
    assert created["orgId"] == 1
    await api.ok("GET", "/api/v1/agents")
    await api.ok("GET", f"/api/v1/agents/{agent['id']}")
    await api.ok("GET", "/api/v1/tasks")
    await api.ok("GET", "/api/v1/metrics")
    await api.ok("DELETE", f"/api/v1/tasks/{created['id']}")
    assert api.auth.requests == 0 and api.auth.tokens == []


@pytest_twisted.ensureDeferred
async def test_admin_key_works_while_the_endpoint_is_down(api):
    api.auth.mode = "error500"
    assert await api.ok("GET", "/api/v1/agents") == []
    assert api.auth.requests == 0


# -- the endpoint failing ------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["error500", "garbage"])
@pytest_twisted.ensureDeferred
async def test_endpoint_failure_with_nothing_cached_is_503(api, mode):
    api.auth.mode = mode
    reply = await api.request("GET", "/api/v1/agents", key=ORG2_KEY)
    assert_error(reply, 503, "auth")
    assert reply.headers.getRawHeaders(b"www-authenticate") is None
    assert api.auth.requests == 1


@pytest_twisted.ensureDeferred
async def test_503_is_not_cached_once_the_endpoint_recovers(api):
    api.auth.mode = "error500"
    assert_error(await api.request("GET", "/api/v1/agents", key=ORG2_KEY), 503)
    api.auth.mode = "normal"
    assert await api.ok("GET", "/api/v1/agents", key=ORG2_KEY) == []
    assert api.auth.requests == 2


@pytest_twisted.ensureDeferred
async def test_cached_key_keeps_working_while_the_endpoint_fails(api):
    await api.ok("GET", "/api/v1/agents", key=ORG2_KEY)
    api.auth.mode = "error500"
    assert await api.ok("GET", "/api/v1/tasks", key=ORG2_KEY) == []
    assert api.auth.requests == 1


# -- auth-valid-org-id -----------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_valid_org_ids_refuse_other_orgs_with_403(org2_only_api):
    api = org2_only_api
    reply = await api.request("GET", "/api/v1/agents", key=ORG3_KEY)
    assert_error(reply, 403, "3")
    assert reply.headers.getRawHeaders(b"www-authenticate") is None
    assert await api.ok("GET", "/api/v1/agents", key=ORG2_KEY) == []


@pytest_twisted.ensureDeferred
async def test_valid_org_ids_refusal_is_cached(org2_only_api):
    api = org2_only_api
    assert_error(await api.request("GET", "/api/v1/agents", key=ORG3_KEY), 403)
    assert_error(await api.request("GET", "/api/v1/tasks", key=ORG3_KEY), 403)
    assert api.auth.requests == 1


@pytest_twisted.ensureDeferred
async def test_valid_org_ids_still_let_the_admin_key_in(org2_only_api):
    api = org2_only_api
    created = await api.ok("POST", "/api/v1/tasks", key=ADMIN_KEY, json_body=task("admin-task"))
    assert created["orgId"] == 1
    assert await task_names(api, ADMIN_KEY) == ["admin-task"]
    assert api.auth.requests == 0
