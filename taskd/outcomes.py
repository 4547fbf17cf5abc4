"""The outcomes a task's status can have: one vocabulary for every layer.

They travel in the agent's ``taskStatus`` frames (docs/protocol.md), are stored in the
``task_status`` table and shown by ``GET /api/v1/tasks/<id>``. Kept in a bottom module
of their own so the database layer can name them without importing the wire layer; the
wire module re-exports them under the names agents and servers have always used.
"""
from __future__ import annotations

STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_PENDING = "pending"  # known to the executor, not run yet
STATUS_OUTCOMES = (STATUS_OK, STATUS_ERROR, STATUS_PENDING)

# Never sent by an agent: the server's verdict on a routed task whose online agent has
# not reported a run for a while (taskd.db.staleness). Not a STATUS_OUTCOMES member, so
# an agent sending it is refused like any unknown outcome.
STATUS_STALE = "stale"
