"""No key, token or password appears in any log line, at any level.

A real task-server (in-process harness, MariaDB through a user with a distinctive
password, RabbitMQ through a URL with a distinctive password that the broker refuses)
and the real agent service (against the Snap emulator) run at log level 0 while a
walkthrough exercises registration, connection, a task's life, refused keys and bad
requests. Every event published to the global log publisher is captured — whatever its
level, since the level filter sits in the observer twistd builds — and searched as
operators and log shippers would see it: the formatted message, the classic text line,
the JSON line of log-format = json, every field of the event dict (JSON with repr() for
objects) and the traceback of any failure. Start-up and config errors are checked too.
"""
from __future__ import annotations

import dataclasses
import json
import uuid

import pytest
import pytest_twisted
import txaio
from twisted.internet import reactor
from twisted.logger import formatEvent, formatEventAsClassicLogText, globalLogPublisher

from taskd import logsetup
from taskd.agent.assembly import Agent
from taskd.agent.settings import AgentSettings
from taskd.config import ConfigError
from taskd.daemon import StartupError
from taskd.server.assembly import build_server
from taskd.server.settings import ServerSettings, load_server_settings
from tests.conftest import MYSQL_HOST, MYSQL_PORT, _mysql_admin
from tests.fakes.auth_endpoint import org
from tests.fakes.snap import SnapEmulator, metric
from tests.integration.agent_client import connect_agent
from tests.integration.harness import start_server, stop_server
from tests.notes_requests import NOTES_TASK
from tests.waiting import until

TAG = uuid.uuid4().hex[:10]
ADMIN_SECRET = f"ADMINKEY{TAG}admin"
ORG_SECRET = f"ORGKEY{TAG}org"
WRONG_SECRET = f"WRONGKEY{TAG}wrong"
WRONG_AGENT_SECRET = f"BADAGENTKEY{TAG}bad"
DB_PASSWORD = f"DBPASS{TAG}db"
RMQ_PASSWORD = f"RMQPASS{TAG}rmq"
UNCHECKED_SECRET = f"UNCHECKED{TAG}key"  # sent while the auth endpoint fails
SECRETS = (ADMIN_SECRET, ORG_SECRET, WRONG_SECRET, WRONG_AGENT_SECRET, DB_PASSWORD, RMQ_PASSWORD,
           UNCHECKED_SECRET)


