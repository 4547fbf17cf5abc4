"""The auth endpoint misbehaving, through a real server: a rate-limited endpoint never
locks a known user out and never tells an unknown key it is wrong; the 503 says when to
retry."""
from __future__ import annotations

import pytest_twisted

from tests.integration.harness import ORG2_KEY, assert_error


@pytest_twisted.ensureDeferred
async def test_a_rate_limited_endpoint_is_unavailable_not_a_verdict(api):
    assert await api.ok("GET", "/api/v1/agents", key=ORG2_KEY) == []
    api.auth.mode, api.auth.status_code = "status", 429
    reply = await api.request("GET", "/api/v1/agents", key="a-key-never-seen")
    assert_error(reply, 503, "auth endpoint is unavailable")
    assert reply.headers.getRawHeaders(b"retry-after") == [b"5"]
    # ORG2_KEY is cached and valid: it keeps working whatever the endpoint says now.
    assert await api.ok("GET", "/api/v1/agents", key=ORG2_KEY) == []
    api.auth.mode = "normal"
    assert_error(await api.request("GET", "/api/v1/agents", key="a-key-never-seen"), 401, "invalid API key")
