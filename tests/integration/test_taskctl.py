"""taskctl (issue 13 item 2) against a real `twistd taskserver`, run as the console script
an operator runs: tables by default, --json for scripts, filters as options, the server's
message and exit status 1 on a refusal, 2 on a usage error or no answer."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest_twisted
from twisted.internet import threads

from tests.fakes.auth_endpoint import start_auth_endpoint
from tests.integration.daemons import ServerProcess, free_port
from tests.integration.harness import ADMIN_KEY

TASKCTL = str(Path(sys.executable).with_name("taskctl"))


def taskctl_sync(*args: str, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TASKD_")}
    return subprocess.run([TASKCTL, *args], capture_output=True, text=True, input=stdin, timeout=60,
                          env={**clean, "HOME": os.environ.get("HOME", "/tmp"), **(env or {})})


async def taskctl(*args: str, **kw) -> subprocess.CompletedProcess:
    """In a thread: the server under test runs in another process, the reactor stays free."""
    return await threads.deferToThread(taskctl_sync, *args, **kw)


@pytest_twisted.async_yield_fixture
async def server(tmp_path):
    auth = start_auth_endpoint({})  # the key check (an emulator of grafana.com's): every other key is invalid
    proc = ServerProcess(tmp_path, "server", **{"admin-key": ADMIN_KEY, "db-type": "sqlite3",
                                                "db-connect-str": str(tmp_path / "task-server.db"),
                                                "auth-endpoint": auth.url})
    await proc.start()
    yield proc
    await proc.stop()
    await auth.stop()


@pytest_twisted.ensureDeferred
async def test_agents_and_tasks_round_trip_with_tables_and_json(server, tmp_path):
    env = {"TASKD_URL": server.base, "TASKD_KEY": ADMIN_KEY}
    made = await taskctl("--json", "agents", "create", "probe-1", "--enabled", "--tag", "dc1", "--tag", "edge", env=env)
    assert made.returncode == 0, made.stderr
    agent = json.loads(made.stdout)
    assert (agent["name"], agent["enabled"], agent["tags"]) == ("probe-1", True, ["dc1", "edge"])
    await taskctl("agents", "create", "probe-2", env=env)

    listed = await taskctl("agents", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["ID", "NAME", "ENABLED", "PUBLIC", "ONLINE", "FAILING", "TAGS"]
    assert [r.split()[1] for r in rows] == ["probe-1", "probe-2"]
    assert rows[0].split()[-1] == "dc1,edge"
    tagged = await taskctl("--json", "agents", "list", "--tag", "edge", "--enabled", env=env)
    assert [a["name"] for a in json.loads(tagged.stdout)] == ["probe-1"]
    newest = await taskctl("--json", "agents", "list", "--order-by=-name", "--limit", "1", env=env)
    assert [a["name"] for a in json.loads(newest.stdout)] == ["probe-2"]

    changed = await taskctl("--json", "agents", "update", str(agent["id"]), "--disable", "--no-tags", env=env)
    assert json.loads(changed.stdout)["enabled"] is False and json.loads(changed.stdout)["tags"] == []

    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps({"name": "web", "interval": 60, "enabled": True, "taskType": "http",
                                     "config": {"/raintank/apps/http": {"url": "http://example.com/"}},
                                     "route": {"type": "byIds", "config": {"ids": [agent["id"]]}}}))
    created = await taskctl("--json", "tasks", "create", "-f", str(task_file), env=env)
    assert created.returncode == 0, created.stderr
    task = json.loads(created.stdout)
    shown = await taskctl("tasks", "list", env=env)
    assert shown.stdout.splitlines()[1].split()[:6] == [str(task["id"]), "web", "http", "60s", "yes", "byIds"]
    detail = await taskctl("tasks", "get", str(task["id"]), env=env)
    assert "unrouted" in detail.stdout and "offline" in detail.stdout  # its agent is not connected
    status = await taskctl("tasks", "status", str(task["id"]), env=env)
    assert status.returncode == 0 and status.stdout.split() == ["AGENT", "OUTCOME", "RUNS", "FAILURES", "SKIPPED",
                                                                "LAST", "RUN", "ERROR"]

    updated = await taskctl("--json", "tasks", "update", str(task["id"]), "-f", "-", env=env,
                            stdin=json.dumps({**json.loads(task_file.read_text()), "interval": 30}))
    assert updated.returncode == 0, updated.stderr
    assert json.loads(updated.stdout)["interval"] == 30
    gone = await taskctl("tasks", "delete", str(task["id"]), env=env)
    assert (gone.returncode, gone.stdout.strip()) == (0, f"task {task['id']} deleted")
    metrics = await taskctl("metrics", env=env)
    assert metrics.returncode == 0 and metrics.stdout.split() == ["NAMESPACE", "VERSION", "PUBLIC"]
    servers = await taskctl("--json", "servers", env=env)
    assert [s["name"] for s in json.loads(servers.stdout)] == ["server"]


@pytest_twisted.ensureDeferred
async def test_refusals_and_usage_errors_have_their_exit_status(server, tmp_path):
    env = {"TASKD_URL": server.base, "TASKD_KEY": ADMIN_KEY}
    missing = await taskctl("agents", "get", "999", env=env)
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.strip() == "taskctl: agent 999 does not exist (HTTP 404)"
    bad_key = await taskctl("--key", "nope", "agents", "list", env={"TASKD_URL": server.base})
    assert bad_key.returncode == 1 and "(HTTP 401)" in bad_key.stderr
    bad_file = tmp_path / "bad.json"
    bad_file.write_text("{not json")
    assert (await taskctl("tasks", "create", "-f", str(bad_file), env=env)).returncode == 2
    nowhere = await taskctl("--url", f"http://127.0.0.1:{free_port()}", "agents", "list")
    assert nowhere.returncode == 2 and "cannot reach the task-server" in nowhere.stderr
    not_a_url = await taskctl("--url", "localhost:8082", "agents", "list")
    assert not_a_url.returncode == 2 and "is not an http:// or https:// URL" in not_a_url.stderr
    usage = await taskctl("agents", "frobnicate", env=env)
    assert usage.returncode == 2 and "invalid choice" in usage.stderr


@pytest_twisted.ensureDeferred
async def test_the_config_file_is_read_and_flags_win(server, tmp_path):
    config = tmp_path / "taskctl.ini"
    config.write_text(f"[taskctl]\nurl = {server.base}\nkey = wrong-key\n")
    refused = await taskctl("--config", str(config), "agents", "list")
    assert refused.returncode == 1  # the file's key was used
    fine = await taskctl("--config", str(config), "--key", ADMIN_KEY, "agents", "list")
    assert fine.returncode == 0, fine.stderr
    assert (await taskctl("--config", str(tmp_path / "absent.ini"), "agents", "list")).returncode == 2


def test_every_command_has_help():
    for args in (["--help"], ["agents", "--help"], ["agents", "list", "--help"], ["tasks", "create", "--help"],
                 ["tasks", "status", "--help"], ["metrics", "--help"], ["servers", "--help"]):
        result = taskctl_sync(*args)
        assert result.returncode == 0 and "usage: taskctl" in result.stdout, (args, result.stderr)
