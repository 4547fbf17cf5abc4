"""Turning `db-type` + `db-connect-str` into a SQLAlchemy engine.

Operators carry their connection strings over from the Go server, so both of its forms
are read as well as plain SQLAlchemy URLs:

* mysql: the Go driver's DSN ``USER:PASS@tcp(HOST:PORT)/DB?charset=utf8`` (also
  ``unix(/path/to.sock)``), or ``mysql://…`` / ``mysql+pymysql://…``.
* sqlite3: a path, the Go ``file:/path.db?cache=shared&mode=rwc`` form, or
  ``sqlite:///path``; empty means :data:`DEFAULT_SQLITE_PATH`.
"""
from __future__ import annotations

import math
import os
import re
import time
from typing import Any
from urllib.parse import parse_qsl, unquote

import pymysql
import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url

DEFAULT_SQLITE_PATH = "/var/lib/taskd/task-server.db"

_GO_DSN = re.compile(
    r"^(?:(?P<user>[^:@/]*)(?::(?P<password>.*))?@)?"
    r"(?:(?P<net>tcp|unix)\((?P<addr>[^)]*)\))?"
    r"/(?P<db>[^?]*)(?:\?(?P<params>.*))?$"
)


class DatabaseConfigError(ValueError):
    """The connection string cannot be used; the message names the key and the fix."""


def mysql_url(connect_str: str) -> URL:
    """A SQLAlchemy URL for PyMySQL from a Go DSN or a URL."""
    if "://" in connect_str:
        try:
            url = make_url(connect_str)
        except (ValueError, sa.exc.ArgumentError):
            # The parser's own message may quote the URL, password included.
            raise DatabaseConfigError(
                "db-connect-str: not a valid mysql:// URL (check the port is a number)"
            ) from None
        if url.get_backend_name() not in ("mysql", "mariadb"):
            raise DatabaseConfigError(
                f"db-connect-str: a {url.get_backend_name()!r} URL cannot be used with db-type = mysql"
            )
        return _with_charset(url.set(drivername="mysql+pymysql"))
    m = _GO_DSN.match(connect_str)
    if not m or not m.group("db"):
        raise DatabaseConfigError(
            "db-connect-str: expected USER:PASS@tcp(HOST:PORT)/DB?charset=utf8 "
            "or a mysql:// URL"
        )
    query: dict[str, str] = {}
    host, port = "localhost", 3306
    if m.group("net") == "unix":
        query["unix_socket"] = m.group("addr")
    elif m.group("addr"):
        host, _, port_s = m.group("addr").rpartition(":") if ":" in m.group("addr") else (m.group("addr"), "", "")
        if port_s:
            if not port_s.isdigit():
                raise DatabaseConfigError("db-connect-str: the port in tcp(HOST:PORT) is not a number")
            port = int(port_s)
        host = host.strip("[]") or "localhost"
    for key, value in parse_qsl(m.group("params") or ""):
        if key == "charset":
            query["charset"] = value
    url = URL.create(
        "mysql+pymysql",
        username=unquote(m.group("user") or "") or None,
        password=m.group("password"),
        host=host,
        port=port,
        database=m.group("db"),
        query=query,
    )
    return _with_charset(url)


def _with_charset(url: URL) -> URL:
    # Go's "utf8" is MySQL's 3-byte utf8mb3; taskd stores any Unicode, so always utf8mb4.
    charset = url.query.get("charset", "utf8mb4")
    if charset in ("utf8", "utf8mb3"):
        charset = "utf8mb4"
    return url.update_query_dict({"charset": charset})


def sqlite_path(connect_str: str) -> str:
    """The database file for a sqlite connect string (``:memory:`` allowed for tests)."""
    s = connect_str.strip()
    if not s:
        return DEFAULT_SQLITE_PATH
    if s.startswith("sqlite:"):
        return make_url(s).database or ":memory:"
    if s.startswith("file:"):
        s = s[len("file:"):].split("?", 1)[0]
    return s


