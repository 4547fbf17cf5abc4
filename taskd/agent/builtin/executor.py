"""The built-in executor: runs the agent's tasks with in-process collectors.

The ``builtin`` counterpart of :mod:`taskd.agent.snap` (same Executor contract,
:mod:`taskd.agent.contract`). For each desired task it picks a collector, validates the
task's config once, and schedules runs on the task's slot grid
(:mod:`taskd.agent.builtin.scheduler`, phase = ``created``). Each run's samples are
stamped with the slot time, the task's org and interval, and handed to the publisher.

Choosing the collector: by ``taskType``; a task without one (as the original ng agent's
tasks were) goes to the one collector whose ``namespace`` is a key of its config. A task
that cannot run here (unknown type, bad config, bad interval) is an ERROR status saying
why, never an exception out of `set_tasks`: one bad task must not stop the others.

Sample values are made floats while the run is collected. One that ``float()`` cannot turn
into a finite number (None, "n/a", NaN, ±inf) fails the whole run with an error naming the
series, rather than being dropped and counted later: a publisher cannot send it (graphite
cannot store NaN/inf, tsdb-gw's JSON cannot carry them, and before this check it cost the
tsdb-gw publisher whole batches), and a task status saying which series is broken tells
the collector's author more than a publisher's ``invalid`` counter would.

Statuses are reported when a task is first scheduled (PENDING), when it cannot be
scheduled (ERROR), after every run, and when a slot is skipped. Counters (runs, failures,
skipped) are kept per task id for as long as the task is desired. Errors are logged when
a task's error changes, not on every run, so a task failing every 10 s does not flood the
log; the stats counters still count each one.
"""
from __future__ import annotations

import gc
import json
import math
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from taskd.agent.builtin.collector import CollectError, Collector, ConfigError, Point, TaskInfo
from taskd.agent.builtin.publisher import Publisher
from taskd.agent.builtin.scheduler import OVERLOADED, RUNNING, Scheduler
from taskd.agent.contract import ERROR, OK, PENDING, ReportStatus, SendCatalog, TaskStatus, desired_tasks
from taskd.stats import NULL_STATS

__all__ = ["BuiltinExecutor"]

FREEZE_MIN_TASKS = 1000  # below this a full collection is cheap: the heap is left alone (_settle_heap)

# The task fields whose change means the task must be looked at again (route, metrics and
# enabled do not change what this agent runs; the server only sends enabled tasks).
_MATTERS = ("interval", "created", "config", "taskType", "name", "orgId", "updated")


class _Unrunnable(Exception):
    """The task cannot be scheduled here; the message is its status error."""


def _fingerprint(task: Mapping[str, Any]) -> str:
    return json.dumps([task.get(k) for k in _MATTERS], sort_keys=True, default=str)


def _value(sample: Any) -> float:
    """The sample's value as a finite float, or CollectError naming the series.

    Done while collecting so a bad value is the run's error, never an exception in a
    publisher where it would cost the whole batch (see the module docstring for NaN/inf).
    """
    try:
        value = float(sample.value)
    except (TypeError, ValueError, OverflowError):
        raise CollectError(f"{sample.name}: value is not a number ({type(sample.value).__name__})") from None
    if not math.isfinite(value):
        raise CollectError(f"{sample.name}: value {value!r} is not finite")
    return value


def _phase(task: Mapping[str, Any], task_id: int, spread: Callable[[int], float]) -> float:
    """``created`` as whole Unix seconds, plus a fixed fraction of a second from the task
    id (`spread`, by default `_spread`); the task id when ``created`` is missing or unparsable, which still
    spreads such tasks over the interval.

    The fraction matters when many tasks are created in one second (a script, an import):
    without it they all fire in the same instant every interval, and a burst of a thousand
    runs started together is late by the time it takes to start them all."""
    value = task.get("created")
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.replace("z", "Z"))
        except ValueError:
            return task_id
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return math.floor(dt.timestamp()) + spread(task_id)
    return task_id


def _spread(task_id: int) -> float:
    """A fraction of a second in [0, 1) from the id: consecutive ids land far apart (the
    golden-ratio sequence), so tasks created together spread evenly over their second.

    Continuous, not in steps: tenths of a second made 1,000 checks a second start in
    bursts of 100 and miss their lateness target. The price is paid at light load, where
    each task wakes the reactor alone (1,000 tcp tasks every 10 s: 11 % of a core
    instead of 4 %, for a lateness p99 of 2.5 ms instead of 86 ms; bench/agent-results.md)."""
    return (task_id * 0.6180339887498949) % 1.0


