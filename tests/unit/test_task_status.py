"""The task-status service without a network: payload validation, coalescing and flushing.

The pool is a fake with DBPool's `do(fn, *args)` signature: it either runs `fn` at once on
a real in-memory sqlite database (so the statements are real) or hands back a Deferred
the test fires, so every ordering question is decided here, on a deterministic Clock.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

import pytest
import sqlalchemy as sa
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent

from taskd.db import models
from taskd.db import taskstatus as status_db
from taskd.db.engine import create_engine
from taskd.db.taskstatus import MAX_REFUSALS, TaskStatusRow
from taskd.server.statusintake import MAX_ERROR, StatusService, parse_entry, parse_payload
from taskd.wire import framing
from taskd.wire.framing import Frame, FrameError
from taskd.db.taskstatus import StatusStore

T0 = datetime(2026, 1, 2, 3, 4, 5)
STORED = datetime(2026, 1, 2, 3, 4, 9, 250000)


def status(task_id: int = 1, **over: Any) -> dict:
    entry = {"taskId": task_id, "executor": "snap", "outcome": "ok", "error": "", "lastRun": 1767323045.5,
             "duration": 0.25, "metrics": None, "runs": 3, "failures": 0, "skipped": 0}
    entry.update(over)
    return entry


def frame(value: Any) -> Frame:
    return framing.decode(framing.encode_json(framing.TASK_STATUS, value))


# -- validation --------------------------------------------------------------------------

def test_a_full_status_becomes_a_row():
    task_id, row = parse_entry(status(7, outcome="error", error="boom", metrics=12, runs=9, failures=2,
                                      skipped=1), agent_id=3)
    assert task_id == 7
    assert row == TaskStatusRow(task_id=7, agent_id=3, executor="snap", outcome="error", error="boom",
                                last_run=datetime(2026, 1, 2, 3, 4, 5, 500000), duration=0.25, metrics=12,
                                runs=9, failures=2, skipped=1)


def test_removal_marker_and_lenient_fields():
    assert parse_entry({"taskId": 4, "removed": True}, 1) == (4, None)
    # Only taskId, executor and outcome are needed; unknown fields (a newer agent) are ignored.
    _, row = parse_entry({"taskId": 4, "executor": "builtin", "outcome": "pending", "colour": "red",
                          "removed": False, "error": None}, 1)
    assert (row.error, row.last_run, row.duration, row.metrics, row.runs) == ("", None, None, None, 0)
    _, row = parse_entry(status(lastRun=0, duration=3), 1)  # integers are numbers too
    assert row.last_run == datetime(1970, 1, 1) and row.duration == 3.0


def test_a_long_error_is_cut_to_what_the_column_holds():
    _, row = parse_entry(status(error="é" * (MAX_ERROR + 100)), 1)
    assert len(row.error) == MAX_ERROR


@pytest.mark.parametrize("entry, says", [
    ([1], "not an object"),
    ({"executor": "snap", "outcome": "ok"}, "taskId must be an integer"),
    (status(True), "taskId must be an integer"),
    (status(0), "taskId must be an integer"),
    (status(2**31), "taskId must be an integer"),
    (status("5"), "taskId must be an integer"),
    ({"taskId": 1, "removed": "yes"}, "removed must be true or false"),
    (status(outcome="failed"), "outcome must be one of ok, error, pending"),
    (status(executor=""), "executor must be a name"),
    (status(executor="x" * 33), "executor must be a name"),
    (status(executor="sn\nap"), "executor must be a name"),
    ({"taskId": 1, "outcome": "ok"}, "executor must be a name"),
    (status(error=["boom"]), "error must be a string"),
    (status(lastRun="yesterday"), "lastRun must be null or a number"),
    (status(lastRun=-1), "lastRun must be null or a number"),
    (status(lastRun=1e12), "lastRun must be null or a number"),
    (status(lastRun=math.nan), "lastRun must be null or a number"),
    (status(duration=math.inf), "duration must be finite"),
    (status(duration=-0.5), "duration must be null or a number"),
    (status(metrics=-1), "metrics must be an integer"),
    (status(metrics=2**31), "metrics must be an integer"),
    (status(runs=-1), "runs must be an integer"),
    (status(failures=1.5), "failures must be an integer"),
    (status(skipped=2**63), "skipped must be an integer"),
    (status(runs=None), "runs must be an integer"),
])
def test_bad_entries_say_what_is_wrong(entry, says):
    entries, problems = parse_payload([status(1), entry, status(2)], 1)
    assert [task_id for task_id, _ in entries] == [1, 2]  # the rest of the frame is kept
    assert len(problems) == 1 and problems[0].startswith("entry 1 ") and says in problems[0], problems


@pytest.mark.parametrize("value", [None, {"taskId": 1}, "[]", 5])
def test_a_payload_that_is_not_an_array_is_refused_whole(value):
    with pytest.raises(FrameError, match="must be a JSON array"):
        parse_payload(value, 1)


# -- the service -------------------------------------------------------------------------

@dataclass
class FakeAgent:
    id: int
    name: str


@dataclass
class FakeSession:
    agent: FakeAgent
    view: dict[int, dict] = field(default_factory=dict)
    sent: set[int] = field(default_factory=set)


def session(agent_id: int = 1, tasks: range | list = range(1, 4), sent: range | list = ()) -> FakeSession:
    return FakeSession(FakeAgent(agent_id, f"agent{agent_id}"), {t: {"id": t} for t in tasks},
                       set(tasks) | set(sent))


class SqlitePool:
    """`do(fn, *args)` runs fn in one transaction of a real sqlite database, at once;
    `hold()` makes the next call wait for the test instead."""

    def __init__(self) -> None:
        self.engine = create_engine("sqlite3", ":memory:")  # taskd's sqlite set-up: real savepoints
        models.metadata.create_all(self.engine)
        self.calls: list[str] = []
        self.statements: list[str] = []
        self.held: list[tuple[Deferred, Callable, tuple]] = []
        self.hold_next = False
        self.failures: list[Exception] = []
        sa.event.listen(self.engine, "before_cursor_execute",
                        lambda conn, cur, stmt, *a: self.statements.append(stmt.split()[0]))

    def do(self, fn: Callable, *args: Any) -> Deferred:
        self.calls.append(fn.__name__)
        if self.failures:
            return fail(self.failures.pop(0))
        if self.hold_next:
            self.hold_next = False
            d: Deferred = Deferred()
            self.held.append((d, fn, args))
            return d
        return maybeDeferred(self.run, fn, *args)  # like DBPool: an exception fails the Deferred

    def run(self, fn: Callable, *args: Any) -> Any:
        with self.engine.begin() as conn:
            return fn(conn, *args)

    def release(self) -> None:
        d, fn, args = self.held.pop(0)
        d.callback(self.run(fn, *args))

    def seed(self, agents: int = 2, tasks: int = 3) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.insert(models.agent), [
                {"id": i, "org_id": 1, "name": f"agent{i}", "enabled": True, "public": False, "online": True,
                 "created": T0, "updated": T0} for i in range(1, agents + 1)])
            conn.execute(sa.insert(models.task), [
                {"id": i, "org_id": 1, "name": f"task{i}", "task_type": "", "config": {}, "interval": 60,
                 "route": {"type": "any"}, "enabled": True, "created": T0, "updated": T0}
                for i in range(1, tasks + 1)])

    def rows(self) -> dict[tuple[int, int], tuple]:
        with self.engine.connect() as conn:
            return {(r.task_id, r.agent_id): (r.outcome, r.runs, r.updated)
                    for r in conn.execute(sa.select(models.task_status))}


class Rig:
    def __init__(self, agents: int = 2, tasks: int = 3, instance_id: str | None = None) -> None:
        self.clock = Clock()
        self.pool = SqlitePool()
        self.pool.seed(agents, tasks)
        self.logs: list[str] = []
        self.service = StatusService(StatusStore(self.pool), clock=self.clock, flush_interval=2.0, now=lambda: STORED,
                                     instance_id=instance_id)
        self.service.log = Logger(namespace="test", observer=lambda e: self.logs.append(formatEvent(e)))
        self.service.startService()

    def tick(self) -> None:
        self.clock.advance(2.0)


@pytest.fixture
def rig():
    r = Rig()
    yield r
    if r.service.running:
        r.service.stopService()


def test_statuses_are_written_only_when_the_interval_ends(rig):
    rig.service.received(session(), frame([status(1, outcome="error", runs=1), status(2)]))
    rig.clock.advance(1.9)
    assert rig.pool.calls == [] and rig.pool.rows() == {}
    rig.clock.advance(0.1)
    assert rig.pool.calls == ["apply"]
    assert rig.pool.rows() == {(1, 1): ("error", 1, STORED), (2, 1): ("ok", 3, STORED)}
    rig.tick()
    assert rig.pool.calls == ["apply"]  # nothing new: no transaction at all


def test_the_latest_status_per_task_and_agent_wins(rig):
    rig.service.received(session(1), frame([status(1, runs=1), status(1, runs=2)]))
    rig.service.received(session(1), frame([status(1, runs=3, outcome="error")]))
    rig.service.received(session(2), frame([status(1, runs=10)]))
    assert len(rig.service.pending) == 2
    rig.tick()
    assert rig.pool.rows() == {(1, 1): ("error", 3, STORED), (1, 2): ("ok", 10, STORED)}
    rig.service.received(session(1), frame([status(1, runs=4)]))
    rig.tick()
    assert rig.pool.rows()[(1, 1)] == ("ok", 4, STORED)  # an update replaces the row
    assert rig.service.flushes == 2


def test_only_tasks_the_session_was_sent_count(rig):
    rig.service.received(session(1, tasks=[1]), frame([status(1), status(2), status(3)]))
    rig.tick()
    assert set(rig.pool.rows()) == {(1, 1)}
    assert not [line for line in rig.logs if "bad" in line]  # not a malformed entry


def test_a_removal_marker_deletes_the_row_even_for_a_task_no_longer_sent(rig):
    rig.service.received(session(1), frame([status(1), status(2)]))
    rig.tick()
    rig.service.received(session(1, tasks=[]), frame([{"taskId": 1, "removed": True}]))
    rig.tick()
    assert set(rig.pool.rows()) == {(2, 1)}
    # A removal and a later status for the same task in one interval: the status wins.
    rig.service.received(session(1), frame([{"taskId": 2, "removed": True}, status(2, runs=7)]))
    rig.tick()
    assert rig.pool.rows()[(2, 1)][1] == 7


def test_bad_entries_cost_one_log_line_naming_the_agent(rig):
    rig.service.received(session(2), frame([status(1), status(2, outcome="meh"), "x", status(3, runs=-1),
                                            {"taskId": "a"}]))
    bad = [line for line in rig.logs if "taskStatus" in line]
    assert len(bad) == 1, rig.logs
    assert "agent agent2 (2) sent 4 bad taskStatus entries" in bad[0]
    assert "entry 1 (task 2) outcome must be one of" in bad[0] and "(and 1 more)" in bad[0]
    rig.tick()
    assert set(rig.pool.rows()) == {(1, 2)}


@pytest.mark.parametrize("payload", [b"{not json", b"\xff[]", b'{"taskId": 1}', b""])
def test_a_bad_payload_is_logged_and_ignored(rig, payload):
    rig.service.received(session(1), Frame(framing.TASK_STATUS, payload))
    assert rig.service.pending == {}
    [line] = [line for line in rig.logs if "taskStatus" in line]
    assert line.startswith("agent agent1 (1) sent a bad taskStatus:") and line.endswith("ignored")


def test_statuses_of_deleted_tasks_or_agents_are_skipped_not_failing_the_batch(rig):
    rig.service.received(session(1), frame([status(1), status(2), status(3)]))
    rig.service.received(session(2), frame([status(1)]))
    with rig.pool.engine.begin() as conn:
        conn.execute(sa.delete(models.task).where(models.task.c.id == 2))
        conn.execute(sa.delete(models.agent).where(models.agent.c.id == 2))
    rig.tick()
    assert set(rig.pool.rows()) == {(1, 1), (3, 1)}
    assert rig.service.rows_written == 2 and rig.service.failed_flushes == 0


def test_ten_thousand_statuses_in_an_interval_are_one_transaction():
    rig = Rig(agents=1, tasks=10_000)
    rig.service.received(session(1, tasks=range(1, 10_001)),
                         frame([status(t, outcome="error" if t % 2 else "ok") for t in range(1, 10_001)]))
    rig.pool.statements.clear()
    rig.tick()
    assert rig.pool.calls == ["apply"]
    assert rig.pool.statements.count("INSERT") == 20  # 500 rows per statement
    assert len(rig.pool.rows()) == 10_000
    with rig.pool.engine.connect() as conn:
        assert status_db.failing_counts(conn, [1, 99]) == {1: 5000, 99: 0}
    rig.service.stopService()


def test_a_failed_flush_is_retried_with_newer_statuses_winning(rig):
    rig.pool.failures.append(RuntimeError("database went away"))
    rig.service.received(session(1), frame([status(1, runs=1), status(2, runs=1)]))
    rig.tick()
    assert rig.pool.rows() == {} and rig.service.failed_flushes == 1
    assert any("could not store 2 task status(es)" in line for line in rig.logs)
    rig.service.received(session(1), frame([status(2, runs=2)]))
    rig.tick()
    assert {k: v[1] for k, v in rig.pool.rows().items()} == {(1, 1): 1, (2, 1): 2}


def test_flushes_never_overlap(rig):
    rig.pool.hold_next = True
    rig.service.received(session(1), frame([status(1, runs=1)]))
    rig.tick()
    rig.service.received(session(1), frame([status(1, runs=2)]))
    rig.tick()
    waiting = rig.service.flush()  # e.g. from stopService: waits for the running one
    assert rig.pool.calls == ["apply"] and not waiting.called
    rig.pool.release()
    assert waiting.called and rig.pool.rows()[(1, 1)][1] == 1
    rig.tick()
    assert rig.pool.rows()[(1, 1)][1] == 2  # the newer one, never overwritten by the older


def test_stopping_writes_what_is_buffered_after_a_running_flush(rig):
    rig.pool.hold_next = True
    rig.service.received(session(1), frame([status(1, runs=1)]))
    rig.tick()
    rig.service.received(session(1), frame([status(2, runs=5)]))
    stopped = rig.service.stopService()
    assert not stopped.called
    rig.pool.release()
    assert stopped.called
    assert {k: v[1] for k, v in rig.pool.rows().items()} == {(1, 1): 1, (2, 1): 5}
    assert rig.clock.getDelayedCalls() == []  # the timer is gone


def test_the_wire_shape_of_the_agent_is_accepted():
    """What the agent's TaskStatus.to_wire() produces (kept in step with the agent)."""
    from taskd.agent.contract import TaskStatus

    wire = [TaskStatus(5, "builtin").to_wire(),
            TaskStatus(6, "snap", "error", "boom", 1767323045.0, 1.5, None, 4, 1, 2).to_wire()]
    entries, problems = parse_payload(json.loads(json.dumps(wire)), 9)
    assert problems == [] and [(t, r.outcome) for t, r in entries] == [(5, "pending"), (6, "error")]


