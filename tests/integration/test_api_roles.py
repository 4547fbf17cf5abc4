"""Endpoint roles through real HTTP: Viewer keys read, Editor and Admin keys write, and a
refusal names the role that is needed."""
from __future__ import annotations

import pytest
import pytest_twisted

from tests.integration.agent_client import connect_agent
from tests.integration.harness import EDITOR_KEY, ORG2_KEY, VIEWER_KEY, assert_error
from tests.waiting import until

TASK = {"name": "t1", "interval": 60, "route": {"type": "any"}}


async def seed(api) -> tuple[dict, dict]:
    agent = await api.ok("POST", "/api/v1/agents", key=ORG2_KEY, json_body={"name": "a1"})
    task = await api.ok("POST", "/api/v1/tasks", key=ORG2_KEY, json_body=TASK)
    return agent, task


def writes(agent: dict, task: dict) -> list[tuple[str, str, dict | None]]:
    return [
        ("POST", "/api/v1/agents", {"name": "a2"}),
        ("PUT", "/api/v1/agents", {"id": agent["id"], "enabled": True}),
        ("POST", f"/api/v1/agents/{agent['id']}/token", None),
        ("DELETE", f"/api/v1/agents/{agent['id']}", None),
        ("POST", "/api/v1/tasks", {**TASK, "name": "t2"}),
        ("PUT", "/api/v1/tasks", {**TASK, "id": task["id"], "enabled": True}),
        ("DELETE", f"/api/v1/tasks/{task['id']}", None),
    ]


@pytest_twisted.ensureDeferred
async def test_a_viewer_key_reads_and_every_write_is_403_naming_the_role(api):
    agent, task = await seed(api)
    for method, path, body in writes(agent, task):
        reply = await api.request(method, path, key=VIEWER_KEY, json_body=body)
        assert_error(reply, 403, "role is Viewer", "needs Editor or Admin")
    # Nothing changed, and reads work.
    assert [a["name"] for a in await api.ok("GET", "/api/v1/agents", key=VIEWER_KEY)] == ["a1"]
    assert [t["name"] for t in await api.ok("GET", "/api/v1/tasks", key=VIEWER_KEY)] == ["t1"]
    assert (await api.ok("GET", f"/api/v1/tasks/{task['id']}", key=VIEWER_KEY))["enabled"] is False


@pytest_twisted.ensureDeferred
async def test_an_editor_key_writes(api):
    agent, task = await seed(api)
    for method, path, body in writes(agent, task):
        await api.ok(method, path, key=EDITOR_KEY, json_body=body)


@pytest_twisted.ensureDeferred
async def test_an_agent_connection_needs_an_editor_key(api):
    viewer = connect_agent(api.base, "viewer-agent", VIEWER_KEY)
    await until(lambda: viewer.closed.called, what="the viewer's connection refused")
    viewer.opened.addErrback(lambda failure: None)
    assert "[403]" in (viewer.close_reason or "")
    assert not await api.ok("GET", "/api/v1/agents", key=ORG2_KEY, params={"name": "viewer-agent"})
    editor = connect_agent(api.base, "editor-agent", EDITOR_KEY)
    await editor.opened
    await editor.next("taskList")
    await editor.disconnect()


@pytest.mark.parametrize("role", ["None", "", "viewer", "Superuser"])
@pytest_twisted.ensureDeferred
async def test_a_role_the_endpoint_does_not_name_is_read_only(api, role):
    from tests.fakes.auth_endpoint import org
    api.auth.keys["odd-role-key"] = org(2, "acme", role)
    assert await api.ok("GET", "/api/v1/agents", key="odd-role-key") == []
    assert_error(await api.request("POST", "/api/v1/agents", key="odd-role-key", json_body={"name": "x"}), 403,
                 "needs Editor or Admin")
