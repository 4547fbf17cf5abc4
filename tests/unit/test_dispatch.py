"""The Dispatcher without network or database: the in-memory FakeDatabase (its stores
have the real ones' signatures and behaviour: tests/integration/test_fakedb_contract.py),
a dict of held sessions, fake transports that record frames, a real EventBus and a
deterministic Clock.

A test says what the database holds (which tasks, routed to whom), never which answer a
call gets; an ordering question is decided by holding a store method's answers
(`db.hold`) until the test releases them, so nothing sleeps.
"""
from __future__ import annotations

import random
from datetime import datetime
from dataclasses import replace
from typing import Any

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from taskd.db.agents import Agent
from taskd.db.tasks import Route, Task
from taskd.server.dispatch import REMOTE_JITTER, Dispatcher
from taskd.server.events import EventBus
from taskd.server.render import task_json
from taskd.server.agentview import AgentView
from taskd.server.agentsession import CLOSE_NORMAL, AgentSession

T0 = datetime(2024, 1, 2, 3, 4, 5)
HERE = "srv-a"
SEED = 1234


# -- fakes -----------------------------------------------------------------------------

from tests.fakes.fakedb import FakeDatabase  # noqa: E402  (signature- and behaviour-checked)
from tests.fakes.transport import FakeTransport  # noqa: E402  (shared, signature-checked)


def make_agent(agent_id: int, name: str | None = None) -> Agent:
    return Agent(agent_id, 1, name or f"agent{agent_id}", True, T0, True, (), True, T0, T0, T0)


def make_task(task_id: int = 1, *, interval: int = 60, enabled: bool = True, route: str = "any",
              metrics: dict | None = None) -> Task:
    return Task(task_id, 1, f"task-{task_id}", "", {"/x": {"a": 1}}, interval, Route(route),
                {"/x/*": 0} if metrics is None else metrics, enabled, T0, T0)


class Rig:
    def __init__(self, agent_ids: tuple[int, ...] = (1, 2), relocate_delay: float = 1.0,
                 concurrent_reads: int = 10) -> None:
        self.clock = Clock()
        self.db = FakeDatabase()
        self.events = EventBus(HERE)
        self.sessions: dict[int, AgentSession] = {}  # as the session manager holds them
        self.view = AgentView()
        self.transports: dict[int, FakeTransport] = {}
        for agent_id in agent_ids:
            self.connect(agent_id)
        self.dispatcher = Dispatcher(
            sessions=self.sessions, view=self.view, db=self.db, events=self.events, clock=self.clock, instance_id=HERE,
            relocate_delay=relocate_delay, sweep_interval=60.0, rng=random.Random(SEED),
            concurrent_reads=concurrent_reads,
        )
        self.published: list[tuple[str, Any]] = []
        self.events.subscribe(lambda e: self.published.append((e.type, e.payload)))
        self.dispatcher.startService()

    def connect(self, agent_id: int) -> AgentSession:
        transport = FakeTransport()
        session = AgentSession(self.db.add_agent(make_agent(agent_id)), 1, "10.0.0.1", transport, id=f"s{agent_id}")
        self.sessions[agent_id] = session
        self.transports[agent_id] = transport
        return session

    def session(self, agent_id: int) -> AgentSession:
        return self.sessions[agent_id]

    def route(self, task: Task, *agent_ids: int) -> None:
        """From now on the database holds `task` (an `any` task), given to the one of
        `agent_ids` (or to nobody)."""
        assert task.route.type == "any" and len(agent_ids) <= 1
        self.db.put_task(task, *agent_ids)

    def called(self, method: Any) -> list[tuple]:
        return self.db.called(method)

    def relocations(self) -> list[Any]:
        return [c for c in self.clock.getDelayedCalls() if c.func == self.dispatcher._relocate]

    def remote(self, type_: str, payload: Any, source: str = "srv-b") -> None:
        self.events.receive({"type": type_, "payload": payload, "source": source, "timestamp": "", "attempts": 0})


@pytest.fixture
def rig() -> Rig:
    r = Rig()
    yield r
    if r.dispatcher.running:
        r.dispatcher.stopService()