class Capture:
    """Every log event, rendered every way it can leave the process."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.events = 0

    def __call__(self, event: dict) -> None:
        self.events += 1
        rendered = [formatEvent(event), formatEventAsClassicLogText(event) or "", logsetup.json_line(event)]
        try:
            rendered.append(json.dumps(event, default=repr))
        except (TypeError, ValueError):  # e.g. a circular structure: each field on its own
            rendered.extend(repr(v) for v in event.values())
        rendered.extend(str(v) for v in event.values() if isinstance(v, str))
        failure = event.get("log_failure")
        if failure is not None:
            rendered.append(failure.getTraceback())
        self.texts.append("\n".join(rendered))

    def leaks(self, extra: list[str] = ()) -> list[tuple[str, str]]:
        return [(secret, text[:2000]) for text in [*self.texts, *extra] for secret in SECRETS if secret in text]

    def contains(self, words: str) -> bool:
        return any(words in text for text in self.texts)


@pytest.fixture
def capture():
    cap = Capture()
    globalLogPublisher.addObserver(cap)
    yield cap
    globalLogPublisher.removeObserver(cap)


@pytest.fixture
def mysql_secret_dsn(mysql_dbs):
    """A database and a user of its own, whose password is one of the secrets."""
    db = mysql_dbs.create("secrets")
    user = f"taskd_sec_{TAG}"
    conn = _mysql_admin()
    with conn.cursor() as cur:
        for host in ("%", "localhost", "127.0.0.1"):
            cur.execute(f"CREATE USER '{user}'@'{host}' IDENTIFIED BY '{DB_PASSWORD}'")
            cur.execute(f"GRANT ALL PRIVILEGES ON `{db}`.* TO '{user}'@'{host}'")
    conn.close()
    yield f"{user}:{DB_PASSWORD}@tcp({MYSQL_HOST}:{MYSQL_PORT})/{db}?charset=utf8", user, db
    conn = _mysql_admin()
    with conn.cursor() as cur:
        for host in ("%", "localhost", "127.0.0.1"):
            cur.execute(f"DROP USER IF EXISTS '{user}'@'{host}'")
    conn.close()


@pytest_twisted.ensureDeferred
async def test_no_secret_in_any_log_line(capture, mysql_secret_dsn):
    dsn, user, db = mysql_secret_dsn
    errors: list[str] = []  # one-line start-up and config errors shown to operators

    # A wrong database password: the start-up error names the problem, not the password.
    wrong_dsn = dsn.replace(DB_PASSWORD, DB_PASSWORD + "x")
    with pytest.raises(StartupError) as refused_db:
        build_server(dataclasses.replace(ServerSettings(), db_type="mysql", db_connect_str=wrong_dsn,
                                         admin_key=ADMIN_SECRET), reactor)
    errors.append(str(refused_db.value))
    assert "cannot open the mysql database" in errors[-1]
    for flags in ({"rabbitmq-url": f"amqp://u:{RMQ_PASSWORD}@host:99999/"},
                  {"db-type": "mysql", "db-connect-str": f"u:{DB_PASSWORD}@tcp(h:notaport)/x"},
                  {"log-level": "9", "admin-key": ADMIN_SECRET}):
        try:
            settings = load_server_settings(None, env={}, flags=flags)
        except ConfigError as e:
            errors.append(str(e))
        else:
            errors.append(repr(settings))

    api = await start_server(
        "mysql", dsn, log_level=0, admin_key=ADMIN_SECRET, exchange=f"taskd-secrets-{TAG}", rabbitmq_queue_expiry=20.0,
        rabbitmq_url=f"amqp://taskd-{TAG}:{RMQ_PASSWORD}@127.0.0.1:5672/")
    api.auth.keys[ORG_SECRET] = org(5, "secretorg")
    snap = SnapEmulator(catalog=[metric("/example-task/foo", 1)]).start()
    no_snap = SnapEmulator().start()  # for the refused agent: a Snap that is down
    await no_snap.set_down(True)
    agents: list[Agent] = []

    def start_agent(name: str, key: str, snap_url: str) -> Agent:
        settings = dataclasses.replace(
            AgentSettings(), log_level=0, server_url=f"ws://127.0.0.1:{api.port}/api/v1", api_key=key, name=name,
            snap_url=snap_url, tsdb_url="http://tsdb-gw.invalid/", reconnect_max_backoff=1.0)
        agent = Agent(settings, reactor, snap_intervals={"supervise_interval": 0.2, "sweep_interval": 1.0,
                                                         "catalog_interval": 2.0})
        agent.service.startService()
        agents.append(agent)
        return agent

    try:
        # Register, then connect the agent with the org's key.
        registered = await api.ok("POST", "/api/v1/agents", key=ORG_SECRET, data={"name": "agent1"})
        await api.ok("PUT", "/api/v1/agents", key=ORG_SECRET, json_body={**registered, "enabled": True})
        start_agent("agent1", ORG_SECRET, snap.url)

        async def online() -> bool:
            rows = await api.ok("GET", "/api/v1/agents", key=ORG_SECRET, params={"name": "agent1"})
            return bool(rows and rows[0]["online"])

        await until(lambda: capture.contains("agent agent1 ("), what="agent connected line")
        for _ in range(100):
            if await online():
                break
        await until(lambda: snap.global_config.get("raintank_api_key") == ORG_SECRET, what="key given to Snap")

        # A task's life: created, updated, deleted, each reaching Snap.
        task = await api.ok("POST", "/api/v1/tasks", key=ORG_SECRET, json_body=NOTES_TASK)
        name = f"raintank-apps:{task['id']}"
        await until(lambda: any(t.name == name for t in snap.tasks.values()), what="Snap task created")
        await api.ok("PUT", "/api/v1/tasks", key=ORG_SECRET, json_body={**task, "interval": 120})
        await until(lambda: any(t.name == name and t.interval_ns == 120 * 10**9
                                for t in snap.tasks.values()), what="Snap task re-created")
        await api.ok("DELETE", f"/api/v1/tasks/{task['id']}", key=ORG_SECRET)
        await until(lambda: not any(t.name == name for t in snap.tasks.values()), what="Snap task removed")
        await api.ok("GET", "/api/v1/agents", key=ADMIN_SECRET)

        # Refused keys: API calls, a socket upgrade, and an agent daemon with a bad key.
        assert (await api.request("GET", "/api/v1/tasks", key=WRONG_SECRET)).status == 401
        assert (await api.request("GET", "/api/v1/tasks", key=None,
                                  headers={"Authentication": f"Bearer {ADMIN_SECRET}"})).status == 401
        assert (await api.request("GET", "/api/v1/tasks", key=None,
                                  headers={"Authorization": f"Token {ADMIN_SECRET}"})).status == 401
        bad_socket = connect_agent(api.base, "intruder", WRONG_SECRET)
        bad_socket.opened.addErrback(lambda _: None)
        await bad_socket.closed
        start_agent("agent-bad", WRONG_AGENT_SECRET, no_snap.url)
        await until(lambda: capture.contains("server refused the agent"), what="the bad agent refused")
        await until(lambda: capture.contains("is unreachable"), what="the bad agent's Snap unreachable")

        # The auth endpoint failing while it is asked about a key it has not seen.
        for mode in ("error500", "garbage"):
            api.auth.mode = mode
            assert (await api.request("GET", "/api/v1/tasks", key=UNCHECKED_SECRET + mode)).status == 503
        api.auth.mode = "normal"
        await until(lambda: capture.contains("auth endpoint"), what="the auth endpoint warning")

        # Bad requests.
        assert (await api.request("POST", "/api/v1/tasks", key=ADMIN_SECRET, data=b"{not json",
                                  headers={"Content-Type": "application/json"})).status == 400
        assert (await api.request("POST", "/api/v1/tasks", key=ADMIN_SECRET,
                                  json_body={**NOTES_TASK, "interval": -1})).status == 400
        assert (await api.request("GET", "/api/v1/socket/agent1/1", key=ADMIN_SECRET)).status == 400
        assert (await api.request("GET", "/api/v1/nowhere", key=ADMIN_SECRET)).status == 404
        await until(lambda: capture.contains("amqp:"), what="an amqp line (broker refused the login)")
        # (on a loaded machine the push can come after the lines above)
        await until(lambda: capture.contains("taskAdd to agent agent1"), what="the task pushed to agent1")
    finally:
        for agent in agents:
            await agent.service.stopService()
        await stop_server(api)
        await snap.stop()
        await no_snap.stop()

    assert capture.events > 50
    # autobahn logs handshakes (Authorization header included) at debug; txaio, which
    # gates them, must still be at its default level although taskd ran at log-level 0.
    assert txaio.get_global_log_level() == "info"
    for line in ("agent agent1 (", "taskAdd to agent agent1", "created Snap task", "removed Snap task",
                 "agent connection refused: intruder"):
        assert capture.contains(line), line
    leaks = capture.leaks(errors)
    assert not leaks, "secrets in the logs:\n" + "\n---\n".join(f"{s}: {t}" for s, t in leaks[:5])
