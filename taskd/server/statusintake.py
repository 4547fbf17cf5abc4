"""Task statuses from agents: validated per frame, coalesced in memory, written in bulk.

Agents send `taskStatus` frames (docs/protocol.md) with the statuses that changed, and
all of them again after every reconnect, so a server restart brings a burst of every
task of every agent at once. Writing each status as it arrives would be a transaction
per task; instead only the latest status per (task, agent) is kept here and written
every `status-flush-interval` in one transaction of multi-row upserts, so 10,000
statuses in an interval cost one pool job. The price is that the API shows a status up
to one interval late, which is fine for something agents report every few seconds.

A payload from an agent is never trusted: a malformed frame or entry costs one log
line and is dropped (the socket stays open; old and new agents may disagree on
details), and an agent may only report on tasks this server sent it, so it cannot write
statuses onto other orgs' tasks.
"""
from __future__ import annotations

import math
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Callable, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import Logger

from taskd.db.availability import log_failure
from taskd.db.taskstatus import StatusStore
from taskd.db.taskstatus import TaskStatusRow
from taskd.timeutil import utcnow
from taskd.wire.framing import STATUS_OUTCOMES as OUTCOMES
from taskd.wire.framing import Frame, FrameError
from taskd.timers import RepeatingTimer

MAX_INT = 2**31 - 1    # task ids and `metrics` are 32-bit columns
MAX_COUNT = 2**63 - 1  # runs / failures / skipped are BIGINT
MAX_EXECUTOR = 32
MAX_ERROR = 4096       # characters: fits a MySQL TEXT (64 KiB) even at 4 bytes each
MAX_UNIX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z, the end of DATETIME
SHOWN_PROBLEMS = 3
#: Removal markers accepted per agent and flush for tasks this session never sent: an agent
#: that was away while its tasks moved reports them removed after its first taskList (rows
#: of an earlier session), but one frame must not be able to queue 290,000 of them.
MAX_FOREIGN_REMOVALS = 1000

Key = tuple[int, int]  # (task id, agent id)
REMOVED = None         # a pending removal in the buffer


class StatusSession(Protocol):
    """What this needs of a session: its agent and the tasks it was sent (`view`)."""

    agent: Any
    view: dict[int, dict]
    sent: set[int]  # every task id it was sent during this session (removals may follow)


class BadEntry(ValueError):
    """One status entry is unusable; the message says why."""


def _int(entry: dict, field: str, lo: int, hi: int, default: Any = ...) -> Any:
    if field not in entry and default is not ...:
        return default
    value = entry.get(field)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadEntry(f"{field} must be an integer from {lo} to {hi}, not {value!r}")
    return value


def _number(entry: dict, field: str, hi: float) -> float | None:
    value = entry.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= hi:
        raise BadEntry(f"{field} must be null or a number from 0 to {hi:g}, not {value!r}")
    return float(value)


