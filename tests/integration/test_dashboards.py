"""The shipped alert rules and Grafana dashboard (issue 13 item 3), checked against the
real thing: `promtool check rules` and `promtool test rules`, then every expression of
both evaluated by a real Prometheus scraping a real server (with RabbitMQ), a built-in
agent and a Snap agent — each must parse, and every taskd series it names must be one
those daemons serve. A renamed metric breaks this test, not an operator's alerting.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest_twisted
import treq

from tests.fakes.auth_endpoint import start_auth_endpoint
from tests.fakes.tsdbgw import TsdbGwEmulator
from tests.integration.agent_client import connect_agent
from tests.integration.daemons import AgentProcess, ServerProcess, free_port
from tests.integration.harness import ADMIN_KEY
from tests.integration.prometheus import Prometheus
from tests.waiting import until, value_of

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "etc" / "prometheus" / "taskd-rules.yml"
RULE_TESTS = ROOT / "etc" / "prometheus" / "taskd-rules.test.yml"
DASHBOARD = ROOT / "etc" / "grafana" / "taskd.json"
NAME = re.compile(r"\btaskd_[a-z0-9_]+")


def promtool(*args: str) -> subprocess.CompletedProcess:
    assert shutil.which("promtool"), "Debian's prometheus package is needed (.ci/run installs it)"
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60, cwd=RULES.parent)


def rule_exprs() -> list[str]:
    return re.findall(r"^\s+expr: (.+)$", RULES.read_text(), re.M)


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        exprs += [t["expr"] for t in panel["targets"]]
    return [e.replace("$server_job", "taskserver").replace("$agent_job", "taskagent")
            .replace("$__rate_interval", "1m") for e in exprs]


def test_the_rules_pass_promtool():
    checked = promtool("check", "rules", RULES.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", RULE_TESTS.name)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_dashboard_is_a_grafana_dashboard():
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "taskd-overview" and board["schemaVersion"] >= 36
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "server_job", "agent_job"}
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in board["panels"]:  # no two panels on one grid cell
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))




@pytest_twisted.ensureDeferred
async def test_every_expression_runs_on_the_series_real_daemons_serve(tmp_path, exchange):
    assert shutil.which("prometheus"), "Debian's prometheus package is needed (.ci/run installs it)"
    auth = start_auth_endpoint({})
    gw = TsdbGwEmulator(admin_key="gw-admin").start()
    server = ServerProcess(tmp_path, "task-server", **{
        "db-type": "sqlite3", "db-connect-str": str(tmp_path / "task-server.db"), "admin-key": ADMIN_KEY,
        "auth-endpoint": auth.url, "exchange": exchange, "rabbitmq-url": "amqp://guest:guest@127.0.0.1:5672/",
        "rabbitmq-queue-expiry": "20s"})
    ports = {"builtin": free_port(), "snap": free_port()}
    builtin = AgentProcess(tmp_path, "builtin", **{
        "server-url": f"ws://127.0.0.1:{server.port}/api/v1", "api-key": ADMIN_KEY, "name": "builtin",
        "executor": "builtin", "publisher": "tsdbgw", "tsdb-url": gw.url + "/", "tsdb-key": "gw-admin",
        "blocked-nets": "none", "metrics-addr": f"127.0.0.1:{ports['builtin']}"})
    snap = AgentProcess(tmp_path, "snap", **{
        "server-url": f"ws://127.0.0.1:{server.port}/api/v1", "api-key": ADMIN_KEY, "name": "snap",
        "executor": "snap", "snap-url": f"http://127.0.0.1:{free_port()}/",  # no Snap there: unreachable
        "metrics-addr": f"127.0.0.1:{ports['snap']}"})
    config = (
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\nscrape_configs:\n"
        f"  - job_name: taskserver\n    static_configs: [{{targets: ['127.0.0.1:{server.port}']}}]\n"
        f"  - job_name: taskagent\n    static_configs: [{{targets: ['127.0.0.1:{ports['builtin']}',"
        f" '127.0.0.1:{ports['snap']}']}}]\n")
    prom = None
    try:
        await server.start()
        builtin.start()
        snap.start()
        await builtin.wait_log("connected to")
        await snap.wait_log("connected to")
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        agents = await (await treq.get(server.base + "/api/v1/agents?name=builtin", headers=headers)).json()
        site = await (await treq.get(server.base + "/")).content()  # the server's own root as the checked URL
        assert site
        await treq.post(server.base + "/api/v1/tasks", headers=headers, json={
            "name": "web", "taskType": "http", "interval": 1, "enabled": True,
            "config": {"/raintank/apps/http": {"url": server.base + "/", "timeout": 1}},
            "route": {"type": "byIds", "config": {"ids": [agents["body"][0]["id"]]}}})
        refused = connect_agent(server.base, "intruder", "not-a-key")  # a refused connection, by status
        await until(lambda: refused.closed.called, what="the intruder refused")
        refused.opened.addErrback(lambda failure: None)

        prom = Prometheus(tmp_path, config)
        get = prom.get

        wanted = {name for expr in rule_exprs() + dashboard_exprs() for name in NAME.findall(expr)}

        async def missing() -> set[str]:
            body = await get("/api/v1/label/__name__/values")
            served = {re.sub(r"_(bucket|count|sum)$", "", n) for n in body.get("data", [])} | set(body.get("data", []))
            return wanted - served

        await value_of(missing, lambda m: m == set(), timeout=90,
                       what=lambda: "every series the rules and the dashboard name, served by the daemons")
        for expr in rule_exprs() + dashboard_exprs():
            body = await get("/api/v1/query", query=expr)
            assert body.get("status") == "success", (expr, body)
    finally:
        if prom is not None:
            prom.stop()
        await snap.stop()
        await builtin.stop()
        await server.stop()
        await gw.stop()
        await auth.stop()
