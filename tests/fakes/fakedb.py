"""In-memory fakes of the database connector's stores, for unit tests of the server.

One fake per store of taskd.db.connector.Database, and `FakeDatabase` with the same six
attributes. Each fake keeps the real store's method names and signatures
(tests/integration/test_fakedb_contract.py compares them with inspect.signature and runs
the same behaviour tests on the fake and on the real store), so a unit test written
against a fake cannot call what the real store does not offer, or get an answer of
another shape. They share one state object, as the real stores share one database:
opening a session puts the agent online for the agent store and for routing too, and
routing applies taskd.routing's rule to that state as the real queries do.

A test decides what the database holds (the stores' own writes, or FakeDatabase's
`add_agent`/`put_task`/...), never which answer a call gets; for ordering questions it
may hold a method's answers (`hold`) or fail its next call (`fail_next`), and it reads
which calls were made with `called`. Methods are named by the bound method itself
(`db.routes.snapshot`), so a misspelt one is an AttributeError, not a silent default.
"""
from __future__ import annotations

import functools
import inspect
import itertools
import random
import re
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from types import MethodType
from typing import Any, Callable, Iterable, Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from taskd.db.agents import Agent, AgentFilter
from taskd.db.catalog import Metric, MetricFilter
from taskd.db.listing import Page
from taskd.db.routes import TaskDetail
from taskd.db.servers import Reaped, ServerInstance
from taskd.db.sessions import OnlineChange
from taskd.db.taskstatus import TaskStatusRow
from taskd.db.tasks import Task, TaskFilter, TaskSpec
from taskd.errors import Conflict, Forbidden, Invalid, NotFound
from taskd.outcomes import STATUS_ERROR
from taskd.routing import ANY, BY_IDS, Candidate, can_run, covers, pick, routes_to, selects
from taskd.timeutil import utcnow


# -- holding and recording calls ----------------------------------------------------------

def _outcome(d: Any) -> tuple[bool, Any]:
    """(ok, value or Failure) of an already fired Deferred (every fake answers at once)."""
    if not isinstance(d, Deferred):
        return True, d
    box: list = []
    d.addCallbacks(lambda v: box.append((True, v)), lambda f: box.append((False, f)))
    assert box, "a fake store answered with an unfired Deferred"
    return box[0]


class Held:
    """The answers of one store method, waiting for the test to deliver them. `early`:
    each call's transaction runs when it is called (the answer, read then, arrives
    later); otherwise it runs only when released, and `fail` means it never ran."""

    def __init__(self, calls: int | None, early: bool) -> None:
        self.left, self.early = calls, early
        self.waiting: list[tuple[tuple, Callable[[], Any], tuple[bool, Any] | None, Deferred]] = []

    def takes(self) -> bool:
        if self.left is None:
            return True
        if self.left == 0:
            return False
        self.left -= 1
        return True

    def add(self, args: tuple, run: Callable[[], Any]) -> Deferred:
        answer: Deferred = Deferred()
        self.waiting.append((args, run, _outcome(run()) if self.early else None, answer))
        return answer

    def args(self) -> list[tuple]:
        """The arguments of the calls still waiting, oldest first."""
        return [args for args, _, _, _ in self.waiting]

    def release(self, index: int = 0) -> Any:
        """Deliver one waiting answer (running its call now unless `early`); returns it."""
        _, run, outcome, answer = self.waiting.pop(index)
        ok, value = outcome if outcome is not None else _outcome(run())
        (answer.callback if ok else answer.errback)(value)
        return value

    def fail(self, exc: Exception, index: int = 0) -> None:
        """The call's transaction failed: its caller gets `exc`."""
        assert not self.early, "an early call already ran; hold with early=False to fail one"
        self.waiting.pop(index)[3].errback(exc)


def recorded(method: Callable) -> Callable:
    """Record a public fake method's calls (arguments bound to the real signature, so a
    call the real store would refuse fails here too) and apply holds and failures."""
    sig = inspect.signature(method)

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = self._state
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        given = tuple(bound.arguments.values())[1:]
        me = MethodType(call, self)
        state.calls.append((me, given))
        if me in state.failing:
            return fail(state.failing.pop(me))
        held = state.holds.get(me)
        if held is not None and held.takes():
            return held.add(given, lambda: method(self, *args, **kwargs))
        return method(self, *args, **kwargs)

    return call


