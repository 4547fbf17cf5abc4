"""The agent's connection against a real task-server on loopback."""
from __future__ import annotations

import random

import pytest_twisted
from twisted.internet import reactor
from twisted.logger import globalLogPublisher

from taskd.agent.connection import ServerConnection, backoff
from taskd.wire.framing import Frame
from tests.integration.harness import ADMIN_KEY, start_server, stop_server
from tests.waiting import until


class Recorder:
    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.connects = 0

    def frame(self, f: Frame) -> None:
        self.frames.append(f)

    def connected(self) -> None:
        self.connects += 1

    def events(self, name: str) -> list[Frame]:
        return [f for f in self.frames if f.event == name]


def connection(base: str, rec: Recorder, name="agent1", key=ADMIN_KEY, **kw) -> ServerConnection:
    url = base.replace("http", "ws", 1) + f"/api/v1/socket/{name}/1"
    return ServerConnection(url=url, api_key=key, reactor=reactor, on_frame=rec.frame,
                            on_connected=rec.connected, rng=random.Random(1), **kw)


class Logs:
    """Captures the agent's log lines at info and above (what an operator sees)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, event: dict) -> None:
        from twisted.logger import formatEvent

        from twisted.logger import LogLevel

        level = event.get("log_level")
        if event.get("log_namespace", "").startswith("taskd.agent") and level is not None and level >= LogLevel.info:
            self.lines.append(formatEvent(event))

    def __enter__(self):
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self)


@pytest_twisted.async_yield_fixture
async def servers():
    """Starts servers on demand and always stops them, even when a test fails."""
    started = []

    async def start(*args, **kw):
        running = await start_server(*args, **kw)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.server.service.running:
            await stop_server(running)


def test_backoff_grows_from_about_a_second_to_the_cap():
    rng = random.Random(3)
    delays = [backoff(n, 30.0, rng) for n in range(1, 10)]
    assert 0.5 <= delays[0] <= 1.0
    assert all(d <= 30.0 for d in delays) and delays[-1] >= 15.0


@pytest_twisted.ensureDeferred
async def test_connects_receives_task_list_and_stops_cleanly(sqlite_only, servers):
    running = await servers(*sqlite_only)
    rec = Recorder()
    conn = connection(running.base, rec)
    conn.startService()
    try:
        await until(lambda: rec.events("taskList"), what="taskList")
        assert rec.connects == 1 and conn.connected
        [agent] = await running.ok("GET", "/api/v1/agents")
        assert agent["name"] == "agent1" and agent["online"] is True
    finally:
        await conn.stopService()
    await until(lambda: not running.server.sessions.sessions, what="session closed")


@pytest_twisted.ensureDeferred
async def test_refused_key_is_logged_once_and_retried_at_the_cap(sqlite_only, servers):
    running = await servers(*sqlite_only)
    rec = Recorder()
    conn = connection(running.base, rec, key="wrong-key", max_backoff=0.3)
    with Logs() as logs:
        conn.startService()
        try:
            await until(lambda: conn.attempts >= 4, what="several attempts")
        finally:
            await conn.stopService()
    refusals = [l for l in logs.lines if "refused" in l]
    assert len(refusals) == 1, logs.lines
    assert "HTTP 401" in refusals[0] and "api-key" in refusals[0]
    assert "wrong-key" not in "\n".join(logs.lines)
    assert rec.connects == 0


@pytest_twisted.ensureDeferred
async def test_reconnects_after_the_server_restarts(sqlite_only, servers):
    from tests.integration.daemons import free_port

    port = free_port()
    running = await servers(*sqlite_only, addr=f"tcp:{port}:interface=127.0.0.1")
    rec = Recorder()
    conn = connection(running.base, rec, max_backoff=0.5)
    with Logs() as logs:
        conn.startService()
        try:
            await until(lambda: rec.connects == 1, what="first connection")
            await stop_server(running)
            await until(lambda: not conn.connected, what="disconnect noticed")
            running = await servers(*sqlite_only, addr=f"tcp:{port}:interface=127.0.0.1")
            await until(lambda: rec.connects == 2, timeout=15, what="reconnection")
        finally:
            await conn.stopService()
    assert any("lost" in l for l in logs.lines)
    assert sum("cannot connect" in l for l in logs.lines) <= 1  # not one line per attempt


@pytest_twisted.ensureDeferred
async def test_silent_server_is_detected_by_missed_heartbeats(sqlite_only, servers):
    running = await servers(*sqlite_only, heartbeat_interval=60.0)
    rec = Recorder()
    conn = connection(running.base, rec, heartbeat_interval=0.1, max_backoff=0.2)
    with Logs() as logs:
        conn.startService()
        try:
            await until(lambda: rec.connects >= 2, timeout=10, what="drop and reconnect")
        finally:
            await conn.stopService()
    assert any("no heartbeat" in l for l in logs.lines)
