"""A whole cluster in real processes, for the chaos scenarios (issue 11, item 7) and their
figures (bench/chaos.py).

Three `twistd taskserver` on one MariaDB database and the machine's RabbitMQ (an exchange
of their own), the real nginx in front of them as one upstream, and a fleet of light
agents (tests.integration.agent_client) connected through nginx. The fleet behaves as
agents do: a socket that closes is reopened through nginx after a short pause, except for
the agents told to stay away (as a host that died with its server would). Faults are
injected only into what this module starts (the servers); the shared MariaDB and
RabbitMQ are never touched.

The end state a scenario must reach is `Cluster.problems()`: empty when every agent's
`online` (as each live server's API shows it) matches whether it holds a socket, every
enabled `any` task is assigned to exactly one online agent that holds one, and no
server has left a traceback in its log; `fivexx()` lists the 5xx answers seen.
"""
from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pymysql
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.web.client import HTTPConnectionPool

from tests.conftest import MYSQL_HOST, MYSQL_PASSWORD, MYSQL_PORT, MYSQL_USER
from tests.integration.agent_client import AgentClient, connect_agent
from tests.integration.daemons import ServerProcess
from tests.integration.test_nginx import Nginx, require_nginx
from tests.waiting import until

ADMIN_KEY = "EASY"
HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
# Small intervals so a fault is detected and repaired within seconds.
FAST = {"server-heartbeat-interval": "0.5s", "server-dead-after": "3s", "relocate-delay": "1s",
        "task-list-interval": "2s", "heartbeat-interval": "1s", "status-flush-interval": "1s"}
TASK = {"metrics": {}, "config": {}, "interval": 60, "enabled": True}
REOPEN_AFTER = 0.2  # seconds (plus up to as much jitter) before an agent reopens its socket


def new_exchange() -> str:
    return f"taskd-chaos-{uuid.uuid4().hex[:8]}"


def delete_exchange(name: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", "eval", f'rabbit_exchange:delete(rabbit_misc:r(<<"/">>, exchange, <<"{name}">>), false, <<"test">>).'],
                   capture_output=True, timeout=60)


class Fleet:
    """Light agents through nginx that reopen their socket when it closes (unless away)."""

    def __init__(self, base: str, names: list[str]) -> None:
        self.base = base
        self.names = names
        self.clients: dict[str, AgentClient] = {}
        self.away: set[str] = set()  # agents that do not come back once their socket closes
        self.reopened: dict[str, float] = {}  # name -> when its latest socket opened again
        self.stopping = False

    def connect(self, name: str) -> AgentClient:
        client = self.clients[name] = connect_agent(self.base, name, ADMIN_KEY)
        client.opened.addCallbacks(lambda _: self._opened(name, client), lambda _: None)
        client.closed.addCallback(lambda _: self._closed(name, client))
        return client

    def _opened(self, name: str, client: AgentClient) -> None:
        if self.stopping or name in self.away:
            client.protocol.dropConnection(abort=True)
            return
        self.reopened[name] = reactor.seconds()

    def _closed(self, name: str, client: AgentClient) -> None:
        if self.stopping or name in self.away or self.clients.get(name) is not client:
            return
        reactor.callLater(REOPEN_AFTER * (1 + random.random()), self._reopen, name)

    def _reopen(self, name: str) -> None:
        if not (self.stopping or name in self.away):
            self.connect(name)

    def holds_socket(self, name: str) -> bool:
        client = self.clients.get(name)
        return client is not None and client.opened.called and not client.closed.called \
            and client.protocol is not None and client.protocol.state == client.protocol.STATE_OPEN

    async def open_all(self, timeout: float = 60.0) -> None:
        for name in self.names:
            self.connect(name)
        await until(lambda: all(self.holds_socket(n) for n in self.names), timeout,
                    what=lambda: f"agents open: {sum(self.holds_socket(n) for n in self.names)}/{len(self.names)}",
                    interval=0.1)

    async def close_all(self) -> None:
        self.stopping = True
        for client in self.clients.values():
            if not client.closed.called and client.protocol is not None:
                client.protocol.dropConnection(abort=True)


