"""server instance: one heartbeat row per running task-server process

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

Only adds a table, so upgrading leaves the 0002 data alone; servers register themselves
at their next start. Downgrading drops the heartbeats (a server of the older version
never reads them).
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TS = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
OPTS = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def upgrade() -> None:
    op.create_table(
        "server_instance",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("addr", sa.String(255), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("started", TS, nullable=False),
        sa.Column("last_seen", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_server_instance"),
        **OPTS,
    )
    op.create_index("ix_server_instance_name", "server_instance", ["name"])
    op.create_index("ix_server_instance_last_seen", "server_instance", ["last_seen"])


def downgrade() -> None:
    op.drop_table("server_instance")
