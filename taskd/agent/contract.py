"""What the agent needs from whatever runs its tasks, and what it reports back.

The task cache decides *which* tasks the agent should run; an executor makes that so.
Two exist: ``snap`` (the local Snap daemon, :mod:`taskd.agent.snap`) and ``builtin``
(collectors in this process, :mod:`taskd.agent.builtin.executor`). Both are Twisted
services taking the same two callbacks, so the agent assembles either the same way and
the cache/reconciliation logic stays shared. (Named ``contract``, not ``executor``: it
runs nothing; the executors are :mod:`taskd.agent.snap` and :mod:`taskd.agent.builtin.executor`.)

`TaskStatus` is the one status shape both produce; it travels to the server in the
``taskStatus`` event (docs/protocol.md) and is what ``GET /api/v1/tasks/<id>`` shows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from twisted.logger import Logger

from taskd.wire.framing import STATUS_ERROR as ERROR
from taskd.wire.framing import STATUS_OK as OK
from taskd.wire.framing import STATUS_OUTCOMES as OUTCOMES
from taskd.wire.framing import STATUS_PENDING as PENDING

__all__ = ["OK", "ERROR", "PENDING", "OUTCOMES", "TaskStatus", "SendCatalog", "ReportStatus", "Executor",
           "desired_tasks"]

SendCatalog = Callable[[list[dict]], None]


@dataclass(frozen=True)
class TaskStatus:
    """The latest known state of one task on this agent.

    ``last_run`` is a Unix time (seconds, float) or None before the first run;
    ``duration`` the last run's seconds; ``metrics`` how many points the last run
    published (built-in) or None (Snap does not say); ``runs``/``failures`` are
    cumulative counts (Snap's ``hit_count``/``failed_count``); ``skipped`` counts slots
    not run: because the previous run was still going, or because the agent was too
    late for them (the clock jumped, the reactor was blocked).
    """

    task_id: int
    executor: str
    outcome: str = PENDING
    error: str = ""
    last_run: float | None = None
    duration: float | None = None
    metrics: int | None = None
    runs: int = 0
    failures: int = 0
    skipped: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "taskId": self.task_id, "executor": self.executor, "outcome": self.outcome,
            "error": self.error, "lastRun": self.last_run, "duration": self.duration,
            "metrics": self.metrics, "runs": self.runs, "failures": self.failures,
            "skipped": self.skipped,
        }


ReportStatus = Callable[[TaskStatus], None]


class Executor(Protocol):
    """The executor interface (also an IService: started before the connection, stopped after).

    Constructed with ``send_catalog`` (hand the agent's catalog records to the server) and
    ``report_status`` (a task's new TaskStatus; the agent coalesces and sends them).
    """

    name: str

    def set_tasks(self, tasks: Mapping[int, dict]) -> None:
        """The full desired task set (task id -> task JSON from the server); reconcile to it."""

    def resend_catalog(self) -> None:
        """Send the catalog again (called on every connection to a server)."""


def desired_tasks(tasks: Mapping[Any, Any], log: Logger) -> dict[int, dict]:
    """The runnable part of a desired set: integer ids, JSON-object tasks, not disabled.

    Both executors take the cache's set through this, so they agree on what to ignore
    (each ignored entry is logged; the server sends enabled tasks only, so a disabled one
    is dropped silently). Task dicts are passed on as they are, not copied: they are never
    edited in place (the cache replaces a changed task's dict), and keeping their identity
    lets the built-in executor skip unchanged tasks at the cost of an ``is`` per task.
    """
    desired: dict[int, dict] = {}
    for key, task in tasks.items():
        try:
            task_id = key if type(key) is int else int(key)
        except (TypeError, ValueError):
            log.warn("ignoring a task with id {key!r}: not an integer", key=key)
            continue
        if not isinstance(task, dict):  # checked first: isinstance(x, typing.Mapping) is slow
            if not isinstance(task, Mapping):
                log.warn("ignoring task {id}: not a JSON object", id=task_id)
                continue
            task = dict(task)
        if task.get("enabled", True) is not False:
            desired[task_id] = task
    return desired
