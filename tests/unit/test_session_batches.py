"""SessionManager batches session opens: agents that connect close together are recorded
in one transaction and brought up together (the FakeDatabase, whose session writes the
test holds and then lets run, and a Clock)."""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

import pytest
from twisted.internet.task import Clock

from taskd.db.agents import Agent
from taskd.server import sessions as sessions_module
from taskd.server.dispatch import Dispatcher
from taskd.server.events import EventBus
from taskd.server.agentsession import CLOSE_GOING_AWAY, CLOSE_NORMAL
from taskd.server.sessions import SessionManager
from taskd.wire import framing

T0 = datetime(2024, 1, 2, 3, 4, 5)


from tests.fakes.fakedb import FakeDatabase  # noqa: E402  (signature- and behaviour-checked)
from tests.fakes.transport import FakeTransport  # noqa: E402  (shared, signature-checked)
from tests.unit.session_rig import task_list_reads  # noqa: E402


def agent(agent_id: int) -> Agent:
    return Agent(agent_id, 1, f"agent{agent_id}", True, T0, True, (), False, None, T0, T0)


class Rig:
    def __init__(self) -> None:
        self.clock = Clock()
        self.db = db = FakeDatabase()
        self.opens = db.hold(db.sessions.open_many, early=False)  # each batch runs at `finish`
        self.events = EventBus("here")
        self.published: list[tuple[str, Any]] = []
        self.events.subscribe(lambda e: self.published.append((e.type, e.payload)))
        held: dict = {}
        self.dispatcher = Dispatcher(sessions=held, db=db, events=self.events, clock=self.clock,
                                     instance_id="here")
        self.manager = SessionManager(db=db, events=self.events, listener=self.dispatcher, sessions=held,
                                      instance_id="here", clock=self.clock)
        self.transports: dict[int, FakeTransport] = {}

    def attach(self, agent_id: int):
        transport = self.transports[agent_id] = FakeTransport()
        return self.manager.attach(self.db.add_agent(agent(agent_id)), 1, "10.0.0.1", transport)

    def batches(self) -> list[list[tuple[int, int, str]]]:
        """The items of each open_many (one per batch), in order."""
        return [list(items) for items, _server in self.db.called(self.db.sessions.open_many)]

    def _waiting(self, index: int) -> int:
        items = self.db.called(self.db.sessions.open_many)[index][0]
        return next(n for n, (waiting, _) in enumerate(self.opens.args()) if waiting is items)

    def finish(self, index: int = 0, *, offline: set[int] = frozenset(), missing: set[int] = frozenset()) -> list:
        """Let batch `index` be written, with its agents offline until now (`offline`:
        each goes online), deleted (`missing`), or else online already; returns what
        open_many answered."""
        for agent_id, _, _ in self.batches()[index]:
            if agent_id in missing:
                self.db.drop_agent(agent_id)
            else:
                self.db.add_agent(replace(agent(agent_id), online=agent_id not in offline))
        return self.opens.release(self._waiting(index))

    def fail(self, index: int, exc: Exception) -> None:
        self.opens.fail(exc, self._waiting(index))

    def task_list_reads(self) -> list:
        return task_list_reads(self.db)

    def closed(self) -> list[tuple]:
        return self.db.called(self.db.sessions.close)


@pytest.fixture
def rig() -> Rig:
    return Rig()


def test_sessions_opening_in_one_turn_are_recorded_together(rig):
    sessions = [rig.attach(i) for i in (1, 2, 3)]
    assert rig.batches() == []  # recorded on the next reactor turn
    rig.clock.advance(0)
    assert rig.batches() == [[(1, 1, "10.0.0.1"), (2, 1, "10.0.0.1"), (3, 1, "10.0.0.1")]]
    rig.finish(0, offline={1, 3})
    assert [("agent.online", 1), ("agent.online", 3)] == [(t, p["id"]) for t, p in rig.published
                                                          if t == "agent.online"]
    assert rig.task_list_reads() == [[1, 2, 3]]  # one read for every first taskList
    for i, s in zip((1, 2, 3), sessions):
        assert s.ready.called and s.id is not None
        assert rig.transports[i].frames == [("taskList", [])]
    assert sorted(rig.manager.sessions) == [1, 2, 3]


