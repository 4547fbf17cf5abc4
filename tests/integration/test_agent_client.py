"""The test agent's absence proof: `roundtrip` / `nothing_pending` against a real server.

Tests elsewhere prove that something does *not* reach an agent with these, so they must
fail when it does: an unconsumed frame that is there is reported, one consumed by `next`
is not, and a frame the server wrote before answering the ping is there by the pong.
"""
from __future__ import annotations

import pytest
import pytest_twisted

from tests.integration.agent_client import connect_agent
from tests.integration.harness import ADMIN_KEY
from tests.notes_requests import NOTES_TASK


async def online(api, name: str):
    client = connect_agent(api.base, name, ADMIN_KEY)
    await client.opened
    await client.next("taskList")
    return client


@pytest_twisted.ensureDeferred
async def test_nothing_pending_passes_when_nothing_came_and_reports_an_unconsumed_frame(api):
    one, two = await online(api, "one"), await online(api, "two")
    await one.nothing_pending("taskAdd")
    agents = {a["name"]: a["id"] for a in await api.ok("GET", "/api/v1/agents")}
    task = await api.ok("POST", "/api/v1/tasks", json_body={
        **NOTES_TASK, "route": {"type": "byIds", "config": {"ids": [agents["one"], agents["two"]]}}})
    assert (await two.next("taskAdd"))["id"] == task["id"]
    # The server told both agents in one turn: by two's frame, one's was written too, and
    # the round trip brings it in; not consumed, it is reported.
    with pytest.raises(AssertionError, match="unexpected taskAdd"):
        await one.nothing_pending("taskAdd")
    assert (await one.next("taskAdd"))["id"] == task["id"]
    await one.nothing_pending("taskAdd")  # consumed: nothing further
    await two.nothing_pending("taskAdd")
    await one.disconnect(), await two.disconnect()
    await one.roundtrip()  # closed: every frame is in, nothing to wait for