# -- the shared state: the database's rows --------------------------------------------------

@dataclass
class _OrgMetric:
    id: int
    public: bool
    policy: Any
    created: datetime


@dataclass
class _State:
    now: Callable[[], datetime]
    rng: random.Random
    agents: dict[int, Agent] = field(default_factory=dict)
    agent_metrics: dict[int, dict[tuple[str, int], datetime]] = field(default_factory=dict)
    org_metrics: dict[int, dict[tuple[str, int], _OrgMetric]] = field(default_factory=dict)
    sessions: dict[str, tuple[int, str]] = field(default_factory=dict)  # id -> (agent id, server)
    statuses: dict[tuple[int, int], TaskStatusRow] = field(default_factory=dict)
    tasks: dict[int, Task] = field(default_factory=dict)
    any_index: dict[int, int] = field(default_factory=dict)  # `any` task id -> its agent
    tokens: dict[int, str] = field(default_factory=dict)  # agent id -> its token's hash
    ids: Iterable[int] = field(default_factory=lambda: itertools.count(1))
    calls: list[tuple[MethodType, tuple]] = field(default_factory=list)
    holds: dict[MethodType, Held] = field(default_factory=dict)
    failing: dict[MethodType, Exception] = field(default_factory=dict)

    def set_online(self, agent_id: int, online: bool, now: datetime) -> OnlineChange | None:
        agent = self.agents.get(agent_id)
        if agent is None or agent.online == online:
            return None
        self.agents[agent_id] = replace(agent, online=online, online_change=now)
        return OnlineChange(agent_id, agent.name, agent.org_id, online)

    def sessionless(self, agent_id: int) -> bool:
        return all(a != agent_id for a, _ in self.sessions.values())

    def drop_agent(self, agent_id: int) -> Agent | None:
        """The agent goes, and with it its tags, sessions, metrics, assignments and
        statuses; the org catalog drops what only it gave (as the database cascades)."""
        old = self.agents.pop(agent_id, None)
        if old is not None:
            self.agent_metrics.pop(agent_id, None)
            self.any_index = {t: a for t, a in self.any_index.items() if a != agent_id}
            self.sessions = {k: v for k, v in self.sessions.items() if v[0] != agent_id}
            self.statuses = {k: v for k, v in self.statuses.items() if k[1] != agent_id}
            self.refresh_org_catalog(old.org_id, self.now(), {})
        return old

    def status_rows(self, task_id: int, visible_to: int | None) -> list[TaskStatusRow]:
        rows = []
        for (t, a), row in self.statuses.items():
            agent = self.agents.get(a)
            if t == task_id and agent is not None and (visible_to is None or agent.visible_to(visible_to)):
                rows.append(replace(row, agent_name=agent.name))
        return sorted(rows, key=lambda r: (r.agent_name, r.agent_id))

    # routing, with taskd.routing's rule, as taskd/db/routes.py applies it in SQL
    def candidate(self, agent_id: int) -> Candidate | None:
        a = self.agents.get(agent_id)
        if a is None:
            return None
        return Candidate(a.id, a.org_id, a.public, a.online, frozenset(a.tags),
                         frozenset(self.agent_metrics.get(a.id, {})))

    def candidates(self, keep: Callable[[Candidate], bool] = lambda c: True) -> list[Candidate]:
        found = (self.candidate(i) for i in sorted(self.agents))
        return [c for c in found if c is not None and keep(c)]

    def routed(self, task: Task) -> set[int]:
        if task.route.type == ANY:
            return {self.any_index[task.id]} if task.id in self.any_index else set()
        r = task.route
        return {c.id for c in self.candidates()
                if routes_to(r.type, r.ids, r.tags, task.org_id, task.metrics, c)}

    def ensure_any(self, task: Task) -> None:
        if task.route.type != ANY:
            self.any_index.pop(task.id, None)
            return
        current = self.candidate(self.any_index.get(task.id, -1))
        if current is not None and can_run(current, task.org_id, task.metrics):
            return
        self.any_index.pop(task.id, None)
        chosen = pick(self.candidates(lambda c: can_run(c, task.org_id, task.metrics)), self.rng)
        if chosen is not None:
            self.any_index[task.id] = chosen.id

    def move_any(self, agent_id: int, tasks: Sequence[Task]) -> list[tuple[Task, int | None]]:
        moved = []
        for task in tasks:
            chosen = pick(self.candidates(lambda c: c.id != agent_id and can_run(c, task.org_id, task.metrics)),
                          self.rng)
            if chosen is None:
                self.any_index.pop(task.id, None)
            else:
                self.any_index[task.id] = chosen.id
            moved.append((task, chosen.id if chosen else None))
        return moved

    def sweep_any(self, offline_for: float) -> tuple[list[tuple[Task, int | None]], list[Task]]:
        cutoff = self.now() - timedelta(seconds=offline_for)
        stale = sorted({a for t, a in self.any_index.items() if self.tasks[t].enabled
                        and (agent := self.agents.get(a)) is not None and not agent.online
                        and (agent.online_change is None or agent.online_change <= cutoff)})
        moved = []
        for agent_id in stale:
            moved.extend(self.move_any(agent_id, [t for t in self.any_tasks_of(agent_id) if t.enabled]))
        return moved, self.assign_unassigned(None)

    def any_tasks_of(self, agent_id: int) -> list[Task]:
        return [self.tasks[t] for t, a in sorted(self.any_index.items()) if a == agent_id]

    def release_unqualified(self, agent_id: int) -> list[tuple[Task, int | None]]:
        agent = self.candidate(agent_id)
        if agent is None or not agent.online:
            return []
        return self.move_any(agent_id, [t for t in self.any_tasks_of(agent_id)
                                        if not can_run(agent, t.org_id, t.metrics)])

    def assign_unassigned(self, agent_ids: Sequence[int] | None) -> list[Task]:
        among = None if agent_ids is None else set(agent_ids)
        online = self.candidates(lambda c: c.online and (among is None or c.id in among))
        assigned = []
        for task in sorted(self.tasks.values(), key=lambda t: t.id):
            if task.route.type != ANY or task.id in self.any_index:
                continue
            chosen = pick([c for c in online if can_run(c, task.org_id, task.metrics)], self.rng)
            if chosen is not None:
                self.any_index[task.id] = chosen.id
                assigned.append(task)
        return assigned

    def refresh_org_catalog(self, org_id: int, now: datetime, policies: dict[tuple[str, int], Any]) -> None:
        wanted: dict[tuple[str, int], bool] = {}
        for agent in self.agents.values():
            if agent.org_id == org_id:
                for key in self.agent_metrics.get(agent.id, {}):
                    wanted[key] = wanted.get(key, False) or agent.public
        have = self.org_metrics.setdefault(org_id, {})
        for key in have.keys() - wanted.keys():
            del have[key]
        for key, public in wanted.items():
            row = have.get(key)
            if row is None:
                have[key] = _OrgMetric(next(self.ids), public, policies.get(key), now)
            else:
                row.public, row.policy = public, policies.get(key, row.policy)


