"""Server liveness against the real databases and real processes: racing reapers (one
wins, on sqlite and MariaDB), GET /api/v1/servers, and two `twistd taskserver` on one
MariaDB database where one is SIGKILLed or frozen (SIGSTOP) past server-dead-after."""
from __future__ import annotations

import signal
import threading
from datetime import timedelta

import pytest
import pytest_twisted
import sqlalchemy as sa
import treq
from twisted.internet import reactor
from twisted.internet.defer import DeferredList

from taskd.db import migrate, models
from taskd.db.connector import Database
from taskd.db.engine import create_engine
from taskd.db.servers import ServerInstance
from taskd.timeutil import utcnow
from tests.integration.agent_client import connect_agent
from tests.integration.daemons import ServerProcess
from tests.integration.harness import ADMIN_KEY, ORG2_KEY, assert_error
from tests.waiting import value_of

HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}
FAST = {"server-heartbeat-interval": "0.2s", "server-dead-after": "1s", "relocate-delay": "0.2s"}


# -- racing reapers ----------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "mysql"])
def two_connectors(request, tmp_path, mysql_dbs):
    """Two connectors on one database, each with its own engine and threads, as two
    server processes have."""
    if request.param == "sqlite":
        cfg = ("sqlite3", str(tmp_path / "reap.db"))
    else:
        cfg = ("mysql", mysql_dbs.dsn(mysql_dbs.create("reap")))
    engines = [create_engine(*cfg, pool_size=4) for _ in range(2)]
    migrate.upgrade(engines[0])
    dbs = [Database.open(engine, reactor) for engine in engines]
    for db in dbs:
        db.start()
    yield engines[0], dbs
    for db in dbs:
        db.stop()


@pytest_twisted.ensureDeferred
async def test_two_reapers_racing_for_the_same_silent_servers_each_is_reaped_once(two_connectors):
    engine, (one, two) = two_connectors
    long_ago = utcnow() - timedelta(minutes=5)
    silent = [ServerInstance(f"{n:036d}", f"dead-{n}", "gone", "tcp:8082", "1", long_ago, long_ago)
              for n in range(12)]
    with engine.begin() as conn:
        conn.execute(sa.insert(models.agent), [
            {"id": n + 1, "org_id": 1, "name": f"agent{n}", "enabled": True, "public": False, "online": True,
             "created": long_ago, "updated": long_ago} for n in range(12)])
        conn.execute(sa.insert(models.server_instance), [
            {"id": s.id, "name": s.name, "hostname": s.hostname, "addr": s.addr, "version": s.version,
             "started": s.started, "last_seen": s.last_seen} for s in silent])
        conn.execute(sa.insert(models.agent_session), [
            {"id": f"s{n}", "agent_id": n + 1, "version": 1, "remote_ip": "10.0.0.1", "server": f"dead-{n}",
             "created": long_ago} for n in range(12)])
    cutoff = utcnow() - timedelta(seconds=30)
    calls = [db.servers.reap(s, cutoff) for s in silent for db in (one, two)]
    results = [value for ok, value in await DeferredList(calls, consumeErrors=True, fireOnOneErrback=True)]
    won = [r for r in results if r is not None]
    assert sorted(r.instance.name for r in won) == sorted(s.name for s in silent)  # each exactly once
    offline = sorted(change.agent_id for r in won for change in r.changes)
    assert offline == list(range(1, 13))  # each agent.offline exactly once
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(models.server_instance)).scalar() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(models.agent_session)).scalar() == 0
        assert not any(conn.execute(sa.select(models.agent.c.online)).scalars())


@pytest_twisted.ensureDeferred
async def test_the_heartbeat_has_a_connection_of_its_own_and_beats_while_every_serving_one_is_busy(mysql_dbs):
    """A server whose pool is full (hundreds of API reads, an event backlog) must still
    beat, or its peers reap it as dead while it serves (the chaos rig saw it cascade)."""
    engine = create_engine("mysql", mysql_dbs.dsn(mysql_dbs.create("beats")), pool_size=3)
    migrate.upgrade(engine)
    db = Database.open(engine, reactor, max_threads=2, timeout=None, own_heartbeat_connection=True)
    db.start()
    release = threading.Event()
    busy = [db.pool.do(lambda conn: release.wait(60)) for _ in range(4)]  # both threads held, two queued
    try:
        now = utcnow()
        me = ServerInstance("b" * 36, "busy", "host", "tcp:8082", "1", now, now)
        await db.servers.register(me).addTimeout(30, reactor)
        assert await db.servers.beat(me.id).addTimeout(30, reactor) is True
        assert not any(d.called for d in busy)  # it beat while all of them waited
    finally:
        release.set()
        await DeferredList(busy)
        db.stop()