def parse_entry(entry: Any, agent_id: int) -> tuple[int, TaskStatusRow | None]:
    """One element of a taskStatus array -> (task id, row), or (task id, None) for a
    removal marker; BadEntry if it is not usable. Unknown fields are ignored so newer
    agents can add some."""
    if not isinstance(entry, dict):
        raise BadEntry(f"is a {type(entry).__name__}, not an object")
    task_id = _int(entry, "taskId", 1, MAX_INT)
    removed = entry.get("removed", False)
    if not isinstance(removed, bool):
        raise BadEntry(f"(task {task_id}) removed must be true or false, not {removed!r}")
    if removed:
        return task_id, REMOVED
    try:
        executor = entry.get("executor")
        if not isinstance(executor, str) or not 1 <= len(executor) <= MAX_EXECUTOR or not executor.isprintable():
            raise BadEntry(f"executor must be a name such as 'snap' or 'builtin', not {executor!r}")
        outcome = entry.get("outcome")
        if outcome not in OUTCOMES:
            raise BadEntry(f"outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")
        error = entry.get("error") or ""
        if not isinstance(error, str):
            raise BadEntry(f"error must be a string, not {error!r}")
        # JSON may carry a lone surrogate ("\ud800"), which no database driver can
        # encode: such a row would fail the flush of every status in the batch.
        error = error[:MAX_ERROR].encode("utf-8", "replace").decode("utf-8")
        last_run = _number(entry, "lastRun", MAX_UNIX_TIME)
        duration = _number(entry, "duration", math.inf)
        if duration is not None and not math.isfinite(duration):
            raise BadEntry("duration must be finite")
        row = TaskStatusRow(
            task_id=task_id, agent_id=agent_id, executor=executor, outcome=outcome, error=error,
            last_run=None if last_run is None else datetime.fromtimestamp(last_run, timezone.utc).replace(tzinfo=None),
            duration=duration,
            metrics=_int(entry, "metrics", 0, MAX_INT, default=None),
            runs=_int(entry, "runs", 0, MAX_COUNT, default=0),
            failures=_int(entry, "failures", 0, MAX_COUNT, default=0),
            skipped=_int(entry, "skipped", 0, MAX_COUNT, default=0),
        )
    except BadEntry as exc:
        raise BadEntry(f"(task {task_id}) {exc}") from None
    return task_id, row


def parse_payload(value: Any, agent_id: int) -> tuple[list[tuple[int, TaskStatusRow | None]], list[str]]:
    """A decoded taskStatus payload -> (usable entries in order, problems). Raises
    FrameError when the payload as a whole is not an array."""
    if not isinstance(value, list):
        raise FrameError("taskStatus payload must be a JSON array of task statuses")
    entries, problems = [], []
    for i, item in enumerate(value):
        try:
            entries.append(parse_entry(item, agent_id))
        except BadEntry as exc:
            problems.append(f"entry {i} {exc}")
    return entries, problems