def _matches(pattern: str, value: str) -> bool:
    """taskd.db.listing.match: `*` is the only wildcard, the rest is literal."""
    if "*" not in pattern:
        return pattern == value
    return re.fullmatch(".*".join(re.escape(p) for p in pattern.split("*")), value, re.DOTALL) is not None


def _page(rows: list, page: Page, key: Callable[[Any], Any], tiebreak: Callable[[Any], Any]) -> list:
    """taskd.db.listing.paginate: ordered by the column (either way), ties by id ascending."""
    rows = sorted(rows, key=tiebreak)
    rows.sort(key=key, reverse=page.descending)  # stable: ties keep the ascending id order
    start = (page.page - 1) * page.limit
    return rows[start:start + page.limit]


class _Fake:
    def __init__(self, state: _State) -> None:
        self._state = state


# -- the stores ------------------------------------------------------------------------------

class FakeAgentStore(_Fake):
    @recorded
    def create(
        self, org_id: int, name: str, *, enabled: bool, public: bool, tags: Sequence[str],
        max_per_org: int | None = None,
    ) -> "Deferred[Agent]":
        if any(a.org_id == org_id and a.name == name for a in self._state.agents.values()):
            return fail(Conflict(f"an agent named {name!r} already exists in this org; choose another name"))
        count = sum(a.org_id == org_id for a in self._state.agents.values())
        if max_per_org is not None and count >= max_per_org:
            return fail(Forbidden(f"org {org_id} already has {count} agents, the most this server allows"
                                  " (max-agents-per-org); delete one first"))
        now = self._state.now()
        agent = Agent(next(self._state.ids), org_id, name, enabled, now if enabled else None, public,
                      tuple(sorted(set(tags))), False, None, now, now)
        self._state.agents[agent.id] = agent
        return succeed(agent)

    @recorded
    def get(self, agent_id: int) -> "Deferred[Agent | None]":
        return succeed(self._state.agents.get(agent_id))

    @recorded
    def get_many(self, agent_ids: Sequence[int]) -> "Deferred[dict[int, Agent]]":
        return succeed({i: self._state.agents[i] for i in agent_ids if i in self._state.agents})

    @recorded
    def get_by_name(self, org_id: int, name: str) -> "Deferred[Agent | None]":
        return succeed(next((a for a in self._state.agents.values() if (a.org_id, a.name) == (org_id, name)), None))

    @recorded
    def get_many_by_name(self, keys: Sequence[tuple[int, str]], *,
                         waited: float = 0.0) -> "Deferred[dict[tuple[int, str], Agent]]":
        wanted = set(keys)
        return succeed({(a.org_id, a.name): a for a in self._state.agents.values() if (a.org_id, a.name) in wanted})


    @recorded
    def list(self, org_id: int, flt: AgentFilter, page: Page) -> "Deferred[list[Agent]]":
        state = self._state
        if flt.public is True:
            seen = lambda a: a.public  # noqa: E731
        elif flt.public is False:
            seen = lambda a: a.org_id == org_id and not a.public  # noqa: E731
        else:
            seen = lambda a: a.visible_to(org_id)  # noqa: E731
        rows = [a for a in state.agents.values() if seen(a)
                and (flt.name is None or _matches(flt.name, a.name))
                and (flt.enabled is None or a.enabled == flt.enabled)
                and (not flt.tags or not set(flt.tags).isdisjoint(a.tags_for(org_id)))
                and (flt.metric is None or any(_matches(flt.metric, ns) for ns, _ in state.agent_metrics.get(a.id, {})))]
        attr = AGENT_ORDER[page.order_by]
        # NULL sorts first ascending (sqlite and MySQL alike), so last descending
        return succeed(_page(rows, page, lambda a: (getattr(a, attr) is not None, getattr(a, attr) or 0),
                             lambda a: a.id))

    @recorded
    def update(
        self, agent_id: int, *, name: str, enabled: bool, public: bool, tags: Sequence[str]
    ) -> "Deferred[tuple[Agent, Agent]]":
        state, now = self._state, self._state.now()
        old = state.agents.get(agent_id)
        if old is None:
            return fail(NotFound(f"agent {agent_id} does not exist"))
        if any(a.org_id == old.org_id and a.name == name and a.id != agent_id for a in state.agents.values()):
            return fail(Conflict(f"an agent named {name!r} already exists in this org; choose another name"))
        new = state.agents[agent_id] = replace(
            old, name=name, enabled=enabled, public=public, tags=tuple(sorted(set(tags))), updated=now,
            enabled_change=now if enabled != old.enabled else old.enabled_change)
        if public != old.public:  # the agent's catalog entries follow its visibility
            state.refresh_org_catalog(old.org_id, now, {})
        return succeed((old, new))

    @recorded
    def set_org_tags(self, agent_id: int, org_id: int, tags: Sequence[str]) -> "Deferred[tuple[Agent, Agent]]":
        state = self._state
        old = state.agents.get(agent_id)
        if old is None or not old.visible_to(org_id):
            return fail(NotFound(f"agent {agent_id} does not exist"))
        kept = tuple(pair for pair in old.org_tags if pair[0] != org_id)
        new = state.agents[agent_id] = replace(
            old, org_tags=tuple(sorted(kept + tuple((org_id, t) for t in set(tags)))))
        return succeed((old, new))

    @recorded
    def delete(self, agent_id: int) -> "Deferred[Agent | None]":
        self._state.tokens.pop(agent_id, None)
        return succeed(self._state.drop_agent(agent_id))

    @recorded
    def set_token(self, agent_id: int, token_hash: str) -> "Deferred[bool]":
        if agent_id not in self._state.agents:
            return succeed(False)
        self._state.tokens[agent_id] = token_hash
        return succeed(True)

    @recorded
    def by_token(self, token_hash: str) -> "Deferred[Agent | None]":
        agent_id = next((a for a, h in self._state.tokens.items() if h == token_hash), None)
        return succeed(self._state.agents.get(agent_id) if agent_id is not None else None)


