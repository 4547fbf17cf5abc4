"""Two servers refreshing one org's catalog at once (issue 11's chaos suite found it: agents
of one org connecting on two servers at the same moment, both first to advertise a
metric). Both transactions find the metric row missing; the second insert waits on the
unique key for the first and then failed with 1062, logged critical, and that agent's
catalog was not stored. It must instead give way and leave one row per metric."""
from __future__ import annotations

import threading

import pymysql
import pytest_twisted
import sqlalchemy as sa

from taskd.db import migrate
from taskd.db import models as m
from taskd.db.catalog import refresh_org_catalog
from taskd.db.engine import create_engine
from taskd.timeutil import utcnow
from tests.conftest import MYSQL_HOST, MYSQL_PASSWORD, MYSQL_PORT, MYSQL_USER
from tests.waiting import until


def _inserting(database: str) -> int:
    """Sessions of `database` inside an INSERT into metric: the second refresh, waiting
    on the unique key the first holds (innodb_trx does not always list the waiter)."""
    conn = pymysql.connect(host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, password=MYSQL_PASSWORD)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM information_schema.processlist WHERE db = %s"
                        " AND command = 'Query' AND info LIKE 'INSERT INTO metric%%'", (database,))
            return cur.fetchone()[0]
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_a_refresh_that_loses_the_insert_race_gives_way_and_keeps_one_row_per_metric(mysql_dbs):
    name = mysql_dbs.create("catalog_race")
    engine = create_engine("mysql", mysql_dbs.dsn(name), pool_size=3)
    migrate.upgrade(engine)
    now = utcnow()
    with engine.begin() as conn:
        ids = []
        for agent, public in (("a1", False), ("a2", True)):
            ids.append(conn.execute(sa.insert(m.agent).values(
                org_id=7, name=agent, enabled=True, public=public, online=True, created=now, updated=now)).inserted_primary_key[0])
        conn.execute(sa.insert(m.agent_metric), [{"agent_id": i, "namespace": ns, "version": 1, "created": now}
                                                 for i in ids for ns in ("/a", "/b")])
    first = engine.connect()
    tx = first.begin()
    refresh_org_catalog(first, 7, now)  # inserts /a and /b, holds their keys until it commits

    errors: list[BaseException] = []

    def second() -> None:
        try:
            with engine.begin() as conn:
                refresh_org_catalog(conn, 7, now)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    # A thread of its own: the reactor's shared pool may be busy with other tests' work.
    racer = threading.Thread(target=second, daemon=True)
    racer.start()
    try:
        await until(lambda: _inserting(name) > 0, 30, what=lambda: f"the second refresh waiting on the first's insert (errors: {errors}, alive: {racer.is_alive()})",
                    interval=0.05)
    finally:
        tx.commit()
        first.close()
    await until(lambda: not racer.is_alive(), 60, what="the second refresh ending")
    assert errors == []  # it raised IntegrityError (1062) before
    with engine.connect() as conn:
        rows = conn.execute(sa.select(m.metric.c.namespace, m.metric.c.public).where(m.metric.c.org_id == 7)
                            .order_by(m.metric.c.namespace)).all()
    assert [tuple(r) for r in rows] == [("/a", True), ("/b", True)]  # a2 is public: so is what it gives
    engine.dispose()
