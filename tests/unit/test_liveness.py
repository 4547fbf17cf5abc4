"""Server liveness (taskd.server.liveness) on one in-memory sqlite database shared by
several servers, each with its own Clock, so a test can freeze one while time passes
for the others."""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Callable

import pytest
import sqlalchemy as sa
from twisted.internet.defer import fail, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent

from taskd.db import models
from taskd.db.connector import Database
from taskd.db.engine import create_engine
from taskd.db.servers import ServerInstance, ServerStore
from taskd.db.sessions import SessionStore
from taskd.server.events import EventBus
from taskd.server.liveness import REAPED_REASON, Liveness

T0 = datetime(2026, 3, 4, 5, 6, 7)
BEAT, DEAD = 5.0, 30.0


class SyncPool:
    """DBPool's contract (one transaction per call, an exception fails the Deferred), at once."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def do(self, fn: Callable, *args: Any) -> Any:
        return maybeDeferred(self.run_sync, fn, *args)

    def run_sync(self, fn: Callable, *args: Any) -> Any:
        with self.engine.begin() as conn:
            return fn(conn, *args)


class Wall:
    """The time every server reads (their clocks agree); each server's timers run on its
    own Clock, which a frozen server's does not follow."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> datetime:
        return T0 + timedelta(seconds=self.offset)


class FakeSessions:
    def __init__(self) -> None:
        self.dropped: list[str] = []

    def drop_all(self, reason: str) -> int:
        self.dropped.append(reason)
        return 3


class CountingStats:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def incr(self, name: str, n: int = 1, tags: Any = None) -> None:
        self.counts[name] = self.counts.get(name, 0) + n


class Node:
    def __init__(self, cluster: "Cluster", name: str, hostname: str = "host") -> None:
        self.clock = Clock()
        self.events = EventBus(name)
        self.published: list[tuple[str, int]] = []
        self.events.subscribe(lambda e: self.published.append((e.type, e.payload["id"])))
        db = Database(cluster.pool)
        db.servers = ServerStore(cluster.pool, now=cluster.wall.now)
        db.sessions = SessionStore(cluster.pool, now=cluster.wall.now)
        self.sessions = FakeSessions()
        self.logs: list[str] = []
        self.liveness = Liveness(db=db, events=self.events, sessions=self.sessions, name=name, addr="tcp:8082",
                                 clock=self.clock, interval=BEAT, dead_after=DEAD, now=cluster.wall.now,
                                 hostname=hostname, stats=CountingStats())
        self.liveness.log = Logger(namespace="test", observer=lambda e: self.logs.append(formatEvent(e)))

    def start(self) -> "Node":
        self.liveness.take_over_sync()
        self.liveness.startService()
        return self


class Cluster:
    def __init__(self) -> None:
        self.engine = create_engine("sqlite3", ":memory:")
        models.metadata.create_all(self.engine)
        self.pool = SyncPool(self.engine)
        self.wall = Wall()
        with self.engine.begin() as conn:
            conn.execute(sa.insert(models.agent), [
                {"id": i, "org_id": 1, "name": f"agent{i}", "enabled": True, "public": False, "online": False,
                 "created": T0, "updated": T0} for i in (1, 2, 3)])

    def node(self, name: str, **kw: Any) -> Node:
        return Node(self, name, **kw)

    def connect(self, agent_id: int, server: str) -> None:
        """An agent session recorded by `server` (as its SessionManager would)."""
        store = SessionStore(self.pool, now=self.wall.now)
        store.open(agent_id, version=1, remote_ip="10.0.0.1", server=server)

    def advance(self, seconds: float, *running: Node, step: float = 1.0) -> None:
        """Time passes for everyone; only the `running` servers' timers fire."""
        while seconds > 0:
            dt = min(step, seconds)
            self.wall.offset += dt
            for node in running:
                node.clock.advance(dt)
            seconds -= dt

    def instances(self) -> dict[str, str]:
        with self.engine.connect() as conn:
            return {r.id: r.name for r in conn.execute(sa.select(models.server_instance))}

    def online(self) -> dict[int, bool]:
        with self.engine.connect() as conn:
            return {r.id: bool(r.online) for r in conn.execute(sa.select(models.agent))}

    def session_servers(self) -> list[str]:
        with self.engine.connect() as conn:
            return sorted(conn.execute(sa.select(models.agent_session.c.server)).scalars())


@pytest.fixture
def cluster() -> Cluster:
    return Cluster()


def test_a_server_registers_at_start_and_beats_every_interval(cluster):
    a = cluster.node("A").start()
    row_id = a.liveness.instance.id
    assert cluster.instances() == {row_id: "A"}
    cluster.advance(BEAT, a)
    with cluster.engine.connect() as conn:
        row = conn.execute(sa.select(models.server_instance)).one()
    assert (row.started, row.last_seen) == (T0, T0 + timedelta(seconds=BEAT))
    assert (row.hostname, row.addr) == ("host", "tcp:8082")


