"""task status: the latest status each agent reported for each task it runs

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05

Only adds a table, so upgrading a database that holds 0001 data leaves that data alone;
downgrading drops the statuses (they are re-sent by every agent on its next connection).
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
OPTS = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def _fk(name: str, target: str, table: str) -> sa.Column:
    return sa.Column(
        name,
        sa.Integer,
        sa.ForeignKey(f"{target}.id", ondelete="CASCADE", name=f"fk_{table}_{name}_{target}"),
        nullable=False,
        autoincrement=False,
    )


def upgrade() -> None:
    op.create_table(
        "task_status",
        _fk("task_id", "task", "task_status"),
        _fk("agent_id", "agent", "task_status"),
        sa.Column("executor", sa.String(32), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("last_run", TS, nullable=True),
        sa.Column("duration", sa.Double, nullable=True),
        sa.Column("metrics", sa.Integer, nullable=True),
        sa.Column("runs", sa.BigInteger, nullable=False),
        sa.Column("failures", sa.BigInteger, nullable=False),
        sa.Column("skipped", sa.BigInteger, nullable=False),
        sa.Column("updated", TS, nullable=False),
        sa.PrimaryKeyConstraint("task_id", "agent_id", name="pk_task_status"),
        **OPTS,
    )
    op.create_index("ix_task_status_agent_id_outcome", "task_status", ["agent_id", "outcome"])


def downgrade() -> None:
    op.drop_table("task_status")