# -- what the database refuses ---------------------------------------------------------------

def test_a_lone_surrogate_in_an_error_is_stored_replaced(rig):
    """JSON accepts "\\ud800"; no database driver can encode it."""
    rig.service.received(session(1), Frame(framing.TASK_STATUS, json.dumps([status(1, error="bad \ud800 x")]).encode()))
    assert rig.service.pending[(1, 1)].error == "bad ? x"
    rig.tick()
    assert rig.service.failed_flushes == 0 and set(rig.pool.rows()) == {(1, 1)}


def refused_row(task_id: int = 2, agent_id: int = 1) -> TaskStatusRow:
    """A status the database cannot store (what parse_entry no longer lets through)."""
    return TaskStatusRow(task_id=task_id, agent_id=agent_id, executor="snap", outcome="error", error="\ud800")


def test_a_status_the_database_refuses_is_dropped_alone_not_failing_every_flush(rig):
    rig.service.received(session(1), frame([status(1), status(3)]))
    rig.service.received(session(2), frame([status(2)]))
    rig.service.pending[(2, 1)] = refused_row()
    rig.tick()
    assert rig.service.failed_flushes == 0 and rig.service.pending == {}
    assert set(rig.pool.rows()) == {(1, 1), (3, 1), (2, 2)} and rig.service.rows_refused == 1
    [line] = [line for line in rig.logs if "refused" in line]
    assert line.startswith("the database refused 1 task status(es), dropped: task 2 of agent 1 (UnicodeEncodeError")
    rig.service.received(session(1), frame([status(2, runs=9)]))
    rig.tick()
    assert rig.pool.rows()[(2, 1)][1] == 9 and rig.service.failed_flushes == 0


