"""A whole cluster in real processes, for the chaos scenarios (issue 11, item 7) and their
figures (bench/chaos.py).

Three `twistd taskserver` on one MariaDB database and the machine's RabbitMQ (an exchange
of their own), the real nginx in front of them as one upstream, and a fleet of light
agents (tests.integration.agent_client) connected through nginx, and with `n_builtin` a
few real `twistd taskagent` with the built-in executor running checks
(tests/chaos/builtin_agents.py). The fleet behaves as
agents do: a socket that closes is reopened through nginx after a short pause, except for
the agents told to stay away (as a host that died with its server would). Faults are
injected only into what this module starts (the servers); the shared MariaDB and
RabbitMQ are never touched.

The end state a scenario must reach is `Cluster.problems()`: empty when every agent's
`online` (as each live server's API shows it) matches whether it holds a socket, every
enabled `any` task is assigned to exactly one online agent that holds one, no builtin
agent's check has missed two runs in a row (its points, read by its tsdb-gw emulator), and what
every agent holding a socket runs (its last `taskList` and the events since:
tests/chaos/frames.py) is exactly the enabled tasks the database routes to it, as
stored; `fivexx()` lists the 5xx answers seen (but the documented database-outage 503
when asked to), `tracebacks()` the servers that logged one.

The same class builds the variants: a private database (`db_port`: a mariadbd of the
scenario's own, tests/chaos/mariadb.py), a lone sqlite server (`database` a Path,
`n_servers=1`, `nginx=False`: the agents then connect to it directly), no exchange.
"""
from __future__ import annotations

import json
import random
import re
import signal
import sqlite3
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pymysql
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.web.client import HTTPConnectionPool

from tests.chaos.builtin_agents import BuiltinAgents
from tests.chaos.frames import same_task, view_of
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
# A metric no catalog provides: agents without one (the light fleet) qualify, the builtin
# agents (their catalog is their collectors') never do, so they run only their own checks.
TASK = {"metrics": {"/chaos/*": 0}, "config": {}, "interval": 60, "enabled": True}
# The SIGKILL and SIGSTOP scenarios' fleet (issue 11: "~300 agents (a light client is fine
# for most; a few real `twistd taskagent` with the built-in executor)").
CLUSTER_AGENTS, BUILTIN_AGENTS = 300, 3
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


@dataclass(frozen=True)
class Answer:
    """One API call the scenario made: where to, what, when (reactor seconds), how long
    the answer took, its status, and for an error its message and Retry-After."""

    where: str
    what: str
    at: float
    took: float
    code: int
    message: str = ""
    retry_after: str | None = None

    @property
    def documented_503(self) -> bool:
        """The database-outage answer of docs/operations.md (failure modes)."""
        return self.code == 503 and "database unavailable" in self.message and bool(self.retry_after)


