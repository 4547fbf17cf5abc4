"""Task status for the Snap executor, read off Snap's task list.

Snap keeps per task ``hit_count`` (fires), ``failed_count`` (runs that recorded an error,
cumulative), ``last_failure_message`` and ``last_run_timestamp`` (docs/snap-api.md §5, §6), but
no "did the last run work" flag. The outcome is derived from how the counters moved since
the previous listing: failures grew → error; fires grew without failures → ok; nothing
moved → unchanged. On the first sight of a task (say, after an agent restart) a task whose
every fire failed, or that Snap ``Disabled``, counts as failing. The two counters are
passed on as ``runs``/``failures`` so an operator sees Snap's own numbers.

A task update (or the sweep's re-creation of a Disabled task) replaces the Snap task with a
new one whose counters start at 0, so comparing them with the old task's totals would keep
a stale outcome until the new counts overtook the old. A new Snap task id or creation time,
or a counter that went down, is therefore a first sight too.
"""
from __future__ import annotations

from typing import Iterable, Mapping

from taskd.agent.contract import ERROR, OK, PENDING, TaskStatus
from taskd.agent.snap.wire import DISABLED, PREFIX

EXECUTOR = "snap"


class SnapStatusTracker:
    """Remembers the last status per task id, to tell which way the counters moved."""

    def __init__(self) -> None:
        self.last = {}
        self._snap_task: dict[int, tuple] = {}  # task id -> (Snap task id, creation_timestamp) last seen

    def update(self, listing: Iterable[Mapping], desired: Mapping[int, object]) -> list[TaskStatus]:
        """Statuses of the desired tasks found in one ``GET /v1/tasks`` listing."""
        seen: dict[int, Mapping] = {}
        for t in listing:
            name = t.get("name") if isinstance(t, Mapping) else None
            if not isinstance(name, str) or not name.startswith(PREFIX):
                continue
            try:
                tid = int(name[len(PREFIX):])
            except ValueError:
                continue
            if tid in desired and (tid not in seen or _newer(t, seen[tid])):
                seen[tid] = t
        out = []
        for tid, t in seen.items():
            status = self._status(tid, t)
            self.last[tid] = status
            out.append(status)
        for tid in [t for t in self.last if t not in desired]:
            del self.last[tid]
            self._snap_task.pop(tid, None)
        return out

    def unrunnable(self, tid: int, message: str) -> TaskStatus:
        """A task Snap cannot be given at all (e.g. no metrics to collect)."""
        prev = self.last.get(tid)
        status = TaskStatus(task_id=tid, executor=EXECUTOR, outcome=ERROR, error=message,
                            runs=prev.runs if prev else 0, failures=prev.failures if prev else 0)
        self.last[tid] = status
        return status

    def _status(self, tid: int, t: Mapping) -> TaskStatus:
        hits = _int(t.get("hit_count"))
        fails = _int(t.get("failed_count"))
        message = t.get("last_failure_message") if isinstance(t.get("last_failure_message"), str) else ""
        last_run = _int(t.get("last_run_timestamp"), -1)
        prev = self.last.get(tid)
        snap_task = (t.get("id"), t.get("creation_timestamp"))
        if self._snap_task.get(tid, snap_task) != snap_task or \
                (prev is not None and (hits < prev.runs or fails < prev.failures)):
            prev = None  # a re-created Snap task: its counters started again (module docstring)
        self._snap_task[tid] = snap_task
        if t.get("task_state") == DISABLED:
            outcome = ERROR
            message = f"Snap disabled the task after {fails} failed run(s)" + (f": {message}" if message else "")
        elif prev is None or prev.executor != EXECUTOR:
            outcome = ERROR if fails and fails >= hits else OK if hits else PENDING
        elif fails > prev.failures:
            outcome = ERROR
        elif hits > prev.runs:
            outcome = OK
        else:
            outcome = prev.outcome
        return TaskStatus(task_id=tid, executor=EXECUTOR, outcome=outcome,
                          error=message if outcome == ERROR else "",
                          last_run=float(last_run) if last_run > 0 else None,
                          runs=hits, failures=fails)


def _int(value: object, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _newer(a: Mapping, b: Mapping) -> bool:
    return _int(a.get("creation_timestamp")) > _int(b.get("creation_timestamp"))
