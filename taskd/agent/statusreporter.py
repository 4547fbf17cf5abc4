"""Coalesces the executor's task statuses and sends them to the server as ``taskStatus``.

An executor reports every run (a 1,000-task agent on 10 s intervals reports 100 times a
second); the server only needs the latest state per task, so reports overwrite each
other here and one ``taskStatus`` frame (split into chunks of ``max_batch`` entries)
leaves every ``interval``, carrying only the tasks whose status changed. A change of
*outcome* (a task starts failing, or recovers) is what an operator waits for, so it is
sent within ``urgent_delay`` (1 s) instead, still coalesced with whatever else changed. A task
the agent stops running is announced once with a removal marker, so the server can drop
its row. After every (re)connection everything known is sent again: the server on the
other end may be a different one, or may have lost its buffered statuses.

Old servers ignore the event (the original server logged unknown events and went on).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from taskd.agent.contract import TaskStatus
from taskd.stats import NULL_STATS
from taskd.wire import framing
from taskd.timers import RepeatingTimer

Send = Callable[[str, Any], bool]


class StatusReporter(Service):
    log = Logger()

    def __init__(self, *, send: Send, clock: IReactorTime, interval: float = 10.0,
                 max_batch: int = 1000, urgent_delay: float = 1.0, stats: Any = NULL_STATS) -> None:
        self.send = send
        self.clock = clock
        self.interval = interval
        self.max_batch = max_batch
        self.urgent_delay = min(urgent_delay, interval)
        self.stats = stats
        self._sent_outcome: dict[int, str] = {}  # the outcome the server last heard per task
        self.latest: dict[int, TaskStatus] = {}
        self._dirty: set[int] = set()
        self._removed: set[int] = set()
        self._timer = RepeatingTimer(clock, interval, self.flush, what="task status loop", log=self.log)
        self._soon: Any = None

    # -- fed by the executor and the task cache ------------------------------------------

    def report(self, status: TaskStatus) -> None:
        """The task's newest status; sent with the next flush if it differs from the last."""
        if self.latest.get(status.task_id) == status:
            return
        self.latest[status.task_id] = status
        self._dirty.add(status.task_id)
        self._removed.discard(status.task_id)
        if status.outcome != self._sent_outcome.get(status.task_id):
            self._soon_flush(self.urgent_delay)

    def retain(self, task_ids: Iterable[int]) -> None:
        """The agent's task set is now ``task_ids``: forget (and announce) the others."""
        keep = set(task_ids)
        for tid in [t for t in self.latest if t not in keep]:
            del self.latest[tid]
            self._sent_outcome.pop(tid, None)
            self._dirty.discard(tid)
            self._removed.add(tid)

    def connected(self) -> None:
        """A new connection: everything known is news to the server on the other end."""
        self._dirty = set(self.latest)
        self._soon_flush(0)

    # -- sending --------------------------------------------------------------------------

    def _soon_flush(self, delay: float) -> None:
        """Flush within ``delay`` (an earlier pending flush stands)."""
        if not self.running:
            return
        if self._soon is not None and self._soon.active():
            if self._soon.getTime() <= self.clock.seconds() + delay:
                return
            self._soon.cancel()
        self._soon = self.clock.callLater(delay, self._flush_soon)

    def _flush_soon(self) -> None:
        self._soon = None
        self.flush()

    def flush(self) -> int:
        """Send what changed; returns the number of entries sent (0 when not connected)."""
        if not self._dirty and not self._removed:
            return 0
        entries = [self.latest[t].to_wire() for t in sorted(self._dirty)]
        entries += [{"taskId": t, "removed": True} for t in sorted(self._removed)]
        for start in range(0, len(entries), self.max_batch):
            if not self.send(framing.TASK_STATUS, entries[start:start + self.max_batch]):
                return 0  # not connected: kept; connected() sends it all again anyway
        for t in self._dirty:
            self._sent_outcome[t] = self.latest[t].outcome
        self._dirty.clear()
        self._removed.clear()
        self.stats.incr("status.sent", len(entries))
        self.log.debug("sent {n} task status update(s)", n=len(entries))
        return len(entries)

    def startService(self) -> None:
        super().startService()
        self._timer.startService()

    def stopService(self) -> Any:
        super().stopService()
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        self._soon = None
        self._timer.stopService()
        self.flush()  # the last word, if the connection is still up
        return None
