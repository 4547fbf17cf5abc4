"""Shared fixtures: the real databases every store and API test runs against.

MariaDB is not optional: a test run that cannot reach it fails (it never skips), because
"works on sqlite" is not what ships to operators running MySQL.
"""
from __future__ import annotations

import os
import uuid

import pymysql
import pytest
import sqlalchemy as sa
from twisted.logger import globalLogPublisher

from taskd.db import models

MYSQL_HOST = os.environ.get("TASKD_TEST_MYSQL_HOST", "127.0.0.1")
MYSQL_PORT = int(os.environ.get("TASKD_TEST_MYSQL_PORT", "3306"))
MYSQL_USER = os.environ.get("TASKD_TEST_MYSQL_USER", "root")
MYSQL_PASSWORD = os.environ.get("TASKD_TEST_MYSQL_PASSWORD", "")


def _mysql_admin() -> pymysql.Connection:
    try:
        return pymysql.connect(host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, password=MYSQL_PASSWORD)
    except pymysql.MySQLError as exc:
        pytest.fail(f"MariaDB at {MYSQL_HOST}:{MYSQL_PORT} is required for the tests and is not reachable: {exc}")


class MySQLDatabases:
    """Creates uniquely named databases for this test run and drops them at the end."""

    def __init__(self) -> None:
        self.created: list[str] = []

    def create(self, label: str = "t") -> str:
        name = f"taskd_test_{label}_{uuid.uuid4().hex[:8]}"
        conn = _mysql_admin()
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        conn.close()
        self.created.append(name)
        return name

    def dsn(self, name: str) -> str:
        return f"{MYSQL_USER}:{MYSQL_PASSWORD}@tcp({MYSQL_HOST}:{MYSQL_PORT})/{name}?charset=utf8"

    def drop_all(self) -> None:
        conn = _mysql_admin()
        with conn.cursor() as cur:
            for name in self.created:
                cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


@pytest.fixture(scope="session")
def mysql_dbs():
    dbs = MySQLDatabases()
    yield dbs
    dbs.drop_all()


@pytest.fixture(scope="session")
def shared_mysql_db(mysql_dbs) -> str:
    """One database reused by the API tests (emptied before each test)."""
    return mysql_dbs.create("api")


def wipe(engine: sa.Engine) -> None:
    """Empty every taskd table, children first."""
    with engine.begin() as conn:
        for table in reversed(models.metadata.sorted_tables):
            conn.execute(table.delete())


@pytest.fixture(params=["sqlite", "mysql"])
def db_config(request, tmp_path, shared_mysql_db, mysql_dbs) -> tuple[str, str]:
    """(db-type, db-connect-str) for each real database taskd supports."""
    if request.param == "sqlite":
        return "sqlite3", str(tmp_path / "task-server.db")
    return "mysql", mysql_dbs.dsn(shared_mysql_db)


@pytest.fixture
def logs():
    """Every log event emitted while the test runs (debug included), as dicts."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)
