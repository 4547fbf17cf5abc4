"""agentview.AgentView: the one way an agent's view changes (one task, or the whole
list as events or as one taskList), read numbering (an older read never overrides a
newer decision), and the task dicts and frames shared across agents; the taskLists the
dispatcher sends through it."""
from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock

from taskd.db.agents import Agent
from taskd.server.agentview import AgentView, Desired
from taskd.server.dispatch import Dispatcher
from taskd.server.events import EventBus
from taskd.server.render import task_json
from taskd.server.agentsession import AgentSession
from taskd.wire import framing

from tests.fakes.fakedb import FakeDatabase
from tests.unit.session_rig import T0, Transport, task


def session_for(agent_id: int, written: list) -> AgentSession:
    agent = Agent(agent_id, 1, f"a{agent_id}", True, T0, True, (), True, T0, T0, T0)
    return AgentSession(agent, 1, "10.0.0.1", Transport(written), id=f"s{agent_id}")


def make(n: int, db: FakeDatabase, clock: Any = None) -> tuple[Dispatcher, Any, list]:
    clock = clock or Clock()
    held: dict[int, AgentSession] = {}
    dispatcher = Dispatcher(sessions=held, db=db, events=EventBus("here"), clock=clock,
                            instance_id="here")
    written: list = []
    for i in range(1, n + 1):
        held[i] = session_for(i, written)
        db.add_agent(held[i].agent)
    return dispatcher, clock, written


# -- one task --------------------------------------------------------------------------

def test_apply_sends_add_then_update_then_remove_and_tracks_the_view():
    view = AgentView()
    session = session_for(1, [])
    v1, v2 = task_json(task(1, interval=60)), task_json(task(1, interval=30))
    assert view.apply(session, Desired.one(1, v1, True), view.next_read()) == [(1, "taskAdd")]
    assert session.transport.take() == [("taskAdd", v1)] and session.view == {1: v1}
    assert view.apply(session, Desired.one(1, v2, True), view.next_read()) == [(1, "taskUpdate")]
    assert session.transport.take() == [("taskUpdate", v2)] and session.view == {1: v2}
    assert view.apply(session, Desired.one(1, v2, False), view.next_read()) == [(1, "taskRemove")]
    assert session.transport.take() == [("taskRemove", v2)] and session.view == {}


def test_apply_sends_nothing_when_nothing_changed():
    view = AgentView()
    session = session_for(1, [])
    payload = task_json(task(1))
    view.apply(session, Desired.one(1, payload, True), view.next_read())
    session.transport.take()
    assert view.apply(session, Desired.one(1, dict(payload), True), view.next_read()) == []  # equal, not identical
    assert view.apply(session, Desired.one(2, None, False), view.next_read()) == []  # never had it, still not wanted
    assert session.transport.take() == [] and session.view == {1: payload}


def test_apply_removes_a_deleted_task_with_what_the_agent_was_last_sent():
    view = AgentView()
    session = session_for(1, [])
    payload = task_json(task(1))
    view.apply(session, Desired.one(1, payload, True), view.next_read())
    session.transport.take()
    view.apply(session, Desired.one(1, None, False), view.next_read())
    assert session.transport.take() == [("taskRemove", payload)] and session.view == {}


def test_closed_sessions_are_sent_nothing():
    view = AgentView()
    session = session_for(1, [])
    session.closed = True
    view.apply(session, Desired.one(1, task_json(task(1)), True), view.next_read())
    assert session.transport.frames == []


def test_frames_on_the_wire_are_json_event_frames():
    """Check one frame byte-for-byte."""
    view = AgentView()
    session = session_for(1, [])
    raw: list[bytes] = []
    session.transport.send_frame = raw.append
    payload = task_json(task(1))
    view.apply(session, Desired.one(1, payload, True), view.next_read())
    assert raw == [b"\x00\x07taskAdd" + json.dumps(payload, separators=(",", ":")).encode()]


def test_a_fan_out_encodes_each_frame_once(monkeypatch):
    view = AgentView()
    sessions = [session_for(i, []) for i in (1, 2, 3)]
    encoded: list[str] = []
    real = framing.encode_json
    monkeypatch.setattr(framing, "encode_json", lambda event, value: encoded.append(event) or real(event, value))
    payload = view.share(task_json(task(1)))
    seq, frames = view.next_read(), {}
    for session in sessions:
        assert view.apply(session, Desired.one(1, payload, True), seq, frames=frames) == [(1, "taskAdd")]
    assert encoded == ["taskAdd"]
    assert [s.transport.take() for s in sessions] == [[("taskAdd", payload)]] * 3


def test_a_read_older_than_the_last_decision_is_ignored():
    view = AgentView()
    session = session_for(1, [])
    old, new = task_json(task(1, interval=60)), task_json(task(1, interval=30))
    older, newer = view.next_read(), view.next_read()
    view.apply(session, Desired.one(1, new, True), newer)
    session.transport.take()
    assert view.apply(session, Desired.one(1, old, True), older) == []
    assert view.apply(session, Desired.one(1, None, False), older) == []
    assert view.apply(session, Desired.full({}), older) == []  # a full read, as old
    view.apply(session, Desired.full({1: old}), older, as_list=True)
    assert session.view == {1: new}
    assert session.transport.take() == [("taskList", [new])]  # the list holds the newer decision


