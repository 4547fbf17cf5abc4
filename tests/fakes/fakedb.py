"""In-memory fakes of the database connector's stores, for unit tests of the server.

Each fake keeps the real store's method names and signatures (tests/integration/
test_fakedb_contract.py compares them with inspect.signature and runs the same behaviour
tests on the fake and on the real store), so a unit test written against a fake cannot
call what the real store does not offer, or get an answer of another shape. They share
one state object, as the real stores share one database: opening a session puts the
agent online for the agent store too.
"""
from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Callable, Iterable, Sequence

from twisted.internet.defer import Deferred, fail, succeed

from taskd.db.agents import Agent
from taskd.db.sessions import OnlineChange
from taskd.db.taskstatus import TaskStatusRow
from taskd.errors import Conflict
from taskd.outcomes import STATUS_ERROR
from taskd.timeutil import utcnow


@dataclass
class _State:
    agents: dict[int, Agent] = field(default_factory=dict)
    sessions: dict[str, tuple[int, str]] = field(default_factory=dict)  # id -> (agent id, server)
    statuses: dict[tuple[int, int], TaskStatusRow] = field(default_factory=dict)
    task_ids: set[int] = field(default_factory=set)  # tasks that exist (statuses need one)
    ids: Iterable[int] = field(default_factory=lambda: itertools.count(1))

    def set_online(self, agent_id: int, online: bool, now: datetime) -> OnlineChange | None:
        agent = self.agents.get(agent_id)
        if agent is None or agent.online == online:
            return None
        self.agents[agent_id] = replace(agent, online=online, online_change=now)
        return OnlineChange(agent_id, agent.name, agent.org_id, online)

    def sessionless(self, agent_id: int) -> bool:
        return all(a != agent_id for a, _ in self.sessions.values())


class FakeAgentStore:
    def __init__(self, state: _State, now: Callable[[], datetime] = utcnow) -> None:
        self._state = state
        self.now = now

    def create(
        self, org_id: int, name: str, *, enabled: bool, public: bool, tags: Sequence[str]
    ) -> "Deferred[Agent]":
        if any(a.org_id == org_id and a.name == name for a in self._state.agents.values()):
            return fail(Conflict(f"an agent named {name!r} already exists in this org"))
        now = self.now()
        agent = Agent(next(self._state.ids), org_id, name, enabled, now if enabled else None, public,
                      tuple(sorted(set(tags))), False, None, now, now)
        self._state.agents[agent.id] = agent
        return succeed(agent)

    def get(self, agent_id: int) -> "Deferred[Agent | None]":
        return succeed(self._state.agents.get(agent_id))

    def get_by_name(self, org_id: int, name: str) -> "Deferred[Agent | None]":
        return succeed(next((a for a in self._state.agents.values() if (a.org_id, a.name) == (org_id, name)), None))

    def get_many_by_name(self, keys: Sequence[tuple[int, str]]) -> "Deferred[dict[tuple[int, str], Agent]]":
        wanted = set(keys)
        return succeed({(a.org_id, a.name): a for a in self._state.agents.values() if (a.org_id, a.name) in wanted})


class FakeSessionStore:
    def __init__(self, state: _State, now: Callable[[], datetime] = utcnow) -> None:
        self._state = state
        self.now = now

    def open(self, agent_id: int, *, version: int, remote_ip: str, server: str) -> "Deferred[tuple[str, OnlineChange | None]]":
        session_id = str(uuid.uuid4())
        self._state.sessions[session_id] = (agent_id, server)
        return succeed((session_id, self._state.set_online(agent_id, True, self.now())))

    def open_many(self, items: Sequence[tuple[int, int, str]], *, server: str) -> "Deferred[list[tuple[str, OnlineChange | None]]]":
        out: list = []
        for agent_id, _version, _ip in items:
            if agent_id not in self._state.agents:
                out.append((None, None))
                continue
            session_id = str(uuid.uuid4())
            self._state.sessions[session_id] = (agent_id, server)
            out.append((session_id, self._state.set_online(agent_id, True, self.now())))
        return succeed(out)

    def close(self, session_id: str, agent_id: int) -> "Deferred[OnlineChange | None]":
        self._state.sessions.pop(session_id, None)
        if self._state.sessionless(agent_id):
            return succeed(self._state.set_online(agent_id, False, self.now()))
        return succeed(None)

    def clear_server(self, server: str) -> "Deferred[list[OnlineChange]]":
        return succeed(self.clear_server_now(server))

    def clear_server_now(self, server: str) -> list[OnlineChange]:
        held = sorted({a for a, s in self._state.sessions.values() if s == server})
        self._state.sessions = {k: v for k, v in self._state.sessions.items() if v[1] != server}
        changes = [self._state.set_online(a, False, self.now()) for a in held if self._state.sessionless(a)]
        return [c for c in changes if c is not None]


class FakeStatusStore:
    def __init__(self, state: _State) -> None:
        self._state = state

    def for_task(self, task_id: int, visible_to: int | None = None) -> "Deferred[list[TaskStatusRow]]":
        rows = []
        for (t, a), row in self._state.statuses.items():
            agent = self._state.agents.get(a)
            if t != task_id or agent is None or (visible_to is not None and not agent.visible_to(visible_to)):
                continue
            rows.append(replace(row, agent_name=agent.name))
        return succeed(sorted(rows, key=lambda r: (r.agent_name, r.agent_id)))

    def failing_counts(self, agent_ids: Sequence[int]) -> "Deferred[dict[int, int]]":
        out = {a: 0 for a in agent_ids}
        for (_, a), row in self._state.statuses.items():
            if a in out and row.outcome == STATUS_ERROR:
                out[a] += 1
        return succeed(out)

    def apply(self, rows: Sequence[TaskStatusRow], removals: Iterable[tuple[int, int]],
              server: str | None = None) -> Deferred:
        held = {a for a, s in self._state.sessions.values() if server is None or s == server}
        written = 0
        for task_id, agent_id in removals:
            if agent_id in held:
                self._state.statuses.pop((task_id, agent_id), None)
        for row in rows:
            if row.agent_id in held and row.agent_id in self._state.agents and row.task_id in self._state.task_ids:
                self._state.statuses[(row.task_id, row.agent_id)] = row
                written += 1
        return succeed((written, []))


class FakeDatabase:
    """The connector's shape (`db.agents`, `db.sessions`, `db.status`) over one state."""

    def __init__(self, now: Callable[[], datetime] = utcnow) -> None:
        self._state = state = _State()
        self.agents = FakeAgentStore(state, now)
        self.sessions = FakeSessionStore(state, now)
        self.status = FakeStatusStore(state)

    def seed_task(self, task_id: int) -> None:
        """A task exists (the fake has no task store; statuses refer to tasks)."""
        self._state.task_ids.add(task_id)