# -- task events -------------------------------------------------------------------------

def test_task_events_push_the_databases_routing_to_local_agents(rig):
    task = make_task()
    rig.route(task, 2)
    rig.events.publish("task.created", task_json(task))
    assert rig.called(rig.db.routes.snapshot) == [(1,)]  # no list of local agents
    assert rig.transports[1].take() == []
    assert rig.transports[2].take() == [("taskAdd", task_json(task))]

    # The same event again (a duplicate over the exchange): nothing changed, nothing sent.
    rig.remote("task.updated", {"old": task_json(task), "new": task_json(task)})
    assert rig.transports[2].take() == [] and rig.transports[1].take() == []

    moved = make_task(interval=10)
    rig.route(moved, 1)
    rig.events.publish("task.updated", {"old": task_json(task), "new": task_json(moved)})
    assert rig.transports[1].take() == [("taskAdd", task_json(moved))]
    assert rig.transports[2].take() == [("taskRemove", task_json(moved))]

    disabled = make_task(interval=10, enabled=False)
    rig.route(disabled, 1)  # still routed, but disabled tasks are not run
    rig.events.publish("task.updated", {"old": task_json(moved), "new": task_json(disabled)})
    assert rig.transports[1].take() == [("taskRemove", task_json(disabled))]

    rig.db.drop_task(disabled.id)
    rig.events.publish("task.deleted", task_json(disabled))
    assert rig.transports[1].take() == [] and rig.transports[2].take() == []


def test_task_events_re_read_the_database_rather_than_trust_the_payload(rig):
    current = make_task(interval=5)
    rig.route(current, 1)
    stale = task_json(make_task(interval=999))
    rig.remote("task.updated", {"old": stale, "new": stale})
    assert rig.transports[1].take() == [("taskAdd", task_json(current))]


def test_no_local_agents_means_no_database_read(rig):
    rig.sessions.clear()
    rig.events.publish("task.created", task_json(make_task()))
    assert rig.called(rig.db.routes.snapshot) == []


# -- a task this server just created: routed from the sessions -----------------------------

def routed_task(task_id: int = 1, *, route: dict, metrics: dict | None = None, enabled: bool = True,
                org_id: int = 1) -> dict:
    payload = task_json(make_task(task_id, enabled=enabled))
    return {**payload, "orgId": org_id, "route": route, "metrics": metrics if metrics is not None else {}}


def with_agent(rig: Rig, agent_id: int, *, org_id: int = 1, tags: tuple = (), catalog=frozenset()) -> None:
    session = rig.connect(agent_id)
    session.agent = rig.db.add_agent(Agent(agent_id, org_id, f"agent{agent_id}", True, T0, True, tags, True, T0, T0, T0))
    session.agent_epoch = 0  # read since it was held, under the (in-process) event stream
    session.catalog = catalog


def test_a_created_by_ids_task_is_routed_from_memory(rig):
    for i in (1, 2):
        rig.session(i).catalog = frozenset()
    payload = routed_task(route={"type": "byIds", "config": {"ids": [2, 99]}})
    rig.events.publish("task.created", payload)
    assert rig.called(rig.db.routes.snapshot) == []
    assert rig.transports[2].take() == [("taskAdd", payload)]
    assert rig.transports[1].take() == []
    assert rig.session(2).view == {1: payload}


def test_a_created_by_tags_task_goes_to_the_tagged_agents_of_its_org(rig):
    rig.sessions.clear()
    with_agent(rig, 1, tags=("web", "db"))
    with_agent(rig, 2, tags=("db",), org_id=2)  # another org's agent: tags are per org
    with_agent(rig, 3, tags=("other",))
    payload = routed_task(route={"type": "byTags", "config": {"tags": ["db", "x"]}})
    rig.events.publish("task.created", payload)
    assert rig.called(rig.db.routes.snapshot) == []
    assert [rig.transports[i].take() for i in (1, 2, 3)] == [[("taskAdd", payload)], [], []]


