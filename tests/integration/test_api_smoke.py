from __future__ import annotations

import pytest_twisted


@pytest_twisted.ensureDeferred
async def test_heartbeat_needs_no_key(api):
    reply = await api.request("GET", "/api/v1/", key=None)
    assert reply.status == 200
    assert reply.json == {"meta": {"code": 200, "message": "success", "type": "heartbeat"},
                          "body": {"database": "available"}}


@pytest_twisted.ensureDeferred
async def test_create_and_get_agent(api):
    agent = await api.ok("POST", "/api/v1/agents", json_body={"name": "agent1"})
    assert agent["name"] == "agent1" and agent["enabled"] is False
    assert await api.ok("GET", f"/api/v1/agents/{agent['id']}") == agent
