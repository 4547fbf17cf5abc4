"""The built-in executor end to end, with the real daemons (issue 7's "done when").

A `twistd taskserver` (sqlite) and a `twistd taskagent` with ``executor = builtin``; a
local web server the ``http`` task checks; and, as the destination, the tsdb-gw emulator
(tests/fakes/tsdbgw.py: decodes msgpack/snappy, checks Ids and integer types) or a real
carbon-cache (tests/integration/carbon.py). Every wait is a deadline, never a sleep.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.fakes.tsdbgw import TsdbGwEmulator
from tests.integration.carbon import CarbonCache
from tests.integration.daemons import AgentProcess, ServerProcess, free_port
from tests.integration.harness import ADMIN_KEY
from tests.waiting import until

HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}
INTERVAL = 2  # seconds; the smallest sensible task interval for a test


class Page(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"hello from the checked site\n"


async def api(server: ServerProcess, method: str, path: str, body: Any = None) -> Any:
    resp = await treq.request(method, server.base + path, json=body, headers=HEADERS)
    data = await resp.json()
    assert resp.code == 200, data
    return data["body"]


async def wait_for(check, timeout: float, what: str) -> Any:
    """Poll ``check`` (sync or async) until truthy; AssertionError after ``timeout`` s."""
    return await until(check, timeout, what, interval=0.05)


class Stack:
    """Server + builtin agent + checked web site; `close()` stops what was started."""

    def __init__(self, tmp: Path, **agent_keys: str) -> None:
        self.site = reactor.listenTCP(0, Site(Page()), interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.site.getHost().port}/"
        self.server = ServerProcess(tmp, "task-server", **{
            "db-type": "sqlite3", "db-connect-str": str(tmp / "task-server.db"), "admin-key": ADMIN_KEY,
            "status-flush-interval": "0.2s"})
        self.agent = AgentProcess(tmp, "task-agent", **{
            "log-level": "1", "server-url": f"ws://127.0.0.1:{self.server.port}/api/v1",
            "api-key": ADMIN_KEY, "name": "builtin1", "executor": "builtin",
            # The checked site is on loopback, which a public agent (this one: org 1's,
            # auto-created) blocks by default; test_blocked_nets.py tests that.
            "blocked-nets": "none",
            **agent_keys})  # the default status-interval: outcome changes are sent within 1 s

    async def start(self) -> int:
        await self.server.start()
        self.agent.start()
        [row] = await wait_for(lambda: api(self.server, "GET", "/api/v1/agents?name=builtin1"),
                               20, "agent builtin1 registered")
        await wait_for(lambda: api(self.server, "GET", f"/api/v1/agents/{row['id']}/metrics"),
                       20, "the agent's catalog")
        return row["id"]

    async def close(self) -> None:
        await self.agent.stop()
        await self.server.stop()
        await self.site.stopListening()


def http_task(name: str, url: str, agent_id: int) -> dict:
    return {"name": name, "taskType": "http", "metrics": {"/raintank/apps/http/*": 0},
            "config": {"/raintank/apps/http": {"url": url, "timeout": 1}}, "interval": INTERVAL,
            "route": {"type": "byIds", "config": {"ids": [agent_id]}}, "enabled": True}


@pytest_twisted.ensureDeferred
async def test_http_task_metrics_reach_tsdbgw_within_two_intervals_and_status_shows_it(tmp_path):
    gw = TsdbGwEmulator(admin_key="gw-admin").start()
    stack = Stack(tmp_path, **{"publisher": "tsdbgw", "tsdb-url": gw.url + "/", "tsdb-key": "gw-admin",
                               "tsdb-flush-interval": "0.1s"})
    try:
        agent_id = await stack.start()
        task = await api(stack.server, "POST", "/api/v1/tasks", http_task("web check", stack.url, agent_id))
        name = "raintank.apps.http.web-check.status_code"
        # within two intervals: the wait's deadline is the bound
        await wait_for(lambda: [m for m in gw.metrics if m["Name"] == name], 2 * INTERVAL,
                       f"{name} at the gateway")
        assert gw.errors == []  # every request decoded, Ids and integer types right
        [first] = [m for m in gw.metrics if m["Name"] == name][:1]
        assert (first["OrgId"], first["Interval"], first["Value"], first["Metric"]) == (1, INTERVAL, 200.0, name)
        assert first["Time"] % INTERVAL == _phase(task) % INTERVAL  # stamped with its slot
        names = {m["Name"] for m in gw.metrics}
        assert {f"raintank.apps.http.web-check.{m}" for m in ("total_time", "ttfb", "body_size")} <= names
        body = await wait_for(lambda: _status(stack, task["id"], "ok"), 2 * INTERVAL, "status ok")
        [status] = body["status"]
        assert (status["agentId"], status["executor"], status["error"]) == (agent_id, "builtin", "")
        assert status["metrics"] >= 4 and status["runs"] >= 1
    finally:
        await stack.close()
        await gw.stop()


@pytest_twisted.ensureDeferred
async def test_a_dead_url_shows_its_error_within_two_intervals_and_fixing_the_task_clears_it(tmp_path):
    gw = TsdbGwEmulator(admin_key=ADMIN_KEY).start()
    stack = Stack(tmp_path, **{"publisher": "tsdbgw", "tsdb-url": gw.url, "tsdb-flush-interval": "0.1s"})
    try:
        agent_id = await stack.start()
        dead = f"http://127.0.0.1:{free_port()}/"
        task = await api(stack.server, "POST", "/api/v1/tasks", http_task("dead site", dead, agent_id))
        body = await wait_for(lambda: _status(stack, task["id"], "error"), 2 * INTERVAL, "status error")
        [status] = body["status"]
        assert "connection refused" in status["error"] and dead in status["error"], status
        agent = await api(stack.server, "GET", f"/api/v1/agents/{agent_id}")
        assert agent["failingTasks"] == 1

        fixed = {**http_task("dead site", stack.url, agent_id), "id": task["id"]}
        await api(stack.server, "PUT", "/api/v1/tasks", fixed)
        body = await wait_for(lambda: _status(stack, task["id"], "ok"), 3 * INTERVAL, "status ok after the fix")
        assert body["status"][0]["error"] == ""
        agent = await api(stack.server, "GET", f"/api/v1/agents/{agent_id}")
        assert agent["failingTasks"] == 0
    finally:
        await stack.close()
        await gw.stop()


@pytest_twisted.ensureDeferred
async def test_publisher_graphite_delivers_the_same_series_to_a_real_carbon_cache(tmp_path):
    carbon = CarbonCache(tmp_path / "carbon")
    await carbon.start()
    stack = Stack(tmp_path, **{"publisher": "graphite", "graphite-addr": carbon.addr})
    try:
        agent_id = await stack.start()
        since = int(time.time()) - 5
        task = await api(stack.server, "POST", "/api/v1/tasks", http_task("web check", stack.url, agent_id))
        name = "raintank.apps.http.web-check.status_code"

        async def stored() -> dict:
            return {ts: v for ts, v in (await carbon.fetch(name, since)).items() if v is not None}

        points = await wait_for(stored, 30, f"{name} in whisper")
        assert set(points.values()) == {200.0}
        assert all(ts % INTERVAL == _phase(task) % INTERVAL for ts in points), points  # on the task's grid
    finally:
        await stack.close()
        await carbon.stop()


def _phase(task: dict) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(task["created"].replace("Z", "+00:00")).timestamp())


async def _status(stack: Stack, task_id: int, outcome: str) -> Any:
    body = await api(stack.server, "GET", f"/api/v1/tasks/{task_id}")
    statuses = body.get("status") or []
    return body if statuses and statuses[0]["outcome"] == outcome else None


@pytest_twisted.ensureDeferred
async def test_a_failed_assertion_shows_in_the_task_within_two_intervals_with_success_0(tmp_path):
    gw = TsdbGwEmulator(admin_key="gw-admin").start()
    stack = Stack(tmp_path, **{"publisher": "tsdbgw", "tsdb-url": gw.url + "/", "tsdb-key": "gw-admin",
                               "tsdb-flush-interval": "0.1s"})
    try:
        agent_id = await stack.start()
        body = http_task("asserted", stack.url, agent_id)
        body["config"]["/raintank/apps/http"]["fail_if_body_not_matches"] = ["^never there$"]
        task = await api(stack.server, "POST", "/api/v1/tasks", body)
        detail = await wait_for(lambda: _status(stack, task["id"], "error"), 2 * INTERVAL, "status error")
        assert detail["status"][0]["error"] == (f"GET {stack.url}: body does not match fail_if_body_not_matches"
                                                " '^never there$'")
        success = await wait_for(lambda: [m for m in gw.metrics if m["Name"] == "raintank.apps.http.asserted.success"],
                                 2 * INTERVAL, "the success point")
        assert success[0]["Value"] == 0.0
        assert [m for m in gw.metrics if m["Name"] == "raintank.apps.http.asserted.status_code"][0]["Value"] == 200.0
    finally:
        await stack.close()
        await gw.stop()
