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


def test_a_commit_on_the_wire_when_the_deadline_strikes_is_waited_for_briefly(rig):
    """Right after a stall every deadline falls while everything commits: a write whose
    COMMIT was sent before its deadline is answered as it ended (here: committed), not
    told it failed while it lands."""
    from taskd.db.pool import COMMIT_GRACE

    def insert_then_commit_slowly(conn: sa.Connection) -> str:
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        # the COMMIT, sent on leaving `fn`, crosses the deadline
        conn.info["on_commit"] = lambda: (rig.clock.advance(TIMEOUT), rig.clock.advance(COMMIT_GRACE / 2))
        return "inserted"

    sa.event.listen(rig.engine, "commit", lambda conn: conn.info.pop("on_commit", lambda: None)())
    got = outcome(rig.pool.do(insert_then_commit_slowly))
    rig.threads.run_next()
    assert got == ["inserted"] and rig.rows() == 1
    assert rig.clock.getDelayedCalls() == []


def test_a_commit_that_outlasts_the_grace_is_answered_unavailable(rig):
    from taskd.db.pool import COMMIT_GRACE

    committing: list = []

    def insert(conn: sa.Connection) -> str:
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        conn.info["on_commit"] = lambda: committing.append((rig.clock.advance(TIMEOUT), rig.clock.advance(COMMIT_GRACE)))
        return "inserted"

    sa.event.listen(rig.engine, "commit", lambda conn: conn.info.pop("on_commit", lambda: None)())
    got = outcome(rig.pool.do(insert))
    rig.threads.run_next()
    # told unavailable once the grace passed (the outcome is unknown to it: here it did commit)
    assert committing and len(got) == 1 and got[0].check(DatabaseUnavailable)


def test_a_failure_begun_before_the_database_came_back_opens_no_second_outage(rig, warnings):
    stalled = outcome(rig.pool.do(rig.insert))  # begun during the stall, answered at its deadline
    rig.clock.advance(TIMEOUT - 0.5)
    late = outcome(rig.pool.do(rig.insert))  # begun during the stall too, deadline 0.5 s later
    rig.clock.advance(0.5)
    assert stalled[0].check(DatabaseUnavailable) and len(warnings) == 1
    fresh = outcome(rig.pool.do(rig.insert))
    rig.threads.queue.insert(0, rig.threads.queue.pop())  # the database is back: the fresh one answers first
    rig.threads.run_next()
    assert fresh == ["inserted"] and warnings[1].startswith("database available again")
    rig.clock.advance(TIMEOUT - 0.5)  # the late one's deadline passes after the recovery
    assert late[0].check(DatabaseUnavailable)
    assert len(warnings) == 2 and rig.pool.availability.available
    rig.threads.run_next()
    rig.threads.run_next()
    assert rig.rows() == 1


def test_a_create_queued_behind_a_stalled_one_is_answered_within_its_own_deadline(tmp_path):
    """Group commit (TaskStore.create): creates that arrive while a batch is in flight wait
    for it. The deadline counts from each create's arrival, and a batch the database does
    not answer fails all its creates at once (no second deadline per create)."""
    from taskd.db import models
    from taskd.db.tasks import GATHER_WAIT, Route, TaskSpec, TaskStore

    rig = Rig(tmp_path)
    models.metadata.create_all(rig.engine)
    store = TaskStore(rig.pool)
    spec = lambda name: TaskSpec(name, "", {}, 60, Route("byTags", {"tags": ["x"]}), {}, True)  # noqa: E731
    first = outcome(store.create(1, spec("first")))
    rig.clock.advance(1.5)
    queued = [outcome(store.create(1, spec(f"queued{i}"))) for i in range(3)]  # wait behind `first`
    rig.clock.advance(TIMEOUT - 1.5)
    assert first[0].check(DatabaseUnavailable) and all(q == [] for q in queued)
    rig.clock.advance(1.5)  # the queued ones' own deadline (they arrived 1.5 s after `first`)
    assert all(len(q) == 1 and q[0].check(DatabaseUnavailable) for q in queued)
    while rig.threads.queue:  # the stalled database answers at last: nothing of it is written
        rig.threads.run_next()
    assert rig.clock.getDelayedCalls() == []
    with rig.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM task").scalar() == 0
    later = outcome(store.create(1, spec("later")))  # and the store goes on
    rig.clock.advance(GATHER_WAIT)  # (after a batch of three, a lone create waits that long for others)
    rig.threads.run_next()
    assert later[0].name == "later"
    rig.engine.dispose()


