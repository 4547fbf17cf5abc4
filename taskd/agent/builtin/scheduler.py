"""When the built-in executor's tasks run: a fixed grid of slots per job, one timer each.

A job with ``interval`` I and ``phase`` P runs at the slots P + k·I. The executor passes
the task's ``created`` (Unix seconds) as P, so a task runs at ``created % interval``
seconds past each interval boundary, as the original agent did: tasks created at
different moments are spread over the interval instead of all firing on the minute.

Rules, each chosen so a slow collector or a stalled reactor degrades into counted
skips rather than drift, bursts or piles of concurrent runs:

* **No drift.** The next fire is always computed from the slot index, never from "now +
  interval", so a timer that fires late does not push later runs back.
* **Late by more than a slot** (the clock jumped, the reactor was blocked): run once, for
  the latest slot already due, and count the slots passed over as ``missed``.
* **No overlap.** A slot that comes due while the job's previous run is still going is not
  started; it is counted as ``skipped``. Runs are never cancelled.
* **Rescheduling** (`set` with another interval or phase) never runs twice for one
  moment: the new grid's first fire is its first slot at or after now *and* strictly
  after the last slot that already ran. `set` with the same grid keeps the current timer
  (only the function is replaced), so re-sending an unchanged task does not move it.
* **Shedding** (with `shed_lateness`): a fire that comes more than that many seconds
  after its slot is not started but skipped (reason ``overloaded``). Such lateness means
  the process is out of CPU; starting more work then only makes every run time out, the
  connection to the server and the publisher starve, and the process stop answering.
  Skipping keeps the work to what the CPU can do, and the runs that do start measure
  their target rather than the backlog. No job is shed more than `SHED_STREAK` times in a
  row, so under any load every task still runs at least every tenth interval.
* **Removal** cancels the timer; a run in progress finishes on its own, its result and
  errors are ignored and nothing is rescheduled for it.

Each job owns one ``IDelayedCall``; the reactor keeps them in a heap, so a fire costs
O(log n) for n jobs. Lateness (actual fire time minus the slot the timer was set for) is
kept for the last ``keep_lateness`` fires in `Scheduler.lateness` and passed to the
``on_lateness`` hook, which is how the bench and the executor's stats see whether the
reactor keeps up.
"""
from __future__ import annotations

import math
from collections import deque
from types import CoroutineType
from typing import Any, Callable, Hashable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["Scheduler", "Job", "RUNNING", "LATE", "OVERLOADED"]

RUNNING = "running"        # on_skip reason: the previous run was still going
LATE = "late"              # on_skip reason: the slot passed while the timer was overdue
OVERLOADED = "overloaded"  # on_skip reason: the fire came later than `shed_lateness`
SHED_STREAK = 9  # a job shed this many times in a row runs at its next fire, however late

RunFn = Callable[[float], Any]
OnSkip = Callable[[Hashable, int, str], None]
OnLateness = Callable[[Hashable, float], None]


class Job:
    """One scheduled job; the attributes without an underscore are for reading.

    ``runs`` counts runs started, ``skipped`` slots not started because a run was still
    going, ``missed`` slots passed over by a late fire; ``last_slot`` is the slot of the
    last run started (None before the first), ``next_slot`` the slot the timer is set for.
    """

    def __init__(self, key: Hashable, interval: float, phase: float, fn: RunFn) -> None:
        self.key = key
        self.fn = fn
        self.interval = interval
        self.offset = phase % interval
        self.runs = 0
        self.skipped = 0
        self.missed = 0
        self.shed = 0
        self._shed_streak = 0  # fires shed in a row
        self.last_slot: float | None = None
        self.running = False
        self._k = 0  # index of the slot the timer is set for
        self._call: IDelayedCall | None = None
        self._active = True

    def slot(self, k: int) -> float:
        return self.offset + k * self.interval

    @property
    def next_slot(self) -> float | None:
        return self.slot(self._k) if self._call is not None else None

    def _k_at_or_before(self, t: float) -> int:
        """Index of the latest slot <= t (float division corrected at the boundary)."""
        k = math.floor((t - self.offset) / self.interval)
        while self.slot(k + 1) <= t:
            k += 1
        while self.slot(k) > t:
            k -= 1
        return k

    def _first_k(self, now: float) -> int:
        """Index of the first slot at or after ``now`` and strictly after ``last_slot``."""
        k = self._k_at_or_before(now)
        if self.slot(k) < now:
            k += 1
        if self.last_slot is not None:
            k = max(k, self._k_at_or_before(self.last_slot) + 1)
        return k

    def _cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


def _start(fn: RunFn, slot: float) -> Deferred:
    """Call ``fn(slot)``; whatever it returns (value, Deferred, coroutine) as a Deferred."""
    try:
        result = fn(slot)
    except Exception:  # noqa: BLE001 - reported through the Deferred like an async failure
        return fail()
    if isinstance(result, Deferred):
        return result
    if type(result) is CoroutineType:
        return Deferred.fromCoroutine(result)
    return succeed(result)


