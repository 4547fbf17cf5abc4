"""The server's in-process agent cache (taskd.server.agentcache) and its use by
AgentService: what is served from memory, and every way an entry stops being served."""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from taskd.db.agents import Agent
from taskd.errors import NotFound
from taskd.server.agentcache import AgentCache, BatchLoader, ShortLived
from taskd.server.auth import User
from taskd.server.events import EventBus
from taskd.server.domain import AgentService

T0 = datetime(2024, 1, 2, 3, 4, 5)


def agent(agent_id: int = 1, name: str = "a1", org_id: int = 1, **kw: Any) -> Agent:
    fields = dict(id=agent_id, org_id=org_id, name=name, enabled=True, enabled_change=T0, public=False, tags=(),
                  online=False, online_change=None, created=T0, updated=T0)
    fields.update(kw)
    return Agent(**fields)


from tests.fakes.transport import FakeTransport  # noqa: E402  (shared, signature-checked)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def bus() -> EventBus:
    return EventBus("here")


@pytest.fixture
def cache(bus, clock) -> AgentCache:
    return AgentCache(bus, clock, max_size=3, max_age=60.0)


def remote(bus: EventBus, type_: str, payload: Any) -> None:
    bus.receive({"type": type_, "payload": payload, "source": "elsewhere"})


def test_put_then_get_by_id_and_by_name(cache):
    a = agent()
    cache.put(a, cache.token())
    assert cache.get(1) is a
    assert cache.get_by_name(1, "a1") is a
    assert cache.get_by_name(2, "a1") is None  # names are per org
    assert cache.get(2) is None


@pytest.mark.parametrize("type_,payload", [
    ("agent.online", {"id": 1, "name": "a1", "orgId": 1}),
    ("agent.offline", {"id": 1, "name": "a1", "orgId": 1}),
    ("agent.deleted", {"id": 1, "name": "a1", "orgId": 1}),
    ("agent.updated", {"old": {"id": 1, "name": "a1"}, "new": {"id": 1, "name": "renamed"}}),
])
@pytest.mark.parametrize("where", ["local", "remote"])
def test_an_event_naming_the_agent_drops_it(cache, bus, type_, payload, where):
    cache.put(agent(1), cache.token())
    cache.put(agent(2, "a2"), cache.token())
    if where == "local":
        bus.publish(type_, payload)
    else:
        remote(bus, type_, payload)
    assert cache.get(1) is None and cache.get_by_name(1, "a1") is None
    assert cache.get(2) is not None  # other agents stay


def test_an_agent_event_without_an_id_empties_everything(cache, bus):
    cache.put(agent(1), cache.token())
    remote(bus, "agent.updated", {"something": "else"})
    assert len(cache) == 0


def test_task_events_keep_the_entries(cache, bus):
    cache.put(agent(1), cache.token())
    bus.publish("task.created", {"id": 1})
    assert cache.get(1) is not None


def test_a_read_that_overlapped_an_agent_event_is_not_stored(cache, bus):
    """The read may have seen the row before the change the event announces."""
    token = cache.token()
    bus.publish("agent.online", {"id": 7, "name": "other", "orgId": 1})  # any agent's event
    cache.put(agent(1), token)
    assert cache.get(1) is None
    cache.put(agent(1), cache.token())
    assert cache.get(1) is not None


def test_a_renamed_agent_is_not_found_under_its_old_name(cache, bus):
    cache.put(agent(1, "old"), cache.token())
    bus.publish("agent.updated", {"old": {"id": 1}, "new": {"id": 1}})
    cache.put(agent(1, "new"), cache.token())
    assert cache.get_by_name(1, "old") is None
    assert cache.get_by_name(1, "new").name == "new"


def test_size_is_bounded_dropping_the_oldest(cache):
    for i in range(1, 5):
        cache.put(agent(i, f"a{i}"), cache.token())
    assert len(cache) == 3
    assert cache.get(1) is None and cache.get_by_name(1, "a1") is None
    assert [cache.get(i).id for i in (2, 3, 4)] == [2, 3, 4]


