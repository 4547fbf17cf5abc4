"""The database keys of a config file, owned by the database layer.

The task-server reads them among its settings and `taskd-db` reads only them, from the
same file, so both accept the same INI, environment variables and flags without the
database layer importing the server's settings.
"""
from __future__ import annotations

from taskd.config import Option
from taskd.configtypes import choice, int_range
from taskd.db.engine import DEFAULT_SQLITE_PATH


def redact_userinfo(value: str) -> str:
    """Hide the password of ``scheme://user:pass@host`` or ``user:pass@tcp(host)``."""
    head, at, tail = value.rpartition("@")
    scheme, sep, userinfo = head.rpartition("://")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}{sep}{user}:***@{tail}" if at and colon else value


DB_OPTIONS: tuple[Option, ...] = (
    Option("db-type", choice("sqlite3", "mysql"), "sqlite3",
           "Database engine: sqlite3 or mysql."),
    Option("db-connect-str", str, "",
           f"Database to use: for sqlite3 a file path (empty means {DEFAULT_SQLITE_PATH}),"
           " for mysql a DSN USER:PASSWORD@tcp(HOST:3306)/DBNAME (required).",
           secret=True, redact=redact_userinfo),
    Option("db-pool-size", int_range(1, 100), "10",
           "Most database connections held open at once (1..100)."),
)