def test_catalogs_decide_in_memory_as_in_the_database(rig):
    rig.sessions.clear()
    with_agent(rig, 1, tags=("t",), catalog=frozenset({("/x/cpu", 2)}))
    with_agent(rig, 2, tags=("t",), catalog=frozenset({("/y/mem", 1)}))
    with_agent(rig, 3, tags=("t",), catalog=frozenset())  # advertises nothing: runs anything
    payload = routed_task(route={"type": "byTags", "config": {"tags": ["t"]}}, metrics={"/x/*": 0})
    rig.events.publish("task.created", payload)
    assert rig.called(rig.db.routes.snapshot) == []
    assert [bool(rig.transports[i].take()) for i in (1, 2, 3)] == [True, False, True]


def test_the_database_decides_when_memory_cannot(rig):
    rig.sessions.clear()
    with_agent(rig, 1, tags=("t",), catalog=None)  # its catalog is being written
    tagged = routed_task(1, route={"type": "byTags", "config": {"tags": ["t"]}}, metrics={"/x/*": 0})
    rig.events.publish("task.created", tagged)
    assert rig.called(rig.db.routes.snapshot) == [(1,)]

    rig.session(1).catalog = frozenset()
    anywhere = routed_task(2, route={"type": "any"})
    rig.events.publish("task.created", anywhere)  # `any`: its agent is chosen in the database
    assert rig.called(rig.db.routes.snapshot)[-1] == (2,)

    remote = routed_task(3, route={"type": "byTags", "config": {"tags": ["t"]}})
    rig.remote("task.created", remote)  # created elsewhere: re-read, as for every change
    assert rig.called(rig.db.routes.snapshot)[-1] == (3,)

    held = rig.db.hold(rig.db.agents.get)
    rig.events.publish("agent.updated", {"old": {"id": 1}, "new": {"id": 1}})  # tags may have changed
    reloading = routed_task(4, route={"type": "byTags", "config": {"tags": ["t"]}})
    rig.events.publish("task.created", reloading)
    assert rig.called(rig.db.routes.snapshot)[-1] == (4,)
    held.release()
    fresh = routed_task(5, route={"type": "byTags", "config": {"tags": ["t"]}})
    rig.events.publish("task.created", fresh)
    assert rig.called(rig.db.routes.snapshot)[-1] == (4,)  # reloaded: memory again


class EventTransport:
    """The parts of AmqpTransport the dispatcher looks at."""

    def __init__(self) -> None:
        self.connected, self.connections = True, 1

    def publish(self, event: dict) -> None:
        pass


def tagged_agent(agent_id: int, *tags: str) -> Agent:
    return Agent(agent_id, 1, f"agent{agent_id}", True, T0, True, tags, True, T0, T0, T0)


def test_by_tags_routing_uses_the_agents_read_once_their_sessions_are_held(rig):
    """The agent a websocket was accepted with was read before its session was held
    here, so an agent.updated in between reached no session: memory may not decide
    for it until the connect read (after the session is held) has refreshed it."""
    rig.sessions.clear()
    with_agent(rig, 1, tags=("old",))
    session = rig.session(1)
    session.agent_epoch = None  # as attached: the websocket's read
    tagged = routed_task(1, route={"type": "byTags", "config": {"tags": ["new"]}})
    rig.events.publish("task.created", tagged)
    assert rig.called(rig.db.routes.snapshot) == [(1,)]
    rig.db.add_agent(tagged_agent(1, "new"))  # changed in the database before its session was held
    rig.dispatcher.agents_connected([session])
    assert session.agent.tags == ("new",)
    rig.transports[1].take()
    again = routed_task(2, route={"type": "byTags", "config": {"tags": ["new"]}})
    rig.events.publish("task.created", again)
    assert rig.called(rig.db.routes.snapshot) == [(1,)]  # from memory, with the tags now stored
    assert rig.transports[1].take() == [("taskAdd", again)]


