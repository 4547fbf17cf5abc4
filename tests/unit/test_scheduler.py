"""The built-in executor's scheduler: slot grids, no drift, no overlap, safe rescheduling."""
from __future__ import annotations

import itertools

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger

from taskd.agent.builtin.scheduler import LATE, OVERLOADED, RUNNING, SHED_STREAK, Scheduler


class Recorder:
    """A job function that records (slot, clock time) and optionally parks its Deferred."""

    def __init__(self, clock: Clock, hold: bool = False) -> None:
        self.clock = clock
        self.hold = hold
        self.runs: list[tuple[float, float]] = []
        self.held: list[Deferred] = []

    def __call__(self, slot: float) -> Deferred | None:
        self.runs.append((slot, self.clock.seconds()))
        if self.hold:
            d: Deferred = Deferred()
            self.held.append(d)
            return d
        return None

    @property
    def slots(self) -> list[float]:
        return [s for s, _ in self.runs]


def advance_to(clock: Clock, t: float, step: float = 1.0) -> None:
    while clock.seconds() + step <= t:
        clock.advance(step)
    clock.advance(t - clock.seconds())


def test_runs_on_each_jobs_grid_of_phase_and_interval():
    clock = Clock()
    clock.advance(1000)
    sched = Scheduler(clock)
    jobs = {"a": (10, 3), "b": (60, 1_700_000_017), "c": (7, 0), "d": (30, 29)}
    recs = {key: Recorder(clock) for key in jobs}
    for key, (interval, phase) in jobs.items():
        sched.set(key, interval, phase, recs[key])
    advance_to(clock, 1200)
    for key, (interval, phase) in jobs.items():
        expected = [t for t in range(1000, 1201) if (t - phase) % interval == 0]
        assert recs[key].slots == expected, key
        assert [when for _, when in recs[key].runs] == expected, key  # on time, to the tick
    assert sched.runs == sum(len(r.runs) for r in recs.values())


def test_a_new_job_whose_slot_is_now_runs_now():
    clock = Clock()
    clock.advance(120)
    sched = Scheduler(clock)
    rec = Recorder(clock)
    sched.set(1, 60, 0, rec)
    clock.advance(0)
    assert rec.slots == [120]


def test_no_drift_over_many_periods_with_uneven_clock_steps():
    clock = Clock()
    sched = Scheduler(clock)
    rec = Recorder(clock)
    sched.set("j", 10, 4, rec)
    steps = itertools.cycle([0.7, 3.1, 0.05, 2.9, 1.33, 9.9, 0.5])
    while clock.seconds() < 10_000:
        clock.advance(next(steps))
    slots = rec.slots
    assert slots == [4 + 10 * k for k in range(len(slots))]  # every slot once, on the grid
    assert len(slots) == 1000
    assert all(0 <= when - slot < 9.9 for slot, when in rec.runs)  # late by at most one step
    assert sched.skipped == sched.missed == 0


def test_a_clock_jump_runs_once_for_the_latest_slot_and_counts_the_missed_ones():
    clock = Clock()
    skips = []
    sched = Scheduler(clock, on_skip=lambda key, n, why: skips.append((key, n, why)))
    rec = Recorder(clock)
    sched.set("j", 10, 0, rec)
    clock.advance(0)
    clock.advance(55)  # slots 10..50 are due at once
    assert rec.runs == [(0, 0), (50, 55)]
    job = sched.job("j")
    assert job.missed == sched.missed == 4
    assert skips == [("j", 4, LATE)]
    assert job.next_slot == 60
    clock.advance(5)
    assert rec.slots == [0, 50, 60]


def test_a_slot_due_while_the_previous_run_is_going_is_skipped_and_counted():
    clock = Clock()
    skips = []
    sched = Scheduler(clock, on_skip=lambda key, n, why: skips.append((key, n, why)))
    rec = Recorder(clock, hold=True)
    sched.set("slow", 10, 0, rec)
    clock.advance(0)
    for _ in range(3):
        clock.advance(10)
    assert rec.slots == [0]
    job = sched.job("slow")
    assert job.running and job.skipped == sched.skipped == 3 and job.runs == 1
    assert skips == [("slow", 1, RUNNING)] * 3
    rec.held[0].callback(None)
    assert not job.running
    clock.advance(10)
    assert rec.slots == [0, 40]  # back on the grid, no catch-up burst