# -- GET /api/v1/servers -----------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_servers_lists_this_live_server_with_its_agents_for_the_admin_org_only(api):
    client = connect_agent(api.base, "one", ADMIN_KEY)
    try:
        await client.opened
        await client.next("taskList")
        [me] = await api.ok("GET", "/api/v1/servers")
        assert me["name"] == api.server.instance_id and me["agents"] == 1
        assert me["id"] == api.server.liveness.instance.id
        assert set(me) == {"id", "name", "hostname", "addr", "version", "started", "lastSeen", "agents"}
        assert_error(await api.request("GET", "/api/v1/servers", key=ORG2_KEY), 403, "admin org")
        assert_error(await api.request("GET", "/api/v1/servers?all=1"), 400, "all")
    finally:
        await client.disconnect()


# -- two real servers --------------------------------------------------------------------

async def call(server: ServerProcess, path: str, method: str = "GET", body=None):
    resp = await treq.request(method, server.base + path, json=body, headers=HEADERS)
    data = await resp.json()
    assert resp.code == 200, data
    return data["body"]


async def pair(tmp_path, mysql_dbs, label: str) -> tuple[ServerProcess, ServerProcess]:
    dsn = mysql_dbs.dsn(mysql_dbs.create(label))
    common = {"db-type": "mysql", "db-connect-str": dsn, "admin-key": ADMIN_KEY, **FAST}
    a, b = ServerProcess(tmp_path, "A", **common), ServerProcess(tmp_path, "B", **common)
    await a.start()
    await b.start()
    return a, b


@pytest_twisted.ensureDeferred
async def test_a_sigkilled_servers_agents_go_offline_and_its_any_task_moves(tmp_path, mysql_dbs):
    a, b = await pair(tmp_path, mysql_dbs, "kill")
    clients = []
    try:
        a1 = connect_agent(a.base, "a1", ADMIN_KEY)
        clients.append(a1)
        await a1.opened
        await a1.next("taskList")
        task = await call(a, "/api/v1/tasks", "POST", {
            "name": "anywhere", "metrics": {}, "interval": 60, "route": {"type": "any"}, "enabled": True})
        assert (await a1.next("taskAdd"))["id"] == task["id"]
        b1 = connect_agent(b.base, "b1", ADMIN_KEY)
        clients.append(b1)
        await b1.opened
        await b1.next("taskList")
        assert sorted(s["name"] for s in await call(b, "/api/v1/servers")) == ["A", "B"]

        a.proc.send_signal(signal.SIGKILL)
        [a1_row] = await value_of(lambda: call(b, "/api/v1/agents?name=a1"), lambda rows: not rows[0]["online"],
                                  timeout=10, what=lambda: f"a1 offline in B's API\n{b.log()}")
        assert (await b1.next("taskAdd", timeout=10))["id"] == task["id"]  # relocated to b1 on B
        [live] = await call(b, "/api/v1/servers")
        assert (live["name"], live["agents"]) == ("B", 1)
        assert "server A (instance" in b.log() and "declared dead" in b.log()
    finally:
        for client in clients:
            if not client.closed.called and client.protocol is not None:
                client.protocol.dropConnection(abort=True)
        await b.stop()
        await a.stop()
    assert "Traceback" not in b.log(), b.log()


@pytest_twisted.ensureDeferred
async def test_a_server_frozen_past_dead_after_drops_its_sockets_on_waking_and_registers_again(
        tmp_path, mysql_dbs):
    a, b = await pair(tmp_path, mysql_dbs, "freeze")
    client = None
    try:
        client = connect_agent(a.base, "a1", ADMIN_KEY)
        await client.opened
        await client.next("taskList")
        first = {s["name"]: s["id"] for s in await call(b, "/api/v1/servers")}
        a.proc.send_signal(signal.SIGSTOP)
        try:
            await value_of(lambda: call(b, "/api/v1/agents?name=a1"), lambda rows: not rows[0]["online"],
                           timeout=10, what=lambda: f"a1 offline while A is frozen\n{b.log()}")
        finally:
            a.proc.send_signal(signal.SIGCONT)
        await value_of(lambda: client.closed.called, timeout=10, what="A closing a1's socket after waking")
        assert client.close_code == 1001 and "registration" in client.close_reason
        servers = await value_of(lambda: call(b, "/api/v1/servers"), lambda rows: len(rows) == 2, timeout=10,
                                 what=lambda: f"A registered again\n{a.log()}")
        again = {s["name"]: s["id"] for s in servers}
        assert again["B"] == first["B"] and again["A"] != first["A"]
        assert "declared dead by another server" in a.log()
        # The agent reconnects (to A, here) and is online again.
        client = connect_agent(a.base, "a1", ADMIN_KEY)
        await client.opened
        await value_of(lambda: call(b, "/api/v1/agents?name=a1"), lambda rows: rows[0]["online"], timeout=10,
                       what="a1 online again")
    finally:
        if client is not None and not client.closed.called and client.protocol is not None:
            client.protocol.dropConnection(abort=True)
        await b.stop()
        await a.stop()
    assert "Traceback" not in a.log() + b.log(), a.log() + b.log()
