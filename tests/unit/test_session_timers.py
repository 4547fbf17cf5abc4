"""SessionManager's shared timer: heartbeats in slices (a push is never queued behind
every heartbeat), and due taskLists handed to the dispatcher (its listener) a slice at a
time, never holding back heartbeats. (What a taskList holds: test_agentview.py.)"""
from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from taskd.db.agents import Agent
from taskd.server import sessions as sessions_module
from taskd.server.dispatch import Dispatcher
from taskd.server.events import EventBus
from taskd.server.agentsession import AgentSession
from taskd.server.sessions import SessionManager
from taskd.wire import framing

from tests.fakes.fakedb import FakeDatabase
from tests.unit.session_rig import T0, Transport, task_list_reads


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


def make(n: int, db: FakeDatabase, clock: Any = None) -> tuple[SessionManager, Any, list]:
    clock = clock or Clock()
    events, held = EventBus("here"), {}
    listener = Dispatcher(sessions=held, db=db, events=events, clock=clock, instance_id="here")
    manager = SessionManager(db=db, events=events, listener=listener, sessions=held, instance_id="here",
                             clock=clock)
    written: list = []
    for i in range(1, n + 1):
        agent = db.add_agent(Agent(i, 1, f"a{i}", True, T0, True, (), True, T0, T0, T0))
        session = AgentSession(agent, 1, "10.0.0.1", Transport(written), id=f"s{i}")
        session.next_task_list = 1e9  # not due
        manager.sessions[i] = session
    return manager, clock, written


def beats(manager: SessionManager) -> int:
    return sum(1 for s in manager.sessions.values() for e, _ in s.transport.frames if e == framing.HEARTBEAT)


def test_heartbeats_go_out_a_slice_per_reactor_turn(monkeypatch):
    monkeypatch.setattr(sessions_module, "SLICE", 1000)
    manager, clock, written = make(2500, FakeDatabase(), Turns())
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
    db = FakeDatabase()
    manager, clock, _ = make(5, db)
    for i in (1, 2, 4, 5):
        manager.sessions[i].next_task_list = 0.0
    done = manager.tick()
    clock.advance(0)
    clock.advance(0)
    assert done.called
    assert task_list_reads(db) == [[1, 2], [4, 5]]
    assert [e for e, _ in manager.sessions[3].transport.frames] == [framing.HEARTBEAT]
    assert [e for e, _ in manager.sessions[5].transport.frames] == [framing.HEARTBEAT, framing.TASK_LIST]


def test_heartbeats_never_wait_for_the_database():
    """A stalled taskList read must not hold back the next heartbeats: without them,
    every agent's watchdog would drop its connection at once."""
    db = FakeDatabase()
    held = db.hold(db.routes.tasks_for_agents)
    manager, clock, _ = make(3, db)
    for session in manager.sessions.values():
        session.next_task_list = 0.0  # all due
    manager.startService()
    try:
        for _ in range(5):
            clock.advance(manager.heartbeat_interval)
        assert beats(manager) == 15
        assert task_list_reads(db) == [[1, 2, 3]]  # one round of taskLists at a time
        assert held.release() == {i: [] for i in (1, 2, 3)}
        assert all(s.transport.frames[-1][0] == framing.TASK_LIST for s in manager.sessions.values())
        manager.sessions[2].next_task_list = 0.0
        clock.advance(manager.heartbeat_interval)
        assert beats(manager) == 18 and task_list_reads(db) == [[1, 2, 3], [2]]  # the next round, once that one ended
    finally:
        manager._ticker.stop()
