"""Schema versioning with alembic, applied at start-up and by the `taskd-db` command.

The revisions live inside the package (taskd/db/migrations) so an installed server, a
Debian package or a CI checkout all migrate the same way, with no alembic.ini to find.
Several servers may start at once against one MySQL database; alembic's version table
makes a repeated upgrade a no-op, and on MySQL a named lock keeps two servers from
running the same revision concurrently.
"""
from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

MIGRATIONS = Path(__file__).parent / "migrations"
_LOCK = "taskd_schema_migration"


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision`; blocking, so call it before the reactor runs
    or from a pool thread."""
    with engine.connect() as conn:
        locked = conn.dialect.name in ("mysql", "mariadb")
        if locked:
            conn.execute(text("SELECT GET_LOCK(:n, 60)"), {"n": _LOCK})
        try:
            command.upgrade(alembic_config(conn), revision)
            conn.commit()
        finally:
            if locked:
                conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": _LOCK})


def downgrade(engine: Engine, revision: str) -> None:
    with engine.connect() as conn:
        command.downgrade(alembic_config(conn), revision)
        conn.commit()


def history() -> list[tuple[str, str]]:
    """(revision, one-line description) from oldest to newest."""
    script = ScriptDirectory.from_config(alembic_config())
    revs = list(script.walk_revisions())
    return [(r.revision, (r.doc or "").splitlines()[0]) for r in reversed(revs)]
