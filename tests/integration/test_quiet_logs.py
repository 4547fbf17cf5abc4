"""Quiet, useful agent logs (issue 13 item 5), with a real twistd agent: many runs of
http and tcp checks add no log line at info (no twisted.web "Starting factory" /
"Stopping factory" pair per run); what changes state does: a task failing, and
recovering."""
from __future__ import annotations

import pytest_twisted

from tests.fakes.tsdbgw import TsdbGwEmulator
from tests.integration.test_builtin_e2e import Stack, _status, api, http_task, wait_for

RUNS = 8


def tcp_task(name: str, port: int, agent_id: int) -> dict:
    return {"name": name, "taskType": "tcp", "metrics": {"/raintank/apps/tcp/*": 0},
            "config": {"/raintank/apps/tcp": {"host": "127.0.0.1", "port": port, "timeout": 1}}, "interval": 1,
            "route": {"type": "byIds", "config": {"ids": [agent_id]}}, "enabled": True}


@pytest_twisted.ensureDeferred
async def test_many_runs_log_nothing_and_a_failure_and_recovery_one_line_each(tmp_path):
    gw = TsdbGwEmulator(admin_key="gw-admin").start()
    stack = Stack(tmp_path, **{"publisher": "tsdbgw", "tsdb-url": gw.url + "/", "tsdb-key": "gw-admin",
                               "tsdb-flush-interval": "0.1s", "log-level": "2"})  # info
    try:
        agent_id = await stack.start()
        port = stack.site.getHost().port
        web = await api(stack.server, "POST", "/api/v1/tasks", {**http_task("web", stack.url, agent_id), "interval": 1})
        await api(stack.server, "POST", "/api/v1/tasks", tcp_task("port", port, agent_id))
        await wait_for(lambda: _status(stack, web["id"], "ok"), 10, "the first http run")
        before = stack.agent.log().splitlines()

        def runs() -> int:
            return sum(m["Name"] == "raintank.apps.http.web.status_code" for m in gw.metrics)

        start = runs()
        await wait_for(lambda: runs() >= start + RUNS, 3 * RUNS, f"{RUNS} more http runs")
        new = stack.agent.log().splitlines()[len(before):]
        assert not [line for line in new if "factory" in line.lower()], new
        assert len(new) <= 1, new  # a statsd/status line at most, never one per run

        # A state change is logged once: failing, then ok again.
        broken = {**http_task("web", f"http://127.0.0.1:{port}/nowhere-port", agent_id), "id": web["id"],
                  "interval": 1}
        broken["config"] = {"/raintank/apps/http": {"url": "http://127.0.0.1:1/", "timeout": 1}}
        await api(stack.server, "PUT", "/api/v1/tasks", broken)
        await wait_for(lambda: _status(stack, web["id"], "error"), 10, "the task failing")
        await api(stack.server, "PUT", "/api/v1/tasks", {**http_task("web", stack.url, agent_id), "id": web["id"],
                                                          "interval": 1})
        await wait_for(lambda: _status(stack, web["id"], "ok"), 10, "the task ok again")
        log = stack.agent.log()
        assert log.count("failed: GET http://127.0.0.1:1/: connection refused") == 1, log[-3000:]
        assert log.count("ok again") == 1, log[-3000:]
    finally:
        await stack.close()
        await gw.stop()
