"""The DB pool: work runs off the reactor thread, in one transaction, and survives the
MySQL server dropping its connections."""
from __future__ import annotations

import threading

import pymysql
import pytest
import pytest_twisted
import sqlalchemy as sa
from twisted.internet import reactor

from taskd.db import migrate, models
from taskd.db.engine import create_engine
from taskd.db.pool import DBPool
from tests.conftest import MYSQL_HOST, MYSQL_PASSWORD, MYSQL_PORT, MYSQL_USER


@pytest.fixture
def pool(db_config):
    engine = create_engine(*db_config, pool_size=2)
    migrate.upgrade(engine)
    from tests.conftest import wipe

    wipe(engine)
    p = DBPool(engine, reactor)
    p.start()
    yield p
    p.stop()


def _insert_agent(conn: sa.Connection, name: str, fail: bool = False) -> int:
    from taskd.timeutil import utcnow

    now = utcnow()
    conn.execute(sa.insert(models.agent).values(org_id=1, name=name, enabled=False, public=False,
                                                online=False, created=now, updated=now))
    if fail:
        raise RuntimeError("boom after the insert")
    return threading.get_ident()


@pytest_twisted.ensureDeferred
async def test_work_runs_off_the_reactor_thread(pool):
    ident = await pool.do(_insert_agent, "a1")
    assert ident != threading.get_ident()


@pytest_twisted.ensureDeferred
async def test_a_failing_unit_of_work_leaves_nothing_behind(pool):
    with pytest.raises(RuntimeError):
        await pool.do(_insert_agent, "half", fail=True)
    count = await pool.do(lambda c: c.execute(sa.select(sa.func.count()).select_from(models.agent)).scalar())
    assert count == 0


@pytest.fixture
def mysql_pool(mysql_dbs):
    engine = create_engine("mysql", mysql_dbs.dsn(mysql_dbs.create("pool")), pool_size=2)
    p = DBPool(engine, reactor, max_threads=2, retry_delay=0.01)
    p.start()
    yield p
    p.stop()


def _kill(conn_id: int) -> None:
    admin = pymysql.connect(host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, password=MYSQL_PASSWORD)
    with admin.cursor() as cur:
        cur.execute(f"KILL CONNECTION {int(conn_id)}")
    admin.close()


@pytest_twisted.ensureDeferred
async def test_idle_connection_killed_by_the_server_is_replaced(mysql_pool):
    conn_id = await mysql_pool.do(lambda c: c.exec_driver_sql("SELECT CONNECTION_ID()").scalar())
    _kill(conn_id)
    again = await mysql_pool.do(lambda c: c.exec_driver_sql("SELECT CONNECTION_ID()").scalar())
    assert again != conn_id


@pytest_twisted.ensureDeferred
async def test_connection_lost_mid_transaction_is_retried_whole(mysql_pool):
    """"Server gone away" in the middle of a unit of work: rolled back, run again."""
    attempts = []

    def work(conn: sa.Connection) -> int:
        attempts.append(conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar())
        if len(attempts) == 1:
            _kill(attempts[0])
        return conn.exec_driver_sql("SELECT 42").scalar()

    assert await mysql_pool.do(work) == 42
    assert len(attempts) == 2 and attempts[0] != attempts[1]


@pytest_twisted.ensureDeferred
async def test_non_transient_errors_are_not_retried(mysql_pool):
    attempts = []

    def work(conn: sa.Connection) -> None:
        attempts.append(1)
        conn.exec_driver_sql("SELECT * FROM no_such_table")

    with pytest.raises(sa.exc.ProgrammingError):
        await mysql_pool.do(work)
    assert len(attempts) == 1


@pytest.fixture
def one_connection(mysql_dbs, monkeypatch):
    """A pool over one MariaDB connection that is never retried: what a `do` gets is
    what the engine handed it."""
    engine = create_engine("mysql", mysql_dbs.dsn(mysql_dbs.create("onecon")), pool_size=1)
    migrate.upgrade(engine)
    p = DBPool(engine, reactor, max_threads=1, retries=0)
    p.start()
    yield p
    p.stop()


def _rollbacks(conn: sa.Connection) -> int:
    return int(conn.exec_driver_sql("SHOW SESSION STATUS LIKE 'Com_rollback'").one()[1])


