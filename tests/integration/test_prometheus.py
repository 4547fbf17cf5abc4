"""Prometheus metrics (issue 13 item 1): what the server serves at GET /metrics on its
main port, what an agent serves at its metrics-addr, and Debian's real `prometheus`
scraping a real twistd server and agent and answering queries about them.
"""
from __future__ import annotations

import re
import subprocess

import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.tsdbgw import TsdbGwEmulator
from tests.integration.agent_client import connect_agent
from tests.integration.daemons import AgentProcess, ServerProcess, free_port
from tests.integration.harness import ADMIN_KEY, start_server, stop_server
from tests.integration.prometheus import Prometheus
from tests.waiting import until, value_of

TASK = {"name": "t1", "interval": 60, "enabled": True, "route": {"type": "any"}}


async def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape, parsed as Prometheus would."""
    resp = await treq.get(url, timeout=5)
    assert resp.code == 200, resp.code
    assert resp.headers.getRawHeaders("content-type")[0].startswith("text/plain")
    text = (await resp.content()).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest_twisted.ensureDeferred
async def test_the_server_serves_its_metrics_on_the_main_port_without_a_key(sqlite_only):
    api = await start_server(*sqlite_only)
    try:
        client = connect_agent(api.base, "a1", ADMIN_KEY)
        await client.opened
        await client.next("taskList")
        await api.ok("POST", "/api/v1/tasks", json_body=TASK)
        await client.next("taskAdd")
        got = await scrape(api.base + "/metrics")
        assert got[("taskd_server_agents_connected", ())] == 1
        assert got[("taskd_server_running", ())] == 1
        assert got[("taskd_server_agents_connections_accepted_total", ())] == 1
        assert got[("taskd_server_api_requests_total", (("code", "200"), ("route", "POST /api/v1/tasks")))] == 1
        assert got[("taskd_server_dispatch_latency_seconds_count", (("event", "taskAdd"), ("source", "local")))] >= 1
        assert got[("taskd_server_db_duration_seconds_count", ())] > 0
        assert got[("taskd_server_db_available", ())] == 1
        assert ("taskd_server_auth_checks_total", (("outcome", "valid"),)) in got
        refused = await api.request("GET", "/api/v1/agents", key="not-a-key")
        assert refused.status == 401
        got = await scrape(api.base + "/metrics")
        assert got[("taskd_server_auth_checks_total", (("outcome", "invalid"),))] == 1
        assert got[("taskd_server_api_requests_total", (("code", "401"), ("route", "GET /api/v1/agents")))] == 1
        await client.disconnect()
        await until(lambda: not api.server.sessions.sessions, what="the agent gone")
        assert (await scrape(api.base + "/metrics"))[("taskd_server_agents_connected", ())] == 0
    finally:
        await stop_server(api)


@pytest_twisted.ensureDeferred
async def test_metrics_addr_off_serves_none(sqlite_only):
    api = await start_server(*sqlite_only, metrics_addr="off")
    try:
        resp = await treq.get(api.base + "/metrics")
        await resp.content()
        assert resp.code == 404
    finally:
        await stop_server(api)


def _prometheus_config(targets: dict[str, str]) -> str:
    jobs = "".join(f"  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
                   for job, target in targets.items())
    return f"global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n{jobs}"


@pytest_twisted.ensureDeferred
async def test_a_real_prometheus_scrapes_a_real_server_and_agent(tmp_path):
    gw = TsdbGwEmulator(admin_key="gw-admin").start()
    server = ServerProcess(tmp_path, "task-server", **{
        "db-type": "sqlite3", "db-connect-str": str(tmp_path / "task-server.db"), "admin-key": ADMIN_KEY})
    agent_metrics = free_port()
    agent = AgentProcess(tmp_path, "task-agent", **{
        "server-url": f"ws://127.0.0.1:{server.port}/api/v1", "api-key": ADMIN_KEY, "name": "scraped",
        "executor": "builtin", "publisher": "tsdbgw", "tsdb-url": gw.url + "/", "tsdb-key": "gw-admin",
        "metrics-addr": f"127.0.0.1:{agent_metrics}", "log-level": "1"})
    config = _prometheus_config({"taskserver": f"127.0.0.1:{server.port}", "taskagent": f"127.0.0.1:{agent_metrics}"})
    (tmp_path / "check.yml").write_text(config)
    check = subprocess.run(["promtool", "check", "config", str(tmp_path / "check.yml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    prom = None
    try:
        await server.start()
        agent.start()
        await agent.wait_log("connected to")
        prom = Prometheus(tmp_path, config)
        for expr, want in (("taskd_server_agents_connected", "1"), ("taskd_agent_server_connected", "1"),
                           ("taskd_server_running", "1"), ("taskd_agent_running", "1")):
            result = await value_of(lambda: prom.query(expr), bool, timeout=60,
                                    what=lambda: f"{expr} in Prometheus:\n{prom.log()}")
            assert [r["value"][1] for r in result] == [want], (expr, result)
        # Every target is up, and a label set survives the trip.
        up = await value_of(lambda: prom.query("up"), lambda r: len(r) == 2 and all(x["value"][1] == "1" for x in r),
                            timeout=30, what=lambda: f"both targets up:\n{prom.log()}")
        assert {r["metric"]["job"] for r in up} == {"taskserver", "taskagent"}
        accepted = await prom.query('taskd_server_agents_connections_accepted_total{job="taskserver"}')
        assert accepted and accepted[0]["value"][1] == "1"
    finally:
        if prom is not None:
            prom.stop()
        await agent.stop()
        await server.stop()
        await gw.stop()


def test_metric_names_follow_the_prometheus_rules():
    from taskd.promstats import metric_name
    assert metric_name("taskd_server", "agents.connections_failed") == "taskd_server_agents_connections_failed"
    assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", metric_name("taskd_agent", "builtin.dur-ation/x"))
