"""The agent's Snap executor: runs the agent's tasks as tasks of the local Snap daemon.

* :mod:`.wire` — what goes over Snap's REST API: names, the task body, reading answers;
* :mod:`.client` — one request and its envelope, redaction, the stop/delete state machine;
* :mod:`.status` — task status derived from Snap's counters;
* :mod:`.reconcile` — one reconcile pass: what to create and remove, what this process built;
* :mod:`.driver` — :class:`SnapDriver`, the service: supervision, catalog, when to reconcile, ticks.

The names below stay importable from ``taskd.agent.snap`` as before the split.
"""
from taskd.agent.snap.client import SnapClient
from taskd.agent.snap.driver import SnapDriver
from taskd.agent.snap.status import SnapStatusTracker
from taskd.agent.snap.wire import (
    PREFIX,
    SnapError,
    SnapUnreachable,
    catalog_record,
    parse_go_duration,
    snap_task_request,
    updated_after_creation,
)

__all__ = ["SnapDriver", "SnapClient", "SnapStatusTracker", "SnapError",
           "SnapUnreachable", "PREFIX", "snap_task_request", "catalog_record",
           "updated_after_creation", "parse_go_duration"]
