"""The SQL schema, as SQLAlchemy Core tables.

This is the single source of truth the alembic revisions must reproduce (a test compares
them). It mirrors the original Go server's tables so operators recognise them, with the
improvements the original lacked: foreign keys that cascade (deleting an agent or task
can no longer leave orphaned tags, routes or sessions), uniqueness enforced by the
database rather than by a read-then-write race, JSON columns instead of serialised text,
and microsecond timestamps on MySQL.
"""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from taskd.db.sealing import SealedJSON

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING)

# MySQL's DATETIME drops sub-seconds unless asked; the API shows microseconds.
Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
# Binary collation: names are case-sensitive on MySQL exactly as on sqlite.
TABLE_OPTS = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def _fk(target: str) -> sa.ForeignKey:
    return sa.ForeignKey(target, ondelete="CASCADE")


agent = sa.Table(
    "agent",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("org_id", sa.Integer, nullable=False),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("enabled_change", Timestamp, nullable=True),
    sa.Column("public", sa.Boolean, nullable=False),
    sa.Column("online", sa.Boolean, nullable=False),
    sa.Column("online_change", Timestamp, nullable=True),
    sa.Column("created", Timestamp, nullable=False),
    sa.Column("updated", Timestamp, nullable=False),
    sa.UniqueConstraint("org_id", "name"),
    sa.Index(None, "public"),
    sqlite_autoincrement=True,  # ids are never reused: byIds routes name them (migration 0005)
    **TABLE_OPTS,
)

agent_tag = sa.Table(
    "agent_tag",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("org_id", sa.Integer, nullable=False),
    sa.Column("agent_id", sa.Integer, _fk("agent.id"), nullable=False),
    sa.Column("tag", sa.String(255), nullable=False),
    sa.Column("created", Timestamp, nullable=False),
    # org_id is the tagging org: the agent's own, or another org tagging a public agent
    # for its own byTags routing (migration 0006).
    sa.UniqueConstraint("agent_id", "org_id", "tag"),
    sa.Index(None, "org_id", "tag"),
    **TABLE_OPTS,
)