def test_sessions_opening_while_a_batch_is_recorded_form_the_next_batch(rig):
    rig.attach(1)
    rig.clock.advance(0)
    for i in (2, 3):
        rig.attach(i)
    rig.clock.advance(0)
    assert len(rig.batches()) == 1  # waits for the batch in flight
    rig.finish(0)
    rig.clock.advance(0)
    assert [[a for a, _, _ in b] for b in rig.batches()] == [[1], [2, 3]]
    rig.finish(1)
    assert rig.task_list_reads() == [[1], [2, 3]]


def test_a_batch_is_bounded(rig, monkeypatch):
    monkeypatch.setattr(sessions_module, "OPEN_BATCH", 2)
    for i in range(1, 6):
        rig.attach(i)
    rig.clock.advance(0)
    rig.finish(0)
    rig.clock.advance(0)
    rig.finish(1)
    rig.clock.advance(0)
    assert [[a for a, _, _ in b] for b in rig.batches()] == [[1, 2], [3, 4], [5]]


def test_a_session_closed_before_its_batch_is_never_recorded(rig):
    gone = rig.attach(1)
    kept = rig.attach(2)
    rig.manager.detach(gone, "closed")
    assert gone.gone.called
    rig.clock.advance(0)
    assert [[a for a, _, _ in b] for b in rig.batches()] == [[2]]
    rig.finish(0)
    assert kept.ready.called and list(rig.manager.sessions) == [2]


def test_a_session_closed_while_its_batch_is_recorded_is_forgotten(rig):
    closing = rig.attach(1)
    rig.attach(2)
    rig.clock.advance(0)
    rig.manager.detach(closing, "closed")
    opened = rig.finish(0, offline={1, 2})
    assert rig.closed() == [(opened[0][0], 1)]
    assert closing.gone.called and not closing.ready.called
    assert list(rig.manager.sessions) == [2]
    assert rig.task_list_reads() == [[2]]


def test_an_agent_deleted_before_it_was_recorded_is_closed(rig):
    deleted = rig.attach(1)
    rig.attach(2)
    rig.clock.advance(0)
    rig.finish(0, missing={1})
    assert rig.transports[1].closes == [(CLOSE_NORMAL, "agent deleted")]
    assert deleted.gone.called and not deleted.ready.called
    assert list(rig.manager.sessions) == [2] and rig.transports[2].frames == [("taskList", [])]


def test_a_failed_batch_closes_its_sessions_and_the_next_batch_still_runs(rig):
    first = rig.attach(1)
    rig.clock.advance(0)
    rig.attach(2)
    rig.fail(0, RuntimeError("database down"))
    assert rig.transports[1].closes == [(CLOSE_GOING_AWAY, "server error; reconnect later")]
    assert first.gone.called and rig.manager.sessions == {}
    rig.clock.advance(0)
    rig.finish(1)
    assert list(rig.manager.sessions) == [2]


def test_a_second_connection_in_the_same_batch_replaces_the_first(rig):
    first = rig.attach(1)
    transport_first = rig.transports[1]
    second = rig.attach(1)
    rig.clock.advance(0)
    rig.finish(0, offline={1})
    assert rig.manager.sessions[1] is second
    assert transport_first.closes == [(CLOSE_NORMAL, "replaced by a newer connection")]
    assert [t for t, _ in rig.published if t == "agent.online"] == ["agent.online"]  # online once
    assert first.id != second.id


def test_the_dispatcher_brings_a_batch_up_with_one_assignment_transaction(rig):
    calls = []
    real = rig.dispatcher.agents_connected

    def agents_connected(sessions):
        calls.append([s.agent.id for s in sessions])
        return real(sessions)

    rig.dispatcher.agents_connected = agents_connected
    for i in (1, 2):
        rig.attach(i)
    rig.clock.advance(0)
    rig.finish(0)
    assert calls == [[1, 2]]
    assert rig.db.called(rig.db.routes.connect_assignments) == [([1, 2],)]
    assert rig.task_list_reads() == [[1, 2]]


