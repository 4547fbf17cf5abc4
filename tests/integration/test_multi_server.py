"""Two `twistd taskserver` processes, one MariaDB database, the local RabbitMQ: one system."""
from __future__ import annotations

import subprocess

import pytest_twisted
import treq

from tests.integration.agent_client import connect_agent
from tests.integration.daemons import ServerProcess
from tests.integration.harness import ADMIN_KEY
from tests.waiting import value_of

HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def call(server: ServerProcess, method: str, path: str, body=None):
    resp = await treq.request(method, server.base + path, json=body, headers=HEADERS)
    data = await resp.json()
    assert resp.code == 200, data
    return data["body"]


async def two_servers(tmp_path, mysql_dbs, exchange, db: str, **extra: str) -> tuple[ServerProcess, ServerProcess]:
    """A and B started on one new MariaDB database and the local RabbitMQ (the test's own exchange)."""
    common = {"db-type": "mysql", "db-connect-str": mysql_dbs.dsn(mysql_dbs.create(db)), "admin-key": ADMIN_KEY,
              "exchange": exchange, "rabbitmq-queue-expiry": "20s",
              "rabbitmq-url": "amqp://guest:guest@127.0.0.1:5672/", **extra}
    a = ServerProcess(tmp_path, "A", **common)
    b = ServerProcess(tmp_path, "B", **common)
    await a.start()
    await b.start()
    return a, b


async def stop_all(servers, clients) -> None:
    """Drop the light agents' sockets, stop the servers; neither left a traceback."""
    for client in clients:
        if not client.closed.called and client.protocol is not None:
            client.protocol.dropConnection(abort=True)
    for server in servers:
        await server.stop()
    logs = "".join(server.log() for server in servers)
    assert "Traceback" not in logs, logs


def close_amqp_connection_of(instance: str) -> None:
    """Cut one server's broker connection from the broker side."""
    out = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    pids = [line.split("\t")[0] for line in out.splitlines() if f"taskd {instance}" in line]
    assert pids, f"no broker connection named 'taskd {instance}' in:\n{out}"
    for pid in pids:
        subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "test cut"], timeout=60, check=True)




@pytest_twisted.ensureDeferred
async def test_two_servers_behave_as_one(tmp_path, mysql_dbs, exchange):
    a, b = await two_servers(tmp_path, mysql_dbs, exchange, "multi", **{"relocate-delay": "0.2s"})
    agents = []
    try:
        # An agent on B gets the taskAdd for a task created through A.
        b1 = connect_agent(b.base, "b1", ADMIN_KEY)
        agents.append(b1)
        await b1.opened
        await b1.next("taskList")
        any_task = await call(a, "POST", "/api/v1/tasks", {
            "name": "anywhere", "metrics": {}, "interval": 60, "route": {"type": "any"}, "enabled": True})
        assert (await b1.next("taskAdd", timeout=20))["id"] == any_task["id"]

        a1 = connect_agent(a.base, "a1", ADMIN_KEY)
        agents.append(a1)
        await a1.opened
        await a1.next("taskList")
        await a1.nothing_more("taskAdd", within=0.3)  # the any task stays on b1

        # A cut of A's broker connection loses no event: A buffers, reconnects, resends.
        b1_id = (await call(a, "GET", "/api/v1/agents?name=b1"))[0]["id"]
        close_amqp_connection_of("A")
        by_id = await call(a, "POST", "/api/v1/tasks", {
            "name": "pinned", "metrics": {}, "interval": 60,
            "route": {"type": "byIds", "config": {"ids": [b1_id]}}, "enabled": True})
        assert (await b1.next("taskAdd", timeout=30))["id"] == by_id["id"]

        # Stopping B closes b1's socket normally, marks b1 offline, and the any task
        # moves to a1 on A.
        # twistd re-raises the terminating signal once it has shut down cleanly.
        assert await b.stop() in (0, -15)
        assert "Server Shut Down." in b.log()
        await b1.closed
        assert b1.close_code == 1000
        moved = await a1.next("taskAdd", timeout=20)
        assert moved["id"] == any_task["id"]
        [b1_now] = await call(a, "GET", "/api/v1/agents?name=b1")
        assert b1_now["online"] is False
        got = await call(a, "GET", f"/api/v1/tasks/{any_task['id']}")
        assert got["agents"] == [(await call(a, "GET", "/api/v1/agents?name=a1"))[0]["id"]]
    finally:
        await stop_all((a, b), agents)