class Scheduler:
    """Runs jobs on their slot grids (see the module docstring for the rules).

    ``fn`` is called with the slot time (a float, Unix seconds on a real reactor) so the
    caller can stamp its results with the intended time rather than the late one.
    Totals over all jobs: ``runs``, ``skipped``, ``missed``, ``shed``; ``lateness`` holds the
    lateness in seconds of the most recent fires.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, *, on_skip: OnSkip | None = None,
                 on_lateness: OnLateness | None = None, keep_lateness: int = 1024,
                 shed_lateness: float | None = None) -> None:
        self.clock = clock
        self.shed_lateness = shed_lateness
        self.on_skip = on_skip
        self.on_lateness = on_lateness
        self.runs = 0
        self.skipped = 0
        self.missed = 0
        self.shed = 0
        self.lateness: deque[float] = deque(maxlen=keep_lateness)
        self._jobs: dict[Hashable, Job] = {}
        self._inflight: set[Deferred] = set()
        self._idle_waiters: list[Deferred] = []

    # -- public -------------------------------------------------------------------------

    def set(self, key: Hashable, interval: float, phase: float, fn: RunFn) -> bool:
        """Add or change a job; True when its timer was (re)made, False when it was kept."""
        if not interval > 0:
            raise ValueError(f"interval must be > 0, not {interval!r}")
        job = self._jobs.get(key)
        if job is not None and job.interval == interval and job.offset == phase % interval:
            job.fn = fn
            return False
        if job is None:
            job = self._jobs[key] = Job(key, interval, phase, fn)
        else:  # a new grid; runs, counters and an in-flight run carry over
            job._cancel()
            job.interval, job.offset, job.fn = interval, phase % interval, fn
        now = self.clock.seconds()
        job._k = job._first_k(now)
        self._arm(job, now)
        return True

    def remove(self, key: Hashable) -> bool:
        """Forget a job: no further runs; a run in progress is left to finish, ignored."""
        job = self._jobs.pop(key, None)
        if job is None:
            return False
        job._active = False
        job._cancel()
        return True

    def stop(self) -> None:
        """Remove every job (runs in progress finish; `idle` says when)."""
        for key in list(self._jobs):
            self.remove(key)

    def job(self, key: Hashable) -> Job | None:
        return self._jobs.get(key)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._jobs

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def in_flight(self) -> int:
        """Runs started and not finished, removed jobs' included."""
        return len(self._inflight)

    def idle(self) -> Deferred:
        """Fires once no run is in progress. Cancelling it only stops the waiting."""
        if not self._inflight:
            return succeed(None)
        waiter: Deferred = Deferred(lambda d: self._idle_waiters.remove(d))
        self._idle_waiters.append(waiter)
        return waiter

    # -- plumbing -----------------------------------------------------------------------

    def _arm(self, job: Job, now: float) -> None:
        job._call = self.clock.callLater(max(0.0, job.slot(job._k) - now), self._fire, job)

    def _fire(self, job: Job) -> None:
        job._call = None
        now = self.clock.seconds()
        intended = job.slot(job._k)
        due = max(job._k, job._k_at_or_before(now))
        missed = due - job._k
        slot = job.slot(due)
        job._k = due + 1
        self._arm(job, now)

        lateness = now - intended
        self.lateness.append(lateness)
        if self.on_lateness is not None:
            self._hook(self.on_lateness, job.key, lateness)
        if missed:
            job.missed += missed
            self.missed += missed
            if self.on_skip is not None:
                self._hook(self.on_skip, job.key, missed, LATE)
        if job.running:
            job.skipped += 1
            self.skipped += 1
            if self.on_skip is not None:
                self._hook(self.on_skip, job.key, 1, RUNNING)
            return
        if not job._active:  # a hook removed it
            return
        if self.shed_lateness is not None and now - slot > self.shed_lateness and job._shed_streak < SHED_STREAK:
            job._shed_streak += 1
            job.shed += 1
            self.shed += 1
            if self.on_skip is not None:
                self._hook(self.on_skip, job.key, 1, OVERLOADED)
            return
        job._shed_streak = 0
        job.last_slot = slot
        job.runs += 1
        self.runs += 1
        job.running = True
        d = _start(job.fn, slot)
        self._inflight.add(d)
        d.addBoth(self._finished, job, d)

    def _finished(self, result: Any, job: Job, d: Deferred) -> None:
        job.running = False
        self._inflight.discard(d)
        if isinstance(result, Failure) and job._active:
            self.log.failure("scheduled job {key!r} failed", result, key=job.key)
        if not self._inflight:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        return None  # a removed job's failure is dropped, not left unhandled

    def _hook(self, hook: Callable[..., None], *args: Any) -> None:
        try:
            hook(*args)
        except Exception:  # noqa: BLE001 - a hook's bug must not stop the timers
            self.log.failure("scheduler hook {hook!r} failed", hook=hook)