def test_a_database_refusing_everything_fails_the_flush_instead_of_dropping_it(rig, monkeypatch):
    """Not the data's fault (a full disk, say): the batch is kept for the next flush,
    after a bounded number of tries."""
    tries: list[int] = []

    def refuse(conn: Any, rows: list) -> None:
        tries.append(len(rows))
        raise sa.exc.OperationalError("INSERT", {}, Exception("database or disk is full"))

    monkeypatch.setattr(status_db, "_upsert", refuse)
    rig.service.received(session(1), frame([status(1), status(2), status(3)]))
    rig.service.pending[(1, 2)] = refused_row(1, 2)
    rig.tick()
    assert rig.service.failed_flushes == 1 and rig.service.rows_refused == 0 and len(rig.service.pending) == 4
    assert len(tries) == 7  # 4 rows, 2 halves, 4 single rows: then no row was written at all
    big = Rig(agents=1, tasks=2000)
    big.service.received(session(1, tasks=range(1, 2001)), frame([status(t) for t in range(1, 2001)]))
    tries.clear()
    big.tick()
    assert big.service.failed_flushes == 1 and len(tries) == MAX_REFUSALS and len(big.service.pending) == 2000
    big.service.stopService()


# -- only the statuses of this server's agents ----------------------------------------------