agent_session = sa.Table(
    "agent_session",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("agent_id", sa.Integer, _fk("agent.id"), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("remote_ip", sa.String(64), nullable=False),
    sa.Column("server", sa.String(255), nullable=False),
    sa.Column("created", Timestamp, nullable=False),
    sa.Index(None, "agent_id"),
    sa.Index(None, "server"),
    **TABLE_OPTS,
)

# The org's catalog: every metric an agent of the org advertised (public when the agent is).
metric = sa.Table(
    "metric",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("org_id", sa.Integer, nullable=False),
    sa.Column("public", sa.Boolean, nullable=False),
    sa.Column("namespace", sa.String(255), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("policy", sa.JSON, nullable=True),
    sa.Column("created", Timestamp, nullable=False),
    sa.UniqueConstraint("org_id", "namespace", "version"),
    **TABLE_OPTS,
)

agent_metric = sa.Table(
    "agent_metric",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("agent_id", sa.Integer, _fk("agent.id"), nullable=False),
    sa.Column("namespace", sa.String(255), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created", Timestamp, nullable=False),
    sa.UniqueConstraint("agent_id", "namespace", "version"),
    sa.Index(None, "namespace"),
    **TABLE_OPTS,
)

task = sa.Table(
    "task",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("org_id", sa.Integer, nullable=False),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("task_type", sa.String(255), nullable=False),
    sa.Column("config", SealedJSON, nullable=False),  # sealed at rest when db-encryption-key is set
    sa.Column("interval", sa.Integer, nullable=False),
    sa.Column("route", sa.JSON, nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("created", Timestamp, nullable=False),
    sa.Column("updated", Timestamp, nullable=False),
    sa.UniqueConstraint("org_id", "name"),
    sqlite_autoincrement=True,  # task ids are never reused either (migration 0005)
    **TABLE_OPTS,
)

task_metric = sa.Table(
    "task_metric",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.Integer, _fk("task.id"), nullable=False),
    sa.Column("namespace", sa.String(255), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created", Timestamp, nullable=False),
    sa.UniqueConstraint("task_id", "namespace"),
    sa.Index(None, "namespace"),
    **TABLE_OPTS,
)

# The three route indexes: which agents a task is routed to, queryable from either side.
route_by_id_index = sa.Table(
    "route_by_id_index",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.Integer, _fk("task.id"), nullable=False),
    sa.Column("agent_id", sa.Integer, _fk("agent.id"), nullable=False),
    sa.Column("created", Timestamp, nullable=False),
    sa.UniqueConstraint("task_id", "agent_id"),
    sa.Index(None, "agent_id"),
    **TABLE_OPTS,
)

route_by_tag_index = sa.Table(
    "route_by_tag_index",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.Integer, _fk("task.id"), nullable=False),
    sa.Column("org_id", sa.Integer, nullable=False),
    sa.Column("tag", sa.String(255), nullable=False),
    sa.Column("created", Timestamp, nullable=False),
    sa.UniqueConstraint("task_id", "tag"),
    sa.Index(None, "org_id", "tag"),
    **TABLE_OPTS,
)

# An `any` task runs on exactly one agent: one row per task, naming it.
route_by_any_index = sa.Table(
    "route_by_any_index",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.Integer, _fk("task.id"), nullable=False),
    sa.Column("agent_id", sa.Integer, _fk("agent.id"), nullable=False),
    sa.Column("created", Timestamp, nullable=False),
    sa.UniqueConstraint("task_id"),
    sa.Index(None, "agent_id"),
    **TABLE_OPTS,
)

# The latest status each agent reported for each task it runs (the agent's `taskStatus`
# event); `updated` is when this server stored it. One row per (task, agent), replaced
# in place, so the table never grows beyond the tasks agents actually run.
task_status = sa.Table(
    "task_status",
    metadata,
    sa.Column("task_id", sa.Integer, _fk("task.id"), primary_key=True, autoincrement=False),
    sa.Column("agent_id", sa.Integer, _fk("agent.id"), primary_key=True, autoincrement=False),
    sa.Column("executor", sa.String(32), nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("last_run", Timestamp, nullable=True),
    sa.Column("duration", sa.Double, nullable=True),
    sa.Column("metrics", sa.Integer, nullable=True),
    sa.Column("runs", sa.BigInteger, nullable=False),
    sa.Column("failures", sa.BigInteger, nullable=False),
    sa.Column("skipped", sa.BigInteger, nullable=False),
    sa.Column("updated", Timestamp, nullable=False),
    sa.Index(None, "agent_id", "outcome"),  # failingTasks: count of "error" per agent
    **TABLE_OPTS,
)

# One row per running task-server process (a new `id` each start): its heartbeat.
# Sessions name their server by `name` (the `instance-id`, default HOSTNAME:PORT), which
# is what survives a restart; `id` tells this run from the previous one, so a reaper's
# delete can only ever hit the run it saw silent.
server_instance = sa.Table(
    "server_instance",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("hostname", sa.String(255), nullable=False),
    sa.Column("addr", sa.String(255), nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("started", Timestamp, nullable=False),
    sa.Column("last_seen", Timestamp, nullable=False),
    sa.Index(None, "name"),
    sa.Index(None, "last_seen"),
    **TABLE_OPTS,
)

# An agent's own secret (POST /api/v1/agents/<id>/token): only its sha256 is kept. It
# authorises that agent's websocket and nothing else; a new token replaces the row.
agent_token = sa.Table(
    "agent_token",
    metadata,
    sa.Column("agent_id", sa.Integer, _fk("agent.id"), primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False),
    sa.Column("created", Timestamp, nullable=False),
    sa.UniqueConstraint("token_hash"),
    **TABLE_OPTS,
)
