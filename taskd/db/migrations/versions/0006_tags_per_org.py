"""tags per org: an org may tag another org's public agent for its own byTags routing

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

Tag rows already carry the tagging org (`agent_tag.org_id`); until now it was always the
agent's own. Two orgs may now put the same tag on one public agent, so the unique key
becomes (agent_id, org_id, tag). The new key is added before the old one goes: on MySQL
the agent_id foreign key needs an index that starts with agent_id at every moment.
Existing rows are unchanged. Downgrading first deletes the tags other orgs set (the old
key cannot hold them), then restores the old key.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

OLD, NEW = "uq_agent_tag_agent_id_tag", "uq_agent_tag_agent_id_org_id_tag"


def upgrade() -> None:
    with op.batch_alter_table("agent_tag") as batch:
        batch.create_unique_constraint(NEW, ["agent_id", "org_id", "tag"])
    with op.batch_alter_table("agent_tag") as batch:
        batch.drop_constraint(OLD, type_="unique")


def downgrade() -> None:
    tag, agent = sa.table("agent_tag", sa.column("agent_id"), sa.column("org_id")), \
        sa.table("agent", sa.column("id"), sa.column("org_id"))
    op.execute(tag.delete().where(tag.c.org_id != sa.select(agent.c.org_id).where(agent.c.id == tag.c.agent_id)
                                  .scalar_subquery()))
    with op.batch_alter_table("agent_tag") as batch:
        batch.create_unique_constraint(OLD, ["agent_id", "tag"])
    with op.batch_alter_table("agent_tag") as batch:
        batch.drop_constraint(NEW, type_="unique")