def create_engine(db_type: str, connect_str: str, *, pool_size: int = 10, timeout: float | None = None) -> Engine:
    """An engine for the configured database, with sqlite set up for a daemon's use.

    `timeout` (`db-timeout`) bounds every connect, read and write of a MySQL connection,
    so a stalled server frees the pool's threads instead of holding them for as long as
    the stall lasts (the pool's own deadline answers the callers meanwhile)."""
    if db_type == "mysql":
        connect_args: dict[str, Any] = {}
        if timeout:
            connect_args = {"connect_timeout": timeout, "read_timeout": timeout, "write_timeout": timeout}
        engine = sa.create_engine(
            mysql_url(connect_str),
            pool_recycle=3600,
            pool_size=pool_size,
            max_overflow=0,
            isolation_level="READ COMMITTED",
            connect_args=connect_args,
            pool_reset_on_return=None,  # _setup_mysql_pool: only what needs it is rolled back
        )
        _setup_mysql_pool(engine)
        if timeout:
            _bound_idle_transactions(engine, timeout)
        return engine
    if db_type != "sqlite3":
        raise DatabaseConfigError(f"db-type: {db_type!r} is not sqlite3 or mysql")
    path = sqlite_path(connect_str)
    if path != ":memory:":
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise DatabaseConfigError(
                f"db-connect-str: directory {directory} for the sqlite database does not exist"
            )
    engine = sa.create_engine(
        f"sqlite:///{path}", connect_args={"check_same_thread": False, "timeout": 30}
    )
    _setup_sqlite(engine)
    return engine


IDLE_PING = 30.0
"""Seconds a MySQL connection may have sat in the pool before it is pinged on checkout."""

COMMITTED = "taskd_committed"
"""Key of a pooled connection's `info`: its last transaction committed (taskd.db.pool)."""

_UNKNOWN_SYSTEM_VARIABLE = 1193  # MySQL's answer to SET of a variable it lacks


def _bound_idle_transactions(engine: Engine, timeout: float) -> None:
    """The database ends a transaction of ours that sits idle for `timeout` (db-timeout).

    Our own work never leaves a transaction idle that long: statements follow one
    another, and past db-timeout the pool has given the work up anyway. A transaction
    idle that long belongs to a process that stopped in the middle of it (a server
    frozen by SIGSTOP, a paused VM, a host gone while its TCP connection lingers). Its
    row locks would otherwise stay held for as long as that lasts, and every other
    server's heartbeat and reap that touch those rows would wait on them (each a
    `db-timeout` 503 in turn), so nobody could reap the frozen server. MariaDB's
    `idle_transaction_timeout` closes that connection and rolls the transaction back
    (a server that comes back finds the connection lost, which the pool retries).
    Ignored where the server does not have the variable (MySQL)."""
    seconds = max(1, math.ceil(timeout))

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"SET SESSION idle_transaction_timeout = {seconds}")
        except pymysql.err.MySQLError as exc:
            if not exc.args or exc.args[0] != _UNKNOWN_SYSTEM_VARIABLE:
                raise
        finally:
            cur.close()


def _setup_mysql_pool(engine: Engine) -> None:
    """Two round trips fewer per transaction, without giving up what they were for.

    SQLAlchemy's defaults cost each `pool.do` a ping at checkout (`pool_pre_ping`) and a
    ROLLBACK at checkin (reset on return), besides the work and its COMMIT: on MariaDB,
    where each is a round trip (and pymysql CPU in the GIL), that was two of a create's
    seven statements (bench/analysis.md, POST on MariaDB). Instead a connection is
    pinged only when it has sat idle for IDLE_PING (what the ping was for: "server has
    gone away" after quiet hours; a connection that dies in use is a lost-connection
    error, which the pool retries), and the ROLLBACK is skipped only for a connection
    whose transaction the pool just committed; any other connection (a failed commit,
    raw DBAPI use) is rolled back as before, so none is pooled holding a transaction or
    its metadata locks."""

    @sa.event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info["returned"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        returned = record.info.get("returned")
        if returned is not None and time.monotonic() - returned > IDLE_PING:
            try:
                dbapi_conn.ping(reconnect=False)
            except Exception as exc:  # the pool replaces it with a new connection
                raise sa.exc.DisconnectionError(f"idle connection lost: {exc}") from exc

    @sa.event.listens_for(engine, "reset")
    def _on_reset(dbapi_conn: Any, record: Any, _state: Any) -> None:
        if record is not None and record.info.pop(COMMITTED, False):
            return
        dbapi_conn.rollback()


def _setup_sqlite(engine: Engine) -> None:
    """WAL for concurrent readers, enforced foreign keys, and real transactions.

    pysqlite's own transaction handling starts transactions late and commits DDL
    implicitly; the SQLAlchemy-documented recipe below makes BEGIN explicit so that a
    unit of work is one transaction, as on MySQL.
    """

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")
