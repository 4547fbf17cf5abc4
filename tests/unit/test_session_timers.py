"""SessionManager's shared timer: heartbeats in slices (a push is never queued behind
every heartbeat), and due taskLists handed to the dispatcher (its listener) a slice at a
time, never holding back heartbeats. (What a taskList holds: test_agentview.py.)"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from taskd.db.agents import Agent
from taskd.db.tasks import Route, Task
from taskd.server import sessions as sessions_module
from taskd.server.dispatch import Dispatcher
from taskd.server.events import EventBus
from taskd.server.sessions import AgentSession, SessionManager
from taskd.wire import framing
from taskd.db.connector import Database

T0 = datetime(2024, 1, 2, 3, 4, 5)


class Transport:
    def __init__(self, log: list) -> None:
        self.log = log  # shared by all transports: the order frames were written in
        self.frames: list[tuple[str, Any]] = []

    def send_frame(self, data: bytes) -> None:
        frame = framing.decode(data)
        self.frames.append((frame.event, frame.payload))
        self.log.append((self, frame.event))

    def close(self, code: int, reason: str) -> None:
        pass


class Pool:
    def __init__(self, tasks: dict[int, list[Task]] | None = None) -> None:
        self.tasks = tasks or {}
        self.reads: list[list[int]] = []

    def do(self, fn, ids):
        assert fn.__name__ == "tasks_for_agents"
        self.reads.append(list(ids))
        return succeed({i: list(self.tasks.get(i, [])) for i in ids})


def task(task_id: int, interval: int = 60) -> Task:
    return Task(task_id, 1, f"task-{task_id}", "", {"/x": {"a": 1}}, interval, Route("byTags", {"tags": ["t"]}),
                {}, True, T0, T0)


class Turns:
    """A clock whose callLater(0, ...) calls run only at the next `turn()`, like the
    reactor's (twisted's Clock would run them all in one advance)."""

    def __init__(self) -> None:
        self.queued: list = []

    def seconds(self) -> float:
        return 0.0

    def callLater(self, delay, fn, *args):
        self.queued.append((fn, args))

    def turn(self) -> None:
        queued, self.queued = self.queued, []
        for fn, args in queued:
            fn(*args)


def make(n: int, pool: Pool, clock: Any = None) -> tuple[SessionManager, Any, list]:
    clock = clock or Clock()
    db, events, held = Database(pool), EventBus("here"), {}
    listener = Dispatcher(sessions=held, db=db, events=events, clock=clock, instance_id="here")
    manager = SessionManager(db=db, events=events, listener=listener, sessions=held, instance_id="here",
                             clock=clock)
    written: list = []
    for i in range(1, n + 1):
        agent = Agent(i, 1, f"a{i}", True, T0, True, (), True, T0, T0, T0)
        session = AgentSession(agent, 1, "10.0.0.1", Transport(written), id=f"s{i}")
        session.next_task_list = 1e9  # not due
        manager.sessions[i] = session
    return manager, clock, written


def beats(manager: SessionManager) -> int:
    return sum(1 for s in manager.sessions.values() for e, _ in s.transport.frames if e == framing.HEARTBEAT)


def test_heartbeats_go_out_a_slice_per_reactor_turn(monkeypatch):
    monkeypatch.setattr(sessions_module, "SLICE", 1000)
    manager, clock, written = make(2500, Pool(), Turns())
    done = manager.tick()
    assert beats(manager) == 1000 and not done.called
    # a push in between goes out now, not after the remaining 1,500 heartbeats
    last = manager.sessions[2500]
    last.send_frame(framing.encode_json(framing.TASK_ADD, {"id": 1}))
    assert written[-1] == (last.transport, framing.TASK_ADD)
    clock.turn()
    assert beats(manager) == 2000
    clock.turn()
    assert beats(manager) == 2500 and done.called
    assert [e for e, _ in last.transport.frames] == [framing.TASK_ADD, framing.HEARTBEAT]


def test_due_task_lists_are_read_a_slice_at_a_time(monkeypatch):
    monkeypatch.setattr(sessions_module, "SLICE", 2)
    pool = Pool()
    manager, clock, _ = make(5, pool)
    for i in (1, 2, 4, 5):
        manager.sessions[i].next_task_list = 0.0
    done = manager.tick()
    clock.advance(0)
    clock.advance(0)
    assert done.called
    assert pool.reads == [[1, 2], [4, 5]]
    assert [e for e, _ in manager.sessions[3].transport.frames] == [framing.HEARTBEAT]
    assert [e for e, _ in manager.sessions[5].transport.frames] == [framing.HEARTBEAT, framing.TASK_LIST]


class StalledPool(Pool):
    """A database that does not answer until the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Deferred] = []

    def do(self, fn, ids):
        assert fn.__name__ == "tasks_for_agents"
        self.reads.append(list(ids))
        self.held.append(Deferred())
        return self.held[-1]


def test_heartbeats_never_wait_for_the_database():
    """A stalled taskList read must not hold back the next heartbeats: without them,
    every agent's watchdog would drop its connection at once."""
    pool = StalledPool()
    manager, clock, _ = make(3, pool)
    for session in manager.sessions.values():
        session.next_task_list = 0.0  # all due
    manager.startService()
    try:
        for _ in range(5):
            clock.advance(manager.heartbeat_interval)
        assert beats(manager) == 15
        assert pool.reads == [[1, 2, 3]]  # one round of taskLists at a time
        pool.held[0].callback({i: [] for i in (1, 2, 3)})
        assert all(s.transport.frames[-1][0] == framing.TASK_LIST for s in manager.sessions.values())
        manager.sessions[2].next_task_list = 0.0
        clock.advance(manager.heartbeat_interval)
        assert beats(manager) == 18 and pool.reads == [[1, 2, 3], [2]]  # the next round, once that one ended
    finally:
        manager._ticker.stop()
