"""The database keys of a config file, owned by the database layer.

The task-server reads them among its settings and `taskd-db` reads only them, from the
same file, so both accept the same INI, environment variables and flags without the
database layer importing the server's settings.
"""
from __future__ import annotations

from taskd.config import Option
from taskd.configtypes import choice, int_range, parse_duration
from taskd.db.engine import DEFAULT_SQLITE_PATH


def redact_userinfo(value: str) -> str:
    """Hide the password of ``scheme://user:pass@host`` or ``user:pass@tcp(host)``."""
    head, at, tail = value.rpartition("@")
    scheme, sep, userinfo = head.rpartition("://")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}{sep}{user}:***@{tail}" if at and colon else value


def db_timeout(raw: str) -> float:
    """A deadline: 0 would fail every statement, hours would hang the API as before."""
    seconds = parse_duration(raw)
    if not 0.1 <= seconds <= 3600:
        raise ValueError("must be between 100ms and 1h, e.g. 5s")
    return seconds


DB_OPTIONS: tuple[Option, ...] = (
    Option("db-type", choice("sqlite3", "mysql"), "sqlite3",
           "Database engine: sqlite3 or mysql."),
    Option("db-connect-str", str, "",
           f"Database to use: for sqlite3 a file path (empty means {DEFAULT_SQLITE_PATH}),"
           " for mysql a DSN USER:PASSWORD@tcp(HOST:3306)/DBNAME (required).",
           secret=True, redact=redact_userinfo),
    Option("db-pool-size", int_range(1, 100), "10",
           "Most database connections held open at once for serving (1..100); with mysql"
           " the server holds one more, its liveness heartbeat's own."),
    Option("db-timeout", db_timeout, "5s",
           "Longest wait for the database per operation (connect, read, write, and the"
           " wait for a free connection); past it API calls answer 503 'database"
           " unavailable' with Retry-After, and agent sessions retry their database work."),
    Option("db-encryption-key", str, "",
           "Key file(s) sealing task config at rest (comma-separated paths; one key per"
           " line, 64 hex digits: `taskd-db genkey`). The first key seals, every key"
           " unseals: rotate by putting a new key first, then `taskd-db reencrypt`."
           " Empty stores task config in clear (the server warns at start-up)."),
)
