"""Alembic environment: always handed a live connection by taskd.db.migrate."""
from __future__ import annotations

from alembic import context

from taskd.db.models import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `taskd-db` (taskd.db.migrate), not bare alembic")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