AGENT_ORDER = {"id": "id", "name": "name", "enabled": "enabled", "enabledChange": "enabled_change",
               "public": "public", "online": "online", "onlineChange": "online_change",
               "created": "created", "updated": "updated"}


class FakeSessionStore(_Fake):
    def _open(self, agent_id: int, server: str) -> tuple[str, OnlineChange | None]:
        session_id = str(uuid.uuid4())
        self._state.sessions = {k: v for k, v in self._state.sessions.items()  # the newest wins
                                if not (v[0] == agent_id and v[1] != server)}
        self._state.sessions[session_id] = (agent_id, server)
        return session_id, self._state.set_online(agent_id, True, self._state.now())

    @recorded
    def open(self, agent_id: int, *, version: int, remote_ip: str, server: str) -> "Deferred[tuple[str, OnlineChange | None]]":
        return succeed(self._open(agent_id, server))

    @recorded
    def open_many(self, items: Sequence[tuple[int, int, str]], *, server: str) -> "Deferred[list[tuple[str, OnlineChange | None]]]":
        return succeed([self._open(agent_id, server) if agent_id in self._state.agents else (None, None)
                        for agent_id, _version, _ip in items])

    @recorded
    def close(self, session_id: str, agent_id: int) -> "Deferred[OnlineChange | None]":
        self._state.sessions.pop(session_id, None)
        if self._state.sessionless(agent_id):
            return succeed(self._state.set_online(agent_id, False, self._state.now()))
        return succeed(None)

    @recorded
    def clear_server(self, server: str) -> "Deferred[list[OnlineChange]]":
        return succeed(self._clear(server))

    @recorded
    def clear_server_now(self, server: str) -> list[OnlineChange]:
        return self._clear(server)

    def _clear(self, server: str) -> list[OnlineChange]:
        state = self._state
        held = sorted({a for a, s in state.sessions.values() if s == server})
        state.sessions = {k: v for k, v in state.sessions.items() if v[1] != server}
        changes = [state.set_online(a, False, state.now()) for a in held if state.sessionless(a)]
        return [c for c in changes if c is not None]