def test_only_agents_with_a_session_on_this_server_are_written():
    rig = Rig(agents=3, instance_id="srv-a")
    with rig.pool.engine.begin() as conn:
        conn.execute(sa.insert(models.agent_session), [
            {"id": f"s{i}", "agent_id": i, "version": 1, "remote_ip": "10.0.0.1", "server": server, "created": T0}
            for i, server in ((1, "srv-a"), (2, "srv-b"))])  # agent 3: no session anywhere
    for agent_id in (1, 2, 3):
        rig.service.received(session(agent_id), frame([status(1, runs=agent_id), status(2)]))
    rig.tick()
    assert set(rig.pool.rows()) == {(1, 1), (2, 1)} and rig.service.rows_written == 2
    with rig.pool.engine.begin() as conn:  # what the agents' servers wrote
        conn.execute(sa.insert(models.task_status), [
            {"task_id": 3, "agent_id": i, "executor": "snap", "outcome": "ok", "error": "", "runs": 0,
             "failures": 0, "skipped": 0, "updated": T0} for i in (1, 2)])
    for agent_id in (1, 2):
        rig.service.received(session(agent_id), frame([{"taskId": 3, "removed": True}]))
    rig.tick()
    assert set(rig.pool.rows()) == {(1, 1), (2, 1), (3, 2)}  # agent 2's row is srv-b's to remove
    rig.service.stopService()


def test_a_transient_error_behind_a_failed_savepoint_rollback_fails_the_flush(rig, monkeypatch):
    """A deadlock ends the whole transaction (MySQL): what fails next is the rollback to
    the savepoint. That is the database's state, not a row to drop: the flush is retried."""
    deadlock = sa.exc.OperationalError("INSERT", {}, Exception(1213, "Deadlock found"))

    real = status_db._upsert

    def refuse(conn: Any, rows: list) -> None:
        if all(r["task_id"] != 2 for r in rows):
            return real(conn, rows)
        try:
            raise deadlock
        except sa.exc.OperationalError:
            raise sa.exc.OperationalError("ROLLBACK TO SAVEPOINT", {}, Exception(1305, "SAVEPOINT does not exist"))

    monkeypatch.setattr(status_db, "_upsert", refuse)
    rig.service.received(session(1), frame([status(1), status(2)]))
    rig.tick()
    assert rig.service.failed_flushes == 1 and rig.service.rows_refused == 0 and len(rig.service.pending) == 2
