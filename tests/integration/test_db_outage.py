"""A database outage, end to end: a real server on the shared MariaDB through a fault
proxy (tests/faultproxy.py) with db-timeout = 1s. While the database is stalled or
unreachable the API answers the 503 envelope with Retry-After within the deadline,
`GET /` answers and says so, agents stay connected; when it is back, everything works
again without a restart, and the log has one warning for each end of the outage and no
traceback."""
from __future__ import annotations

import pytest
import pytest_twisted
from twisted.logger import formatEvent

from taskd.wire import framing
from tests.conftest import MYSQL_HOST, MYSQL_PASSWORD, MYSQL_PORT, MYSQL_USER
from tests.faultproxy import FaultProxy
from tests.integration.agent_client import connect_agent
from tests.integration.harness import ADMIN_KEY, assert_error, start_server, stop_server
from tests.waiting import until, value_of

ANSWER_WITHIN = 10.0
"""A request still unanswered after this fails the test instead of hanging it (db-timeout
is 1s: a hang means the deadline did not work)."""


@pytest_twisted.async_yield_fixture
async def outage(mysql_dbs):
    proxy = FaultProxy(MYSQL_HOST, MYSQL_PORT)
    name = mysql_dbs.create("outage")
    dsn = f"{MYSQL_USER}:{MYSQL_PASSWORD}@tcp(127.0.0.1:{proxy.port})/{name}?charset=utf8"
    running = await start_server("mysql", dsn, db_timeout=1.0, heartbeat_interval=0.3,
                                 status_flush_interval=0.3)
    yield proxy, running
    proxy.resume()
    await stop_server(running)
    proxy.close()


def warnings_of(logs: list[dict], words: str) -> list[str]:
    return [formatEvent(e) for e in logs if e["log_level"].name == "warn" and words in formatEvent(e)]


def tracebacks(logs: list[dict]) -> list[str]:
    return [formatEvent(e) for e in logs if "log_failure" in e or e["log_level"].name in ("error", "critical")]


async def database_state(running) -> dict:
    reply = await running.request("GET", "/", key=None, timeout=ANSWER_WITHIN)
    assert reply.status == 200 and reply.meta["type"] == "heartbeat", reply.raw
    return reply.body


async def answered(running) -> bool:
    return (await running.request("GET", "/api/v1/agents", timeout=ANSWER_WITHIN)).status == 200


@pytest_twisted.ensureDeferred
async def test_a_stalled_database_answers_503_keeps_agents_and_recovers_without_a_restart(outage, logs):
    proxy, running = outage
    await running.ok("POST", "/api/v1/agents", json_body={"name": "steady"})
    agent = connect_agent(running.base, "steady", ADMIN_KEY)
    await agent.opened
    await agent.next("taskList")
    [steady] = await running.ok("GET", "/api/v1/agents", params={"name": "steady"})
    task = await running.ok("POST", "/api/v1/tasks", json_body={
        "name": "watched", "interval": 60, "enabled": True, "route": {"type": "byIds", "config": {"ids": [steady["id"]]}}})
    await agent.next("taskAdd", predicate=lambda t: t["id"] == task["id"])
    assert await database_state(running) == {"database": "available"}

    proxy.stall()
    read = await running.request("GET", "/api/v1/agents", timeout=ANSWER_WITHIN)
    assert_error(read, 503, "database unavailable")
    assert read.headers.getRawHeaders(b"retry-after") == [b"1"]
    write = await running.request("POST", "/api/v1/agents", json_body={"name": "written-during-stall"},
                                  timeout=ANSWER_WITHIN)
    assert_error(write, 503, "database unavailable")
    state = await database_state(running)
    assert state["database"] == "unavailable" and state["unavailableSeconds"] >= 0
    beats = len(agent.events("heartbeat"))
    await until(lambda: len(agent.events("heartbeat")) >= beats + 3 or agent.closed.called,
                what="heartbeats during the stall")
    assert not agent.closed.called
    # Session work meanwhile is kept for later, not dropped (nor the connection's end).
    agent.send(framing.TASK_STATUS, [{"taskId": task["id"], "executor": "snap", "outcome": "error",
                                      "error": "reported during the stall", "lastRun": 1767323045.25,
                                      "duration": 0.5, "metrics": None, "runs": 3, "failures": 1, "skipped": 0}])

    proxy.resume()
    await until(lambda: answered(running), what="the API answering again")
    await value_of(lambda: database_state(running), lambda s: s == {"database": "available"},
                   what="GET / saying the database is back")
    names = [a["name"] for a in await running.ok("GET", "/api/v1/agents")]
    assert names == ["steady"]  # the write answered 503 was not committed later
    shown = await value_of(lambda: running.ok("GET", f"/api/v1/tasks/{task['id']}"), lambda t: t["status"],
                           what="the status reported during the stall")
    assert shown["status"][0]["error"] == "reported during the stall"
    assert not agent.closed.called
    shown = await running.ok("GET", "/api/v1/agents", params={"name": "steady"})
    assert shown[0]["online"] is True
    assert len(warnings_of(logs, "database unavailable")) == 1
    assert len(warnings_of(logs, "database available again after")) == 1
    assert tracebacks(logs) == []
    await agent.disconnect()


@pytest_twisted.ensureDeferred
async def test_an_unreachable_database_answers_503_and_new_agents_wait_for_it(outage, logs):
    proxy, running = outage
    await running.ok("POST", "/api/v1/agents", json_body={"name": "early"})
    proxy.refuse()
    assert_error(await running.request("GET", "/api/v1/tasks", timeout=ANSWER_WITHIN), 503, "database unavailable")
    assert (await database_state(running))["database"] == "unavailable"
    proxy.resume()
    await until(lambda: answered(running), what="the API answering again")
    agent = connect_agent(running.base, "early", ADMIN_KEY)
    await agent.opened
    await agent.next("taskList")
    assert len(warnings_of(logs, "database unavailable")) == 1
    assert tracebacks(logs) == []
    await agent.disconnect()


@pytest.mark.parametrize("mode", ["stall", "refuse"])
def test_the_proxy_fails_as_asked(mode):
    """The fault proxy itself: forwards, then fails as asked, then forwards again."""
    import pymysql

    proxy = FaultProxy(MYSQL_HOST, MYSQL_PORT)
    try:
        args = dict(host="127.0.0.1", port=proxy.port, user=MYSQL_USER, password=MYSQL_PASSWORD,
                    connect_timeout=1, read_timeout=1)
        pymysql.connect(**args).close()
        getattr(proxy, mode)()
        with pytest.raises(pymysql.err.OperationalError):
            pymysql.connect(**args)
        proxy.resume()
        conn = pymysql.connect(**args)
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
        conn.close()
    finally:
        proxy.close()