class FakeStatusStore(_Fake):
    @recorded
    def for_task(self, task_id: int, visible_to: int | None = None) -> "Deferred[list[TaskStatusRow]]":
        return succeed(self._state.status_rows(task_id, visible_to))

    @recorded
    def failing_counts(self, agent_ids: Sequence[int]) -> "Deferred[dict[int, tuple[int, int]]]":
        """(failing, stale); the fake judges no staleness (taskd.db.staleness is tested
        on the real stores: tests/integration/test_staleness.py)."""
        out = {a: 0 for a in agent_ids}
        for (_, a), row in self._state.statuses.items():
            if a in out and row.outcome == STATUS_ERROR:
                out[a] += 1
        return succeed({a: (n, 0) for a, n in out.items()})

    @recorded
    def apply(self, rows: Sequence[TaskStatusRow], removals: Iterable[tuple[int, int]],
              server: str | None = None) -> Deferred:
        state = self._state
        held = {a for a, s in state.sessions.values() if server is None or s == server}
        written = 0
        for task_id, agent_id in removals:
            if agent_id in held:
                state.statuses.pop((task_id, agent_id), None)
        for row in rows:
            if row.agent_id in held and row.agent_id in state.agents and row.task_id in state.tasks:
                state.statuses[(row.task_id, row.agent_id)] = row
                written += 1
        return succeed((written, []))


TASK_ORDER = {"id": "id", "name": "name", "taskType": "task_type", "interval": "interval",
              "enabled": "enabled", "created": "created", "updated": "updated"}