class Cluster:
    def __init__(self, workdir: Path, database: str | Path, exchange: str | None, n_servers: int = 3,
                 n_agents: int = 150, *, n_builtin: int = 0, db_port: int = MYSQL_PORT, nginx: bool = True,
                 **keys: str) -> None:
        """`database`: a database's name on the MariaDB at `db_port` (the shared one by
        default), or the Path of an sqlite file. `exchange` None: no RabbitMQ."""
        self.workdir = workdir
        self.database, self.db_port = database, db_port
        if isinstance(database, Path):
            common = {"db-type": "sqlite3", "db-connect-str": str(database)}
        else:
            common = {"db-type": "mysql",
                      "db-connect-str": f"{MYSQL_USER}:{MYSQL_PASSWORD}@tcp({MYSQL_HOST}:{db_port})/{database}?charset=utf8"}
        if exchange:
            common.update({"exchange": exchange, "rabbitmq-url": RABBITMQ_URL, "rabbitmq-queue-expiry": "60s"})
        common.update({"admin-key": ADMIN_KEY, **FAST, **keys})
        self.servers = [ServerProcess(workdir, f"S{i}", **common) for i in range(1, n_servers + 1)]
        self.nginx: Nginx | None = None
        if nginx:
            require_nginx()
            (workdir / "nginx").mkdir()
            self.nginx = Nginx(workdir / "nginx", [s.port for s in self.servers], worker_connections=4 * n_agents + 256)
        self.base = self.nginx.base if self.nginx else self.servers[0].base
        self.fleet = Fleet(self.base, [f"agent{i:03d}" for i in range(n_agents)])
        self.builtin = BuiltinAgents(workdir, [f"builtin{i}" for i in range(n_builtin)],
                                     self.base.replace("http://", "ws://") + "/api/v1", ADMIN_KEY)
        self.answers: list[Answer] = []  # every API call made through `call`
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent_ids: dict[str, int] = {}
        self.any_tasks: list[int] = []
        self.tasks: list[int] = []  # every task made through `create_task`, `any` ones included

    def live(self) -> list[ServerProcess]:
        return [s for s in self.servers if s.proc is not None and s.proc.poll() is None]

    async def start(self) -> None:
        await gatherResults([Deferred.fromCoroutine(s.start(timeout=60)) for s in self.servers])
        if self.nginx:
            await self.nginx.start()

    async def stop(self) -> None:
        await self.fleet.close_all()
        await self.builtin.stop()
        if self.nginx:
            self.nginx.stop()
        for server in self.servers:
            if server.proc is not None and server.proc.poll() is None:
                try:
                    server.proc.send_signal(signal.SIGCONT)
                except ProcessLookupError:
                    pass
            await server.stop()

    async def call(self, method: str, path: str, body: Any = None, base: str | None = None) -> tuple[int, Any]:
        base = base or self.base
        at = reactor.seconds()
        resp = await treq.request(method, base + path, json=body, headers=HEADERS, timeout=20, pool=self.pool)
        raw = await resp.content()
        try:
            envelope = json.loads(raw)
            got, message = envelope["body"], str(envelope["meta"]["message"])
        except (ValueError, KeyError, TypeError):
            got, message = raw, raw[:200].decode(errors="replace")
        retry = resp.headers.getRawHeaders(b"retry-after")
        self.answers.append(Answer(base, f"{method} {path}", at, reactor.seconds() - at, resp.code,
                                   message if resp.code >= 400 else "", retry[0].decode() if retry else None))
        return resp.code, got

    async def ok(self, method: str, path: str, body: Any = None, base: str | None = None) -> Any:
        code, got = await self.call(method, path, body, base)
        assert code == 200, (method, path, code, got)
        return got

    async def create_task(self, body: dict, base: str | None = None) -> dict:
        task = await self.ok("POST", "/api/v1/tasks", body, base)
        self.tasks.append(task["id"])
        return task

    async def populate(self, n_any: int = 30, n_tags: int = 6, n_ids: int = 6) -> None:
        """Agents (tagged in groups), then `byTags`, `byIds` (each to two agents) and
        `any` tasks, all through `base` (nginx). The builtin agents start before the `any`
        tasks exist: an agent qualifies for every task until its catalog is in."""
        for i, name in enumerate(self.fleet.names):
            agent = await self.ok("POST", "/api/v1/agents", {"name": name, "tags": [f"group{i % n_tags}"]})
            self.agent_ids[name] = agent["id"]
        ids = list(self.agent_ids.values())
        for name in self.builtin.names:
            self.agent_ids[name] = (await self.ok("POST", "/api/v1/agents", {"name": name}))["id"]
        await self.builtin.start(self.ok, self.create_task, self.agent_ids)
        for i in range(n_tags):
            await self.create_task({**TASK, "name": f"tagged{i}", "route": {
                "type": "byTags", "config": {"tags": [f"group{i}"]}}})
        for i in range(n_ids):
            pair = sorted({ids[(7 * i) % len(ids)], ids[(7 * i + 3) % len(ids)]})
            await self.create_task({**TASK, "name": f"ids{i:02d}", "route": {"type": "byIds", "config": {"ids": pair}}})
        for i in range(n_any):
            task = await self.create_task({**TASK, "name": f"any{i:02d}", "route": {"type": "any"}})
            self.any_tasks.append(task["id"])

    def sessions(self) -> dict[str, set[str]]:
        """instance id -> names of the agents it holds a session for (read from the database
        directly: the API does not say which server holds which agent)."""
        query = "SELECT s.server, a.name FROM agent_session s JOIN agent a ON a.id = s.agent_id"
        if isinstance(self.database, Path):
            with sqlite3.connect(self.database, timeout=10) as conn:
                rows = conn.execute(query).fetchall()
            conn.close()
        else:
            conn = pymysql.connect(host=MYSQL_HOST, port=self.db_port, user=MYSQL_USER, password=MYSQL_PASSWORD,
                                   database=self.database)
            try:
                with conn.cursor() as cur:
                    cur.execute(query)
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
        return [task["agents"] for task in await self.task_details(task_ids, base)]

    async def task_details(self, task_ids: list[int], base: str | None = None) -> list[dict]:
        """GET /api/v1/tasks/<id> of each (the task, and the agents it is routed to)."""
        return await gatherResults([Deferred.fromCoroutine(self.ok("GET", f"/api/v1/tasks/{tid}", base=base))
                                    for tid in task_ids])

    async def online(self, base: str) -> dict[str, bool]:
        listed = await self.ok("GET", "/api/v1/agents?limit=1000", base=base)
        return {a["name"]: a["online"] for a in listed}

    async def settled(self) -> bool:
        """The fleet holds every socket it should (a stable point to inject a fault at)."""
        return all(self.fleet.holds_socket(n) for n in self.fleet.names if n not in self.fleet.away)

    async def problems(self) -> list[str]:
        """What is wrong with the end state now (empty: the cluster has converged)."""
        found: list[str] = self.builtin.gap_problems()
        by_id = {v: k for k, v in self.agent_ids.items()}
        for n, server in enumerate(self.live()):
            online, assigned = await gatherResults([Deferred.fromCoroutine(self.online(server.base)),
                                                    Deferred.fromCoroutine(self.assignments(server.base))])
            holds = self.holds_socket()  # after this server's answers: the freshest
            for name in self.fleet.names + self.builtin.names:
                if online.get(name) != holds(name):
                    found.append(f"{server.name}: {name} online={online.get(name)} but holds a socket={holds(name)}")
            for tid, agents in assigned.items():
                if len(agents) != 1:
                    found.append(f"{server.name}: any task {tid} assigned to {agents}")
                    continue
                name = by_id.get(agents[0])
                if not (online.get(name) and holds(name)):
                    found.append(f"{server.name}: any task {tid} on {name}, online={online.get(name)}, "
                                 f"socket={holds(name)}")
            if n == 0 and not found:  # the routing as the first live server shows it
                found += self.views_wrong(dict(zip(self.tasks, await self.task_details(self.tasks, server.base))))
        return found[:20] + ([f"... and {len(found) - 20} more"] if len(found) > 20 else [])

    def holds_socket(self) -> Callable[[str], bool]:
        """name -> whether the agent holds a socket now: a light agent's own client says so;
        a builtin agent's (another process) is read from the database (`sessions()`) once."""
        if not self.builtin.names:
            return self.fleet.holds_socket
        sessions, live = self.sessions(), {s.name for s in self.live()}
        return lambda name: self.fleet.holds_socket(name) or (
            name in self.builtin.names and self.builtin.holds(name, sessions, live))

    def views_wrong(self, shown: dict[int, dict]) -> list[str]:
        """Each agent holding a socket runs exactly the enabled tasks `shown` (task id ->
        GET /api/v1/tasks/<id>) routes to it, each as stored."""
        found = []
        for name in self.fleet.names:
            if not self.fleet.holds_socket(name):
                continue
            agent_id = self.agent_ids[name]
            want = {tid: t for tid, t in shown.items() if t["enabled"] and agent_id in t["agents"]}
            view = view_of(self.fleet.clients[name].frames)
            if view is None:
                found.append(f"{name}: no taskList yet")
            elif set(view) != set(want):
                found.append(f"{name} runs {sorted(set(view) - set(want))} not routed to it, "
                             f"lacks {sorted(set(want) - set(view))} routed to it")
            elif stale := [tid for tid in want if not same_task(view[tid], want[tid])]:
                found.append(f"{name} runs tasks {stale} not as stored")
        return found

    def fivexx(self, documented_503: bool = False) -> list[str]:
        """Every 5xx answer: to the test's own calls, and in nginx's access log. With
        `documented_503`, the database-outage 503 envelope (with Retry-After) is not one
        (nor a 503 in nginx's log: nginx itself answers 502/504 for a failed upstream)."""
        bad = [f"{a.where} {a.what} -> {a.code} {a.message}" for a in self.answers
               if a.code >= 500 and not (documented_503 and a.documented_503)]
        access = self.nginx.dir / "access.log" if self.nginx else None
        if access is not None and access.exists():
            bad += [line for line in access.read_text(errors="replace").splitlines()
                    if re.search(r'" 5\d\d ', line) and not (documented_503 and '" 503 ' in line)]
        return bad

    def tracebacks(self) -> list[str]:
        return [s.name for s in self.servers if "Traceback" in s.log()] + self.builtin.tracebacks()

    def logs(self) -> str:
        return "\n".join(f"==== {s.name}\n{s.log()[-6000:]}" for s in self.servers) + "\n" + self.builtin.logs()