def test_entries_expire_after_max_age(cache, clock):
    cache.put(agent(1), cache.token())
    clock.advance(60)
    assert cache.get(1) is not None
    clock.advance(0.1)
    assert cache.get(1) is None and len(cache) == 0


def test_bypassed_while_the_event_transport_is_down_and_emptied_after_it_reconnects(cache, bus):
    transport = bus.transport = FakeTransport()
    cache.put(agent(1), cache.token())
    assert cache.get(1) is not None
    transport.connected = False  # events of other servers may be missed now
    assert cache.get(1) is None
    cache.put(agent(2, "a2"), cache.token())  # not stored either
    transport.connected, transport.connections = True, 2
    assert cache.get(1) is None and cache.get(2) is None and len(cache) == 0
    cache.put(agent(1), cache.token())
    assert cache.get(1) is not None


def test_a_read_that_began_before_a_broker_reconnect_is_not_stored(cache, bus):
    """No event arrived during the gap (it may have been missed): the reconnect alone
    must keep what was read before it out of the cache."""
    transport = bus.transport = FakeTransport()
    assert cache.get(1) is None  # the cache has seen connection 1
    token = cache.token()
    transport.connected = False
    transport.connected, transport.connections = True, 2
    cache.put(agent(1), token)  # the first look at the cache since the reconnect
    assert cache.get(1) is None and len(cache) == 0
    cache.put(agent(1), cache.token())
    assert cache.get(1) is not None


def test_short_lived_values_expire_and_follow_the_generation(clock):
    generation = [0]
    values = ShortLived(clock, ttl=2.0, generation=lambda: generation[0])
    token = values.token()
    values.store({1: 5}, token)
    assert values.lookup([1, 2]) == ({1: 5}, [2])
    clock.advance(2.5)
    assert values.lookup([1]) == ({}, [1])
    values.store({1: 6}, values.token())
    generation[0] += 1  # e.g. this server wrote a batch of statuses
    assert values.lookup([1]) == ({}, [1])
    old = values.token()
    generation[0] += 1  # changed while a read was in flight: stored under the old one
    values.store({1: 7}, old)
    assert values.lookup([1]) == ({}, [1])


# -- AgentService --------------------------------------------------------------------------

class FakeStore:
    def __init__(self, *agents: Agent) -> None:
        self.rows = {a.id: a for a in agents}
        self.reads: list[tuple] = []
        self.held: Deferred | None = None

    def get(self, agent_id: int) -> Deferred:
        self.reads.append(("get", agent_id))
        return succeed(self.rows.get(agent_id))

    def get_by_name(self, org_id: int, name: str) -> Deferred:
        self.reads.append(("get_by_name", org_id, name))
        found = [a for a in self.rows.values() if a.org_id == org_id and a.name == name]
        return succeed(found[0] if found else None)

    def get_many_by_name(self, keys: list, *, waited: float = 0.0) -> Deferred:
        self.reads.append(("get_many_by_name", sorted(keys)))
        return succeed({(a.org_id, a.name): a for a in self.rows.values() if (a.org_id, a.name) in keys})


class FakeStatus:
    def __init__(self) -> None:
        self.reads: list[list[int]] = []
        self.counts: dict[int, int] = {}

    def failing_counts(self, ids: list[int]) -> Deferred:
        self.reads.append(list(ids))
        return succeed({i: (self.counts.get(i, 0), 0) for i in ids})


def result(d: Deferred) -> Any:
    out: list = []
    d.addBoth(out.append)
    assert out, "not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


@pytest.fixture
def service(bus, clock):
    store = FakeStore(agent(1, "mine", org_id=1), agent(2, "theirs", org_id=2), agent(3, "pub", org_id=2, public=True))
    svc = AgentService(store, catalog=None, events=bus, status=FakeStatus(), clock=clock)
    return svc, store


def user(org_id: int) -> User:
    return User(org_id=org_id, org_name=f"org{org_id}", org_slug=f"org{org_id}", role="Admin")