class FakeTaskStore(_Fake):
    def _check(self, org_id: int, spec: TaskSpec, except_id: int | None = None) -> None:
        state = self._state
        if any(t.org_id == org_id and t.name == spec.name and t.id != except_id for t in state.tasks.values()):
            raise Conflict(f"a task named {spec.name!r} already exists in this org; choose another name")
        if spec.route.type == BY_IDS:
            missing = sorted(i for i in set(spec.route.ids)
                             if i not in state.agents or not state.agents[i].visible_to(org_id))
            if missing:
                raise Invalid("route.config.ids: no agent visible to this org has id "
                              + ", ".join(str(i) for i in missing))

    def _own(self, org_id: int, task_id: int) -> Task:
        task = self._state.tasks.get(task_id)
        if task is None or task.org_id != org_id:
            raise NotFound(f"task {task_id} does not exist in this org")
        return task

    def _write(self, task_id: int, org_id: int, spec: TaskSpec, created: datetime, now: datetime) -> Task:
        task = Task(task_id, org_id, spec.name, spec.task_type, spec.config, spec.interval,
                    replace(spec.route), dict(sorted(spec.metrics.items())), spec.enabled, created, now)
        self._state.tasks[task_id] = task
        self._state.ensure_any(task)  # in the same transaction, as TaskStore does
        return task

    @recorded
    def create(self, org_id: int, spec: TaskSpec) -> "Deferred[Task]":
        try:
            self._check(org_id, spec)
        except (Conflict, Invalid) as exc:
            return fail(exc)
        now = self._state.now()
        return succeed(self._write(next(self._state.ids), org_id, spec, now, now))

    @recorded
    def update(self, org_id: int, task_id: int, spec: TaskSpec) -> "Deferred[tuple[Task, Task]]":
        try:
            old = self._own(org_id, task_id)
            self._check(org_id, spec, except_id=task_id)
        except (NotFound, Conflict, Invalid) as exc:
            return fail(exc)
        return succeed((old, self._write(task_id, org_id, spec, old.created, self._state.now())))

    @recorded
    def delete(self, org_id: int, task_id: int) -> "Deferred[Task]":
        try:
            old = self._own(org_id, task_id)
        except NotFound as exc:
            return fail(exc)
        state = self._state
        del state.tasks[task_id]
        state.any_index.pop(task_id, None)
        state.statuses = {k: v for k, v in state.statuses.items() if k[0] != task_id}
        return succeed(old)

    @recorded
    def count_by_enabled(self) -> "Deferred[tuple[int, int]]":
        enabled = sum(1 for t in self._state.tasks.values() if t.enabled)
        return succeed((enabled, len(self._state.tasks) - enabled))

    @recorded
    def list(self, org_id: int, flt: TaskFilter, page: Page) -> "Deferred[list[Task]]":
        rows = [t for t in self._state.tasks.values() if t.org_id == org_id
                and (flt.name is None or _matches(flt.name, t.name))
                and (flt.enabled is None or t.enabled == flt.enabled)
                and (flt.metric is None or any(_matches(flt.metric, ns) for ns in t.metrics))]
        attr = TASK_ORDER[page.order_by]
        return succeed(_page(rows, page, lambda t: getattr(t, attr), lambda t: t.id))


METRIC_ORDER = {"namespace": "namespace", "version": "version", "created": "created", "public": "public"}


class FakeCatalogStore(_Fake):
    @recorded
    def list(self, org_id: int, flt: MetricFilter, page: Page) -> "Deferred[list[Metric]]":
        rows = [(row.id, Metric(ns, ver, row.policy, row.public, row.created))
                for org, metrics in self._state.org_metrics.items() for (ns, ver), row in metrics.items()
                if (org == org_id or row.public)
                and (flt.namespace is None or _matches(flt.namespace, ns))
                and (flt.version is None or ver == flt.version)]
        attr = METRIC_ORDER[page.order_by]
        return succeed([m for _, m in _page(rows, page, lambda r: getattr(r[1], attr), lambda r: r[0])])

    @recorded
    def agent_metrics(self, agent_id: int) -> "Deferred[list[Metric]]":
        agent = self._state.agents.get(agent_id)
        if agent is None:
            return succeed([])
        org = self._state.org_metrics.get(agent.org_id, {})
        return succeed([Metric(ns, ver, org[(ns, ver)].policy if (ns, ver) in org else None, agent.public, created)
                        for (ns, ver), created in sorted(self._state.agent_metrics.get(agent_id, {}).items())])

    @recorded
    def replace_agent_catalog(self, agent_id: int, records: Iterable[tuple[str, int, Any]]) -> "Deferred[int]":
        records = list(records)
        state, now = self._state, self._state.now()
        agent = state.agents.get(agent_id)
        if agent is None:
            return succeed(0)
        wanted = {(ns, ver) for ns, ver, _ in records}
        have = state.agent_metrics.get(agent_id, {})
        state.agent_metrics[agent_id] = {k: have.get(k, now) for k in wanted}
        state.refresh_org_catalog(agent.org_id, now, {(ns, ver): p for ns, ver, p in records if p is not None})
        return succeed(len(wanted))


