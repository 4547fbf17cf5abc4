"""What one agent (or one key) can make the server hold or do: bounded catalogs, bounded
task-status removals, bad frames that cost a rate-limited log line and at most
`max-bad-frames` of them per connection, and at most `max-agents-per-org` agents.

Each test fails if its bound is removed: the hostile input is larger than the bound and
the test checks what was stored, logged or closed.
"""
from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from taskd.wire import framing
from tests.integration.agent_client import AgentClient, connect_agent
from tests.integration.harness import ADMIN_KEY, ORG2_KEY, assert_error, start_server, stop_server
from tests.waiting import until, value_of


class Warnings:
    """Warnings logged in this process while the test runs (the server runs in it)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, event: dict) -> None:
        if event.get("log_level") in (LogLevel.warn, LogLevel.error, LogLevel.critical):
            self.lines.append(formatEvent(event))

    def about(self, *words: str) -> list[str]:
        return [line for line in self.lines if all(w in line for w in words)]


@pytest.fixture
def warnings():
    cap = Warnings()
    globalLogPublisher.addObserver(cap)
    yield cap
    globalLogPublisher.removeObserver(cap)


@pytest_twisted.async_yield_fixture
async def small(db_config):
    running = await start_server(*db_config, heartbeat_interval=0.2, max_catalog_records=5,
                                 max_bad_frames=4, max_agents_per_org=3,
                                 status_flush_interval=3600.0)  # statuses stay in the buffer to be counted
    yield running
    await stop_server(running)


async def online(api, name: str, key: str = ADMIN_KEY) -> AgentClient:
    client = connect_agent(api.base, name, key)
    await client.opened
    await client.next("taskList")
    return client


async def metrics_of(api, name: str) -> list[tuple[str, int]]:
    [agent] = await api.ok("GET", "/api/v1/agents", params={"name": name})
    return [(m["namespace"], m["version"]) for m in await api.ok("GET", f"/api/v1/agents/{agent['id']}/metrics")]


def records(n: int, prefix: str = "/m") -> list[dict]:
    return [{"namespace": f"{prefix}/{i}", "version": 1, "policy": []} for i in range(n)]


async def heartbeats(client: AgentClient, n: int = 2) -> None:
    seen = len(client.events("heartbeat"))
    await until(lambda: len(client.events("heartbeat")) >= seen + n or client.closed.called, what="heartbeats")


@pytest_twisted.ensureDeferred
async def test_a_catalog_over_max_catalog_records_is_refused_whole(small, warnings):
    client = await online(small, "big")
    client.send("catalog", records(5))
    await value_of(lambda: metrics_of(small, "big"), lambda got: len(got) == 5, what="5 metrics stored")
    client.send("catalog", records(6, "/more"))  # one over: nothing of it is stored
    await heartbeats(client)
    assert not client.closed.called
    assert await metrics_of(small, "big") == sorted((f"/m/{i}", 1) for i in range(5))
    [line] = warnings.about("agent big", "max-catalog-records")
    assert "nothing of it stored" in line and "6 records" in line
    await client.disconnect()


@pytest.mark.parametrize("namespace", ["no-slash", "/with space", "/glob?", "/glob[ab]", "/" + "x" * 255])
@pytest_twisted.ensureDeferred
async def test_a_catalog_with_a_namespace_outside_the_rule_is_refused(small, warnings, namespace):
    client = await online(small, "odd")
    client.send("catalog", [{"namespace": "/good", "version": 1}, {"namespace": namespace, "version": 1}])
    await heartbeats(client)
    assert await metrics_of(small, "odd") == []
    assert warnings.about("agent odd", "bad namespace")
    await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_bad_frames_are_logged_once_a_minute_and_close_the_connection_after_max_bad_frames(small, warnings):
    client = await online(small, "noisy")
    for i in range(3):
        client.send(f"noSuchEvent{i}", {})
    await heartbeats(client)
    assert not client.closed.called  # three bad frames: below the bound of four
    assert len(warnings.about("agent noisy", "unknown event")) == 1  # the later two are not logged
    client.send("catalog", "not a list")
    await until(lambda: client.closed.called, what="the connection closed after the fourth bad frame")
    assert client.close_code == 1008 and "too many bad frames" in client.close_reason
    assert warnings.about("agent noisy", "sent 4 bad frames; closing")
    again = await online(small, "noisy")  # a new connection starts a new count
    again.send("noSuchEvent", {})
    await heartbeats(again)
    assert not again.closed.called
    await again.disconnect()


@pytest_twisted.ensureDeferred
async def test_removals_of_tasks_never_sent_cannot_fill_the_status_buffer(small):
    client = await online(small, "remover")
    status = small.server.status
    client.send("taskStatus", [{"taskId": i, "removed": True} for i in range(1, 5001)])
    await heartbeats(client)
    pending = [key for key in status.pending if key[1] == client_agent_id(small, "remover")]
    assert len(pending) <= 1000  # MAX_FOREIGN_REMOVALS, not 5,000
    await client.disconnect()


def client_agent_id(api, name: str) -> int:
    [session] = [s for s in api.server.sessions.sessions.values() if s.agent.name == name]
    return session.agent.id


@pytest_twisted.ensureDeferred
async def test_max_agents_per_org_bounds_post_and_auto_create(small):
    for name in ("a1", "a2", "a3"):
        await small.ok("POST", "/api/v1/agents", key=ORG2_KEY, json_body={"name": name})
    reply = await small.request("POST", "/api/v1/agents", key=ORG2_KEY, json_body={"name": "a4"})
    assert_error(reply, 403, "max-agents-per-org", "3 agents")
    refused = connect_agent(small.base, "a5", ORG2_KEY)
    await until(lambda: refused.closed.called, what="the fourth agent's connection refused")
    refused.opened.addErrback(lambda failure: None)  # refused: it never opened
    assert "[403]" in (refused.close_reason or ""), refused.close_reason
    assert not (await small.ok("GET", "/api/v1/agents", key=ORG2_KEY, params={"name": "a5"}))
    # Another org is not affected, and a deleted agent frees its place.
    await small.ok("POST", "/api/v1/agents", json_body={"name": "other-org"})
    [a1] = await small.ok("GET", "/api/v1/agents", key=ORG2_KEY, params={"name": "a1"})
    await small.ok("DELETE", f"/api/v1/agents/{a1['id']}", key=ORG2_KEY)
    await small.ok("POST", "/api/v1/agents", key=ORG2_KEY, json_body={"name": "a4"})


FLOOD = 60  # catalog frames of ~32 KB: many TCP reads' worth


@pytest_twisted.ensureDeferred
async def test_a_flood_behind_a_stuck_catalog_write_is_held_off_by_back_pressure(api):
    """Real Autobahn and TCP: while the catalog store is stuck, a flood of catalog frames
    stops being read once MAX_INBOUND wait (the rest stays in the kernel's buffers and
    the agent's), and everything resumes once the store answers."""
    from twisted.internet.defer import Deferred
    from taskd.server.sessions import MAX_INBOUND
    small = api  # default limits: catalogs of 400 records (32 KB frames) are fine
    client = await online(small, "flooder")
    store = small.server.sessions.catalog
    real, stuck = store.replace_agent_catalog, []

    def stuck_write(agent_id: int, recs: Any):
        d: Deferred = Deferred()
        stuck.append((d, agent_id, recs))
        return d

    store.replace_agent_catalog = stuck_write
    try:
        for i in range(FLOOD):
            client.send("catalog", records(400, f"/flood{i}/a-longer-namespace-to-make-the-frame-bigger"))
        [session] = [s for s in small.server.sessions.sessions.values() if s.agent.name == "flooder"]
        await until(lambda: session.paused, what="reading paused")
        assert session.inbound < FLOOD // 2  # not the whole flood (2 MB) queued in the server
    finally:
        store.replace_agent_catalog = real
    for d, agent_id, recs in stuck:  # the store answers again; later frames go to it directly
        real(agent_id, recs).chainDeferred(d)

    async def first_namespace() -> str:
        got = await metrics_of(small, "flooder")
        return got[0][0] if got else ""

    await value_of(first_namespace, lambda ns: ns.startswith(f"/flood{FLOOD - 1}/"), timeout=60,
                   what="the last catalog stored")
    # The last catalog is stored before its frame's bookkeeping runs (listener, then
    # `_handled`): wait for that, then the queue is empty and reading resumed.
    await until(lambda: session.inbound == 0 and not session.paused, what="the queue drained and reading resumed")
    assert not client.closed.called
    await client.disconnect()
