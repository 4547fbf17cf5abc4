"""initial schema: agents, tags, sessions, catalog, tasks and the three route indexes

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
OPTS = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def _id() -> sa.Column:
    return sa.Column("id", sa.Integer, primary_key=True, autoincrement=True)


def _fk(name: str, target: str, table: str) -> sa.Column:
    return sa.Column(
        name,
        sa.Integer,
        sa.ForeignKey(f"{target}.id", ondelete="CASCADE", name=f"fk_{table}_{name}_{target}"),
        nullable=False,
    )


def upgrade() -> None:
    op.create_table(
        "agent",
        _id(),
        sa.Column("org_id", sa.Integer, nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("enabled_change", TS, nullable=True),
        sa.Column("public", sa.Boolean, nullable=False),
        sa.Column("online", sa.Boolean, nullable=False),
        sa.Column("online_change", TS, nullable=True),
        sa.Column("created", TS, nullable=False),
        sa.Column("updated", TS, nullable=False),
        sa.UniqueConstraint("org_id", "name", name="uq_agent_org_id_name"),
        **OPTS,
    )
    op.create_index("ix_agent_public", "agent", ["public"])

    op.create_table(
        "agent_tag",
        _id(),
        sa.Column("org_id", sa.Integer, nullable=False),
        _fk("agent_id", "agent", "agent_tag"),
        sa.Column("tag", sa.String(255), nullable=False),
        sa.Column("created", TS, nullable=False),
        sa.UniqueConstraint("agent_id", "tag", name="uq_agent_tag_agent_id_tag"),
        **OPTS,
    )
    op.create_index("ix_agent_tag_org_id_tag", "agent_tag", ["org_id", "tag"])

    op.create_table(
        "agent_session",
        sa.Column("id", sa.String(36), primary_key=True),
        _fk("agent_id", "agent", "agent_session"),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("remote_ip", sa.String(64), nullable=False),
        sa.Column("server", sa.String(255), nullable=False),
        sa.Column("created", TS, nullable=False),
        **OPTS,
    )
    op.create_index("ix_agent_session_agent_id", "agent_session", ["agent_id"])
    op.create_index("ix_agent_session_server", "agent_session", ["server"])

    op.create_table(
        "metric",
        _id(),
        sa.Column("org_id", sa.Integer, nullable=False),
        sa.Column("public", sa.Boolean, nullable=False),
        sa.Column("namespace", sa.String(255), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("policy", sa.JSON, nullable=True),
        sa.Column("created", TS, nullable=False),
        sa.UniqueConstraint("org_id", "namespace", "version", name="uq_metric_org_id_namespace_version"),
        **OPTS,
    )

    op.create_table(
        "agent_metric",
        _id(),
        _fk("agent_id", "agent", "agent_metric"),
        sa.Column("namespace", sa.String(255), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created", TS, nullable=False),
        sa.UniqueConstraint(
            "agent_id", "namespace", "version", name="uq_agent_metric_agent_id_namespace_version"
        ),
        **OPTS,
    )
    op.create_index("ix_agent_metric_namespace", "agent_metric", ["namespace"])

    op.create_table(
        "task",
        _id(),
        sa.Column("org_id", sa.Integer, nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("task_type", sa.String(255), nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("interval", sa.Integer, nullable=False),
        sa.Column("route", sa.JSON, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("created", TS, nullable=False),
        sa.Column("updated", TS, nullable=False),
        sa.UniqueConstraint("org_id", "name", name="uq_task_org_id_name"),
        **OPTS,
    )

    op.create_table(
        "task_metric",
        _id(),
        _fk("task_id", "task", "task_metric"),
        sa.Column("namespace", sa.String(255), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created", TS, nullable=False),
        sa.UniqueConstraint("task_id", "namespace", name="uq_task_metric_task_id_namespace"),
        **OPTS,
    )
    op.create_index("ix_task_metric_namespace", "task_metric", ["namespace"])

    op.create_table(
        "route_by_id_index",
        _id(),
        _fk("task_id", "task", "route_by_id_index"),
        _fk("agent_id", "agent", "route_by_id_index"),
        sa.Column("created", TS, nullable=False),
        sa.UniqueConstraint("task_id", "agent_id", name="uq_route_by_id_index_task_id_agent_id"),
        **OPTS,
    )
    op.create_index("ix_route_by_id_index_agent_id", "route_by_id_index", ["agent_id"])

    op.create_table(
        "route_by_tag_index",
        _id(),
        _fk("task_id", "task", "route_by_tag_index"),
        sa.Column("org_id", sa.Integer, nullable=False),
        sa.Column("tag", sa.String(255), nullable=False),
        sa.Column("created", TS, nullable=False),
        sa.UniqueConstraint("task_id", "tag", name="uq_route_by_tag_index_task_id_tag"),
        **OPTS,
    )
    op.create_index("ix_route_by_tag_index_org_id_tag", "route_by_tag_index", ["org_id", "tag"])

    op.create_table(
        "route_by_any_index",
        _id(),
        _fk("task_id", "task", "route_by_any_index"),
        _fk("agent_id", "agent", "route_by_any_index"),
        sa.Column("created", TS, nullable=False),
        sa.UniqueConstraint("task_id", name="uq_route_by_any_index_task_id"),
        **OPTS,
    )
    op.create_index("ix_route_by_any_index_agent_id", "route_by_any_index", ["agent_id"])


def downgrade() -> None:
    for table in (
        "route_by_any_index",
        "route_by_tag_index",
        "route_by_id_index",
        "task_metric",
        "task",
        "agent_metric",
        "metric",
        "agent_session",
        "agent_tag",
        "agent",
    ):
        op.drop_table(table)