def test_a_job_finishing_synchronously_or_by_coroutine_does_not_block_the_next():
    clock = Clock()
    sched = Scheduler(clock)
    ran = []

    async def coro(slot):
        ran.append(slot)

    sched.set("c", 5, 0, coro)
    advance_to(clock, 10)
    assert ran == [0, 5, 10] and sched.skipped == 0 and sched.in_flight == 0


def test_new_interval_does_not_run_twice_and_starts_after_the_last_run():
    clock = Clock()
    clock.advance(100)
    sched = Scheduler(clock)
    rec = Recorder(clock)
    sched.set("j", 60, 0, rec)
    advance_to(clock, 120)
    assert rec.slots == [120]
    assert sched.set("j", 30, 0, rec) is True  # at 120: slot 120 of the new grid already ran
    clock.advance(0)
    assert rec.slots == [120]
    advance_to(clock, 150)
    assert rec.slots == [120, 150]
    advance_to(clock, 165)
    assert sched.set("j", 10, 0, rec) is True  # 160 is past: no catch-up, next is 170
    clock.advance(0)
    advance_to(clock, 180)
    assert rec.slots == [120, 150, 170, 180]


def test_a_new_phase_whose_slot_equals_the_last_run_waits_for_the_next_slot():
    clock = Clock()
    sched = Scheduler(clock)
    rec = Recorder(clock)
    sched.set("j", 60, 0, rec)
    clock.advance(0)
    clock.advance(20)
    sched.set("j", 20, 0, rec)  # its slots 0 (ran) and 20 (now); 20 is after 0, so it runs
    clock.advance(0)
    assert rec.slots == [0, 20]
    sched.set("j", 40, 20, rec)  # slot 20 again: ran already, next is 60
    clock.advance(0)
    advance_to(clock, 60)
    assert rec.slots == [0, 20, 60]


def test_rescheduling_during_a_run_keeps_the_overlap_rule():
    clock = Clock()
    sched = Scheduler(clock)
    rec = Recorder(clock, hold=True)
    sched.set("j", 60, 0, rec)
    clock.advance(0)
    sched.set("j", 10, 0, rec)
    clock.advance(10)
    assert rec.slots == [0] and sched.job("j").skipped == 1
    rec.held[0].callback(None)
    clock.advance(10)
    assert rec.slots == [0, 20]


def test_the_same_schedule_keeps_the_timer_and_swaps_the_function():
    clock = Clock()
    clock.advance(3)
    sched = Scheduler(clock)
    old, new = Recorder(clock), Recorder(clock)
    sched.set("j", 10, 7, old)
    (call,) = clock.getDelayedCalls()
    clock.advance(2)
    assert sched.set("j", 10, 7, new) is False
    assert sched.set("j", 10, 17, new) is False  # the same grid
    assert clock.getDelayedCalls() == [call] and call.getTime() == 7
    clock.advance(2)
    assert old.runs == [] and new.slots == [7]


def test_remove_stops_runs_and_ignores_the_in_flight_result():
    clock = Clock()
    events = []
    sched = Scheduler(clock)
    sched.log = Logger(namespace="test", observer=events.append)
    rec = Recorder(clock, hold=True)
    sched.set("j", 10, 0, rec)
    clock.advance(0)
    assert sched.remove("j") is True and sched.remove("j") is False
    assert clock.getDelayedCalls() == []
    advance_to(clock, 100)
    assert rec.slots == [0] and "j" not in sched
    idle = sched.idle()
    assert not idle.called
    rec.held[0].errback(RuntimeError("late failure"))
    assert idle.called and sched.in_flight == 0
    assert events == []  # a removed job's failure is not logged
    assert clock.getDelayedCalls() == []


def test_an_active_jobs_failure_is_logged_and_the_job_keeps_running():
    clock = Clock()
    events = []
    sched = Scheduler(clock)
    sched.log = Logger(namespace="test", observer=events.append)

    def boom(slot):
        raise RuntimeError("boom")

    sched.set("j", 10, 0, boom)
    clock.advance(0)
    clock.advance(10)
    assert sched.runs == 2
    assert len(events) == 2 and events[0]["log_failure"].check(RuntimeError)


