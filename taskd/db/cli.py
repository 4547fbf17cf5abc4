"""`taskd-db`: the operator's handle on the schema, reading the server's own config file.

The server applies migrations itself at start-up; this command lets an operator do it
ahead of a rollout (or check where a database stands) without starting a server:

    taskd-db --config /etc/taskd/task-server.ini upgrade
    taskd-db --config /etc/taskd/task-server.ini current
    taskd-db genkey > /etc/taskd/db.key          # a key for db-encryption-key
    taskd-db --config /etc/taskd/task-server.ini reencrypt   # every task config under the first key
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import sqlalchemy as sa

from taskd.config import ConfigError, load
from taskd.db import migrate, models, sealing
from taskd.db.engine import DatabaseConfigError, create_engine
from taskd.db.options import DB_OPTIONS

ENV_PREFIX = "TASKSERVER_"  # the task-server's: the same environment configures both


def load_db_settings(path: str, flags: dict[str, str], env: dict[str, str] | None = None) -> tuple[str, str]:
    """(db-type, db-connect-str) from defaults < the file's database keys (its other
    keys are the server's business) < environment < flags. Raises ConfigError."""
    values = _db_values(path, flags, env)
    return values["db-type"], values["db-connect-str"]


def _db_values(path: str, flags: dict[str, str], env: dict[str, str] | None = None) -> Any:
    values = load(DB_OPTIONS, path=path, env=os.environ if env is None else env, env_prefix=ENV_PREFIX,
                  flags=flags, only_known=True)
    if values["db-type"] == "mysql" and not values["db-connect-str"].strip():
        raise ConfigError("db-connect-str", "must be set when db-type is mysql"
                          f" (db-type from {values.origins['db-type']})")
    return values


def reencrypt(engine: Any) -> int:
    """Rewrite every task's config under the engine's sealer (its first key), in one
    transaction; plain rows get sealed too. Returns how many rows were rewritten."""
    with engine.begin() as conn:
        rows = conn.execute(sa.select(models.task.c.id, models.task.c.config)).all()
        for task_id, config in rows:
            conn.execute(sa.update(models.task).where(models.task.c.id == task_id).values(config=config))
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="taskd-db", description="Inspect and migrate the task-server's database schema."
    )
    parser.add_argument("--config", "-c", default="/etc/taskd/task-server.ini",
                        help="the task-server config file (default: %(default)s)")
    parser.add_argument("--db-type", help="override db-type (sqlite3 or mysql)")
    parser.add_argument("--db-connect-str", help="override db-connect-str")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("upgrade", help="apply every pending revision (what start-up does)")
    sub.add_parser("current", help="print the database's revision and the newest known one")
    sub.add_parser("history", help="list the revisions, oldest first")
    sub.add_parser("genkey", help="print a new random key for db-encryption-key (keep it in a 0600 file)")
    sub.add_parser("reencrypt", help="rewrite every task config sealed under db-encryption-key's first key"
                                     " (after adding a key in front), in one transaction")
    down = sub.add_parser("downgrade", help="step back to a revision (destroys data of later revisions)")
    down.add_argument("revision", help="target revision, e.g. 0001 or base")
    args = parser.parse_args(argv)

    if args.command == "history":
        for rev, doc in migrate.history():
            print(f"{rev}  {doc}")
        return 0
    if args.command == "genkey":
        print(sealing.new_key())
        return 0
    flags = {"db-type": args.db_type, "db-connect-str": args.db_connect_str}
    try:
        values = _db_values(args.config, {k: v for k, v in flags.items() if v is not None})
        engine = create_engine(values["db-type"], values["db-connect-str"], pool_size=1)
        try:
            sealer = sealing.sealer_from_setting(values["db-encryption-key"])
        except sealing.SealError as exc:
            raise ConfigError("db-encryption-key", str(exc)) from None
        sealing.attach(engine, sealer)
        if args.command == "reencrypt":
            if sealer is None:
                raise ConfigError("db-encryption-key", "must be set to reencrypt")
            migrate.upgrade(engine)
            print(f"{reencrypt(engine)} task config(s) sealed with key {sealer.current}")
        elif args.command == "upgrade":
            migrate.upgrade(engine)
            print(f"schema at {migrate.current_revision(engine)}")
        elif args.command == "current":
            print(f"database: {migrate.current_revision(engine) or 'empty'}; newest: {migrate.head_revision()}")
        else:
            migrate.downgrade(engine, args.revision)
            print(f"schema at {migrate.current_revision(engine) or 'base'}")
    except sealing.SealError as exc:
        print(f"taskd-db: {exc}", file=sys.stderr)
        return 1
    except (ConfigError, DatabaseConfigError) as exc:
        print(f"taskd-db: config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # unreachable server and the like: one line, not a traceback
        detail = str(getattr(exc, "orig", exc)).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"taskd-db: database error: {detail}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
