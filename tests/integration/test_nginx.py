"""A real Debian nginx running etc/nginx/taskd.conf in front of a real `twistd taskserver`.

The shipped site file is used as it is, with only its upstream address and its listen
port changed (and the IPv6 listen dropped), inside a throwaway nginx.conf in tmp_path
(pid, logs and temp files there too; nginx listens on a free loopback port). Through it:
the notes' curl registration byte for byte, the notes' task, an agent websocket that gets
its task list and the task and keeps receiving heartbeats, and the body-size limit.

nginx is not optional: without /usr/sbin/nginx the test fails, saying how to install it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pwd
import re
import signal
import socket
import subprocess
from pathlib import Path
from typing import Sequence

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.web.client import HTTPConnectionPool

from taskd.server.settings import ServerSettings
from tests.integration.agent_client import connect_agent
from tests.integration.daemons import ServerProcess, free_port
from tests.integration.test_notes_registration import RawResponse, _OneExchange, assert_registered
from tests.notes_requests import CURL, NOTES_TASK
from tests.waiting import until

NGINX = os.environ.get("TASKD_TEST_NGINX", "/usr/sbin/nginx")
SITE = Path(__file__).resolve().parents[2] / "etc" / "nginx" / "taskd.conf"
ADMIN_KEY = "EASY"
DEFAULTS = {f.name: f.default for f in dataclasses.fields(ServerSettings)}
TIMEOUT = 10.0


def require_nginx() -> None:
    if not (os.path.isfile(NGINX) and os.access(NGINX, os.X_OK)):
        pytest.fail(f"{NGINX} is required for the nginx tests and is missing: run .ci/run, "
                    "or apt-get install -y nginx")


def render_site(upstream_port: int | Sequence[int], listen_port: int) -> str:
    """etc/nginx/taskd.conf with the upstream (one server, or several: the chaos suite's
    cluster) and the listen port moved; each substitution must hit exactly once, so the
    test breaks if the shipped site changes shape."""
    text = SITE.read_text()
    ports = [upstream_port] if isinstance(upstream_port, int) else list(upstream_port)
    upstreams = "\n".join(rf"\g<1>127.0.0.1:{port}\g<2>" for port in ports)
    for pattern, replacement in (
        (r"(?m)^(\s*server\s+)127\.0\.0\.1:8082(\s*;)", upstreams),
        (r"(?m)^(\s*listen\s+)80(\s*;)", rf"\g<1>127.0.0.1:{listen_port}\g<2>"),
        (r"(?m)^\s*listen\s+\[::\]:80\s*;[^\n]*\n", ""),
    ):
        text, count = re.subn(pattern, replacement, text)
        assert count == 1, f"{SITE}: expected one match of {pattern!r}, found {count}"
    return text


class Nginx:
    def __init__(self, workdir: Path, upstream_port: int | Sequence[int], worker_connections: int = 256) -> None:
        self.dir = workdir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.conf = workdir / "nginx.conf"
        self.error_log = workdir / "error.log"
        (workdir / "taskd.conf").write_text(render_site(upstream_port, self.port))
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
        temp = "".join(f"    {kind}_temp_path {workdir / kind};\n"
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        self.conf.write_text(
            f"daemon off;\n{user}worker_processes 1;\npid {workdir / 'nginx.pid'};\n"
            f"error_log {self.error_log} info;\n"
            f"events {{ worker_connections {worker_connections}; }}\n"
            "http {\n"
            f"    access_log {workdir / 'access.log'};\n{temp}"
            "    default_type application/octet-stream;\n"
            f"    include {workdir / 'taskd.conf'};\n"
            "}\n")
        self.argv = [NGINX, "-e", str(self.error_log), "-p", str(workdir), "-c", str(self.conf)]
        self.proc: subprocess.Popen | None = None

    def check(self) -> None:
        result = subprocess.run(self.argv + ["-t"], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"nginx -t rejects the site:\n{result.stderr}"

    async def start(self) -> "Nginx":
        self.check()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

        def listening() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"nginx exited {self.proc.returncode}:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            except OSError:
                return False
            return True

        await until(listening, TIMEOUT, what=lambda: f"nginx listening on {self.port}:\n{self.log()}", interval=0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # fast stop: no lingering close after the 413
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.error_log.read_text(errors="replace") if self.error_log.exists() else ""


@pytest_twisted.async_yield_fixture
async def proxied(tmp_path):
    """(server, nginx): a real task-server (sqlite, admin key EASY) behind nginx."""
    require_nginx()
    server = ServerProcess(tmp_path, "server", **{
        "admin-key": ADMIN_KEY, "db-type": "sqlite3", "db-connect-str": str(tmp_path / "task-server.db"),
        "agent-autocreate": "false"})
    await server.start()
    nginx = Nginx(tmp_path, server.port)
    try:
        await nginx.start()
        yield server, nginx
    finally:
        nginx.stop()
        await server.stop()


async def send_raw(port: int, request: bytes) -> RawResponse:
    protocol = _OneExchange(request)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
    protocol.done.addTimeout(TIMEOUT, reactor)
    return await protocol.done


async def call(nginx: Nginx, method: str, path: str, **kwargs):
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", **kwargs.pop("headers", {})}
    # A connection per request: nothing is left open for nginx's graceful stop to wait on.
    pool = HTTPConnectionPool(reactor, persistent=False)
    resp = await treq.request(method, nginx.base + path, headers=headers, timeout=TIMEOUT, pool=pool, **kwargs)
    raw = await resp.content()
    return resp, raw


async def ok(nginx: Nginx, method: str, path: str, **kwargs):
    resp, raw = await call(nginx, method, path, **kwargs)
    assert resp.code == 200, (method, path, resp.code, raw)
    envelope = json.loads(raw)
    assert envelope["meta"]["code"] == 200, envelope
    return envelope["body"]


@pytest_twisted.ensureDeferred
async def test_notes_walkthrough_and_an_agent_through_nginx(proxied):
    server, nginx = proxied
    resp, raw = await call(nginx, "GET", "/")
    assert resp.code == 200, raw

    # The notes' curl registration, byte for byte, to nginx.
    agent = assert_registered(await send_raw(nginx.port, CURL.build("agent1", f"127.0.0.1:{nginx.port}")), "agent1")

    # The notes' task, then the listings the walkthrough shows.
    task = await ok(nginx, "POST", "/api/v1/tasks", json=NOTES_TASK)
    assert task["name"] == NOTES_TASK["name"] and task["route"]["type"] == "any"
    assert [a["name"] for a in await ok(nginx, "GET", "/api/v1/agents?orderBy=created&limit=10")] == ["agent1"]
    assert (await ok(nginx, "GET", f"/api/v1/tasks/{task['id']}"))["id"] == task["id"]

    # An agent's websocket through nginx: the upgrade, its tasks, and heartbeats that keep coming.
    client = connect_agent(nginx.base, "agent1", ADMIN_KEY)
    client.opened.addTimeout(TIMEOUT, reactor)
    await client.opened
    try:
        # The notes' task was waiting for an agent: it comes in the first task list.
        assert [t["id"] for t in await client.next("taskList")] == [task["id"]]
        # A task created now is pushed through the proxy as it happens.
        second = await ok(nginx, "POST", "/api/v1/tasks", json={**NOTES_TASK, "name": "example-task-2"})
        added = await client.next("taskAdd", predicate=lambda t: t["id"] == second["id"])
        assert added["name"] == "example-task-2"
        online = await ok(nginx, "GET", f"/api/v1/agents/{agent['id']}")
        assert online["online"] is True
        # Heartbeats keep coming through (the server's default interval, 2s).
        interval = DEFAULTS["heartbeat_interval"]
        seen = len(client.events("heartbeat"))
        await until(lambda: len(client.events("heartbeat")) >= seen + 2 or client.closed.called,
                    timeout=interval * 3 + 1, what="two more heartbeats through nginx")
        assert not client.closed.called, (client.close_code, client.close_reason)
    finally:
        client.disconnect().addTimeout(TIMEOUT, reactor)
        await client.closed
    problems = [line for line in nginx.log().splitlines()
                if any(f"[{level}]" in line for level in ("error", "crit", "alert", "emerg"))]
    assert not problems, problems


@pytest_twisted.ensureDeferred
async def test_body_limit_matches_the_server(proxied):
    server, nginx = proxied
    limit = DEFAULTS["max_body_size"]
    headers = {"Content-Type": "application/json"}
    # Exactly the limit: nginx passes it on and the server parses it (not JSON: 400).
    resp, raw = await call(nginx, "POST", "/api/v1/tasks", data=b" " * (limit - 1) + b"x", headers=headers)
    assert resp.code == 400, (resp.code, raw[:300])
    # One byte more: refused at the proxy, still with the API's error envelope.
    resp, raw = await call(nginx, "POST", "/api/v1/tasks", data=b"x" * (limit + 1), headers=headers)
    assert resp.code == 413, (resp.code, raw[:300])
    assert resp.headers.getRawHeaders("content-type")[0].startswith("application/json")
    envelope = json.loads(raw)
    assert envelope["meta"]["code"] == 413 and envelope["meta"]["type"] == "error"
    assert envelope["body"] is None
    assert "client_max_body_size" in envelope["meta"]["message"]  # nginx's limit, not a larger one


@pytest_twisted.ensureDeferred
async def test_the_metrics_are_not_served_through_the_site(proxied):
    """GET /metrics needs no key, so the public site does not pass it on; Prometheus
    scrapes the server directly."""
    server, nginx = proxied
    resp, raw = await call(nginx, "GET", "/metrics")
    assert resp.code == 404 and json.loads(raw)["meta"]["code"] == 404, raw[:300]
    direct = await treq.get(server.base + "/metrics", timeout=TIMEOUT)
    assert direct.code == 200 and b"taskd_server_running 1.0" in await direct.content()


def test_site_keeps_the_socket_open_longer_than_the_servers_intervals():
    text = SITE.read_text()
    assert re.search(r"(?m)^\s*proxy_http_version\s+1\.1\s*;", text)
    assert re.search(r"(?m)^\s*proxy_set_header\s+Upgrade\s+\$http_upgrade\s*;", text)
    assert re.search(r"(?m)^\s*proxy_set_header\s+Connection\s+\$taskd_connection\s*;", text)
    read_timeout = re.search(r"(?m)^\s*proxy_read_timeout\s+(\d+)s\s*;", text)
    assert read_timeout, "proxy_read_timeout missing"
    assert int(read_timeout.group(1)) > max(DEFAULTS["heartbeat_interval"], DEFAULTS["task_list_interval"])
    body = re.search(r"(?m)^\s*client_max_body_size\s+(\d+)([km]?)\s*;", text)
    assert body, "client_max_body_size missing"
    size = int(body.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[body.group(2)]
    assert size == DEFAULTS["max_body_size"]
