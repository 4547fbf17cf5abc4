"""The agent websocket's protocol edges: bad frames, replacement, timers, shutdown, start-up.

A bad frame must cost only the connection that sent it; a second connection for an
agent replaces the first; timers keep their promises; stopping the server leaves
nothing behind and starting one clears what its previous run left.
"""
from __future__ import annotations

import dataclasses
import re
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import pytest
import pytest_twisted
import sqlalchemy as sa
from twisted.internet import reactor

from taskd.db import models
from taskd.server.assembly import build_server
from taskd.server.settings import ServerSettings
from taskd.timeutil import utcnow
from taskd.wire import framing
from tests.integration.agent_client import AgentClient, connect_agent
from tests.integration.harness import ADMIN_KEY, start_server, stop_server
from tests.waiting import until, value_of

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")


# -- helpers ---------------------------------------------------------------------------

async def online(api, name: str, key: str = ADMIN_KEY) -> AgentClient:
    client = connect_agent(api.base, name, key)
    await client.opened
    await client.next("taskList")
    return client


async def another(client: AgentClient, event: str, timeout: float = 5.0) -> Any:
    """Wait for an `event` frame that arrives after this call."""
    seen = len(client.events(event))
    await until(lambda: len(client.events(event)) > seen or client.closed.called, timeout, f"a new {event}")
    assert not client.closed.called, f"closed ({client.close_code} {client.close_reason}) waiting for {event}"
    return client.events(event)[seen]


def count(engine: sa.Engine, table: sa.Table, *where: Any) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar()


def agent_online(engine: sa.Engine, name: str) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(sa.select(models.agent.c.online).where(models.agent.c.name == name)).scalar())


async def agent_metrics(api, name: str) -> list[tuple[str, int]]:
    [agent] = await api.ok("GET", "/api/v1/agents", params={"name": name})
    return [(m["namespace"], m["version"]) for m in await api.ok("GET", f"/api/v1/agents/{agent['id']}/metrics")]


@pytest_twisted.async_yield_fixture
async def fast(db_config):
    """A server with 0.2 s heartbeats (so 'still alive' is quick to prove)."""
    running = await start_server(*db_config, heartbeat_interval=0.2)
    yield running
    await stop_server(running)


# -- bad frames ------------------------------------------------------------------------

@pytest.mark.parametrize("frame", [
    pytest.param(b"\x00\x05ab", id="too-short"),
    pytest.param(b"\x01\x07catalog[]", id="wrong-version"),
    pytest.param(b"\x00\xffcatalog[]", id="name-length-overruns"),
    pytest.param(b"\x00\x00catalog[]", id="name-length-zero"),
    pytest.param(b"\x00\x07cat\x01log[]", id="name-not-printable"),
])
@pytest_twisted.ensureDeferred
async def test_malformed_frame_closes_only_that_connection(fast, frame):
    api = fast
    victim, bystander = await online(api, "victim"), await online(api, "bystander")
    victim.send_raw(frame)
    await victim.closed
    assert victim.close_code == 1002
    assert "malformed frame" in (victim.close_reason or "")
    await another(bystander, "heartbeat")
    await another(bystander, "heartbeat")
    assert not bystander.closed.called
    agents = {a["name"]: a["online"] for a in await api.ok("GET", "/api/v1/agents")}
    assert agents["bystander"] is True
    await until(lambda: not agent_online(api.server.engine, "victim"), what="victim offline")
    await bystander.disconnect()


@pytest_twisted.ensureDeferred
async def test_text_frame_is_a_protocol_error(fast):
    client = await online(fast, "texter")
    client.send_raw(b'{"event": "catalog"}', binary=False)
    await client.closed
    assert client.close_code == 1002
    assert "text frames" in (client.close_reason or "")


@pytest_twisted.ensureDeferred
async def test_unknown_event_is_ignored_and_the_connection_stays(fast):
    client = await online(fast, "chatty")
    client.send("noSuchEvent", {"hello": "world"})
    client.send_raw(framing.encode("alsoUnknown"))  # no payload at all
    await another(client, "heartbeat")
    await another(client, "heartbeat")
    # The connection still works: a catalog sent afterwards is stored.
    client.send("catalog", [{"namespace": "/after/unknown", "version": 1, "policy": []}])
    await until_async(lambda: agent_metrics(fast, "chatty"), [("/after/unknown", 1)])
    assert not client.closed.called
    await client.disconnect()


