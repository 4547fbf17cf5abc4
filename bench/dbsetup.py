"""A fresh benchmark database: schema by taskd's own migrations, agents bulk-inserted.

Registering 10,000 agents through the API would take longer than the scenarios, so
they are written directly with taskd's SQLAlchemy tables (the same rows
`POST /api/v1/agents` writes): org 1, enabled, public, offline. Tags select the fan-out
groups: every agent has ``all``; the first ``k1`` agents also ``k1``, the first ``k5``
also ``k5``.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import sqlalchemy as sa

from taskd.db import migrate, models as m
from taskd.db.engine import create_engine
from taskd.timeutil import utcnow

MYSQL = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}


def agent_name(i: int) -> str:
    return f"bench-{i:05d}"


@dataclass
class BenchDB:
    db_type: str          # sqlite3 | mysql
    connect_str: str      # what the server's db-connect-str gets
    label: str
    mysql_name: str | None = None
    ids: dict[str, int] | None = None  # agent name -> id

    def engine(self) -> sa.Engine:
        return create_engine(self.db_type, self.connect_str, pool_size=2)

    def drop(self) -> None:
        if self.mysql_name:
            import pymysql

            conn = pymysql.connect(**MYSQL)
            with conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{self.mysql_name}`")
            conn.close()
        elif os.path.exists(self.connect_str):
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.unlink(self.connect_str + suffix)
                except FileNotFoundError:
                    pass

    def online_counts(self) -> tuple[int, int]:
        """(agents marked online, session rows): a check that the storm really registered."""
        engine = self.engine()
        try:
            with engine.connect() as conn:
                online = conn.execute(sa.select(sa.func.count()).select_from(m.agent)
                                      .where(m.agent.c.online.is_(True))).scalar()
                sessions = conn.execute(sa.select(sa.func.count()).select_from(m.agent_session)).scalar()
            return int(online), int(sessions)
        finally:
            engine.dispose()


def create(kind: str, workdir: str, n_agents: int, k1: int, k5: int) -> BenchDB:
    if kind == "mysql":
        import pymysql

        name = f"taskd_bench_{uuid.uuid4().hex[:8]}"
        conn = pymysql.connect(**MYSQL)
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        conn.close()
        db = BenchDB("mysql", f"{MYSQL['user']}:{MYSQL['password']}@tcp({MYSQL['host']}:{MYSQL['port']})/{name}"
                              "?charset=utf8", f"mysql {name}", mysql_name=name)
    else:
        path = os.path.join(workdir, f"bench-{uuid.uuid4().hex[:8]}.db")
        db = BenchDB("sqlite3", path, "sqlite")
    engine = db.engine()
    try:
        migrate.upgrade(engine)
        now = utcnow()
        with engine.begin() as conn:
            conn.execute(sa.insert(m.agent), [
                {"org_id": 1, "name": agent_name(i), "enabled": True, "enabled_change": now, "public": True,
                 "online": False, "online_change": None, "created": now, "updated": now}
                for i in range(n_agents)
            ])
            ids = {name: i for i, name in conn.execute(sa.select(m.agent.c.id, m.agent.c.name))}
            tags = []
            for i in range(n_agents):
                agent_id = ids[agent_name(i)]
                for tag, limit in (("all", n_agents), ("k1", k1), ("k5", k5)):
                    if i < limit:
                        tags.append({"org_id": 1, "agent_id": agent_id, "tag": tag, "created": now})
            conn.execute(sa.insert(m.agent_tag), tags)
        db.ids = ids
    except BaseException:
        engine.dispose()
        db.drop()
        raise
    engine.dispose()
    return db