def test_stopping_closes_sessions_still_waiting_for_their_batch(rig):
    waiting = rig.attach(1)
    rig.manager.startService()
    rig.manager.stopService()
    assert rig.transports[1].closes == [(CLOSE_NORMAL, "server shutting down")]
    assert waiting.gone.called
    rig.clock.advance(1)
    assert rig.batches() == []


def test_a_sessions_catalog_is_unknown_while_written_then_known(rig):
    held = rig.db.hold(rig.db.catalog.replace_agent_catalog)
    session = rig.attach(1)
    rig.clock.advance(0)
    rig.finish(0)
    session.catalog = frozenset()  # as loaded when it connected
    rig.manager.frame_received(session, framing.encode_json(framing.CATALOG, [
        {"namespace": "/a/b", "version": 2}, {"namespace": "/c", "version": 0, "policy": None}]))
    assert session.catalog is None  # routing asks the database meanwhile
    assert held.release() == 2
    assert session.catalog == frozenset({("/a/b", 2), ("/c", 0)})


def test_a_batch_recorded_while_stopping_is_closed_not_brought_up(rig):
    rig.manager.startService()
    late = rig.attach(1)
    rig.clock.advance(0)  # its batch is being recorded...
    rig.manager.stopService()  # ...when the server stops
    opened = rig.finish(0, offline={1})
    assert rig.transports[1].closes == [(CLOSE_NORMAL, "server shutting down")]
    assert rig.closed() == [(opened[0][0], 1)] and late.gone.called
    assert rig.manager.sessions == {} and rig.task_list_reads() == []


def test_stopping_waits_for_a_batch_being_recorded_before_clearing_the_server(rig):
    """Cleared first, the batch's rows (and its agents' online flags) would be written
    after the clear and stay until the next start."""
    close, clear = rig.db.sessions.close, rig.db.sessions.clear_server
    rig.manager.startService()
    late = rig.attach(1)
    rig.clock.advance(0)  # its batch is being recorded...
    stopped = rig.manager.stopService()  # ...when the server stops
    assert rig.db.calls_to(close, clear) == [] and not stopped.called
    rig.finish(0, offline={1})
    assert rig.db.calls_to(close, clear) == [close, clear] and stopped.called and late.gone.called


def test_a_batch_meeting_a_database_outage_keeps_its_sockets_and_is_recorded_once_it_answers(rig):
    """No socket closed, heartbeats meanwhile, and the same sessions recorded on the retry."""
    from taskd.db.availability import RETRY_DELAY, DatabaseUnavailable
    from tests.unit.session_rig import Transport  # keeps frames that are not JSON (heartbeats)

    transport = Transport([])
    waiting = rig.manager.attach(rig.db.add_agent(agent(1)), 1, "10.0.0.1", transport)
    rig.clock.advance(0)
    rig.fail(0, DatabaseUnavailable("no answer within 5s (db-timeout)"))
    rig.manager.tick()
    assert [e for e, _ in transport.frames] == [framing.HEARTBEAT]
    assert not waiting.gone.called and rig.manager.sessions == {}
    rig.clock.advance(RETRY_DELAY)
    assert [[a for a, _, _ in b] for b in rig.batches()] == [[1], [1]]
    rig.finish(1, offline={1})
    assert waiting.ready.called and list(rig.manager.sessions) == [1]
    assert [e for e, _ in transport.frames] == [framing.HEARTBEAT, "taskList"]


def test_a_session_closed_during_an_outage_is_removed_once_the_database_answers(rig):
    from taskd.db.availability import RETRY_DELAY, DatabaseUnavailable

    session = rig.attach(1)
    rig.clock.advance(0)
    rig.finish(0)
    closes = rig.db.hold(rig.db.sessions.close, early=False)
    rig.manager.detach(session, "closed")
    closes.fail(DatabaseUnavailable("no answer within 5s (db-timeout)"))
    assert len(rig.closed()) == 1 and not session.gone.called
    rig.clock.advance(RETRY_DELAY)
    assert len(rig.closed()) == 2 and rig.closed()[0] == rig.closed()[1]
    closes.release()
    assert session.gone.called