def _error_text(exc: BaseException) -> str:
    """The operator's message: a collector's own errors as they are, others with their type."""
    if isinstance(exc, (CollectError, ConfigError)):
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@dataclass(eq=False)
class _Task:
    """One desired task and what this executor made of it."""

    id: int
    status: TaskStatus
    task: dict = field(default_factory=dict)
    fingerprint: str | None = None
    type: str = ""
    collector: Collector | None = None
    cfg: Any = None
    info: TaskInfo | None = None
    scheduled: bool = False
    generation: int = 0       # bumped when unscheduled: runs of an older generation are ignored
    logged_error: str = ""    # the error last logged, so each error is logged once
    reported: bool = False    # whether `status` was reported yet
    skip_logged: bool = False  # a skip was logged and runs have not been regular since
    last_fire_ran: bool = False

    @property
    def label(self) -> str:
        return f"task {self.id} ({self.task.get('name')})"


class BuiltinExecutor(Service):
    """Keeps the scheduler running exactly the desired tasks with this agent's collectors.

    ``collectors`` maps taskType -> Collector (as `load_collectors` returns it);
    ``stop_timeout`` bounds how long `stopService` waits for runs in progress.
    ``scheduler`` is public so the bench can read its lateness and counters.
    """

    name = "builtin"
    log = Logger()

    def __init__(self, *, collectors: Mapping[str, Collector], publisher: Publisher, clock: IReactorTime,
                 send_catalog: SendCatalog, report_status: ReportStatus, stats: Any = NULL_STATS,
                 stop_timeout: float = 5.0, spread: Callable[[int], float] | None = None,
                 max_run_lateness: float = 0.0) -> None:
        """`spread`: a task id's fraction of a second within its `created` second
        (default `_spread`; the unit tests pass none, to run on whole seconds).
        `max_run_lateness`: a run whose timer fires later than this many seconds is
        skipped, not started (the scheduler's shedding); 0: never."""
        self.collectors = dict(collectors)
        self.spread = _spread if spread is None else spread
        self.publisher = publisher
        self.clock = clock
        self.send_catalog = send_catalog
        self.report_status = report_status
        self.stats = stats
        self.stop_timeout = stop_timeout
        self.max_run_lateness = max_run_lateness
        self.scheduler = Scheduler(clock, on_skip=self._skipped, on_lateness=self._late,
                                   shed_lateness=max_run_lateness or None)
        self._shedding = 0  # runs shed since the agent fell behind (0: it is not behind)
        self._frozen_at = 0  # tasks held when the heap was last frozen (_settle_heap)
        self._desired: dict[int, dict] = {}
        self._tasks: dict[int, _Task] = {}
        self._epoch = 0  # bumped when a stop stops waiting: runs from before are ignored

    # -- the Executor contract ----------------------------------------------------------

    def set_tasks(self, tasks: Mapping[int, dict]) -> None:
        """The full desired set (task id -> server task JSON); applied now if running.

        Task dicts are taken as immutable: one passed again (the same object) is known
        unchanged without being looked at, so an event costs one identity check per other
        task rather than a fingerprint each. The task cache never edits a task dict in
        place (a changed task arrives as a new one).
        """
        self._desired = desired_tasks(tasks, self.log)
        if self.running:
            self._reconcile()

    def resend_catalog(self) -> None:
        """Send every collector's catalog records, each record once."""
        seen: set[str] = set()
        records: list[dict] = []
        for type_name in sorted(self.collectors):
            for record in self.collectors[type_name].catalog:
                key = json.dumps(record, sort_keys=True, default=str)
                if key not in seen:
                    seen.add(key)
                    records.append(dict(record))
        self.send_catalog(records)

    def startService(self) -> None:
        super().startService()
        self.resend_catalog()
        self._reconcile()

    def stopService(self) -> Deferred:
        """Cancel the timers; fire once runs in progress end, or after ``stop_timeout``."""
        super().stopService()
        self.scheduler.stop()
        for state in self._tasks.values():
            state.scheduled = False
            state.fingerprint = None  # a restart schedules everything again
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        waiter = self.scheduler.idle()
        timer = self.clock.callLater(self.stop_timeout, waiter.cancel)
        try:
            await waiter
        except CancelledError:
            self.log.warn("{n} task run(s) still going after {t}s; not waiting for them",
                          n=self.scheduler.in_flight, t=self.stop_timeout)
        finally:
            if timer.active():
                timer.cancel()
        self._epoch += 1

    # -- reconciling --------------------------------------------------------------------

    def _reconcile(self) -> None:
        for task_id in [i for i in self._tasks if i not in self._desired]:
            state = self._tasks.pop(task_id)
            self.scheduler.remove(task_id)
            state.generation += 1
            self.log.info("{task} removed", task=state.label)
        tasks = self._tasks
        for task_id, task in self._desired.items():
            state = tasks.get(task_id)
            if state is None or state.task is not task or state.fingerprint is None:
                self._put(task_id, task)  # else the very dict applied last time: unchanged (set_tasks)
        self.stats.gauge("builtin.tasks", len(self.scheduler))
        self._settle_heap()

    def _settle_heap(self) -> None:
        """Once the task set has grown by half (from FREEZE_MIN_TASKS on): collect, then
        move what is alive out of the garbage collector's sight (gc.freeze). The tasks
        and their parsed configs live as long as the agent, yet every full collection
        walked them all again: with 10,000 http tasks that was about 8 % of the CPU of
        1,000 checks a second (bench/agent-vs-blackbox.md). Collecting first leaves no
        garbage in the frozen set; the rare growth steps bound how often it is paid."""
        n = len(self._tasks)
        if n >= FREEZE_MIN_TASKS and n >= self._frozen_at * 3 // 2:
            gc.collect()
            gc.freeze()
            self._frozen_at = n

    def _put(self, task_id: int, task: dict) -> None:
        state = self._tasks.get(task_id)
        fingerprint = _fingerprint(task)
        if state is not None and state.fingerprint == fingerprint:
            state.task = task  # an equal copy: next time the identity check suffices
            return
        if state is None:
            state = self._tasks[task_id] = _Task(task_id, TaskStatus(task_id, self.name))
        state.task, state.fingerprint = task, fingerprint
        try:
            type_name, collector, cfg, info = self._prepare(task_id, task)
        except _Unrunnable as exc:
            self._unschedule(state, str(exc))
            return
        first = not state.scheduled
        state.type, state.collector, state.cfg, state.info = type_name, collector, cfg, info
        state.scheduled = True
        phase = _phase(task, task_id, self.spread)
        moved = self.scheduler.set(task_id, info.interval, phase, lambda slot: self._run(state, slot))
        self.log.info("{task} {verb}: {type} every {interval}s at offset {offset}s", task=state.label,
                      verb="scheduled" if first else ("rescheduled" if moved else "updated"),
                      type=type_name, interval=info.interval, offset=math.floor(phase % info.interval))
        if first:
            state.logged_error = ""
            self._report(state, replace(state.status, outcome=PENDING, error=""))

    async def run_once(self, task: Mapping[str, Any]) -> dict[str, Any]:
        """An ad-hoc run ("test before you save"): the task once, now, outside the schedule;
        its measurements are answered to the server, not published."""
        started = self.clock.seconds()
        try:
            _, collector, cfg, info = self._prepare(task.get("id") or 0, task)
        except _Unrunnable as exc:
            return {"outcome": "error", "error": str(exc), "duration": None, "metrics": []}
        samples, error = [], ""
        try:
            samples = await collector.collect(cfg, info)
        except Exception as exc:  # noqa: BLE001 - any collector failure is the run's error
            error = _error_text(exc)
            samples = exc.samples if isinstance(exc, CollectError) else []
        metrics = []
        for s in samples:
            try:
                metrics.append({"name": s.name, "value": _value(s), "unit": s.unit})
            except CollectError as exc:
                error = error or str(exc)
        return {"outcome": "error" if error else "ok", "error": error,
                "duration": self.clock.seconds() - started, "metrics": metrics}

    def _prepare(self, task_id: int, task: Mapping[str, Any]) -> tuple[str, Collector, Any, TaskInfo]:
        """Collector, parsed config and TaskInfo for a task, or _Unrunnable saying why not."""
        interval = task.get("interval")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval <= 0:
            raise _Unrunnable(f"interval {interval!r} is not a positive whole number of seconds")
        config = task.get("config") or {}
        if not isinstance(config, Mapping):
            raise _Unrunnable("config: not an object")
        type_name, collector = self._select(task.get("taskType") or "", config)
        org_id = task.get("orgId")
        info = TaskInfo(id=task_id, name=str(task.get("name") or ""), interval=interval,
                        org_id=org_id if isinstance(org_id, int) and not isinstance(org_id, bool) else 0)
        section = config.get(collector.namespace, {})
        if section is None:
            section = {}
        try:
            if not isinstance(section, Mapping):
                raise ConfigError(f"{collector.namespace} is not an object")
            cfg = collector.parse_config(section, info)
        except Exception as exc:  # noqa: BLE001 - a bad config is the task's error, whatever raised it
            raise _Unrunnable(f"config: {_error_text(exc)}") from exc
        return type_name, collector, cfg, info

    def _select(self, task_type: str, config: Mapping[str, Any]) -> tuple[str, Collector]:
        have = ", ".join(sorted(self.collectors)) or "none"
        if task_type:
            collector = self.collectors.get(task_type)
            if collector is None:
                raise _Unrunnable(f"no collector for taskType {task_type!r} (this agent has: {have})")
            return task_type, collector
        matches = [(n, c) for n, c in sorted(self.collectors.items()) if c.namespace in config]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise _Unrunnable(f"no taskType, and no config key names a collector (this agent has: {have})")
        raise _Unrunnable("no taskType, and the config names several collectors: "
                          + ", ".join(n for n, _ in matches))

    def _unschedule(self, state: _Task, error: str) -> None:
        if state.scheduled:
            self.scheduler.remove(state.id)
            state.scheduled = False
        state.generation += 1
        if error != state.logged_error:
            self.log.error("{task} not scheduled: {error}", task=state.label, error=error)
            state.logged_error = error
        self.stats.incr("builtin.config_errors")
        self._report(state, replace(state.status, outcome=ERROR, error=error))

    # -- running ------------------------------------------------------------------------

    async def _run(self, state: _Task, slot: float) -> None:
        generation, epoch = state.generation, self._epoch
        collector, cfg, info, type_name = state.collector, state.cfg, state.info, state.type
        assert collector is not None and info is not None
        if state.last_fire_ran:  # two runs in a row: skips are news again
            state.skip_logged = False
        state.last_fire_ran = True
        started = self.clock.seconds()
        points: list[Point] = []
        error = ""
        when = math.floor(slot)

        def stamped(samples: list) -> list[Point]:
            return [Point(org_id=info.org_id, name=s.name, value=_value(s), time=when,
                          interval=info.interval, unit=s.unit, mtype=s.mtype, tags=tuple(s.tags))
                    for s in samples]

        try:
            points = stamped(await collector.collect(cfg, info))
        except Exception as exc:  # noqa: BLE001 - any collector failure is the run's error
            error = _error_text(exc)
            # A failed assertion still measured something (success 0, the status seen...).
            points = stamped(exc.samples) if isinstance(exc, CollectError) and exc.samples else []
        duration = self.clock.seconds() - started
        if self._tasks.get(state.id) is not state or state.generation != generation or self._epoch != epoch:
            return  # removed, unscheduled or abandoned by a stop meanwhile: ignored
        tags = {"collector": type_name}
        self.stats.incr("builtin.runs", tags=tags)
        self.stats.timing("builtin.duration", duration * 1000.0, tags=tags)
        if points:
            try:
                self.publisher.add(points)
            except Exception as exc:  # noqa: BLE001 - the contract says never; a bug must not kill the run
                error = error or f"publish: {_error_text(exc)}"
        status = replace(state.status, last_run=started, duration=duration, runs=state.status.runs + 1)
        if error:
            self.stats.incr("builtin.failures", tags=tags)
            if error != state.logged_error:
                self.log.error("{task} failed: {error}", task=state.label, error=error)
                state.logged_error = error
            status = replace(status, outcome=ERROR, error=error, metrics=len(points), failures=status.failures + 1)
        else:
            self.stats.incr("builtin.points", len(points), tags=tags)
            if state.logged_error:
                self.log.info("{task} ok again", task=state.label)
                state.logged_error = ""
            status = replace(status, outcome=OK, error="", metrics=len(points))
        self._report(state, status)

    def _skipped(self, task_id: Any, n: int, why: str) -> None:
        state = self._tasks.get(task_id)
        if state is None:
            return
        self.stats.incr("builtin.skipped", n, tags={"collector": state.type})
        state.last_fire_ran = False
        if why == OVERLOADED:  # one line for the agent, not one per task
            if not self._shedding:
                self.log.warn("runs are starting more than {max:g}s late: this agent is out of CPU; such runs are"
                              " skipped (counted in each task's skipped) until it catches up (max-run-lateness)",
                              max=self.max_run_lateness)
            self._shedding += n
        elif not state.skip_logged:
            state.skip_logged = True
            if why == RUNNING:
                self.log.warn("{task}: previous run still going at the next slot; run skipped",
                              task=state.label)
            else:
                self.log.warn("{task}: {n} slot(s) passed while the agent was busy; skipped",
                              task=state.label, n=n)
        self._report(state, replace(state.status, skipped=state.status.skipped + n))

    def _late(self, task_id: Any, lateness: float) -> None:
        self.stats.timing("builtin.lateness", lateness * 1000.0)
        if self._shedding and lateness < self.max_run_lateness / 2:
            self.log.info("caught up: runs start on time again; {n} run(s) were skipped while behind",
                          n=self._shedding)
            self._shedding = 0

    def _report(self, state: _Task, status: TaskStatus) -> None:
        if status == state.status and state.reported:
            return
        state.status, state.reported = status, True
        try:
            self.report_status(status)
        except Exception:  # noqa: BLE001 - the agent's callback must not break scheduling
            self.log.failure("reporting the status of {task} failed", task=state.label)
