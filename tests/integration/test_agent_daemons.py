"""The operators' notes' walkthrough with the real daemons.

A `twistd taskserver` process (sqlite, admin-key EASY) and a `twistd taskagent` process
configured with the notes' agent keys; Snap is the emulator, served from this test's
reactor. The agent is registered with the notes' curl request (byte for byte), the
notes' task is created, and the agent's log, the emulator and the API must show it
running; SIGTERM then stops both daemons cleanly.
"""
from __future__ import annotations

import re

import pytest_twisted
import treq

from tests.fakes.snap import SnapEmulator, metric
from tests.integration.daemons import AgentProcess, ServerProcess
from tests.integration.harness import ADMIN_KEY
from tests.integration.test_notes_registration import send_raw
from tests.notes_requests import CURL, NOTES_TASK
from tests.waiting import until, value_of

HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def call(server: ServerProcess, method: str, path: str, body=None, **kw):
    resp = await treq.request(method, server.base + path, json=body, headers=HEADERS, **kw)
    data = await resp.json()
    assert resp.code == 200, data
    return data["body"]


async def eventually_api(server: ServerProcess, path: str, check, timeout: float = 10.0, what: str = ""):
    """Poll GET `path` until `check(body)` is truthy; returns that body."""
    return await value_of(lambda: call(server, "GET", path), check, timeout, what or path, interval=0.05)


@pytest_twisted.ensureDeferred
async def test_notes_walkthrough_with_real_daemons(tmp_path):
    server = ServerProcess(tmp_path, "task-server", **{
        "db-type": "sqlite3", "db-connect-str": str(tmp_path / "task-server.db"), "admin-key": ADMIN_KEY})
    snap = SnapEmulator(strict=True, catalog=[metric("/example-task/foo", 1)]).start()
    agent = AgentProcess(tmp_path, "task-agent", **{
        # The notes' agent keys, pointed at this test's server and emulator.
        "log-level": "1",
        "server-url": f"ws://127.0.0.1:{server.port}/api/v1",
        "tsdb-url": "http://tsdb-gw.invalid/",
        "snap-url": snap.url + "/",
        "stats-enabled": "false",
        "statsd-addr": "localhost:8125",
        "statsd-type": "standard",
        "api-key": ADMIN_KEY,
        "name": "agent1",
    })
    try:
        await server.start()

        # "Registering an Agent": the notes' curl request, as curl sends it.
        reply = await send_raw(server, CURL.build("agent1", f"127.0.0.1:{server.port}"))
        assert reply.status == 200, reply.body
        registered = reply.json["body"]
        assert registered["name"] == "agent1" and registered["online"] is False

        agent.start()
        socket_url = f"ws://127.0.0.1:{server.port}/api/v1/socket/agent1/1"
        await agent.wait_log(f"connected to {socket_url}")
        await eventually_api(server, "/api/v1/agents?name=agent1",
                             lambda rows: rows and rows[0]["online"], what="agent1 online")

        # "Creating a task": the notes' JSON body.
        task = await call(server, "POST", "/api/v1/tasks", NOTES_TASK)
        tid = task["id"]
        log = await agent.wait_log("example-task-1")
        assert re.search(rf"task {tid} \(example-task-1\) added: every 300s", log), log

        name = f"raintank-apps:{tid}"
        await until(lambda: [t for t in snap.tasks.values() if t.name == name and t.state == "Running"],
                    timeout=15, what=f"Snap task {name}")
        [snap_task] = [t for t in snap.tasks.values() if t.name.startswith("raintank-apps:")]
        assert snap_task.name == name and snap_task.interval_ns == 300 * 10**9
        assert snap_task.workflow["collect"]["config"] == NOTES_TASK["config"]
        assert snap.global_config["raintank_agent_name"] == "agent1"
        assert snap.global_config["raintank_api_key"] == ADMIN_KEY
        await agent.wait_log(f"created Snap task {snap_task.id}")
        got = await call(server, "GET", f"/api/v1/tasks/{tid}")
        assert got["agents"] == [registered["id"]]
        # log-level 1 is DEBUG: the server's heartbeats (every 2 s) are logged.
        await agent.wait_log("#debug] heartbeat ", timeout=10)

        # SIGTERM the agent: it closes its socket normally; the server marks it offline.
        # (twistd re-raises the terminating signal once it has shut down cleanly.)
        assert await agent.stop() in (0, -15), agent.log()
        assert "Main loop terminated." in agent.log(), agent.log()
        await until(lambda: "agent agent1 disconnected (code 1000" in server.log(),
                    what="the server seeing a normal closure")
        await eventually_api(server, "/api/v1/agents?name=agent1",
                             lambda rows: rows and rows[0]["online"] is False, what="agent1 offline")

        assert await server.stop() in (0, -15), server.log()
        assert "Server Shut Down." in server.log()
    finally:
        try:
            await agent.stop()
        finally:
            try:
                await server.stop()
            finally:
                await snap.stop()

    agent_log, server_log = agent.log(), server.log()
    assert "Traceback" not in agent_log + server_log, agent_log + server_log
    assert "EASY" not in agent_log, agent_log  # at every level, debug included
