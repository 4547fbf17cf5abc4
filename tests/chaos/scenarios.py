"""The chaos scenarios of issue 11 (item 7) that fault the database or a lone server
(the broker's is tests/chaos/broker.py), each run start to end on a cluster of its own. Each returns what happened (a
`Run`); the tests in tests/chaos/ assert on it, bench/chaos.py reports it as figures, so
the test and the figure are the same experiment.

- `database_stall`: SIGSTOP of a private mariadbd for `STALL` s, with API calls to
  every server (and through nginx) at a steady pace, each timed.
- `database_restart`: SIGKILL of it, then mariadbd started again on the same port and
  data directory; the servers are not restarted.
- `lone_restart`: SIGKILL of a lone sqlite server and a start again, while the agent
  holding its `any` tasks stays away.
"""
from __future__ import annotations

import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall

from tests.chaos.cluster import BUILTIN_AGENTS, TASK, Answer, Cluster, delete_exchange, new_exchange, start_settled
from tests.chaos.frames import duplicate_pushes
from tests.chaos.mariadb import PrivateMariaDB
from tests.waiting import until, value_of

DB_TIMEOUT = 2.0  # db-timeout of the database scenarios: the 503 bound is this + 1 s
STALL = 10.0  # seconds mariadbd stays SIGSTOPped (issue 11)
CONVERGE = 60.0  # seconds a cluster may take to converge after a fault before it counts as stuck
PROBE_EVERY = 0.5  # seconds between the probes' calls to each target
DB_AGENTS = 60  # agents of the database scenarios (the API is what they measure; the machine has 2 cores)


@dataclass
class Run:
    scenario: str
    facts: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # the end state (empty: converged)
    converged_after: float | None = None  # seconds from the end of the fault
    fivexx: list[str] = field(default_factory=list)  # beside the documented 503
    tracebacks: list[str] = field(default_factory=list)
    logs: str = ""


async def converge(cluster: Cluster, since: float, run: Run, timeout: float = CONVERGE) -> None:
    """Poll the end state until it holds (or `timeout`); record it and when it held."""
    try:
        await value_of(cluster.problems, lambda found: not found, timeout, interval=0.5, what="converging")
        run.converged_after = reactor.seconds() - since
        run.problems = []
    except AssertionError:
        run.problems = await cluster.problems()


def finish(cluster: Cluster, run: Run) -> Run:
    run.fivexx = cluster.fivexx(documented_503=True)
    run.tracebacks = cluster.tracebacks()
    run.logs = cluster.logs()
    return run


def log_count(cluster: Cluster, text: str) -> dict[str, int]:
    return {s.name: s.log().count(text) for s in cluster.servers}