@pytest_twisted.ensureDeferred
async def test_a_committed_connection_goes_back_to_the_pool_without_a_rollback(one_connection):
    """taskd.db.engine: no reset ROLLBACK after the pool's own COMMIT (a round trip of
    every transaction on MariaDB)."""
    before = await one_connection.do(_rollbacks)
    for i in range(3):
        await one_connection.do(_insert_agent, f"c{i}")
    assert await one_connection.do(_rollbacks) == before


@pytest_twisted.ensureDeferred
async def test_a_connection_returned_inside_a_transaction_is_rolled_back_and_holds_no_lock(one_connection):
    """Anything but the pool's committed work is still reset when it goes back (here a
    raw DBAPI connection that read a table and never ended its transaction, which
    SQLAlchemy's own Connection would have rolled back on close): pooled, it would
    hold that table's metadata lock and block DDL on it."""
    await one_connection.do(_insert_agent, "committed")  # the pool's own work first, on the same connection
    raw = one_connection.engine.raw_connection()
    cur = raw.cursor()
    cur.execute("SELECT id FROM agent")  # a transaction begins (autocommit is off), never ends
    cur.fetchall()
    raw.close()  # back to the pool
    admin = pymysql.connect(host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, password=MYSQL_PASSWORD,
                            database=one_connection.engine.url.database)
    try:
        with admin.cursor() as cur:
            cur.execute("SET SESSION lock_wait_timeout = 2")
            cur.execute("ALTER TABLE agent COMMENT = 'not blocked'")  # 1205 if the pooled one held it
    finally:
        admin.close()
    assert await one_connection.do(lambda c: c.exec_driver_sql("SELECT 1").scalar()) == 1


@pytest_twisted.ensureDeferred
async def test_only_a_connection_idle_past_idle_ping_is_pinged_at_checkout(one_connection, monkeypatch):
    """The checkout ping (what pool_pre_ping did for every transaction) is kept for a
    connection that sat idle: one the server dropped meanwhile is replaced before the
    work runs, with no retry needed. A connection in steady use is not pinged: if the
    server drops it, the work's own statement finds out (and the pool would retry)."""
    from taskd.db import engine as engine_module
    from taskd.db.availability import DatabaseUnavailable

    monkeypatch.setattr(engine_module, "IDLE_PING", 0.0)
    first = await one_connection.do(lambda c: c.exec_driver_sql("SELECT CONNECTION_ID()").scalar())
    _kill(first)
    second = await one_connection.do(lambda c: c.exec_driver_sql("SELECT CONNECTION_ID()").scalar())
    assert second != first

    monkeypatch.setattr(engine_module, "IDLE_PING", 3600.0)
    _kill(second)
    with pytest.raises(DatabaseUnavailable):  # retries=0: not pinged, so the statement met the loss
        await one_connection.do(lambda c: c.exec_driver_sql("SELECT CONNECTION_ID()").scalar())


def test_a_transaction_left_idle_by_a_stopped_process_is_ended_by_the_database(mysql_dbs):
    """taskd.db.engine: with db-timeout set, MariaDB ends a transaction of ours that sits
    idle that long, so a server frozen in the middle of one (SIGSTOP, a paused VM) does
    not hold its row locks, and every other server's heartbeat and reap behind them, for
    as long as it stays frozen. Without it the other writer below waits out its own
    lock-wait timeout (20 s) and fails with 1205."""
    name = mysql_dbs.create("idletx")
    admin = pymysql.connect(host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, password=MYSQL_PASSWORD,
                            database=name, autocommit=True)
    engine = create_engine("mysql", mysql_dbs.dsn(name), pool_size=1, timeout=1)
    try:
        with admin.cursor() as cur:
            cur.execute("CREATE TABLE t (id INT PRIMARY KEY, x INT) ENGINE=InnoDB")
            cur.execute("INSERT INTO t VALUES (1, 0)")
        frozen = engine.raw_connection()  # what a server stopped mid-transaction leaves
        frozen_cur = frozen.cursor()
        frozen_cur.execute("UPDATE t SET x = x + 1 WHERE id = 1")  # the row lock, never committed
        with admin.cursor() as cur:
            cur.execute("SET SESSION innodb_lock_wait_timeout = 20")
            cur.execute("UPDATE t SET x = 10 WHERE id = 1")  # waits until the database ends the idle one
            cur.execute("SELECT x FROM t WHERE id = 1")
            assert cur.fetchone() == (10,)  # and the frozen one's update was rolled back
        with pytest.raises(pymysql.err.OperationalError):
            frozen_cur.execute("SELECT 1")  # its connection is gone
        frozen.invalidate()
    finally:
        admin.close()
        engine.dispose()
