"""Ad-hoc runs (issue 14 item 4) with the real daemons: `POST /api/v1/tasks/<id>/run`
runs a stored task once on its routed agents and answers with each one's outcome and
measurements; `POST /api/v1/tasks/test` runs a body that is not stored. An agent that
does not list runTask is answered for as unsupported, a silent one as timeout."""
from __future__ import annotations

import pytest_twisted
import treq

from tests.fakes.tsdbgw import TsdbGwEmulator
from tests.integration.agent_client import connect_agent
from tests.integration.harness import ADMIN_KEY
from tests.integration.test_builtin_e2e import HEADERS, Stack, api, http_task

RUNS = "/api/v1/tasks"


async def post(stack: Stack, path: str, body=None, **params) -> tuple[int, dict]:
    resp = await treq.post(stack.server.base + path, json=body, headers=HEADERS, params=params or None)
    return resp.code, await resp.json()


@pytest_twisted.ensureDeferred
async def test_run_a_stored_task_now_and_test_an_unsaved_one(tmp_path):
    gw = TsdbGwEmulator(admin_key="gw-admin").start()
    stack = Stack(tmp_path, **{"publisher": "tsdbgw", "tsdb-url": gw.url + "/", "tsdb-key": "gw-admin"})
    try:
        agent_id = await stack.start()
        task = await api(stack.server, "POST", RUNS, {**http_task("web", stack.url, agent_id), "interval": 3600})
        code, body = await post(stack, f"{RUNS}/{task['id']}/run")
        assert code == 200 and body["meta"]["type"] == "runResults", body
        [result] = body["body"]["results"]
        assert (result["agentId"], result["agentName"], result["outcome"], result["error"]) == \
            (agent_id, "builtin1", "ok", "")
        got = {m["name"].rsplit(".", 1)[1]: m["value"] for m in result["metrics"]}
        assert got["status_code"] == 200 and got["success"] == 1 and result["duration"] >= 0

        # Not stored: a failing assertion is shown, with what was measured.
        unsaved = http_task("try-me", stack.url, agent_id)
        unsaved["config"]["/raintank/apps/http"]["fail_if_body_not_matches"] = ["nowhere"]
        code, body = await post(stack, f"{RUNS}/test", unsaved, agentId=str(agent_id))
        [result] = body["body"]["results"]
        assert code == 200 and body["body"]["taskId"] is None and result["outcome"] == "error"
        assert "fail_if_body_not_matches 'nowhere'" in result["error"]
        assert {m["name"].rsplit(".", 1)[1]: m["value"] for m in result["metrics"]}["success"] == 0
        assert [t["name"] for t in await api(stack.server, "GET", RUNS)] == ["web"]  # nothing stored
        code, body = await post(stack, f"{RUNS}/test", {**http_task("any-agent", stack.url, agent_id),
                                                        "route": {"type": "any"}})
        assert code == 200 and body["body"]["results"][0]["agentId"] == agent_id  # the one capable agent
    finally:
        await stack.close()
        await gw.stop()


@pytest_twisted.ensureDeferred
async def test_agents_that_cannot_or_do_not_answer(tmp_path):
    gw = TsdbGwEmulator(admin_key="gw-admin").start()
    stack = Stack(tmp_path, **{"publisher": "tsdbgw", "tsdb-url": gw.url + "/", "tsdb-key": "gw-admin"})
    try:
        await stack.start()
        old = connect_agent(stack.server.base, "old", ADMIN_KEY)  # lists no features: the original agent
        mute = connect_agent(stack.server.base, "mute", ADMIN_KEY, features="runTask")  # says yes, never answers
        for client in (old, mute):
            await client.opened
            await client.next("taskList")
        ids = {a["name"]: a["id"] for a in await api(stack.server, "GET", "/api/v1/agents")}
        task = await api(stack.server, "POST", RUNS, {"name": "both", "interval": 60, "enabled": True,
                                                      "route": {"type": "byIds",
                                                                "config": {"ids": [ids["old"], ids["mute"]]}}})
        code, body = await post(stack, f"{RUNS}/{task['id']}/run", timeout="1")
        assert code == 200
        outcomes = {r["agentName"]: (r["outcome"], r["error"]) for r in body["body"]["results"]}
        assert outcomes == {"old": ("unsupported", "this agent does not know runTask (an older agent)"),
                            "mute": ("timeout", "no answer within 1s")}
        [request] = mute.events("runTask")
        assert request["task"]["id"] == task["id"] and request["requestId"]
        # An answer to nobody's request (forged, or late) is dropped: not a result.
        mute.send("runResult", {"requestId": "f" * 32, "taskId": task["id"], "outcome": "ok"})
        await mute.roundtrip()
        assert (await post(stack, f"{RUNS}/test", {"name": "x", "interval": 60, "route": {"type": "any"}},
                           agentId="999999"))[0] == 404
        assert (await post(stack, f"{RUNS}/{task['id']}/run", timeout="100"))[0] == 400
        for client in (old, mute):
            await client.disconnect()
    finally:
        await stack.close()
        await gw.stop()