def test_while_an_outage_is_known_an_unreachable_database_fails_at_once(rig):
    """The first work to find the database unreachable retries (a restart may be over by
    then); once the outage is known, retrying would only hold a pool thread, and the work
    queued behind it past its deadline."""
    tries: list = []

    def counted(conn: sa.Connection) -> None:
        tries.append(1)
        lost_connection(conn)

    first = outcome(rig.pool.do(counted))
    rig.threads.run_next()
    assert first[0].check(DatabaseUnavailable) and len(tries) == 1 + rig.pool.retries
    tries.clear()
    again = outcome(rig.pool.do(counted))
    rig.threads.run_next()
    assert again[0].check(DatabaseUnavailable) and len(tries) == 1
    back = outcome(rig.pool.do(rig.insert))
    rig.threads.run_next()
    assert back == ["inserted"] and rig.pool.availability.available


def test_a_connection_the_database_dropped_is_not_logged_as_an_error_when_returned_to_the_pool():
    """SQLAlchemy logs a failed reset (rollback on return to the pool) at error level with a
    traceback; for a connection the database dropped (it was killed) that is the outage,
    already one warning: the record is dropped. Any other failure is kept."""
    import logging

    from taskd.db.engine import create_engine as make_engine

    engine = make_engine("mysql", "root:@tcp(127.0.0.1:1)/none")  # never connected
    DBPool(engine, ThreadClock(), threadpool=ManualThreadPool())
    logger = logging.getLogger(f"{type(engine.pool).__module__}.{type(engine.pool).__name__}")

    def record(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            import sys

            return logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "Exception during reset or similar",
                                     (), sys.exc_info())

    lost = pymysql.err.OperationalError(2013, "Lost connection to MySQL server during query")
    assert not logger.filter(record(lost))
    assert not logger.filter(record(ConnectionResetError(104, "Connection reset by peer")))
    assert logger.filter(record(pymysql.err.ProgrammingError(1064, "syntax error")))
    assert logger.filter(logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "something else", (), None))
    engine.dispose()


def test_an_agent_lookup_that_waited_behind_another_read_has_only_the_rest_of_its_deadline(tmp_path):
    """The websocket upgrade's batched lookup (BatchLoader): keys that arrived while the
    read before was stalled have waited already; their own read gets what is left of
    db-timeout, so the upgrade is answered within one db-timeout, not two."""
    from taskd.db import models
    from taskd.db.agents import AgentStore

    rig = Rig(tmp_path)
    models.metadata.create_all(rig.engine)
    lookup = outcome(AgentStore(rig.pool).get_many_by_name([(1, "a")], waited=TIMEOUT - 0.5))
    rig.clock.advance(0.5)
    assert len(lookup) == 1 and lookup[0].check(DatabaseUnavailable)
    rig.engine.dispose()


def test_group_commit_lets_a_burst_gather_and_never_holds_a_lone_create(tmp_path):
    """TaskStore.create: after a batch of N, the next transaction waits (up to
    GATHER_WAIT) until N creates are waiting, so a steady load of N clients does not
    split into a batch of one and one of N-1; a create that follows batches of one
    starts at once, and a wait that gathers too few ends at GATHER_WAIT."""
    from taskd.db import models
    from taskd.db.tasks import GATHER_WAIT, Route, TaskSpec, TaskStore

    rig = Rig(tmp_path)
    models.metadata.create_all(rig.engine)
    store = TaskStore(rig.pool)
    spec = lambda name: TaskSpec(name, "", {}, 60, Route("byTags", {"tags": ["x"]}), {}, True)  # noqa: E731

    def written(*names: str) -> list[list]:
        return [outcome(store.create(1, spec(n))) for n in names]

    lone = written("lone")
    assert len(rig.threads.queue) == 1  # the first create of all starts at once
    burst = written("b1", "b2", "b3")  # arrive while it runs
    rig.threads.run_next()
    assert [o[0].name for o in lone] == ["lone"] and len(rig.threads.queue) == 1  # b1-b3 together, at once
    rig.threads.run_next()
    assert [o[0].name for o in burst] == ["b1", "b2", "b3"]

    before = store.create_transactions
    again = written("c1", "c2")
    assert rig.threads.queue == []  # gathering: fewer than the last batch's three
    again += written("c3")
    assert len(rig.threads.queue) == 1  # three: it starts without waiting out GATHER_WAIT
    rig.threads.run_next()
    assert [o[0].name for o in again] == ["c1", "c2", "c3"] and store.create_transactions == before + 1

    late = written("d1")  # only one comes: it waits GATHER_WAIT, no more
    rig.clock.advance(GATHER_WAIT / 2)
    assert rig.threads.queue == []
    rig.clock.advance(GATHER_WAIT / 2)
    assert len(rig.threads.queue) == 1
    rig.threads.run_next()
    assert late[0][0].name == "d1"
    alone = written("e1")  # after a batch of one, a create never waits
    assert len(rig.threads.queue) == 1
    rig.threads.run_next()
    assert alone[0][0].name == "e1"
    rig.engine.dispose()