# -- the whole list --------------------------------------------------------------------

def test_apply_of_a_full_set_sends_the_difference_in_task_id_order():
    view = AgentView()
    session = session_for(1, [])
    kept, changed, gone = task_json(task(1)), task_json(task(2)), task_json(task(3))
    session.view = {3: gone, 1: kept, 2: changed}
    newer, fresh = task_json(task(2, interval=5)), task_json(task(4))
    sent = view.apply(session, Desired.full({4: fresh, 1: dict(kept), 2: newer}), view.next_read())
    assert sent == [(2, "taskUpdate"), (3, "taskRemove"), (4, "taskAdd")]
    assert session.transport.take() == [("taskUpdate", newer), ("taskRemove", gone), ("taskAdd", fresh)]
    assert session.view == {1: kept, 2: newer, 4: fresh}


def test_apply_of_a_full_set_as_a_task_list_sends_one_frame_sorted_by_name():
    view = AgentView()
    sessions = [session_for(i, []) for i in (1, 2)]
    b, a = view.share(task_json(task(1, name="b"))), view.share(task_json(task(2, name="a")))
    sessions[0].view = {9: task_json(task(9))}
    seq, frames = view.next_read(), {}
    for session in sessions:
        assert view.apply(session, Desired.full({1: b, 2: a}), seq, as_list=True, frames=frames) == []
    assert [s.transport.take() for s in sessions] == [[("taskList", [a, b])]] * 2
    assert sessions[0].view == {1: b, 2: a} and sessions[0].decided_floor == seq
    assert len(frames) == 1  # the same list: one frame for both agents


def test_agents_running_the_same_tasks_share_the_dicts_and_the_frame(monkeypatch):
    db = FakeDatabase()
    t1, t2 = db.put_task(task(1, to=(1, 2, 3))), db.put_task(task(2, to=(1, 2)))
    dispatcher, clock, _ = make(3, db)
    encoded: list[str] = []
    real = framing.encode_json
    monkeypatch.setattr(framing, "encode_json", lambda event, value: encoded.append(event) or real(event, value))
    dispatcher.send_task_lists(list(dispatcher.sessions.values()))
    s1, s2, s3 = (dispatcher.sessions[i] for i in (1, 2, 3))
    assert s1.view[1] is s2.view[1] is s3.view[1] and s1.view[2] is s2.view[2]
    assert encoded == [framing.TASK_LIST, framing.TASK_LIST]  # two distinct lists, three agents
    assert s1.transport.frames[-1] == (framing.TASK_LIST, s2.transport.frames[-1][1])
    # a later read (a new Task object, equal content) keeps the same shared dict ...
    db.put_task(task(1, to=(1, 2, 3)))
    dispatcher.send_task_lists([s1])
    assert s1.view[1] is s2.view[1]
    # ... and a changed task replaces it for whoever is told next
    changed = db.put_task(task(1, interval=10, to=(1, 2, 3)))
    dispatcher.send_task_lists([s1])
    assert s1.view[1] == task_json(changed) and s2.view[1] == task_json(t1)
    assert dispatcher.view.share(task_json(changed)) is s1.view[1]
    dispatcher.view.forget_task(1)
    assert dispatcher.view.share(task_json(changed)) is not s1.view[1]



def test_a_task_list_keeps_decisions_only_for_its_view_and_older_reads_still_lose():
    """A push decides a task for every session, routed there or not; kept for good,
    that is an entry per session per task of the whole cluster."""
    db = FakeDatabase()
    held = db.hold(db.routes.tasks_for_agents)
    dispatcher, _, _ = make(1, db)
    session = dispatcher.sessions[1]
    one, nine = db.put_task(task(1, to=(1,))), db.put_task(task(9, to=(1,)))
    dispatcher.send_task_lists([session])  # read A (older) ...
    db.drop_task(9)
    for task_id in (7, 8, 9):  # ... pushes of tasks not routed here decide them meanwhile
        session.decided_by[task_id] = dispatcher.view.next_read()
    dispatcher.send_task_lists([session])  # read B
    assert held.release(1) == {1: [one]}
    assert set(session.view) == {1} and set(session.decided_by) == {1}
    assert held.release(0) == {1: [one, nine]}  # A saw task 9, but a push after A decided it
    assert set(session.view) == {1}
    assert [e for e, _ in session.transport.frames] == [framing.TASK_LIST, framing.TASK_LIST]
    assert json.loads(session.transport.frames[-1][1]) == [task_json(one)]


def test_a_task_list_read_in_flight_does_not_share_a_deleted_task_again():
    db = FakeDatabase()
    held = db.hold(db.routes.tasks_for_agents)
    dispatcher, _, _ = make(1, db)
    session = dispatcher.sessions[1]
    one, two = db.put_task(task(1, to=(1,))), db.put_task(task(2, to=(1,)))
    dispatcher.send_task_lists([session])  # the read sees task 1 ...
    db.drop_task(1)
    session.decided_by[1] = dispatcher.view.next_read()  # ... which is deleted: the delete push
    dispatcher.view.forget_task(1)
    assert held.release() == {1: [one, two]}
    assert set(session.view) == {2} and set(dispatcher.view._payloads) == {2}