class FakeRouteStore(_Fake):
    @recorded
    def capable(self, org_id: int, metrics: dict[str, int]) -> "Deferred[list[int]]":
        found = [c for c in self._state.candidates() if can_run(c, org_id, metrics)]
        return succeed([c.id for c in sorted(found, key=lambda c: (c.org_id != org_id, c.id))])

    @recorded
    def snapshot(self, task_id: int) -> "Deferred[tuple[Task | None, set[int]]]":
        task = self._state.tasks.get(task_id)
        return succeed((None, set()) if task is None else (task, self._state.routed(task)))

    @recorded
    def task_detail(self, org_id: int, task_id: int) -> "Deferred[TaskDetail | None]":
        task = self._state.tasks.get(task_id)
        if task is None or task.org_id != org_id:
            return succeed(None)
        return succeed(TaskDetail(task, sorted(self._state.routed(task)), self._state.status_rows(task.id, org_id)))

    @recorded
    def tasks_for_agents(self, agent_ids: Sequence[int]) -> "Deferred[dict[int, list[Task]]]":
        """As the route indexes hold them: named by id or tag (online or not), or the
        `any` assignee; enabled; covered by the agent's catalog; by task name."""
        state = self._state
        out: dict[int, list[Task]] = {i: [] for i in agent_ids}
        for agent_id in out:
            agent = state.candidate(agent_id)
            if agent is None:
                continue
            for task in sorted(state.tasks.values(), key=lambda t: t.name):
                r = task.route
                named = state.any_index.get(task.id) == agent_id if r.type == ANY else \
                    selects(r.type, r.ids, r.tags, task.org_id, agent)
                if named and task.enabled and covers(agent.catalog, task.metrics):
                    out[agent_id].append(task)
        return succeed(out)

    @recorded
    def release_unqualified(self, agent_id: int) -> "Deferred[list[tuple[Task, int | None]]]":
        return succeed(self._state.release_unqualified(agent_id))

    @recorded
    def assign_unassigned(self, agent_ids: Sequence[int] | None = None) -> "Deferred[list[Task]]":
        return succeed(self._state.assign_unassigned(agent_ids))

    @recorded
    def connect_assignments(self, agent_ids: Sequence[int]) -> Deferred:
        """See `connect_assignments`: (moved, assigned, catalogs, agents)."""
        state = self._state
        moved = [m for i in sorted(set(agent_ids)) for m in state.release_unqualified(i)]
        assigned = [(t, state.any_index.get(t.id)) for t in state.assign_unassigned(agent_ids)]
        catalogs = {i: frozenset(state.agent_metrics.get(i, {})) for i in agent_ids}
        return succeed((moved, assigned, catalogs, {i: state.agents[i] for i in agent_ids if i in state.agents}))

    @recorded
    def sweep_any(self, offline_for: float) -> "Deferred[tuple[list[tuple[Task, int | None]], list[Task]]]":
        return succeed(self._state.sweep_any(offline_for))

    @recorded
    def relocate_from(self, agent_id: int) -> "Deferred[list[tuple[Task, int | None]]]":
        agent = self._state.agents.get(agent_id)
        if agent is not None and agent.online:
            return succeed([])
        return succeed(self._state.move_any(agent_id, self._state.any_tasks_of(agent_id)))


# -- the connector ---------------------------------------------------------------------------

