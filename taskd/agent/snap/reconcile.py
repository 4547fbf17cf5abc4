"""One reconcile pass of the Snap driver: Snap's ``raintank-apps:<taskId>`` tasks made to
match the desired set.

Cut out of :mod:`taskd.agent.snap.driver` because it is a different job from the driver's:
the driver decides *when* to reconcile (coalescing requests, retry with backoff, the
reachability edge, the sweep tick); this module decides *what* one pass does to Snap and
remembers what this process created, which the "out of date" test needs.

Missing → create; present but out of date → remove and create; not desired → remove;
duplicates → keep one; with ``sweep``, Disabled copies are removed first (and so created
afresh). Other tasks are never touched. "Out of date" (see docs/snap.md): a Snap task this
process created is compared with the request it was created from and the ``updated`` it
was built from; any other Snap task (created before an agent restart, or by a create whose
answer was lost) is compared by content — its full view echoes the workflow, schedule and
deadline — and only when Snap does not echo a workflow by ``creation_timestamp`` (whole
seconds): re-create if ``updated`` is later than ``creation_timestamp + 1``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from twisted.logger import Logger

from taskd.agent.snap.client import SnapClient
from taskd.agent.snap.wire import (
    DISABLED,
    PREFIX,
    RUNNING,
    SnapError,
    essence,
    parse_rfc3339,
    request_essence,
    snap_task_request,
    updated_after_creation,
)
from taskd.stats import NULL_STATS

__all__ = ["SnapReconciler"]


@dataclass
class _Built:
    fingerprint: str  # the creation request, canonical JSON
    updated: Any      # the server task's `updated` it was built from


class SnapReconciler:
    """Runs reconcile passes against one Snap daemon; holds what this process created there.

    ``problem(key, message)`` / ``solved(key)`` are the driver's warn-once log (so a problem
    that persists across passes is one warning, not one per pass); ``on_listing(tasks)``
    gets every task listing read (the driver reports statuses off it), and
    ``on_unrunnable(task_id, why)`` a desired task Snap cannot run.
    """

    log = Logger()

    def __init__(self, *, client: SnapClient, problem: Callable[[Any, str], None],
                 solved: Callable[[Any], None], on_listing: Callable[[list], None],
                 on_unrunnable: Callable[[int, str], None], stats: Any = NULL_STATS) -> None:
        self.client = client
        self._problem, self._solved = problem, solved
        self._on_listing, self._on_unrunnable = on_listing, on_unrunnable
        self.stats = stats
        self._built: dict[str, _Built] = {}  # Snap task id -> what this process created it from

    async def once(self, desired: Mapping[int, dict], sweep: bool) -> bool:
        """One pass; True if Snap now matches ``desired``. SnapUnreachable aborts it."""
        listing = await self.client.call("GET", "/v1/tasks", "scheduled_task_list_returned")
        tasks = listing.get("ScheduledTasks") if isinstance(listing, dict) else None
        if not isinstance(tasks, list):
            raise SnapError(200, "the task list has no ScheduledTasks array")
        self._on_listing(tasks)
        ours: dict[str, list[dict]] = {}
        for t in tasks:
            if isinstance(t, dict) and isinstance(t.get("name"), str) and \
                    t["name"].startswith(PREFIX) and isinstance(t.get("id"), str):
                ours.setdefault(t["name"], []).append(t)
        present = {t["id"] for copies in ours.values() for t in copies}
        self._built = {sid: b for sid, b in self._built.items() if sid in present}
        ok = True
        if sweep:
            for name, copies in ours.items():
                for c in [c for c in copies if c.get("task_state") == DISABLED]:
                    self.log.warn("{name}: Snap disabled task {sid} after {n} failed runs (last: "
                                  "{msg}); re-creating it", name=name, sid=c["id"],
                                  n=c.get("failed_count", 0), msg=c.get("last_failure_message", ""))
                    if await self._remove(name, c, "it was Disabled"):
                        copies.remove(c)
                    else:
                        ok = False
        wanted = {f"{PREFIX}{tid}": (tid, task) for tid, task in desired.items()}
        for name, copies in ours.items():
            if name not in wanted:
                for c in copies:
                    ok = await self._remove(name, c, "no longer assigned to this agent") and ok
        for name, (tid, task) in wanted.items():
            ok = await self._converge(name, tid, task, ours.get(name, [])) and ok
        return ok

    async def _converge(self, name: str, tid: int, task: dict, copies: list[dict]) -> bool:
        try:
            request = snap_task_request(tid, task)
        except ValueError as e:
            self._problem(name, f"task {tid} cannot be run by Snap: {e}")
            self._on_unrunnable(tid, f"cannot be run by Snap: {e}")
            return True  # not retryable: a new version of the task will come
        updated = task.get("updated")
        keep: dict | None = None
        ok = True
        try:
            # Prefer a running copy, then one this process built, then the newest.
            for c in sorted(copies, key=lambda c: (c.get("task_state") != RUNNING,
                                                   c["id"] not in self._built,
                                                   -(c.get("creation_timestamp") or 0))):
                if keep is None:
                    why = await self._unusable(c, request, updated)
                    if why is None:
                        keep = c
                        continue
                else:
                    why = f"duplicate of {keep['id']}"
                ok = await self._remove(name, c, why) and ok
        except SnapError as e:
            self._problem(name, f"task {tid}: reading Snap task failed: {e}")
            return False
        if keep is None:
            ok = await self._create(name, tid, request, updated) and ok
        return ok

    async def _unusable(self, c: dict, request: dict, updated: Any) -> str | None:
        """Why this Snap copy cannot stay (None: it is current)."""
        state = c.get("task_state")
        if state not in (RUNNING, DISABLED):  # e.g. a create whose start failed
            return f"it is {state}, not Running"
        built = self._built.get(c["id"])
        fingerprint = json.dumps(request, sort_keys=True)
        if built is not None:
            if built.fingerprint != fingerprint:
                return "the task changed"
            old, new = parse_rfc3339(built.updated), parse_rfc3339(updated)
            newer = (new > old) if (old and new) else (updated != built.updated)
            return f"the task was updated ({updated})" if newer else None
        try:
            full = await self.client.call("GET", f"/v1/tasks/{c['id']}", "scheduled_task_returned")
        except SnapError as e:
            if e.status == 404:
                return "it is gone"
            raise
        full = full if isinstance(full, dict) else {}
        seen = essence(full.get("schedule"), full.get("deadline"), full.get("workflow"))
        if seen is not None:
            if seen != request_essence(request):
                return "its content differs from the task"
        elif updated_after_creation(updated, c.get("creation_timestamp")):
            return f"the task was updated ({updated}) after it was created"
        self._built[c["id"]] = _Built(fingerprint, updated)  # adopt it
        return None

    async def _create(self, name: str, tid: int, request: dict, updated: Any) -> bool:
        try:
            body = await self.client.call("POST", "/v1/tasks", "scheduled_task_created", 201, request)
        except SnapError as e:
            self._problem(name, f"task {tid}: creating the Snap task failed: {e}; will retry")
            return False
        self._solved(name)
        sid = body.get("id") if isinstance(body, dict) else None
        if isinstance(sid, str):
            self._built[sid] = _Built(json.dumps(request, sort_keys=True), updated)
        self.stats.incr("snap.tasks_created")
        self.log.info("task {tid}: created Snap task {sid} ({name}, every {interval})", tid=tid,
                      sid=sid, name=name, interval=request["schedule"]["interval"])
        return True

    async def _remove(self, name: str, c: dict, reason: str) -> bool:
        sid = c["id"]
        try:
            await self.client.stop_and_delete(sid)
        except SnapError as e:
            self._problem((name, sid), f"{name}: removing Snap task {sid} ({reason}) failed: {e}; "
                                       "will retry")
            return False
        self._solved((name, sid))
        self._built.pop(sid, None)
        self.stats.incr("snap.tasks_removed")
        self.log.info("task {tid}: removed Snap task {sid} ({name}, {reason})", tid=name[len(PREFIX):],
                      sid=sid, name=name, reason=reason)
        return True