# -- drop_all: this server was declared dead by another (taskd.server.liveness) ----------

def test_drop_all_closes_every_held_socket_so_the_agents_reconnect(rig):
    for i in (1, 2):
        rig.attach(i)
    rig.clock.advance(0)
    rig.finish(0)
    assert rig.manager.drop_all("lost registration") == 2
    for i in (1, 2):
        assert rig.transports[i].closes == [(CLOSE_GOING_AWAY, "lost registration")]


def test_a_batch_recorded_while_dropping_is_closed_and_forgotten_once_written(rig):
    """Its rows may have been written before the other server removed this one's rows:
    holding it would leave an agent connected here with no session recorded."""
    rig.attach(1)
    rig.clock.advance(0)  # being recorded
    assert rig.manager.drop_all("lost registration") == 0
    [(first_id, _)] = rig.finish(0)
    assert rig.transports[1].closes == [(CLOSE_GOING_AWAY, "lost registration")]
    assert rig.manager.sessions == {} and rig.closed() == [(first_id, 1)]
    rig.attach(2)  # a connection after the drop is held as usual
    rig.clock.advance(0)
    rig.finish(1)
    assert list(rig.manager.sessions) == [2] and rig.transports[2].closes == []


# -- newest session wins across servers --------------------------------------------------

def test_an_agent_connecting_elsewhere_closes_its_older_connection_here(rig):
    rig.manager.startService()
    rig.attach(1)
    rig.attach(2)
    rig.clock.advance(0)
    rig.finish(0)
    held = rig.manager.sessions[1].id

    def connected(agent_id: int, session: str, source: str = "srv-b") -> None:
        rig.events.receive({"type": "agent.connected", "source": source, "timestamp": "", "attempts": 0,
                            "id": f"ev-{agent_id}-{session}-{source}",
                            "payload": {"id": agent_id, "name": f"agent{agent_id}", "orgId": 1,
                                        "session": session, "server": source}})

    connected(1, held)          # this very session, announced again: nothing to do
    connected(1, "s-new", source="here")  # this server's own event: handled when recorded
    connected(3, "s-new")       # an agent not held here
    assert all(t.closes == [] for t in rig.transports.values())
    connected(1, "s-new")
    assert rig.transports[1].closes == [(CLOSE_NORMAL, "replaced by a newer connection on server srv-b")]
    assert rig.transports[2].closes == []
    rig.manager.stopService()


def test_a_session_of_an_agent_online_already_is_announced_as_connected(rig):
    rig.attach(1)
    rig.attach(2)
    rig.clock.advance(0)
    rig.finish(0, offline={1})  # agent 2 was online already (a session elsewhere)
    assert [t for t, _ in rig.published] == ["agent.online", "agent.connected"]
    [(_, payload)] = [p for p in rig.published if p[0] == "agent.connected"]
    assert payload == {"id": 2, "name": "agent2", "orgId": 1, "session": rig.manager.sessions[2].id,
                       "server": "here"}


def test_frames_piling_up_behind_a_slow_catalog_pause_reading_the_socket(rig):
    """Back-pressure instead of an unbounded queue: past MAX_INBOUND frames waiting the
    server stops reading that agent; once half are handled it reads again."""
    from taskd.server.sessions import MAX_INBOUND
    held = rig.db.hold(rig.db.catalog.replace_agent_catalog)
    session = rig.attach(1)
    rig.clock.advance(0)
    rig.finish(0)
    transport = rig.transports[1]
    catalog = framing.encode_json(framing.CATALOG, [{"namespace": "/a", "version": 1}])
    for _ in range(MAX_INBOUND - 1):
        rig.manager.frame_received(session, catalog)
    assert not transport.paused and session.inbound == MAX_INBOUND - 1
    rig.manager.frame_received(session, catalog)
    assert transport.paused and transport.pauses == 1
    rig.manager.frame_received(session, catalog)  # what was already in flight still counts
    assert transport.pauses == 1
    while transport.paused:
        held.release()
    assert session.inbound == MAX_INBOUND // 2 and not transport.paused
    while held.waiting:
        held.release()
    assert session.inbound == 0 and transport.pauses == 1
