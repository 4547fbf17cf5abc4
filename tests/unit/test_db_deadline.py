"""The pool's deadline (db-timeout) on a Clock: the caller is answered DatabaseUnavailable
once it passes, queue wait included; work that finishes later is rolled back, not
committed; an outage is logged once when it starts and once when it ends.

The "thread pool" here runs the work when the test says so, in the test's thread, so
"the database is stalled" is simply work that has not run yet."""
from __future__ import annotations

from typing import Any

import pymysql
import pytest
import sqlalchemy as sa
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from taskd.db.availability import DatabaseUnavailable
from taskd.db.engine import create_engine
from taskd.db.pool import DBPool

TIMEOUT = 2.0


class ThreadClock(Clock):
    """A Clock that deferToThreadPool can report results through."""

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


class ManualThreadPool:
    """Holds the work until `run_next`: a stalled database, as the caller sees it."""

    def __init__(self) -> None:
        self.queue: list[tuple] = []

    def callInThreadWithCallback(self, on_result: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        self.queue.append((on_result, f, args, kwargs))

    def run_next(self) -> None:
        on_result, f, args, kwargs = self.queue.pop(0)
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class Rig:
    def __init__(self, tmp_path: Any) -> None:
        self.clock = ThreadClock()
        self.threads = ManualThreadPool()
        self.engine = create_engine("sqlite3", str(tmp_path / "t.db"))
        with self.engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        self.pool = DBPool(self.engine, self.clock, timeout=TIMEOUT, retry_delay=0, threadpool=self.threads)
        self.pool.start()

    def rows(self) -> int:
        with self.engine.connect() as conn:
            return conn.exec_driver_sql("SELECT COUNT(*) FROM t").scalar()

    def insert(self, conn: sa.Connection) -> str:
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        return "inserted"


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.engine.dispose()


@pytest.fixture
def warnings():
    seen: list[str] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace", "").startswith("taskd.db") and event["log_level"].name in ("warn", "error", "critical"):
            from twisted.logger import formatEvent

            seen.append(formatEvent(event))
            assert "log_failure" not in event  # no traceback for an outage

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def outcome(d: Any) -> list:
    got: list = []
    d.addBoth(got.append)
    return got


def test_work_done_within_the_deadline_answers_and_leaves_no_timer(rig):
    got = outcome(rig.pool.do(rig.insert))
    rig.clock.advance(TIMEOUT - 0.1)
    rig.threads.run_next()
    assert got == ["inserted"] and rig.rows() == 1
    assert rig.clock.getDelayedCalls() == []


def test_work_queued_past_the_deadline_is_answered_unavailable_and_never_runs(rig):
    got = outcome(rig.pool.do(rig.insert))
    rig.clock.advance(TIMEOUT - 0.1)
    assert got == []
    rig.clock.advance(0.1)
    assert len(got) == 1 and got[0].check(DatabaseUnavailable)
    assert got[0].value.retry_after == 2 and "db-timeout" in got[0].value.reason
    rig.threads.run_next()  # the stalled thread gets to it at last
    assert rig.rows() == 0 and len(got) == 1


def test_a_write_finishing_after_its_deadline_is_rolled_back(rig):
    def slow_insert(conn: sa.Connection) -> str:
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        rig.clock.advance(TIMEOUT)  # the statement took that long: the caller was answered meanwhile
        return "inserted"

    got = outcome(rig.pool.do(slow_insert))
    rig.threads.run_next()
    assert len(got) == 1 and got[0].check(DatabaseUnavailable)
    assert rig.rows() == 0  # told it failed, so it did not happen


def lost_connection(conn: sa.Connection) -> None:
    raise sa.exc.OperationalError("SELECT 1", {}, pymysql.err.OperationalError(2003, "Can't connect to MySQL"))


def test_an_unreachable_database_after_the_retries_is_unavailable(rig):
    got = outcome(rig.pool.do(lost_connection))
    rig.threads.run_next()
    assert len(got) == 1 and got[0].check(DatabaseUnavailable)
    assert "Can't connect" in got[0].value.reason
    assert not rig.pool.availability.available


def test_other_database_errors_are_passed_on_as_they_are(rig):
    got = outcome(rig.pool.do(lambda conn: conn.exec_driver_sql("SELECT * FROM no_such_table")))
    rig.threads.run_next()
    assert got[0].check(sa.exc.OperationalError) and rig.pool.availability.available


def test_an_outage_is_one_warning_when_it_starts_and_one_when_it_ends(rig, warnings):
    for _ in range(3):
        outcome(rig.pool.do(rig.insert))
    rig.clock.advance(TIMEOUT)
    for _ in range(3):
        rig.threads.run_next()
    got = outcome(rig.pool.do(lost_connection))
    rig.threads.run_next()
    assert got[0].check(DatabaseUnavailable)
    assert len(warnings) == 1 and "database unavailable" in warnings[0] and "db-timeout" in warnings[0]
    assert rig.pool.availability.state() == {"database": "unavailable", "unavailableSeconds": 0.0}
    rig.clock.advance(7.5)
    assert rig.pool.availability.state()["unavailableSeconds"] == 7.5
    got = outcome(rig.pool.do(rig.insert))
    rig.threads.run_next()
    assert got == ["inserted"]
    assert warnings[1:] == ["database available again after 7.5s"]
    assert rig.pool.availability.state() == {"database": "available"}


def test_the_probe_follows_the_database_with_one_check_at_a_time(rig):
    first = rig.pool.probe()
    assert rig.pool.probe() is first and len(rig.threads.queue) == 1
    rig.clock.advance(TIMEOUT)
    assert not rig.pool.availability.available and first.called
    rig.threads.run_next()  # the late answer of the abandoned probe changes nothing
    assert not rig.pool.availability.available
    rig.pool.probe()
    rig.threads.run_next()
    assert rig.pool.availability.available