class Cluster:
    def __init__(self, workdir: Path, database: str, exchange: str, n_servers: int = 3,
                 n_agents: int = 150, **keys: str) -> None:
        require_nginx()
        self.workdir = workdir
        self.database = database
        dsn = f"{MYSQL_USER}:{MYSQL_PASSWORD}@tcp({MYSQL_HOST}:{MYSQL_PORT})/{database}?charset=utf8"
        common = {"db-type": "mysql", "db-connect-str": dsn, "admin-key": ADMIN_KEY, "exchange": exchange,
                  "rabbitmq-url": RABBITMQ_URL, "rabbitmq-queue-expiry": "60s", **FAST, **keys}
        self.servers = [ServerProcess(workdir, f"S{i}", **common) for i in range(1, n_servers + 1)]
        (workdir / "nginx").mkdir()
        self.nginx = Nginx(workdir / "nginx", [s.port for s in self.servers], worker_connections=4 * n_agents + 256)
        self.fleet = Fleet(self.nginx.base, [f"agent{i:03d}" for i in range(n_agents)])
        self.answers: list[tuple[str, str, int]] = []  # (where, method path, status) of every API call
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent_ids: dict[str, int] = {}
        self.any_tasks: list[int] = []

    def live(self) -> list[ServerProcess]:
        return [s for s in self.servers if s.proc is not None and s.proc.poll() is None]

    async def start(self) -> None:
        await gatherResults([Deferred.fromCoroutine(s.start(timeout=60)) for s in self.servers])
        await self.nginx.start()

    async def stop(self) -> None:
        await self.fleet.close_all()
        self.nginx.stop()
        for server in self.servers:
            if server.proc is not None and server.proc.poll() is None:
                try:
                    server.proc.send_signal(signal.SIGCONT)
                except ProcessLookupError:
                    pass
            await server.stop()

    async def call(self, method: str, path: str, body: Any = None, base: str | None = None) -> tuple[int, Any]:
        base = base or self.nginx.base
        resp = await treq.request(method, base + path, json=body, headers=HEADERS, timeout=20, pool=self.pool)
        raw = await resp.content()
        self.answers.append((base, f"{method} {path}", resp.code))
        try:
            return resp.code, json.loads(raw)["body"]
        except (ValueError, KeyError, TypeError):
            return resp.code, raw

    async def ok(self, method: str, path: str, body: Any = None, base: str | None = None) -> Any:
        code, got = await self.call(method, path, body, base)
        assert code == 200, (method, path, code, got)
        return got

    async def populate(self, n_any: int = 30, n_tags: int = 6) -> None:
        """Agents (tagged in groups), `any` tasks and `byTags` tasks, all through nginx."""
        for i, name in enumerate(self.fleet.names):
            agent = await self.ok("POST", "/api/v1/agents", {"name": name, "tags": [f"group{i % n_tags}"]})
            self.agent_ids[name] = agent["id"]
        for i in range(n_tags):
            await self.ok("POST", "/api/v1/tasks", {**TASK, "name": f"tagged{i}", "route": {
                "type": "byTags", "config": {"tags": [f"group{i}"]}}})
        for i in range(n_any):
            task = await self.ok("POST", "/api/v1/tasks", {**TASK, "name": f"any{i:02d}", "route": {"type": "any"}})
            self.any_tasks.append(task["id"])

    def sessions(self) -> dict[str, set[str]]:
        """instance id -> names of the agents it holds a session for (read from the database
        directly: the API does not say which server holds which agent)."""
        conn = pymysql.connect(host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, password=MYSQL_PASSWORD,
                               database=self.database)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT s.server, a.name FROM agent_session s JOIN agent a ON a.id = s.agent_id")
                rows = cur.fetchall()
        finally:
            conn.close()
        held: dict[str, set[str]] = {}
        for server, name in rows:
            held.setdefault(server.split("#")[0], set()).add(name)
        return held

    async def assignments(self, base: str | None = None) -> dict[int, list[int]]:
        """`any` task id -> the agent ids GET /api/v1/tasks/<id> shows it assigned to."""
        return dict(zip(self.any_tasks, await self.task_agents(self.any_tasks, base)))

    async def task_agents(self, task_ids: list[int], base: str | None = None) -> list[list[int]]:
        """The agents of each task, asked all at once (a poll round stays short)."""
        shown = await gatherResults([Deferred.fromCoroutine(self.ok("GET", f"/api/v1/tasks/{tid}", base=base))
                                     for tid in task_ids])
        return [task["agents"] for task in shown]

    async def online(self, base: str) -> dict[str, bool]:
        listed = await self.ok("GET", "/api/v1/agents?limit=1000", base=base)
        return {a["name"]: a["online"] for a in listed}

    async def settled(self) -> bool:
        """The fleet holds every socket it should (a stable point to inject a fault at)."""
        return all(self.fleet.holds_socket(n) for n in self.fleet.names if n not in self.fleet.away)

    async def problems(self) -> list[str]:
        """What is wrong with the end state now (empty: the cluster has converged)."""
        found: list[str] = []
        by_id = {v: k for k, v in self.agent_ids.items()}
        for server in self.live():
            online, assigned = await gatherResults([Deferred.fromCoroutine(self.online(server.base)),
                                                    Deferred.fromCoroutine(self.assignments(server.base))])
            for name in self.fleet.names:
                holds = self.fleet.holds_socket(name)
                if online.get(name) != holds:
                    found.append(f"{server.name}: {name} online={online.get(name)} but holds a socket={holds}")
            for tid, agents in assigned.items():
                if len(agents) != 1:
                    found.append(f"{server.name}: any task {tid} assigned to {agents}")
                    continue
                name = by_id.get(agents[0])
                if not (online.get(name) and self.fleet.holds_socket(name)):
                    found.append(f"{server.name}: any task {tid} on {name}, online={online.get(name)}, "
                                 f"socket={self.fleet.holds_socket(name)}")
        return found[:20] + ([f"... and {len(found) - 20} more"] if len(found) > 20 else [])

    def fivexx(self) -> list[str]:
        """Every 5xx answer: to the test's own calls, and in nginx's access log."""
        bad = [f"{where} {what} -> {code}" for where, what, code in self.answers if code >= 500]
        access = self.nginx.dir / "access.log"
        if access.exists():
            bad += [line for line in access.read_text(errors="replace").splitlines()
                    if re.search(r'" 5\d\d ', line)]
        return bad

    def tracebacks(self) -> list[str]:
        return [s.name for s in self.servers if "Traceback" in s.log()]

    def logs(self) -> str:
        return "\n".join(f"==== {s.name}\n{s.log()[-6000:]}" for s in self.servers)