def test_a_silent_server_is_reaped_its_agents_go_offline_and_agent_offline_is_published(cluster):
    a, b = cluster.node("A").start(), cluster.node("B").start()
    cluster.connect(1, "A")
    cluster.connect(2, "A")
    cluster.connect(3, "A")
    cluster.connect(3, "B")  # agent 3 is also connected to B: it stays online
    cluster.advance(DEAD - BEAT, b)  # A frozen, not yet for long enough
    assert set(cluster.instances().values()) == {"A", "B"} and cluster.online()[1]
    cluster.advance(2 * BEAT, b)
    assert set(cluster.instances().values()) == {"B"}
    assert cluster.online() == {1: False, 2: False, 3: True}
    assert cluster.session_servers() == ["B"]
    assert sorted(b.published) == [("agent.offline", 1), ("agent.offline", 2)]
    assert b.liveness.reaped == 1 and any("server A" in line and "declared dead" in line for line in b.logs)
    assert b.liveness.stats.counts == {"servers.reaped": 1}
    [live] = b.liveness.live().result
    assert (live.name, live.agents) == ("B", 1)


def test_exactly_one_server_wins_the_reap(cluster):
    a, b, c = (cluster.node(n).start() for n in "ABC")
    cluster.connect(1, "A")
    cluster.wall.offset += DEAD + 1  # A, B and C all silent
    cutoff = cluster.wall.now() - timedelta(seconds=DEAD)
    [seen_by_b] = [s for s in b.liveness.store.silent(cutoff, exclude=b.liveness.instance.id).result if s.name == "A"]
    [seen_by_c] = [s for s in c.liveness.store.silent(cutoff, exclude=c.liveness.instance.id).result if s.name == "A"]
    results = [b.liveness.store.reap(seen_by_b, cutoff).result, c.liveness.store.reap(seen_by_c, cutoff).result]
    assert results[1] is None and [ch.agent_id for ch in results[0].changes] == [1]


def test_a_server_that_beats_again_before_the_reap_is_not_reaped(cluster):
    a, b = cluster.node("A").start(), cluster.node("B").start()
    cluster.connect(1, "A")
    cluster.wall.offset += DEAD + 1
    cutoff = cluster.wall.now() - timedelta(seconds=DEAD)
    [silent] = b.liveness.store.silent(cutoff, exclude=b.liveness.instance.id).result
    assert a.liveness.store.beat(a.liveness.instance.id).result is True  # A woke up just now
    assert b.liveness.store.reap(silent, cutoff).result is None
    assert cluster.online()[1] and cluster.session_servers() == ["A"]


def test_a_reaped_server_closes_its_sockets_and_registers_again(cluster):
    a, b = cluster.node("A").start(), cluster.node("B").start()
    first = a.liveness.instance.id
    cluster.advance(DEAD + 2 * BEAT, b)  # A frozen: B reaps it
    assert set(cluster.instances().values()) == {"B"}
    cluster.advance(BEAT, a, b)  # A wakes: its next beat finds its row gone
    assert a.sessions.dropped == [REAPED_REASON]
    assert a.liveness.stats.counts == {"servers.declared_dead_self": 1}
    assert a.liveness.instance.id != first and a.liveness.registrations == 2
    assert sorted(cluster.instances().values()) == ["A", "B"]
    assert any("declared dead by another server" in line for line in a.logs)
    cluster.advance(3 * DEAD, a, b)  # both beating: nobody reaps anybody
    assert sorted(cluster.instances().values()) == ["A", "B"] and a.sessions.dropped == [REAPED_REASON]


def test_start_up_takes_over_earlier_runs_of_its_name_whatever_their_hostname(cluster):
    old = cluster.node("web:8082", hostname="old-host").start()
    cluster.node("other:8082").start()  # another server, alive
    cluster.connect(1, "web:8082")
    cluster.connect(2, "other:8082")
    old_id = old.liveness.instance.id
    # SIGKILLed, and back at once on a renamed host with the same instance-id.
    new = cluster.node("web:8082", hostname="new-host")
    new.liveness.take_over_sync()
    assert old_id not in cluster.instances()
    assert cluster.online() == {1: False, 2: True, 3: False}
    assert any("taking over from server web:8082" in line for line in new.logs)  # it looked alive
    new.liveness.startService()
    assert new.published == [("agent.offline", 1)]
    assert sorted(cluster.instances().values()) == ["other:8082", "web:8082"]


def test_a_run_under_another_name_is_reaped_after_dead_after(cluster):
    """The host was renamed and no instance-id is set: the old run's rows carry a name
    nobody takes over; they go like any silent server's."""
    cluster.node("old-host:8082").start()
    cluster.connect(1, "old-host:8082")
    new = cluster.node("new-host:8082").start()
    assert cluster.online()[1]
    cluster.advance(DEAD + BEAT, new)
    assert cluster.instances() == {new.liveness.instance.id: "new-host:8082"}
    assert new.published == [("agent.offline", 1)]