def test_by_tags_routing_asks_the_database_once_agent_events_may_have_been_missed(rig):
    """While the broker is away, and after it came back, another server's agent.updated
    may never arrive: until an agent is read again, its held tags are not trusted."""
    rig.sessions.clear()
    rig.events.transport = transport = EventTransport()
    with_agent(rig, 1, tags=("t",))
    with_agent(rig, 2, tags=("t",))
    for i in (1, 2):
        rig.db.add_agent(tagged_agent(i, "t"))
    rig.dispatcher.agents_connected([rig.session(1), rig.session(2)])
    created = iter(range(1, 100))

    def from_memory() -> bool:
        task_id = next(created)
        rig.events.publish("task.created", routed_task(task_id, route={"type": "byTags", "config": {"tags": ["t"]}}))
        return task_id not in [args[0] for args in rig.called(rig.db.routes.snapshot)]

    assert from_memory()
    transport.connected = False
    assert not from_memory()
    transport.connected, transport.connections = True, 2
    assert not from_memory()
    rig.events.publish("agent.updated", {"old": {"id": 1}, "new": {"id": 1}})
    assert rig.session(1).agent_epoch == 2
    assert not from_memory()  # agent 2 is still as read before the reconnect
    rig.events.publish("agent.updated", {"old": {"id": 2}, "new": {"id": 2}})
    assert from_memory()
    # byIds routing needs no more of an agent than its id: memory still decides
    transport.connected = False
    task_id = next(created)
    rig.events.publish("task.created", routed_task(task_id, route={"type": "byIds", "config": {"ids": [1]}}))
    assert task_id not in [args[0] for args in rig.called(rig.db.routes.snapshot)]


def test_an_older_read_of_the_agent_never_replaces_a_newer_one(rig):
    session = rig.session(1)
    held = rig.db.hold(rig.db.routes.connect_assignments)
    rig.db.add_agent(tagged_agent(1, "older"))
    rig.dispatcher.agents_connected([session])  # read 1 starts (and reads "older") ...
    rig.db.add_agent(tagged_agent(1, "newer"))
    rig.events.publish("agent.updated", {"old": {"id": 1}, "new": {"id": 1}})  # ... read 2 starts and ends
    assert held.release()[3] == {1: tagged_agent(1, "older")}  # read 1 ends
    assert session.agent.tags == ("newer",)


def test_a_deleted_tasks_shared_dict_is_dropped_after_a_push_still_in_flight(rig):
    task = make_task(1)
    rig.route(task, 1)
    held = rig.db.hold(rig.db.routes.snapshot, calls=1)
    rig.remote("task.updated", {"old": task_json(task), "new": task_json(task)})  # its read is slow
    rig.db.drop_task(task.id)  # then the task is deleted
    rig.remote("task.deleted", task_json(task))
    assert held.release() == (task, {1})  # the update's read, from before the delete, ends
    assert rig.transports[1].take() == [("taskAdd", task_json(task)), ("taskRemove", task_json(task))]
    assert rig.view._payloads == {}


def test_a_created_disabled_task_sends_nothing(rig):
    for i in (1, 2):
        rig.session(i).catalog = frozenset()
    rig.events.publish("task.created", routed_task(route={"type": "byIds", "config": {"ids": [1, 2]}},
                                                   enabled=False))
    assert rig.called(rig.db.routes.snapshot) == []
    assert rig.transports[1].take() == [] and rig.transports[2].take() == []


# -- serialised pushes -----------------------------------------------------------------

def test_pushes_for_one_task_are_serialised_so_a_slow_read_cannot_win(rig):
    """The first read is slow; a second change arrives meanwhile. The second read only
    starts once the first push is applied, so the agent ends with the later state."""
    reads = rig.db.hold(rig.db.routes.snapshot)
    old, new = make_task(interval=60), make_task(interval=30)
    rig.route(old, 1)
    first = rig.dispatcher.task_changed(1)
    rig.route(new, 1)
    second = rig.dispatcher.task_changed(1)
    assert len(rig.called(rig.db.routes.snapshot)) == 1  # the second read waits for the first push

    assert reads.release() == (old, {1})  # the slow read returns the older state...
    assert rig.transports[1].take() == [("taskAdd", task_json(old))]
    assert first.called and not second.called
    assert len(rig.called(rig.db.routes.snapshot)) == 2  # ...and only now is the newer state read
    assert reads.release() == (new, {1})
    assert second.called
    assert rig.transports[1].take() == [("taskUpdate", task_json(new))]
    assert rig.session(1).view == {1: task_json(new)}
    assert rig.dispatcher._chains == {}  # nothing left queued


