"""Issue 11 item 6 with real daemons: a builtin agent keeps running its tasks while the
server is away, and, restarted with no server, resumes the list saved under state-dir."""
from __future__ import annotations

import os
import stat

import pytest_twisted

from tests.fakes.tsdbgw import TsdbGwEmulator
from tests.integration.test_builtin_e2e import INTERVAL, Stack, api, http_task, wait_for

NAME = "raintank.apps.http.web-check.status_code"


def _points(gw: TsdbGwEmulator) -> int:
    return sum(1 for m in gw.metrics if m["Name"] == NAME)


async def _more_points(gw: TsdbGwEmulator, what: str) -> None:
    before = _points(gw)
    await wait_for(lambda: _points(gw) >= before + 2, 4 * INTERVAL, what)


@pytest_twisted.ensureDeferred
async def test_agent_keeps_running_without_server_and_resumes_saved_list_after_restart(tmp_path):
    gw = TsdbGwEmulator(admin_key="gw-admin").start()
    state_dir = tmp_path / "state"
    stack = Stack(tmp_path, **{"publisher": "tsdbgw", "tsdb-url": gw.url + "/", "tsdb-key": "gw-admin",
                               "tsdb-flush-interval": "0.1s", "state-dir": str(state_dir)})
    try:
        agent_id = await stack.start()
        await api(stack.server, "POST", "/api/v1/tasks", http_task("web check", stack.url, agent_id))
        await wait_for(lambda: _points(gw), 3 * INTERVAL, f"{NAME} at the gateway")
        saved = state_dir / "tasks.json"
        await wait_for(lambda: saved.exists() and b"web check" in saved.read_bytes(), 10, "the saved list")
        assert stat.S_IMODE(os.stat(saved).st_mode) == 0o600

        await stack.server.stop()
        await _more_points(gw, "points while the server is away")

        await stack.agent.stop()
        assert "running the saved task list" not in stack.agent.log()
        stack.agent.start()  # the server is still stopped
        await stack.agent.wait_log("running the saved task list from ")
        assert "(1 tasks) until a server answers" in stack.agent.log()
        await _more_points(gw, "points from the resumed list with no server")
        assert gw.errors == []
    finally:
        await stack.close()
        await gw.stop()