def test_a_database_outage_is_one_warning_and_beating_resumes(cluster):
    a = cluster.node("A").start()
    real_beat = a.liveness.store.beat
    a.liveness.store.beat = lambda instance_id: fail(RuntimeError("server has gone away"))
    cluster.advance(3 * BEAT, a)
    assert [line for line in a.logs if "unavailable" in line] == [
        "server liveness: database unavailable (server has gone away); retrying every 5s"]
    a.liveness.store.beat = real_beat
    cluster.advance(BEAT, a)
    assert a.logs[-1] == "server liveness: database available again"
    with cluster.engine.connect() as conn:
        assert conn.execute(sa.select(models.server_instance.c.last_seen)).scalar() == cluster.wall.now()


def test_a_clean_stop_removes_its_row(cluster):
    a, b = cluster.node("A").start(), cluster.node("B").start()
    a.liveness.stopService()
    assert list(cluster.instances().values()) == ["B"]
    cluster.advance(2 * BEAT, a)
    assert list(cluster.instances().values()) == ["B"]  # the timer stopped with it


def test_live_lists_recent_instances_with_their_agents(cluster):
    a, b = cluster.node("A").start(), cluster.node("B").start()
    for agent_id in (1, 2):
        cluster.connect(agent_id, "A")
    live = a.liveness.live().result
    assert [(s.name, s.agents) for s in live] == [("A", 2), ("B", 0)]
    assert all(isinstance(s, ServerInstance) and s.version for s in live)


def test_after_a_database_outage_for_everyone_the_first_back_does_not_reap_the_others(cluster):
    """Every row is old when the database returns; a server reaps only once it has
    itself been beating for server-dead-after, which gives the others as long."""
    a, b = cluster.node("A").start(), cluster.node("B").start()
    cluster.advance(DEAD, a, b)
    real = {n: n.liveness.store.beat for n in (a, b)}
    for n in (a, b):
        n.liveness.store.beat = lambda instance_id: fail(RuntimeError("can't connect"))
    cluster.advance(2 * DEAD, a, b)
    a.liveness.store.beat = real[a]  # A reaches the database again first
    cluster.advance(DEAD - 2 * BEAT, a, b)
    b.liveness.store.beat = real[b]  # B a while later, still within A's grace
    cluster.advance(3 * DEAD, a, b)
    assert sorted(cluster.instances().values()) == ["A", "B"]
    assert a.liveness.reaped == 0 and a.sessions.dropped == b.sessions.dropped == []


def test_a_server_cut_off_from_the_database_alone_is_reaped_after_dead_after(cluster):
    a, b = cluster.node("A").start(), cluster.node("B").start()
    cluster.advance(DEAD, a, b)
    b.liveness.store.beat = lambda instance_id: fail(RuntimeError("can't connect"))
    cluster.advance(DEAD - BEAT, a, b)
    assert a.liveness.reaped == 0
    cluster.advance(2 * BEAT, a, b)
    assert a.liveness.reaped == 1 and list(cluster.instances().values()) == ["A"]


def test_stopping_while_a_beat_is_in_flight_neither_registers_again_nor_leaves_a_row(cluster):
    from twisted.internet.defer import Deferred

    a = cluster.node("A").start()
    held: list[Deferred] = []

    def slow_beat(instance_id):
        d = Deferred()
        held.append(d)
        return d

    a.liveness.store.beat = slow_beat
    cluster.advance(BEAT, a)
    assert len(held) == 1  # a beat in flight
    stopping = a.liveness.stopService()
    assert not stopping.called  # waits for it
    held[0].callback(False)  # as if the row had gone: while stopping, that is no reason to register
    assert stopping.called
    assert cluster.instances() == {} and a.sessions.dropped == [] and a.liveness.registrations == 1


def test_a_database_outage_is_left_to_the_pools_single_warning(cluster):
    """The pool warns once when an outage starts and once when it ends; liveness adds
    no warning of its own for DatabaseUnavailable."""
    from taskd.db.availability import DatabaseUnavailable

    from twisted.logger import LogLevel

    a = cluster.node("A").start()
    heard: list[tuple] = []
    a.liveness.log = Logger(namespace="test", observer=lambda e: heard.append((e["log_level"], formatEvent(e))))
    real_beat = a.liveness.store.beat
    a.liveness.store.beat = lambda instance_id: fail(DatabaseUnavailable("no answer within 5s (db-timeout)"))
    cluster.advance(3 * BEAT, a)
    a.liveness.store.beat = real_beat
    cluster.advance(BEAT, a)
    assert any("beat missed" in text for _, text in heard)
    assert [text for level, text in heard if level > LogLevel.debug and "available" in text] == []
    with cluster.engine.connect() as conn:
        assert conn.execute(sa.select(models.server_instance.c.last_seen)).scalar() == cluster.wall.now()
