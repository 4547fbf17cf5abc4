"""The agent's view of its tasks: what the server last said it should run.

Server events change it (`taskList` replaces it, `taskAdd`/`taskUpdate` put one task,
`taskRemove` drops one); after every change (from the first `taskList` on) the executor
is handed the full desired set and reconciles against it, so a lost or repeated event
can never leave the executor out of step for longer than the next `taskList`. Payloads
that are not what the protocol says are logged and ignored, never fatal.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping

from twisted.logger import Logger

from taskd.stats import NULL_STATS
from taskd.wire import framing
from taskd.wire.framing import Frame, FrameError


LIST_SHOWN = 20  # task names in the taskList log line; a 1,000-task list is one short line


def _task(value: Any) -> dict:
    if not isinstance(value, dict) or isinstance(value.get("id"), bool) or not isinstance(value.get("id"), int):
        raise FrameError("task payload is not a task object with an integer id")
    return value


class TaskCache:
    log = Logger()

    def __init__(self, apply: Callable[[Mapping[int, dict]], None], *, stats: Any = NULL_STATS,
                 state: Any = None, run_once: Callable[[str, dict], None] | None = None) -> None:
        """`run_once(request_id, task)`: a runTask from the server (an ad-hoc run; the
        task set is not touched)."""
        self.apply = apply
        self.run_once = run_once
        self.state = state  # a TaskState (taskstate.py) or None: do not persist
        self.stats = stats
        self.tasks: dict[int, dict] = {}
        # Until the server's first taskList the executor must not act (it would remove
        # tasks it cannot know are still wanted: the Snap executor would reconcile to a
        # one-task set after a lone taskAdd); events before it are recorded, not applied.
        # That first list always goes through, even when empty, so stale executor tasks
        # are then cleaned up.
        self.have_list = False

    def handle(self, frame: Frame) -> None:
        """A frame from the server (heartbeats included)."""
        handler = getattr(self, f"handle_{frame.event}", None) if frame.event in framing.SERVER_EVENTS else None
        if handler is None:
            self.log.warn("server sent unknown event {event!r}; ignored", event=frame.event)
            return
        if frame.event == framing.HEARTBEAT:
            handler(frame)
            return
        try:
            changed = handler(frame.json())
        except FrameError as exc:
            self.log.warn("ignoring {event}: {err}", event=frame.event, err=str(exc))
            return
        if changed:
            self.stats.gauge("tasks.active", len(self.tasks))
            if self.have_list:  # an add/update/remove before the first list is only recorded
                self.apply(dict(self.tasks))
                if self.state is not None:
                    self.state.save(self.tasks)

    def resume_saved(self) -> bool:
        """At start, before any server answers: run the saved list until the first taskList.

        The saved tasks are applied but ``have_list`` stays False, so the server's first
        taskList still goes through (and replaces them) even if it is identical or empty.
        """
        saved = self.state.load() if self.state is not None else None
        if saved is None or self.have_list:
            return False
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(saved.saved_at))
        self.log.info("running the saved task list from {when} ({n} tasks) until a server answers",
                      when=when, n=len(saved.tasks))
        self.tasks = dict(saved.tasks)
        self.stats.gauge("tasks.active", len(self.tasks))
        self.apply(dict(self.tasks))
        return True

    # -- one handler per server event (framing.SERVER_EVENTS); each returns whether the
    # -- task set changed.

    def handle_heartbeat(self, frame: Frame) -> None:
        self.log.debug("heartbeat {time}", time=frame.payload.decode("utf-8", "replace"))

    def handle_taskList(self, value: Any) -> bool:
        items = [] if value is None else value  # the original server sent null for none
        if not isinstance(items, list):
            raise FrameError("taskList payload is not a list")
        tasks = {t["id"]: t for t in map(_task, items)}
        shown = [f"{t['id']} ({t.get('name')})" for t in list(tasks.values())[:LIST_SHOWN]]
        more = f", and {len(tasks) - LIST_SHOWN} more" if len(tasks) > LIST_SHOWN else ""
        self.log.info("task list: {n} task(s){names}", n=len(tasks),
                      names=": " + ", ".join(shown) + more if tasks else "")
        changed = tasks != self.tasks or not self.have_list
        self._count(self.tasks, tasks)
        self.tasks = tasks
        self.have_list = True
        return changed

    def handle_runTask(self, value: Any) -> bool:
        if not isinstance(value, dict) or not isinstance(value.get("requestId"), str):
            raise FrameError("runTask payload must be {requestId, task}")
        task = _task(value.get("task"))
        self.log.info("task {id} ({name}): run once, now, on the server's request", id=task["id"],
                      name=task.get("name"))
        if self.run_once is not None:
            self.run_once(value["requestId"], task)
        return False

    def handle_taskRemove(self, value: Any) -> bool:
        task = _task(value)
        self.log.info("task {id} ({name}) removed", id=task["id"], name=task.get("name"))
        if self.tasks.pop(task["id"], None) is None:
            return False
        self.stats.incr("tasks.removed")
        return True

    def handle_taskAdd(self, value: Any) -> bool:
        return self._put(value, "added")

    def handle_taskUpdate(self, value: Any) -> bool:
        return self._put(value, "updated")

    def _put(self, value: Any, verb: str) -> bool:
        task = _task(value)
        self.log.info("task {id} ({name}) {verb}: every {interval}s", id=task["id"], name=task.get("name"),
                      verb=verb, interval=task.get("interval"))
        changed = self.tasks.get(task["id"]) != task
        if changed:
            self.stats.incr("tasks.updated" if task["id"] in self.tasks else "tasks.added")
        self.tasks[task["id"]] = task
        return changed

    def _count(self, old: Mapping[int, dict], new: Mapping[int, dict]) -> None:
        """The tasks.added/removed/updated counters for a whole new list."""
        added = sum(1 for i in new if i not in old)
        removed = sum(1 for i in old if i not in new)
        updated = sum(1 for i, t in new.items() if i in old and old[i] != t)
        for name, n in (("tasks.added", added), ("tasks.removed", removed), ("tasks.updated", updated)):
            if n:
                self.stats.incr(name, n)