def test_lateness_is_recorded_per_fire_and_bounded():
    clock = Clock()
    seen = []
    sched = Scheduler(clock, on_lateness=lambda key, late: seen.append((key, late)), keep_lateness=2)
    sched.set("j", 10, 0, Recorder(clock))
    clock.advance(0)
    clock.advance(13)
    clock.advance(8.5)
    assert seen == [("j", 0.0), ("j", 3.0), ("j", 1.5)]
    assert list(sched.lateness) == [3.0, 1.5]


def test_stop_cancels_every_timer_and_idle_waits_for_runs_in_flight():
    clock = Clock()
    sched = Scheduler(clock)
    slow, fast = Recorder(clock, hold=True), Recorder(clock)
    sched.set("slow", 10, 0, slow)
    sched.set("fast", 10, 5, fast)
    clock.advance(0)
    sched.stop()
    assert clock.getDelayedCalls() == [] and len(sched) == 0
    advance_to(clock, 50)
    assert slow.slots == [0] and fast.runs == []
    idle = sched.idle()
    assert not idle.called
    slow.held[0].callback(None)
    assert idle.called


def test_cancelling_idle_only_stops_the_wait():
    clock = Clock()
    sched = Scheduler(clock)
    rec = Recorder(clock, hold=True)
    sched.set("j", 10, 0, rec)
    clock.advance(0)
    idle = sched.idle()
    idle.cancel()
    idle.addErrback(lambda f: None)
    assert not rec.held[0].called and sched.in_flight == 1
    rec.held[0].callback(None)  # nothing left waiting: no AlreadyCalledError
    assert sched.in_flight == 0


def test_a_failing_hook_does_not_stop_the_job():
    clock = Clock()

    def bad_hook(*args):
        raise ValueError("hook bug")

    sched = Scheduler(clock, on_lateness=bad_hook)
    sched.log = Logger(namespace="test", observer=lambda e: None)
    rec = Recorder(clock)
    sched.set("j", 10, 0, rec)
    advance_to(clock, 20)
    assert rec.slots == [0, 10, 20]


@pytest.mark.parametrize("interval", [0, -5])
def test_interval_must_be_positive(interval):
    with pytest.raises(ValueError):
        Scheduler(Clock()).set("j", interval, 0, lambda slot: None)


def test_a_fire_later_than_shed_lateness_is_skipped_as_overloaded_and_on_time_ones_run():
    clock = Clock()
    skips = []
    sched = Scheduler(clock, on_skip=lambda key, n, why: skips.append((key, n, why)), shed_lateness=1.0)
    rec = Recorder(clock)
    sched.set("j", 10, 0, rec)
    clock.advance(0)      # on time
    clock.advance(10.5)   # half a second late: within the bound, runs
    clock.advance(11)     # slot 20 fired at 21.5: 1.5 s late, shed
    assert rec.slots == [0, 10]
    assert skips == [("j", 1, OVERLOADED)] and sched.job("j").shed == sched.shed == 1
    assert sched.job("j").runs == sched.runs == 2
    advance_to(clock, 30)  # the next slot, on time: runs
    assert rec.slots == [0, 10, 30]


def test_shedding_never_skips_a_job_more_than_shed_streak_times_in_a_row():
    clock = Clock()
    skips = []
    sched = Scheduler(clock, on_skip=lambda key, n, why: skips.append(why), shed_lateness=1.0)
    rec = Recorder(clock)
    sched.set("j", 10, 0, rec)
    clock.advance(0)
    clock.advance(5)
    fires = 2 * (SHED_STREAK + 1)
    for _ in range(fires):  # fires at 15, 25, ... each 5 s late: SHED_STREAK shed, then one runs
        clock.advance(10)
    assert skips == [OVERLOADED] * (2 * SHED_STREAK)
    every = 10 * (SHED_STREAK + 1)
    assert rec.runs == [(0, 0), (every, every + 5), (2 * every, 2 * every + 5)]


def test_without_shed_lateness_a_late_fire_runs():
    clock = Clock()
    sched = Scheduler(clock)
    rec = Recorder(clock)
    sched.set("j", 10, 0, rec)
    clock.advance(0)
    clock.advance(15)  # 5 s late
    assert rec.runs == [(0, 0), (10, 15)] and sched.shed == 0
