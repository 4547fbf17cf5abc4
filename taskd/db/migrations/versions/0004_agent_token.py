"""agent token: one hashed secret per agent, opening that agent's websocket only

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

Only adds a table (nothing is issued until an operator asks for a token), so upgrading
leaves the 0003 data alone. Downgrading drops the tokens: agents that used one must be
given an API key again.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TS = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
OPTS = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def upgrade() -> None:
    op.create_table(
        "agent_token",
        sa.Column("agent_id", sa.Integer, nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created", TS, nullable=False),
        sa.PrimaryKeyConstraint("agent_id", name="pk_agent_token"),
        sa.ForeignKeyConstraint(["agent_id"], ["agent.id"], name="fk_agent_token_agent_id_agent",
                                ondelete="CASCADE"),
        sa.UniqueConstraint("token_hash", name="uq_agent_token_token_hash"),
        **OPTS,
    )


def downgrade() -> None:
    op.drop_table("agent_token")