async def until_async(fetch: Callable[[], Any], expected: Any, timeout: float = 10.0) -> None:
    await value_of(fetch, lambda got: got == expected, timeout, what=f"expected {expected!r}", interval=0.05)


@pytest.mark.parametrize("payload", [
    pytest.param(b"{not json", id="invalid-json"),
    pytest.param(b"\xff\xfe[]", id="not-utf8"),
    pytest.param(b'{"namespace": "/a/b"}', id="not-an-array"),
    pytest.param(b'[{"version": 1}]', id="record-without-namespace"),
    pytest.param(b'[{"namespace": "/a/b", "version": -1}]', id="negative-version"),
    pytest.param(b'[{"namespace": "/a/b", "version": 18446744073709551616}]', id="version-beyond-int"),
])
@pytest_twisted.ensureDeferred
async def test_bad_catalog_is_ignored_and_later_catalogs_still_count(fast, payload):
    client = await online(fast, "cataloger")
    client.send("catalog", [{"namespace": "/before", "version": 1, "policy": []}])
    await until_async(lambda: agent_metrics(fast, "cataloger"), [("/before", 1)])
    client.send_raw(framing.encode("catalog", payload))
    await another(client, "heartbeat")
    await another(client, "heartbeat")
    assert not client.closed.called
    assert await agent_metrics(fast, "cataloger") == [("/before", 1)]  # the bad one changed nothing
    client.send("catalog", [{"namespace": "/after", "version": 2, "policy": []}])
    await until_async(lambda: agent_metrics(fast, "cataloger"), [("/after", 2)])
    await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_a_catalog_the_database_refuses_does_not_block_later_catalogs(fast):
    """Catalogs are queued per session; one failing to store must not wedge the queue."""
    client = await online(fast, "unlucky")
    store = fast.server.sessions.catalog
    real = store.replace_agent_catalog
    calls: list[Any] = []

    def broken_once(agent_id: int, records: Any):
        calls.append(records)
        if len(calls) == 1:
            from twisted.internet.defer import fail
            return fail(RuntimeError("database said no"))
        return real(agent_id, records)

    store.replace_agent_catalog = broken_once
    try:
        client.send("catalog", [{"namespace": "/refused", "version": 1, "policy": []}])
        client.send("catalog", [{"namespace": "/accepted", "version": 1, "policy": []}])
        await until_async(lambda: agent_metrics(fast, "unlucky"), [("/accepted", 1)])
        assert len(calls) == 2
        assert not client.closed.called
    finally:
        store.replace_agent_catalog = real
    await client.disconnect()


# -- one connection per agent ------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_second_connection_replaces_the_first(fast):
    api = fast
    first = await online(api, "twice")
    second = await online(api, "twice")
    await first.closed
    assert first.close_code == 1000
    engine = api.server.engine
    await until(lambda: count(engine, models.agent_session) == 1, what="one session row")
    await another(second, "heartbeat")
    await another(second, "heartbeat")
    assert not second.closed.called
    assert agent_online(engine, "twice")
    [agent] = await api.ok("GET", "/api/v1/agents", params={"name": "twice"})
    assert agent["online"] is True
    await second.disconnect()
    await until(lambda: not agent_online(engine, "twice"), what="offline after the last connection")
    assert count(engine, models.agent_session) == 0