def test_pushes_for_different_tasks_do_not_wait_for_each_other(rig):
    reads = rig.db.hold(rig.db.routes.snapshot)
    rig.route(make_task(2), 1)
    rig.dispatcher.task_changed(1)
    rig.dispatcher.task_changed(2)
    assert sorted(reads.args()) == [(1,), (2,)]
    reads.release(reads.args().index((2,)))
    assert [e for e, _ in rig.transports[1].take()] == ["taskAdd"]


def test_a_burst_of_task_events_has_at_most_concurrent_reads_in_the_database_at_once():
    """The backlog of a broker reconnect: hundreds of events at once. Past the bound they
    wait in the dispatcher (outside db-timeout), not in the pool's queue."""
    rig = Rig(concurrent_reads=3)
    reads = rig.db.hold(rig.db.routes.snapshot)
    for task_id in range(1, 21):
        rig.route(make_task(task_id), 1)
        rig.remote("task.updated", {"new": {"id": task_id}})
    assert len(reads.args()) == 3
    done = 0
    while reads.args():
        assert len(reads.args()) <= 3
        reads.release()
        done += 1
    assert done == 20
    assert sorted(rig.session(1).view) == list(range(1, 21))  # every one pushed in the end


def test_a_failed_push_does_not_block_the_next_one(rig):
    rig.route(make_task(), 1)
    rig.db.fail_next(rig.db.routes.snapshot, RuntimeError("db down"))
    first = rig.dispatcher.task_changed(1)
    second = rig.dispatcher.task_changed(1)
    assert first.called and second.called
    assert rig.transports[1].take() == [("taskAdd", task_json(make_task()))]


# -- relocation --------------------------------------------------------------------------

def test_local_offline_event_relocates_after_relocate_delay(rig):
    rig.events.publish("agent.offline", {"id": 7, "name": "gone", "orgId": 1})
    [call] = rig.relocations()
    assert call.getTime() == pytest.approx(1.0) and call.args == (7,)
    rig.clock.advance(0.999)
    assert rig.called(rig.db.routes.relocate_from) == []
    rig.clock.advance(0.001)
    assert rig.called(rig.db.routes.relocate_from) == [(7,)]
    assert rig.relocations() == []


def test_remote_offline_event_adds_seeded_jitter(rig):
    rig.remote("agent.offline", {"id": 7, "name": "gone", "orgId": 1})
    expected = 1.0 + random.Random(SEED).uniform(0, REMOTE_JITTER)
    assert 1.0 <= expected <= 1.0 + REMOTE_JITTER
    [call] = rig.relocations()
    assert call.getTime() == pytest.approx(expected)
    rig.clock.advance(expected - 0.01)
    assert rig.called(rig.db.routes.relocate_from) == []
    rig.clock.advance(0.01)
    assert rig.called(rig.db.routes.relocate_from) == [(7,)]


def test_a_second_offline_event_reschedules_instead_of_duplicating(rig):
    rig.events.publish("agent.offline", {"id": 7, "name": "gone", "orgId": 1})
    rig.clock.advance(0.6)
    rig.events.publish("agent.offline", {"id": 7, "name": "gone", "orgId": 1})
    [call] = rig.relocations()
    assert call.getTime() == pytest.approx(1.6)
    rig.clock.advance(0.5)  # t=1.1: the first schedule would have fired by now
    assert rig.called(rig.db.routes.relocate_from) == []
    rig.clock.advance(0.5)
    assert rig.called(rig.db.routes.relocate_from) == [(7,)]
    rig.clock.advance(10)
    assert rig.called(rig.db.routes.relocate_from) == [(7,)]