def test_visible_reads_the_database_once_then_memory(service):
    svc, store = service
    u = user(1)
    assert result(svc.visible(u, 1)).name == "mine"
    assert result(svc.visible(u, 1)).name == "mine"
    assert result(svc.visible(u, 3)).name == "pub"
    assert store.reads == [("get", 1), ("get", 3)]
    with pytest.raises(NotFound):
        result(svc.visible(u, 2))  # another org's private agent, cached or not
    with pytest.raises(NotFound):
        result(svc.visible(u, 2))
    with pytest.raises(NotFound):
        result(svc.visible(u, 99))


def test_visible_after_an_event_reads_again(service, bus):
    svc, store = service
    u = user(1)
    result(svc.visible(u, 1))
    store.rows[1] = replace(store.rows[1], online=True)
    bus.publish("agent.online", {"id": 1, "name": "mine", "orgId": 1})
    assert result(svc.visible(u, 1)).online is True
    assert store.reads == [("get", 1), ("get", 1)]


def test_writes_check_ownership_on_a_fresh_read(service):
    svc, store = service
    u = user(1)
    result(svc.visible(u, 1))
    result(svc.owned(u, 1))
    assert store.reads == [("get", 1), ("get", 1)]


def test_for_socket_answers_known_agents_from_memory(service, clock):
    svc, store = service
    u = user(1)
    first = svc.for_socket(u, "mine", autocreate=False)
    clock.advance(0)
    assert result(first).id == 1
    assert result(svc.for_socket(u, "mine", autocreate=False)).id == 1
    assert result(svc.visible(u, 1)).id == 1
    assert store.reads == [("get_many_by_name", [(1, "mine")])]


def test_upgrades_arriving_together_look_their_agents_up_together(service, clock):
    svc, store = service
    lookups = [svc.for_socket(user(1), "mine", autocreate=False), svc.for_socket(user(2), "theirs", autocreate=False),
               svc.for_socket(user(2), "pub", autocreate=False), svc.for_socket(user(1), "mine", autocreate=False)]
    assert store.reads == []
    clock.advance(0)
    assert store.reads == [("get_many_by_name", [(1, "mine"), (2, "pub"), (2, "theirs")])]
    assert [result(d).id for d in lookups] == [1, 2, 3, 1]


def test_batch_loader_reads_what_arrives_during_a_read_next(clock):
    reads: list[list] = []
    held: list[Deferred] = []

    waits: list[float] = []

    def load(keys, *, waited):
        reads.append(keys)
        waits.append(waited)
        held.append(Deferred())
        return held[-1]

    loader = BatchLoader(clock, load, max_batch=2)
    a = loader.get("a")
    clock.advance(0)
    b, c, d = loader.get("b"), loader.get("c"), loader.get("d")
    clock.advance(0)
    assert reads == [["a"]]  # one read at a time
    clock.advance(4)  # a slow read (a stall): b, c and d have waited 4 s already
    held[0].callback({"a": 1})
    clock.advance(0)
    assert result(a) == 1 and reads == [["a"], ["b", "c"]]
    assert waits == [0, 4]  # the store takes it off their db-timeout
    held[1].errback(RuntimeError("db down"))
    with pytest.raises(RuntimeError):
        result(b)
    with pytest.raises(RuntimeError):
        result(c)
    clock.advance(0)
    held[2].callback({})
    assert result(d) is None and reads == [["a"], ["b", "c"], ["d"]]


def test_failing_tasks_counts_are_kept_briefly(service, clock):
    svc, _ = service
    status = svc.status
    status.counts = {1: 2}
    a1 = result(svc.visible(user(1), 1))
    assert result(svc.failing_tasks([a1])) == {1: (2, 0)}
    status.counts = {1: 3}
    assert result(svc.failing_tasks([a1])) == {1: (2, 0)}
    assert status.reads == [[1]]
    clock.advance(2.1)
    assert result(svc.failing_tasks([a1])) == {1: (3, 0)}
    assert status.reads == [[1], [1]]
