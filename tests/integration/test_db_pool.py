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