# -- timers ----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_heartbeats_carry_the_time_and_task_lists_repeat(db_config):
    api = await start_server(*db_config, heartbeat_interval=0.2, task_list_interval=0.5)
    try:
        client = connect_agent(api.base, "ticker", ADMIN_KEY)
        await client.opened
        # The waits' deadlines are the bound: 4 beats at 0.2 s, 3 lists at 0.5 s.
        await until(lambda: len(client.events("heartbeat")) >= 4, timeout=3, what="4 heartbeats")
        await until(lambda: len(client.events("taskList")) >= 3, timeout=4, what="3 task lists")
        for beat in client.events("heartbeat"):
            assert RFC3339_UTC.match(beat), beat
            when = datetime.fromisoformat(beat.replace("Z", "+00:00"))
            assert abs(datetime.now(timezone.utc) - when) < timedelta(seconds=30)
        # Empty is an empty JSON array, never null; and so it stays on repetition.
        assert client.events("taskList")[:3] == [[], [], []]
        # The client decodes JSON, so null would look like None: check the wire bytes too.
        raw: list[bytes] = []
        orig = client.protocol.onMessage

        def spy(payload: bytes, isBinary: bool) -> None:
            raw.append(payload)
            orig(payload, isBinary)

        client.protocol.onMessage = spy
        await until(lambda: any(framing.decode(p).event == "taskList" for p in raw), timeout=3,
                    what="a raw taskList")
        assert framing.encode("taskList", b"[]") in raw
        await client.disconnect()
    finally:
        await stop_server(api)


# -- shutdown and start-up ---------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_stopping_the_server_closes_sockets_and_leaves_agents_offline(db_config):
    api = await start_server(*db_config)
    clients = [await online(api, name) for name in ("s1", "s2", "s3")]
    engine = api.server.engine
    assert count(engine, models.agent_session) == 3
    await stop_server(api)
    for client in clients:
        await client.closed
        assert client.close_code == 1000
    try:
        assert count(engine, models.agent_session) == 0
        assert count(engine, models.agent, models.agent.c.online.is_(True)) == 0
        assert count(engine, models.agent) == 3
    finally:
        engine.dispose()


def _insert_session(conn: sa.Connection, agent_id: int, server: str) -> None:
    conn.execute(sa.insert(models.agent_session).values(
        id=str(uuid.uuid4()), agent_id=agent_id, version=1, remote_ip="10.0.0.1", server=server,
        created=utcnow()))
    conn.execute(sa.update(models.agent).where(models.agent.c.id == agent_id).values(online=True))


@pytest_twisted.ensureDeferred
async def test_start_up_clears_only_this_instances_stale_sessions(db_config):
    first = await start_server(*db_config, instance_id="srv-live")
    second = None
    try:
        live = await online(first, "live")  # a real session on srv-live
        stale = await first.ok("POST", "/api/v1/agents", json_body={"name": "stale"})
        elsewhere = await first.ok("POST", "/api/v1/agents", json_body={"name": "elsewhere"})
        engine = first.server.engine
        with engine.begin() as conn:
            _insert_session(conn, stale["id"], "srv-x")        # left behind by srv-x's last run
            _insert_session(conn, elsewhere["id"], "srv-other")
        assert agent_online(engine, "stale") and agent_online(engine, "elsewhere")

        # A new run of srv-x on the same database clears its rows while it is built.
        settings = dataclasses.replace(
            ServerSettings(), addr="tcp:0:interface=127.0.0.1", db_type=db_config[0],
            db_connect_str=db_config[1], admin_key=ADMIN_KEY, auth_endpoint=first.auth.url,
            instance_id="srv-x")
        second = build_server(settings, reactor)
        assert count(engine, models.agent_session, models.agent_session.c.server == "srv-x") == 0
        assert not agent_online(engine, "stale")
        # Rows of other instances (and the agents they keep online) are left alone.
        assert count(engine, models.agent_session, models.agent_session.c.server == "srv-other") == 1
        assert count(engine, models.agent_session, models.agent_session.c.server == "srv-live") == 1
        assert agent_online(engine, "elsewhere") and agent_online(engine, "live")

        # Starting it announces the agent it found offline (so its tasks can move).
        published: list[tuple[str, Any]] = []
        second.events.subscribe(lambda e: published.append((e.type, e.payload["id"])))
        second.service.startService()
        await second.listener.listening
        assert published == [("agent.offline", stale["id"])]
        assert not live.closed.called
        await live.disconnect()
    finally:
        if second is not None and second.service.running:
            await second.service.stopService()
        await stop_server(first)


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