async def start_and_choose_victim(cluster: Cluster) -> tuple[ServerProcess, set[str], set[str]]:
    """Start, populate, connect, wait for every `any` task to be assigned; choose the victim
    (the server whose agents hold the most `any` tasks) and the agents of it that will stay
    away (every one holding an `any` task, and every third of the rest). Returns (victim,
    its agents, those staying away)."""
    await cluster.start()
    await cluster.populate()
    await cluster.fleet.open_all()

    async def all_assigned() -> dict[int, list[int]]:
        return await cluster.assignments()

    assigned = await until(lambda: _all_one(all_assigned()), 30, what="every any task assigned", interval=0.2)
    held = await until(lambda: _sessions_complete(cluster), 30, what="one session per agent", interval=0.2)
    by_id = {v: k for k, v in cluster.agent_ids.items()}
    holders = {by_id[agents[0]] for agents in assigned.values()}
    victim = max(cluster.servers, key=lambda s: len(holders & held.get(s.name, set())))
    mine = held.get(victim.name, set())
    rest = sorted(mine - holders)
    away = (mine & holders) | set(rest[::3])
    return victim, mine, away


async def _all_one(pending: Any) -> Any:
    got = await pending
    return got if all(len(agents) == 1 for agents in got.values()) else None


def _sessions_complete(cluster: Cluster) -> dict[str, set[str]] | None:
    held = cluster.sessions()
    count = sum(len(v) for v in held.values())
    return held if count == len(cluster.fleet.names) else None