class FakeServerStore:
    """`db.servers`: server instance rows (taskd.server.liveness); a reap clears the dead
    run's sessions as the real store does, unless a newer run of that name exists."""

    def __init__(self, state: _State) -> None:
        self._state = state
        self._instances: dict[str, ServerInstance] = {}

    def _clear(self, name: str) -> list[OnlineChange]:
        return FakeSessionStore(self._state)._clear(name)

    @recorded
    def take_over_now(self, name: str) -> tuple[list[ServerInstance], list[OnlineChange]]:
        previous = [i for i in self._instances.values() if i.name == name]
        for instance in previous:
            del self._instances[instance.id]
        return previous, self._clear(name)

    @recorded
    def register(self, instance: ServerInstance) -> "Deferred[None]":
        self._instances[instance.id] = instance
        return succeed(None)

    @recorded
    def beat(self, instance_id: str) -> "Deferred[bool]":
        instance = self._instances.get(instance_id)
        if instance is None:
            return succeed(False)
        self._instances[instance_id] = replace(instance, last_seen=self._state.now())
        return succeed(True)

    @recorded
    def silent(self, cutoff: datetime, *, exclude: str) -> "Deferred[list[ServerInstance]]":
        return succeed(sorted((i for i in self._instances.values() if i.last_seen < cutoff and i.id != exclude),
                              key=lambda i: i.last_seen))

    @recorded
    def reap(self, instance: ServerInstance, cutoff: datetime) -> "Deferred[Reaped | None]":
        current = self._instances.get(instance.id)
        if current is None or not current.last_seen < cutoff:
            return succeed(None)
        del self._instances[instance.id]
        successor = any(i.name == instance.name for i in self._instances.values())
        return succeed(Reaped(instance, [] if successor else self._clear(instance.name)))

    @recorded
    def unregister(self, instance_id: str) -> "Deferred[None]":
        self._instances.pop(instance_id, None)
        return succeed(None)

    @recorded
    def live(self, cutoff: datetime) -> "Deferred[list[ServerInstance]]":
        held = [server for _agent, server in self._state.sessions.values()]
        return succeed([replace(i, agents=held.count(i.name))
                        for i in sorted(self._instances.values(), key=lambda i: (i.name, i.started))
                        if i.last_seen >= cutoff])


class FakeDatabase:
    """The connector's shape (`db.tasks`, `db.agents`, `db.catalog`, `db.sessions`,
    `db.status`, `db.routes`, `db.servers`) over one state, plus what a test needs to set that state up
    and to watch and time the calls."""

    def __init__(self, now: Callable[[], datetime] = utcnow, rng: random.Random | None = None) -> None:
        self._state = state = _State(now, rng or random.Random(0))
        self.tasks = FakeTaskStore(state)
        self.agents = FakeAgentStore(state)
        self.catalog = FakeCatalogStore(state)
        self.sessions = FakeSessionStore(state)
        self.status = FakeStatusStore(state)
        self.routes = FakeRouteStore(state)
        self.servers = FakeServerStore(state)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    # -- the state, as a test sets it up (the objects given are the ones answers return)
    def add_agent(self, agent: Agent, catalog: Iterable[tuple[str, int]] = ()) -> Agent:
        """Store `agent` as it is (or replace the stored one of its id), advertising `catalog`."""
        self._state.agents[agent.id] = agent
        self._state.agent_metrics[agent.id] = {key: agent.created for key in catalog}
        return agent

    def drop_agent(self, agent_id: int) -> None:
        """Delete the agent, as `agents.delete` does (without recording a call)."""
        self._state.drop_agent(agent_id)

    def put_task(self, task: Task, assignee: int | None = None) -> Task:
        """Store `task` as it is (or replace the one of its id); an `any` task is given to
        `assignee` (None: to nobody)."""
        assert assignee is None or task.route.type == ANY, "only an `any` task has an assignee"
        self._state.tasks[task.id] = task
        self._state.any_index.pop(task.id, None)
        if assignee is not None:
            self._state.any_index[task.id] = assignee
        return task

    def drop_task(self, task_id: int) -> None:
        self._state.tasks.pop(task_id, None)
        self._state.any_index.pop(task_id, None)

    # -- the calls
    def called(self, method: Callable) -> list[tuple]:
        """The arguments (bound to the signature, defaults filled) of each call of `method`."""
        return [args for m, args in self._state.calls if m == method]

    def calls_to(self, *methods: Callable) -> list[Callable]:
        """Which of `methods` were called, in order."""
        return [m for m, _ in self._state.calls if m in methods]

    def hold(self, method: Callable, calls: int | None = None, *, early: bool = True) -> Held:
        """Hold the answers of the next `calls` calls of `method` (None: all) until the
        test releases them (see Held)."""
        held = self._state.holds[method] = Held(calls, early)
        return held

    def fail_next(self, method: Callable, exc: Exception) -> None:
        """The next call of `method` fails with `exc` without running (a failed transaction)."""
        self._state.failing[method] = exc