def test_offline_events_of_different_agents_are_independent(rig):
    rig.events.publish("agent.offline", {"id": 7, "name": "a", "orgId": 1})
    rig.events.publish("agent.offline", {"id": 8, "name": "b", "orgId": 1})
    assert sorted(c.args for c in rig.relocations()) == [(7,), (8,)]
    rig.clock.advance(1.0)
    assert sorted(rig.called(rig.db.routes.relocate_from)) == [(7,), (8,)]


def test_relocated_tasks_are_announced_and_pushed(rig):
    task = make_task()
    rig.db.add_agent(replace(make_agent(7, "gone"), online=False))
    rig.db.add_agent(make_agent(1), catalog=[("/y/other", 1)])  # cannot run it: agent 2 is the one
    rig.route(task, 7)
    rig.events.publish("agent.offline", {"id": 7, "name": "gone", "orgId": 1})
    rig.clock.advance(1.0)
    assert ("task.updated", {"old": task_json(task), "new": task_json(task)}) in rig.published
    assert rig.transports[2].take() == [("taskAdd", task_json(task))]


def test_stop_service_cancels_pending_relocations(rig):
    rig.events.publish("agent.offline", {"id": 7, "name": "gone", "orgId": 1})
    rig.remote("agent.offline", {"id": 8, "name": "far", "orgId": 1})
    assert len(rig.relocations()) == 2
    rig.dispatcher.stopService()
    assert rig.clock.getDelayedCalls() == []  # relocations and the sweeper
    rig.clock.advance(100)
    assert rig.called(rig.db.routes.relocate_from) == []
    # Once stopped, offline events are left to the servers still running.
    rig.events.publish("agent.offline", {"id": 9, "name": "late", "orgId": 1})
    assert rig.clock.getDelayedCalls() == []


# -- agents ------------------------------------------------------------------------------

def test_agent_changed_assigns_then_resyncs_the_view(rig):
    session, transport = rig.session(1), rig.transports[1]
    kept, changed, gone = make_task(1), make_task(2), make_task(3)
    session.view = {1: task_json(kept), 2: task_json(changed), 3: task_json(gone)}
    fresh = make_task(4)
    newer = make_task(2, interval=5)
    rig.route(kept, 1)
    rig.route(newer, 1)
    rig.route(fresh)  # unassigned: agent 1 is given it
    rig.dispatcher.agent_changed(session)
    assert rig.called(rig.db.routes.release_unqualified) == [(1,)]
    assert rig.called(rig.db.routes.assign_unassigned) == [([1],)]
    assert ("task.updated", {"old": task_json(fresh), "new": task_json(fresh)}) in rig.published
    frames = transport.take()
    assert sorted(frames, key=lambda f: (f[0], f[1]["id"])) == sorted([
        ("taskAdd", task_json(fresh)), ("taskUpdate", task_json(newer)), ("taskRemove", task_json(gone)),
    ], key=lambda f: (f[0], f[1]["id"]))
    assert session.view == {1: task_json(kept), 2: task_json(newer), 4: task_json(fresh)}


def test_connecting_agents_get_assignments_and_task_lists_as_one_batch(rig):
    """One assignment transaction and one taskList read for all agents of a batch; the
    tasks assigned are in their first taskList and announced to the other servers."""
    s1, s2 = rig.session(1), rig.session(2)
    given, moved = make_task(4), make_task(5, metrics={"/z/*": 0})
    rig.db.add_agent(make_agent(1, "renamed"), catalog=[("/x/y", 1)])  # it cannot run `moved` any more
    rig.db.drop_agent(2)  # deleted
    rig.db.add_agent(make_agent(9))  # held by another server; it can
    rig.route(moved, 1)
    rig.route(given)  # unassigned
    order: list[Any] = []
    rig.dispatcher.send_task_lists = lambda sessions: order.append(
        (len(rig.called(rig.db.routes.connect_assignments)), [s.agent.id for s in sessions])) or succeed(None)
    done = rig.dispatcher.agents_connected([s1, s2])
    assert done.called
    assert rig.called(rig.db.routes.connect_assignments) == [([1, 2],)]
    assert order == [(1, [1, 2])]  # assigned first, so the taskLists hold the tasks
    assert rig.db.routes.snapshot(5).result == (moved, {9}) and rig.db.routes.snapshot(4).result == (given, {1})
    assert s1.catalog == frozenset({("/x/y", 1)}) and s2.catalog == frozenset()  # known from now on
    assert s1.agent.name == "renamed" and s1.agent_epoch == 0  # as it is now that it is held
    assert s2.agent.name == "agent2" and s2.agent_epoch is None  # not found (deleted): left as it was
    assert rig.called(rig.db.routes.release_unqualified) == rig.called(rig.db.routes.assign_unassigned) == []
    announced = [p["new"]["id"] for t, p in rig.published if t == "task.updated"]
    assert sorted(announced) == [4, 5]