async def eventually(read, check, timeout: float = 5.0):
    """Poll `read()` until `check(value)`; well below the agent cache's 60 s max age, so
    only the event from the other server can have refreshed what this one shows."""
    return await value_of(read, check, timeout, what="the other server's change", interval=0.05)


@pytest_twisted.ensureDeferred
async def test_agent_reads_on_one_server_follow_changes_made_through_another(tmp_path, mysql_dbs, exchange):
    """A caches agents it was asked about; what B changes (the API, the agent's
    connection, deletion) reaches A's GET through B's agent.* events."""
    a, b = await two_servers(tmp_path, mysql_dbs, exchange, "cache")
    client = None
    try:
        agent = await call(b, "POST", "/api/v1/agents", {"name": "roamer", "tags": ["one"]})
        path = f"/api/v1/agents/{agent['id']}"

        async def on_a():
            resp = await treq.request("GET", a.base + path, headers=HEADERS)
            data = await resp.json()
            return data["body"] if resp.code == 200 else resp.code

        assert (await on_a())["tags"] == ["one"]
        assert (await on_a())["tags"] == ["one"]  # now from A's cache

        await call(b, "PUT", "/api/v1/agents", {"id": agent["id"], "tags": ["two"], "public": True})
        shown = await eventually(on_a, lambda v: v["tags"] == ["two"])
        assert shown["public"] is True

        client = connect_agent(b.base, "roamer", ADMIN_KEY)
        await client.opened
        await client.next("taskList")
        await eventually(on_a, lambda v: v["online"] is True)
        await client.disconnect()
        await eventually(on_a, lambda v: v["online"] is False)

        await call(b, "DELETE", path)
        await eventually(on_a, lambda v: v == 404)
    finally:
        await stop_all((a, b), [client] if client is not None else [])


@pytest_twisted.ensureDeferred
async def test_the_newest_session_wins_across_servers(tmp_path, mysql_dbs, exchange):
    """An agent whose socket to A died unseen connects to B: A closes its stale socket,
    saying why, and no longer writes for it; the agent stays online through B."""
    a, b = await two_servers(tmp_path, mysql_dbs, exchange, "newest")
    clients = []
    try:
        on_a = connect_agent(a.base, "roamer", ADMIN_KEY)
        clients.append(on_a)
        await on_a.opened
        await on_a.next("taskList")
        on_b = connect_agent(b.base, "roamer", ADMIN_KEY)  # the same agent, through B
        clients.append(on_b)
        await on_b.opened
        await on_b.next("taskList")
        await on_a.closed
        assert on_a.close_code == 1000
        assert "replaced by a newer connection on server B" in (on_a.close_reason or "")
        [roamer] = await call(a, "GET", "/api/v1/agents?name=roamer")
        assert roamer["online"] is True
        assert not on_b.closed.called
    finally:
        await stop_all((a, b), clients)


@pytest_twisted.ensureDeferred
async def test_an_ad_hoc_run_asked_of_one_server_is_answered_by_the_agent_on_the_other(tmp_path, mysql_dbs, exchange):
    """POST /tasks/<id>/run on A for an agent held by B: the request crosses RabbitMQ to
    B, B sends runTask to its agent, the agent's runResult crosses back, A answers it."""
    a, b = await two_servers(tmp_path, mysql_dbs, exchange, "adhoc")
    agent = None
    try:
        agent = connect_agent(b.base, "on-b", ADMIN_KEY, features="runTask")
        await agent.opened
        await agent.next("taskList")
        [listed] = await call(a, "GET", "/api/v1/agents")
        task = await call(a, "POST", "/api/v1/tasks", {"name": "now", "metrics": {}, "interval": 3600, "enabled": True,
                                                       "route": {"type": "byIds", "config": {"ids": [listed["id"]]}}})
        asked = treq.post(a.base + f"/api/v1/tasks/{task['id']}/run", headers=HEADERS, params={"timeout": "20"})
        request = await agent.next("runTask", timeout=20)
        assert request["task"]["id"] == task["id"]
        agent.send("runResult", {"requestId": request["requestId"], "taskId": task["id"], "outcome": "ok",
                                 "duration": 0.25, "metrics": [{"name": "x.up", "value": 1, "unit": ""}]})
        resp = await asked
        body = await resp.json()
        assert resp.code == 200, body
        [result] = body["body"]["results"]
        assert (result["agentId"], result["outcome"], result["duration"]) == (listed["id"], "ok", 0.25)
        assert [(m["name"], m["value"]) for m in result["metrics"]] == [("x.up", 1)]
    finally:
        await stop_all((a, b), [agent] if agent is not None else [])