class Prober:
    """API calls at a steady pace to each target (every server directly, and nginx),
    each recorded with its start and duration in `cluster.answers`; plus `GET /` of each
    server (`status`). A call that never answers is recorded with code 0."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.targets = [s.base for s in cluster.servers] + ([cluster.nginx.base] if cluster.nginx else [])
        self.status: list[tuple[str, float, float, int, dict]] = []  # (server, at, took, code, body)
        self.posted: dict[str, tuple[int, float, float]] = {}  # probe task name -> (code, sent, answered)
        self._n = 0
        self._pending: set[Deferred] = set()
        self._loop = LoopingCall(self._fire)
        self._last = 0.0
        self.late = 0.0  # the most this (the measuring) process's own ticks came late, in s

    def start(self) -> None:
        self._loop.start(PROBE_EVERY, now=True)

    async def stop(self) -> None:
        self._loop.stop()
        await DeferredList(list(self._pending))

    def ok_posts(self) -> set[str]:
        return {name for name, (code, *_) in self.posted.items() if code == 200}

    def _track(self, coro: Any) -> None:
        d = Deferred.fromCoroutine(coro)
        self._pending.add(d)
        d.addBoth(lambda _: self._pending.discard(d))

    def _fire(self) -> None:
        now = reactor.seconds()
        if self._last:
            self.late = max(self.late, now - self._last - PROBE_EVERY)
        self._last = now
        self._n += 1
        task_id = self.cluster.tasks[self._n % len(self.cluster.tasks)]
        for i, base in enumerate(self.targets):
            kind = (self._n + i) % 3
            if kind == 0:
                self._track(self._call(base, "GET", "/api/v1/agents?limit=5"))
            elif kind == 1:
                self._track(self._call(base, "GET", f"/api/v1/tasks/{task_id}"))
            else:
                name = f"probe{self._n:04d}x{i}"  # routed to nobody: a write, nothing to push
                self._track(self._post(base, name))
        for server in self.cluster.servers:
            self._track(self._status(server.base))

    async def _call(self, base: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        at = reactor.seconds()
        try:
            return await self.cluster.call(method, path, body, base)
        except Exception as exc:  # no answer at all (the client's timeout): the worst case
            self.cluster.answers.append(Answer(base, f"{method} {path}", at, reactor.seconds() - at, 0,
                                               f"{type(exc).__name__}: {exc}"))
            return 0, None

    async def _post(self, base: str, name: str) -> None:
        at = reactor.seconds()
        code, got = await self._call(base, "POST", "/api/v1/tasks", {
            **TASK, "name": name, "route": {"type": "byTags", "config": {"tags": ["nobody"]}}})
        self.posted[name] = (code, at, reactor.seconds())
        if code == 200:
            self.cluster.tasks.append(got["id"])

    async def _status(self, base: str) -> None:
        at = reactor.seconds()
        try:
            resp = await treq.get(base + "/", timeout=20, pool=self.cluster.pool)
            body = (await resp.json())["body"]
            self.status.append((base, at, reactor.seconds() - at, resp.code, body))
        except Exception as exc:
            self.status.append((base, at, reactor.seconds() - at, 0, {"error": repr(exc)}))


def answers_between(cluster: Cluster, start: float, end: float, direct_only: bool = False) -> list[Answer]:
    bases = {s.base for s in cluster.servers}
    return [a for a in cluster.answers if start <= a.at < end and (a.where in bases or not direct_only)]


async def answering_again(cluster: Cluster, since: float) -> dict[str, float]:
    """Wait (the probes running) until every server has answered 200 to a call made after
    `since`; returns, per server, seconds from `since` to the end of its first such answer."""
    recovered: dict[str, float] = {}

    def answering() -> bool:
        for s in cluster.servers:
            ok = [a for a in answers_between(cluster, since, float("inf")) if a.where == s.base and a.code == 200]
            if ok and s.name not in recovered:
                recovered[s.name] = min(a.at + a.took for a in ok) - since
        return len(recovered) == len(cluster.servers)

    await until(answering, CONVERGE, interval=0.1, what="every server answering again")
    return recovered


async def stored_probes(cluster: Cluster) -> set[str]:
    listed = await cluster.ok("GET", "/api/v1/tasks?limit=1000")
    return {t["name"] for t in listed if t["name"].startswith("probe")}


async def _private_cluster(workdir: Path, n_agents: int, n_builtin: int) -> tuple[PrivateMariaDB, Cluster, str]:
    db = await PrivateMariaDB(workdir / "mariadb").start()
    exchange = new_exchange()
    cluster = Cluster(workdir, db.create_database("chaos"), exchange, n_agents=n_agents, n_builtin=n_builtin,
                      db_port=db.port,
                      **{"db-timeout": f"{DB_TIMEOUT:g}s", "log-level": "2"})
    return db, cluster, exchange


def _answer_facts(cluster: Cluster, prober: Prober, start: float, end: float, cut: float) -> dict[str, Any]:
    """What the API answered between `start` and `end` (the outage), against the bound;
    `cut`: calls that ended before it must all be the documented 503."""
    during = answers_between(cluster, start, end)
    return dict(
        nginx=cluster.base, bound=DB_TIMEOUT + 1,
        answers=[(a.where, a.what, a.took, a.code, a.documented_503) for a in during],
        late=[f"{a.what} at {a.where}: {a.took:.2f} s ({a.code})" for a in during if a.took > DB_TIMEOUT + 1],
        not_503=[f"{a.what} at {a.where}: {a.code} {a.message}" for a in during
                 if a.at + a.took < cut and not a.documented_503],
        status=[(b, t, c, body.get("database")) for b, at, t, c, body in prober.status if start <= at < end],
        probe_late=prober.late)


async def _write_facts(cluster: Cluster, prober: Prober) -> dict[str, Any]:
    """Writes answered 503 but stored, answered 200 but missing; outage warnings per server."""
    stored = await stored_probes(cluster)
    return dict(
        half_written=[(n, prober.posted.get(n)) for n in sorted(stored - prober.ok_posts())],
        lost_writes=sorted(prober.ok_posts() - stored),
        outage_warnings=log_count(cluster, "Availability#warn] database unavailable ("),
        recovery_warnings=log_count(cluster, "Availability#warn] database available again after"))


async def _teardown(cluster: Cluster, db: PrivateMariaDB, exchange: str) -> None:
    await cluster.stop()
    await db.stop()
    delete_exchange(exchange)
    db.remove()


async def database_stall(workdir: Path, n_agents: int = DB_AGENTS, n_builtin: int = BUILTIN_AGENTS) -> Run:
    run = Run("database stall")
    db, cluster, exchange = await _private_cluster(workdir, n_agents, n_builtin)
    prober = Prober(cluster)
    try:
        await start_settled(cluster)
        sockets = {n: cluster.fleet.clients[n] for n in cluster.fleet.names}
        beats = {n: len(c.events("heartbeat")) for n, c in sockets.items()}
        prober.start()
        db.freeze()
        frozen = run.facts["frozen"] = reactor.seconds()
        try:
            # The stall's length is the fault under test (issue 11: "SIGSTOP mariadbd for
            # 10 s"); the probes keep calling meanwhile.
            await until(lambda: reactor.seconds() - frozen >= STALL, STALL + 30, interval=0.1, what="the stall")
            kept = [n for n, c in sockets.items() if cluster.fleet.clients[n] is c and cluster.fleet.holds_socket(n)]
            beaten = [n for n, c in sockets.items() if len(c.events("heartbeat")) > beats[n]]
        finally:
            db.thaw()
        thawed = reactor.seconds()
        recovered = await answering_again(cluster, thawed)
        await prober.stop()
        run.facts.update(_answer_facts(cluster, prober, frozen, thawed, cut=thawed), stall=thawed - frozen,
                         recovered=recovered, agents=len(sockets), sockets_kept=len(kept),
                         heartbeats_during=len(beaten))
        await converge(cluster, thawed, run)
        run.facts.update(await _write_facts(cluster, prober), **await cluster.builtin.end_facts(),
                         declared_dead=log_count(cluster, "was declared dead by another server"))
    finally:
        await _teardown(cluster, db, exchange)
    return finish(cluster, run)


async def database_restart(workdir: Path, n_agents: int = DB_AGENTS, n_builtin: int = BUILTIN_AGENTS) -> Run:
    run = Run("database restart")
    db, cluster, exchange = await _private_cluster(workdir, n_agents, n_builtin)
    prober = Prober(cluster)
    try:
        await start_settled(cluster)
        pids = [s.proc.pid for s in cluster.servers]
        prober.start()
        await db.kill()
        killed = reactor.seconds()

        def noticed() -> bool:  # every server has answered the 503 envelope since the kill
            return all(any(a.where == s.base and a.documented_503 for a in answers_between(cluster, killed, float("inf")))
                       for s in cluster.servers)

        await until(noticed, 30, interval=0.1, what="every server answering 503 with mariadbd down")
        restarting = reactor.seconds()
        await db.start()  # same port and data directory; InnoDB recovers from the crash
        back = reactor.seconds()
        recovered = await answering_again(cluster, back)
        await prober.stop()
        run.facts.update(_answer_facts(cluster, prober, killed, back, cut=restarting), down=restarting - killed,
                         mariadbd_start=back - restarting, recovered=recovered, marks=(killed, restarting, back))
        await converge(cluster, back, run)
        run.facts.update(
            await _write_facts(cluster, prober), **await cluster.builtin.end_facts(),
            restarted=[s.name for s, pid in zip(cluster.servers, pids) if s.proc.pid != pid or s.proc.poll() is not None],
            servers=sorted(s["name"] for s in await cluster.ok("GET", "/api/v1/servers")))
    finally:
        await _teardown(cluster, db, exchange)
    return finish(cluster, run)


async def lone_restart(workdir: Path, n_agents: int = 12, n_builtin: int = BUILTIN_AGENTS) -> Run:
    run = Run("lone sqlite server restart")
    cluster = Cluster(workdir, workdir / "task-server.db", None, n_servers=1, n_agents=n_agents, n_builtin=n_builtin,
                      nginx=False)
    [server] = cluster.servers
    try:
        assigned, _ = await start_settled(cluster, n_any=8, n_tags=3, n_ids=3)
        by_id = {v: k for k, v in cluster.agent_ids.items()}
        holders = Counter(by_id[agents[0]] for agents in assigned.values())
        away = holders.most_common(1)[0][0]
        moving = [tid for tid, agents in assigned.items() if by_id[agents[0]] == away]
        before = dict(cluster.fleet.clients)
        cluster.fleet.away.add(away)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        killed = reactor.seconds()
        await until(lambda: not any(cluster.fleet.holds_socket(n) for n in cluster.fleet.names), 30, interval=0.05,
                    what="every agent's socket closed by the kill")
        await server.start(timeout=60)
        up = reactor.seconds()
        await converge(cluster, up, run)
        back = [n for n in cluster.fleet.names if n != away]
        try:  # (an agent not back yet is offline: the end state above can hold before it is)
            await until(lambda: all(map(cluster.holds_socket(), cluster.builtin.names)), CONVERGE, interval=0.2,
                        what="every builtin agent back on the restarted server")
        except AssertionError:
            pass  # reported by builtin_back
        holds = cluster.holds_socket()
        builtin_back = sorted(n for n in cluster.builtin.names if holds(n))
        shown = await cluster.online(server.base)
        after = await cluster.assignments(server.base)
        run.facts.update(
            away=away, moving=len(moving), down=up - killed, agents_back=len(back),
            reconnected=sorted(n for n in back if cluster.fleet.holds_socket(n) and cluster.fleet.clients[n] is not before[n]),
            away_online=shown.get(away), moved_to=sorted({by_id.get(a[0]) for t, a in after.items() if t in moving and a}),
            duplicates=[f"{n}: {d}" for n in back for d in duplicate_pushes(cluster.fleet.clients[n].frames)],
            duplicates_before=[f"{n}: {d}" for n, c in before.items() for d in duplicate_pushes(c.frames)],
            builtin_back=builtin_back,
            **await cluster.builtin.end_facts())
    finally:
        await cluster.stop()
    return finish(cluster, run)