def test_agent_deleted_closes_its_local_session_and_sweeps(rig):
    rig.remote("agent.deleted", {"id": 2, "name": "agent2", "orgId": 1})
    assert rig.transports[2].closes == [(CLOSE_NORMAL, "agent deleted")]
    assert rig.transports[1].closes == []
    assert rig.called(rig.db.routes.sweep_any) == [(1.0,)]


def test_agent_updated_reloads_the_held_agent_and_resyncs(rig):
    renamed = rig.db.add_agent(make_agent(1, "renamed"))
    rig.events.publish("agent.updated", {"old": {"id": 1}, "new": {"id": 1}})
    assert rig.session(1).agent is renamed
    assert rig.called(rig.db.routes.tasks_for_agents) == [([1],)]
    rig.events.publish("agent.updated", {"old": {"id": 99}, "new": {"id": 99}})  # not held here
    assert rig.called(rig.db.agents.get) == [(1,)]


def test_sweep_runs_a_relocation_delay_after_start_and_on_the_sweep_interval(rig):
    """At start-up: the agents this server marked offline while starting published their
    agent.offline before the dispatcher ran; the sweep a relocation delay later moves
    their tasks if they have not come back."""
    sweeps = lambda: rig.called(rig.db.routes.sweep_any)  # noqa: E731
    rig.clock.advance(0.9)
    assert sweeps() == []
    rig.clock.advance(0.1)
    assert sweeps() == [(1.0,)]
    rig.clock.advance(58.9)
    assert sweeps() == [(1.0,)]
    rig.clock.advance(0.1)
    assert sweeps() == [(1.0,)] * 2
    assert rig.called(rig.db.routes.assign_unassigned) == []  # the sweep's own transaction does it


def test_the_sweep_announces_and_pushes_what_it_moved_and_assigned(rig):
    """No agent.offline was seen for the agent the task was on: the sweep's move is
    announced and pushed like an event-driven relocation."""
    gone = Agent(3, 1, "agent3", True, T0, True, (), False, T0, T0, T0)  # offline since T0
    rig.db.add_agent(gone)
    moved, given = make_task(4), make_task(5)
    rig.route(moved, 3)
    rig.route(given)
    rig.dispatcher.sweep()
    announced = [p["new"]["id"] for t, p in rig.published if t == "task.updated"]
    assert announced == [4, 5]
    now_on = rig.db._state.any_index[4]
    assert now_on in (1, 2)
    assert [(e, v["id"]) for e, v in rig.transports[now_on].take() if e == "taskAdd" and v["id"] == 4] == [("taskAdd", 4)]


def test_a_slow_task_list_read_does_not_undo_a_newer_push(rig):
    """The race found in review: a full read that started before a push finishes after
    it; the push (decided by the later-started read) wins for that task."""
    session, transport = rig.session(1), rig.transports[1]
    old, new = make_task(1, interval=60), make_task(1, interval=30)
    session.view = {1: task_json(old)}
    rig.route(old, 1)
    held = rig.db.hold(rig.db.routes.tasks_for_agents)
    rig.dispatcher.resync(session)                      # read #1 starts (reads `old`), held
    rig.route(new, 1)
    rig.dispatcher.task_changed(1)                      # read #2 starts and applies
    assert transport.take() == [("taskUpdate", task_json(new))]
    assert held.release() == {1: [old]}                 # read #1 finishes with stale data
    assert transport.take() == []
    assert session.view == {1: task_json(new)}