class StatusService(Service):
    """Buffers the latest status per (task, agent) and writes the buffer every
    `flush_interval` seconds (and once more when stopped)."""

    log = Logger()
    name = "task-status"

    def __init__(self, store: StatusStore, *, clock: Any, flush_interval: float = 2.0,
                 now: Callable[[], datetime] = utcnow, instance_id: str | None = None) -> None:
        self.store = store
        # Statuses are written only for agents with a session on this server (None: no
        # such check), so a late flush here never overwrites what an agent that moved
        # on reported to its new server (taskd.db.taskstatus.upsert_many).
        self.instance_id = instance_id
        self.clock = clock
        self.flush_interval = flush_interval
        self.now = now
        self.pending: dict[Key, TaskStatusRow | None] = {}
        self.flushes = 0        # transactions committed (one per interval with work)
        self.rows_written = 0   # statuses upserted (skipping those of deleted tasks/agents)
        self.failed_flushes = 0
        self.rows_refused = 0   # statuses the database refused, dropped (see flush)
        self._flushing: Deferred | None = None
        self._foreign: dict[int, int] = {}  # agent id -> removals of unsent tasks pending
        # Who hears about a bad frame: the session manager's BadFrames (rate-limited log,
        # closes after too many); a plain warning when used alone.
        self.complain: Callable[[Any, str], None] = self._warn
        self._timer = RepeatingTimer(clock, flush_interval, self.flush, what="task status flush timer", log=self.log)

    # -- incoming ----------------------------------------------------------------------

    def received(self, session: StatusSession, frame: Frame) -> None:
        """One taskStatus frame from `session`'s agent; never raises."""
        agent = session.agent
        try:
            entries, problems = parse_payload(frame.json(), agent.id)
        except FrameError as exc:
            self.complain(session, f"sent a bad taskStatus: {exc}; ignored")
            return
        if problems:
            more = f" (and {len(problems) - SHOWN_PROBLEMS} more)" if len(problems) > SHOWN_PROBLEMS else ""
            self.complain(session, f"sent {len(problems)} bad taskStatus entr{'y' if len(problems) == 1 else 'ies'},"
                                   f" ignored: {'; '.join(problems[:SHOWN_PROBLEMS])}{more}")
        unsent = []
        sent = getattr(session, "sent", ())
        for task_id, row in entries:
            if task_id in session.view or (row is REMOVED and task_id in sent):
                self.pending[(task_id, agent.id)] = row
            elif row is REMOVED and self._foreign.get(agent.id, 0) < MAX_FOREIGN_REMOVALS:
                # A removal touches only this agent's own row, so it needs no other check.
                if (task_id, agent.id) not in self.pending:
                    self._foreign[agent.id] = self._foreign.get(agent.id, 0) + 1
                self.pending[(task_id, agent.id)] = row
            else:
                unsent.append(task_id)
        if unsent:
            # Normal right after a taskRemove crossed a status in flight; anything else
            # is an agent reporting on tasks that are not its own.
            self.log.debug("agent {name} ({id}) reported {n} task(s) it was not sent, ignored: {ids}",
                           name=agent.name, id=agent.id, n=len(unsent), ids=sorted(unsent)[:10])

    def _warn(self, session: Any, message: str) -> None:
        self.log.warn("agent {name} ({id}) {message}", name=session.agent.name, id=session.agent.id,
                      message=message)

    # -- writing -----------------------------------------------------------------------

    def flush(self) -> Deferred:
        """Write everything buffered in one transaction. While a flush runs, another
        one waits for it (so an older batch can never overwrite a newer one); a failed
        batch goes back into the buffer under any newer statuses, for the next flush.
        Single statuses the database refuses are dropped with a log line instead
        (taskd.db.taskstatus), so that one of them cannot fail every later flush."""
        if self._flushing is not None:
            waiter: Deferred = Deferred()
            self._flushing.addBoth(lambda result: (waiter.callback(None), result)[1])
            return waiter
        if not self.pending:
            return succeed(None)
        batch, self.pending = self.pending, {}
        self._foreign = {}
        now = self.now()
        rows = [replace(r, updated=now) for r in batch.values() if r is not None]
        removals = [key for key, r in batch.items() if r is None]
        d = self.store.apply(rows, removals, self.instance_id)

        def written(result: tuple[int, list[tuple[TaskStatusRow, str]]]) -> None:
            count, refused = result
            self.flushes += 1
            self.rows_written += count
            self.log.debug("stored {n} task status(es), removed {r}", n=count, r=len(removals))
            if refused:
                # Dropped, not put back: retried, they would fail again, and with them
                # the whole batch of every later flush.
                self.rows_refused += len(refused)
                shown = "; ".join(f"task {row.task_id} of agent {row.agent_id} ({why})"
                                  for row, why in refused[:SHOWN_PROBLEMS])
                more = f" (and {len(refused) - SHOWN_PROBLEMS} more)" if len(refused) > SHOWN_PROBLEMS else ""
                self.log.warn("the database refused {n} task status(es), dropped: {shown}{more}",
                              n=len(refused), shown=shown, more=more)

        def failed(failure: Any) -> None:
            self.failed_flushes += 1
            for key, row in batch.items():
                self.pending.setdefault(key, row)
            log_failure(self.log, failure, "could not store {n} task status(es); retrying at the next flush",
                        n=len(batch))

        def done(_: Any) -> None:
            self._flushing = None

        d.addCallbacks(written, failed).addBoth(done)
        if not d.called:
            self._flushing = d
        return d

    # -- lifecycle ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._timer.startService()

    @inlineCallbacks
    def stopService(self):
        """Stops the timer and writes what is buffered (the pool stops after this)."""
        super().stopService()
        self._timer.stopService()
        yield self.flush()  # waits for a running flush
        yield self.flush()  # then writes what arrived meanwhile (or what it failed to write)
        if self.pending:
            self.log.warn("{n} task status(es) were not stored at shutdown; agents re-send them on reconnect",
                          n=len(self.pending))
