"""ids never reused: sqlite AUTOINCREMENT on agent and task

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03

A `byIds` route names agents by id. Without AUTOINCREMENT sqlite gives a new row the
highest id + 1, so deleting org B's newest agent handed its id to the next agent
created anywhere (org C's), which then inherited every task that named the old one.
MySQL/MariaDB's AUTO_INCREMENT already never goes back (MariaDB 10.2.4+ keeps the
counter across restarts), so this is a no-op there.

sqlite cannot add AUTOINCREMENT to a table, so each table is rebuilt (the procedure of
sqlite.org/lang_altertable.html): with foreign keys off, since dropping the old table
would otherwise cascade into every table that references it. That pragma is ignored
inside a transaction, so this revision commits what came before it, rebuilds in its own
transaction (checked with foreign_key_check before it commits), and leaves a transaction
open for alembic to record the revision in. Ids deleted before this revision, above the
highest id left, cannot be known any more; every id from now on is new.

Downgrading rebuilds the tables without AUTOINCREMENT (ids may be reused again).
"""
from __future__ import annotations

import re

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TABLES = ("agent", "task")


def _rebuild(conn, table: str, autoincrement: bool) -> None:
    ddl = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).scalar()
    indexes = [sql for (sql,) in conn.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL", (table,))]
    if autoincrement:
        new, n = re.subn(r"\bid INTEGER NOT NULL,", f"id INTEGER NOT NULL CONSTRAINT pk_{table} PRIMARY KEY AUTOINCREMENT,",
                         ddl, count=1)
        new, m = re.subn(rf",?\s*CONSTRAINT pk_{table} PRIMARY KEY \(id\)", "", new, count=1)
    else:
        new, n = re.subn(rf"\bid INTEGER NOT NULL CONSTRAINT pk_{table} PRIMARY KEY AUTOINCREMENT,",
                         "id INTEGER NOT NULL,", ddl, count=1)
        new, m = re.subn(r"\n\)\s*$", f", \n\tCONSTRAINT pk_{table} PRIMARY KEY (id)\n)", new, count=1)
    if not (n and m):
        raise RuntimeError(f"migration 0005: table {table} is not as revision 0004 left it; its schema:\n{ddl}")
    tmp = f"_{table}_0005"
    new, k = re.subn(rf'^CREATE TABLE "?{table}"? \(', f"CREATE TABLE {tmp} (", new, count=1)  # quoted once renamed
    if not k:
        raise RuntimeError(f"migration 0005: table {table} is not as revision 0004 left it; its schema:\n{ddl}")
    conn.exec_driver_sql(new)
    conn.exec_driver_sql(f"INSERT INTO {tmp} SELECT * FROM {table}")
    conn.exec_driver_sql(f"DROP TABLE {table}")
    conn.exec_driver_sql(f"ALTER TABLE {tmp} RENAME TO {table}")
    for sql in indexes:
        conn.exec_driver_sql(sql)


def _rebuild_all(autoincrement: bool) -> None:
    conn = op.get_bind()
    if conn.dialect.name != "sqlite":
        return
    if conn.connection.dbapi_connection.in_transaction:
        conn.exec_driver_sql("COMMIT")  # the revisions before this one, and the version row
    conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
    try:
        conn.exec_driver_sql("BEGIN")
        try:
            for table in TABLES:
                _rebuild(conn, table, autoincrement)
            broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"migration 0005: foreign keys broken by the rebuild: {broken[:5]}")
            conn.exec_driver_sql("COMMIT")
        except BaseException:
            conn.exec_driver_sql("ROLLBACK")
            raise
    finally:
        conn.exec_driver_sql("PRAGMA foreign_keys=ON")
        conn.exec_driver_sql("BEGIN")  # for alembic's version row and its commit


def upgrade() -> None:
    _rebuild_all(autoincrement=True)


def downgrade() -> None:
    _rebuild_all(autoincrement=False)