async def start_and_choose_victim(cluster: Cluster) -> tuple[ServerProcess, set[str], set[str]]:
    """Start, populate, connect, wait for every `any` task to be assigned; choose the victim
    (the server whose agents hold the most `any` tasks; of those, one holding a builtin
    agent) and the light agents of it that will stay away (every one holding an `any`
    task, and every third of the rest). Returns (victim, its light agents, those staying
    away)."""
    assigned, held = await start_settled(cluster)
    by_id = {v: k for k, v in cluster.agent_ids.items()}
    holders = {by_id[agents[0]] for agents in assigned.values()}
    victim = max(cluster.servers, key=lambda s: (len(holders & held.get(s.name, set())),
                                                 len(set(cluster.builtin.names) & held.get(s.name, set()))))
    mine = held.get(victim.name, set()) & set(cluster.fleet.names)
    rest = sorted(mine - holders)
    away = (mine & holders) | set(rest[::3])
    return victim, mine, away


async def start_settled(cluster: Cluster, **populate: int) -> tuple[dict[int, list[int]], dict[str, set[str]]]:
    """Start, populate, connect the fleet; wait until every `any` task is assigned and
    every agent has its session. Returns (any task id -> its agents, sessions())."""
    await cluster.start()
    await cluster.populate(**populate)
    await cluster.fleet.open_all()
    assigned = await until(lambda: _all_one(cluster.assignments()), 30, what="every any task assigned", interval=0.2)
    held = await until(lambda: _sessions_complete(cluster), 30, what="one session per agent", interval=0.2)
    return assigned, held


async def _all_one(pending: Any) -> Any:
    got = await pending
    return got if all(len(agents) == 1 for agents in got.values()) else None


def _sessions_complete(cluster: Cluster) -> dict[str, set[str]] | None:
    held = cluster.sessions()
    count = sum(len(v) for v in held.values())
    return held if count == len(cluster.fleet.names) + len(cluster.builtin.names) else None
