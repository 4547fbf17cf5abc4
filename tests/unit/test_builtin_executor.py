"""The built-in executor: collector choice, config errors, runs, points, catalog, stop."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent

from taskd.agent.builtin.collector import CollectError, Point, Sample
from taskd.agent.builtin.executor import BuiltinExecutor
from taskd.agent.contract import ERROR, OK, PENDING, TaskStatus

from tests.unit.builtin_fakes import FakeCollector, FakePublisher, RecordingStats, collectors

START = 1_795_856_400            # 2026-11-28T09:00:00Z, a whole minute
CREATED = "2026-11-28T08:27:17.631350Z"  # 17 s past a minute: a 60 s task runs at :17
FIRST = START + 17


@dataclass
class Rig:
    clock: Clock
    collectors: dict[str, FakeCollector]
    publisher: FakePublisher
    executor: BuiltinExecutor
    stats: RecordingStats
    statuses: list[TaskStatus] = field(default_factory=list)
    catalogs: list[list[dict]] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)

    def status(self, task_id: int) -> TaskStatus:
        return [s for s in self.statuses if s.task_id == task_id][-1]

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events]


def rig(start: bool = True, **kw: Any) -> Rig:
    clock = Clock()
    clock.advance(START)
    cols = collectors(clock)
    publisher, stats = FakePublisher(), RecordingStats()
    statuses: list[TaskStatus] = []
    catalogs: list[list[dict]] = []
    ex = BuiltinExecutor(collectors=cols, publisher=publisher, clock=clock, send_catalog=catalogs.append,
                         report_status=statuses.append, stats=stats, **{"spread": lambda _id: 0.0, **kw})
    r = Rig(clock, cols, publisher, ex, stats, statuses, catalogs)
    ex.log = Logger(namespace="test", observer=r.events.append)
    if start:
        ex.startService()
    return r


def task(id: int, task_type: str = "http", config: dict | None = None, **kw: Any) -> dict:
    if config is None:
        config = {"/raintank/apps/http": {"target": "example.org"}}
    return {"id": id, "name": f"t{id}", "taskType": task_type, "orgId": 3, "config": config,
            "interval": 60, "route": {"type": "any"}, "metrics": {}, "enabled": True,
            "created": CREATED, "updated": CREATED, **kw}


def test_picks_the_collector_by_task_type_and_reports_pending_then_ok():
    r = rig()
    r.executor.set_tasks({5: task(5, "tcp", {"/raintank/apps/tcp": {"target": "db:5432"}})})
    assert r.statuses == [TaskStatus(5, "builtin", PENDING)]
    assert "task 5 (t5) scheduled: tcp every 60s at offset 17s" in r.lines()
    r.clock.advance(17)
    assert [c[0] for c in r.collectors["tcp"].calls] == [{"target": "db:5432"}]
    assert r.collectors["http"].calls == r.collectors["ns1"].calls == []
    assert r.status(5) == TaskStatus(5, "builtin", OK, last_run=FIRST, duration=0, metrics=1, runs=1)


def test_without_task_type_the_collector_is_the_one_whose_namespace_is_in_the_config():
    r = rig()
    r.executor.set_tasks({1: task(1, "", {"/raintank/apps/ns1": {"target": "zone"}})})
    r.clock.advance(17)
    assert len(r.collectors["ns1"].calls) == 1 and r.status(1).outcome == OK


def test_without_task_type_no_or_several_matching_config_keys_is_an_error():
    r = rig()
    r.executor.set_tasks({
        1: task(1, "", {"/other": {"target": "x"}}),
        2: task(2, "", {"/raintank/apps/ns1": {"target": "x"}, "/raintank/apps/tcp": {"target": "y"}}),
    })
    assert r.status(1).outcome == ERROR and "this agent has: http, ns1, tcp" in r.status(1).error
    assert r.status(2) == TaskStatus(2, "builtin", ERROR,
                                     error="no taskType, and the config names several collectors: ns1, tcp")
    assert len(r.executor.scheduler) == 0


def test_unknown_task_type_is_an_error_and_not_scheduled():
    r = rig()
    r.executor.set_tasks({7: task(7, "snmp")})
    assert r.statuses == [TaskStatus(7, "builtin", ERROR,
                                     error="no collector for taskType 'snmp' (this agent has: http, ns1, tcp)")]
    assert 7 not in r.executor.scheduler
    r.clock.advance(600)
    assert all(c.calls == [] for c in r.collectors.values())


def test_bad_config_is_an_error_until_fixed_then_scheduled_and_ok():
    r = rig()
    bad = task(1, config={"/raintank/apps/http": {"target": "x", "bad": "nope"}})
    r.executor.set_tasks({1: bad})
    assert r.statuses == [TaskStatus(1, "builtin", ERROR, error="config: bad: nope")]
    assert 1 not in r.executor.scheduler
    assert "task 1 (t1) not scheduled: config: bad: nope" in r.lines()
    r.clock.advance(120)
    assert r.collectors["http"].calls == []
    r.executor.set_tasks({1: task(1, updated="2026-11-28T09:02:00Z")})
    assert r.statuses[-1] == TaskStatus(1, "builtin", PENDING)
    r.clock.advance(60)  # 09:03:00 -> the next :17
    assert r.status(1).outcome == OK and r.status(1).error == "" and r.status(1).runs == 1


def test_a_missing_config_section_or_any_parse_exception_is_a_config_error():
    r = rig()

    def broken(config, info):
        return 1 / 0

    r.collectors["tcp"].parse_config = broken
    r.executor.set_tasks({1: task(1, config={}), 2: task(2, "tcp"),
                          3: task(3, config={"/raintank/apps/http": "text"})})
    assert r.status(1).error == "config: target is required"
    assert r.status(2).error == "config: ZeroDivisionError: division by zero"
    assert r.status(3).error == "config: /raintank/apps/http is not an object"
    assert len(r.executor.scheduler) == 0


def test_a_bad_interval_is_an_error():
    r = rig()
    r.executor.set_tasks({1: task(1, interval=0), 2: task(2, interval="60")})
    assert r.status(1).outcome == r.status(2).outcome == ERROR
    assert r.status(1).error == "interval 0 is not a positive whole number of seconds"
    assert len(r.executor.scheduler) == 0


def test_collector_error_then_recovery_clears_the_error_and_logs_each_change_once():
    r = rig()
    http = r.collectors["http"]
    http.fail_with = CollectError("connection refused")
    r.executor.set_tasks({1: task(1)})
    r.clock.advance(17)
    r.clock.advance(60)
    r.clock.advance(60)
    assert r.status(1) == TaskStatus(1, "builtin", ERROR, error="connection refused", last_run=FIRST + 120,
                                     duration=0, metrics=0, runs=3, failures=3)
    http.fail_with = RuntimeError("bug")
    r.clock.advance(60)
    assert r.status(1).error == "RuntimeError: bug" and r.status(1).failures == 4
    http.fail_with = None
    r.clock.advance(60)
    assert r.status(1) == TaskStatus(1, "builtin", OK, last_run=FIRST + 240, duration=0, metrics=1,
                                     runs=5, failures=4)
    failed = [line for line in r.lines() if "failed" in line]
    assert failed == ["task 1 (t1) failed: connection refused", "task 1 (t1) failed: RuntimeError: bug"]
    assert "task 1 (t1) ok again" in r.lines()
    assert r.stats.total("builtin.failures") == 4 and r.stats.total("builtin.runs") == 5


def test_points_are_stamped_with_the_slot_time_org_and_interval():
    r = rig()
    r.collectors["http"].answer = [Sample("raintank.apps.http.a.b.status_code", 200, unit="code",
                                          mtype="gauge", tags=("probe=x",)), Sample("x.y", 0.5)]
    r.executor.set_tasks({1: task(1, interval=30)})  # 08:27:17 -> every 30 s at :17 and :47
    r.clock.advance(17 + 2.5)  # the reactor is 2.5 s late
    assert r.publisher.batches == [[
        Point(org_id=3, name="raintank.apps.http.a.b.status_code", value=200, time=FIRST, interval=30,
              unit="code", mtype="gauge", tags=("probe=x",)),
        Point(org_id=3, name="x.y", value=0.5, time=FIRST, interval=30)]]
    assert r.status(1).last_run == FIRST + 2.5 and r.status(1).metrics == 2
    r.clock.advance(30)
    assert [p.time for p in r.publisher.batches[1]] == [FIRST + 30] * 2


def test_the_collector_gets_the_task_info_and_the_duration_is_measured():
    r = rig()
    http = r.collectors["http"]
    http.hold = True
    r.executor.set_tasks({1: task(1)})
    r.clock.advance(17)
    cfg, info, when = http.calls[0]
    assert (info.id, info.name, info.org_id, info.interval, when) == (1, "t1", 3, 60, FIRST)
    r.clock.advance(4)
    http.held[0].callback([Sample("a", 1)])
    assert r.status(1).duration == 4 and r.status(1).last_run == FIRST


def test_a_slot_skipped_because_the_run_is_still_going_shows_in_the_status():
    r = rig()
    http = r.collectors["http"]
    http.hold = True
    r.executor.set_tasks({1: task(1)})
    r.clock.advance(17)
    r.clock.advance(60)
    r.clock.advance(60)
    assert len(http.calls) == 1
    assert r.status(1).skipped == 2 and r.status(1).outcome == PENDING
    assert r.stats.total("builtin.skipped") == 2
    assert sum("run skipped" in line for line in r.lines()) == 1
    http.held[0].callback([])
    assert r.status(1).outcome == OK and r.status(1).skipped == 2 and r.status(1).runs == 1


def test_catalog_is_sent_on_start_and_on_resend_each_record_once():
    r = rig()
    expected = [{"namespace": "/raintank/apps/http/*/status_code", "version": 1},
                {"namespace": "/raintank/apps/common/*/up", "version": 1},
                {"namespace": "/raintank/apps/ns1/*/qps", "version": 1},
                {"namespace": "/raintank/apps/tcp/*/connect", "version": 1}]
    assert r.catalogs == [expected]
    r.executor.resend_catalog()
    assert r.catalogs == [expected, expected]


def test_a_removed_task_stops_running_and_its_in_flight_result_is_ignored():
    r = rig()
    http = r.collectors["http"]
    r.executor.set_tasks({1: task(1), 2: task(2)})
    r.clock.advance(17)
    assert len(http.calls) == 2
    http.hold = True
    r.clock.advance(60)
    r.executor.set_tasks({2: task(2)})
    assert 1 not in r.executor.scheduler and "task 1 (t1) removed" in r.lines()
    reported = len(r.statuses)
    published = len(r.publisher.points)
    http.held[0].callback([Sample("late", 1)])  # task 1's run
    assert len(r.statuses) == reported and len(r.publisher.points) == published
    assert [c[1].id for c in http.calls[2:]] == [1, 2]
    http.held[1].callback([Sample("kept", 1)])  # task 2's run still counts
    assert r.statuses[-1].task_id == 2 and r.publisher.points[-1].name == "kept"
    http.hold = False
    for _ in range(10):
        r.clock.advance(60)
    assert [c[1].id for c in http.calls[4:]] == [2] * 10


def test_an_unchanged_task_is_left_alone_and_a_config_change_keeps_the_timer():
    r = rig()
    r.executor.set_tasks({1: task(1)})
    (call,) = r.clock.getDelayedCalls()
    r.executor.set_tasks({1: task(1), 2: task(2, "snmp")})
    r.executor.set_tasks({1: task(1), 2: task(2, "snmp")})
    assert r.collectors["http"].parsed == 1  # not looked at again
    assert not any("updated" in line for line in r.lines())
    assert [s.outcome for s in r.statuses] == [PENDING, ERROR]  # reported once each
    r.executor.set_tasks({1: task(1)})
    newer = task(1, config={"/raintank/apps/http": {"target": "other.org"}}, updated="2026-11-28T09:00:00Z")
    r.executor.set_tasks({1: newer})
    assert r.clock.getDelayedCalls() == [call] and r.statuses[-1] == TaskStatus(2, "builtin", ERROR, error=(
        "no collector for taskType 'snmp' (this agent has: http, ns1, tcp)"))
    assert "task 1 (t1) updated: http every 60s at offset 17s" in r.lines()
    r.clock.advance(17)
    assert r.collectors["http"].calls[0][0] == {"target": "other.org"}


def test_a_new_interval_reschedules_without_a_double_run():
    r = rig()
    r.executor.set_tasks({1: task(1)})
    r.clock.advance(17)
    r.executor.set_tasks({1: task(1, interval=10, updated="2026-11-28T09:00:17Z")})
    assert "task 1 (t1) rescheduled: http every 10s at offset 7s" in r.lines()
    r.clock.advance(0)
    assert len(r.collectors["http"].calls) == 1
    r.clock.advance(10)
    assert [c[2] for c in r.collectors["http"].calls] == [FIRST, FIRST + 10]
    assert r.status(1).runs == 2


def test_tasks_given_before_start_are_scheduled_on_start_and_disabled_ones_never():
    r = rig(start=False)
    r.executor.set_tasks({1: task(1), 2: task(2, enabled=False)})
    assert r.statuses == [] and len(r.executor.scheduler) == 0
    r.executor.startService()
    assert [s.task_id for s in r.statuses] == [1] and 2 not in r.executor.scheduler


def test_stop_waits_for_runs_in_flight_and_cancels_the_timers():
    r = rig()
    http = r.collectors["http"]
    http.hold = True
    r.executor.set_tasks({1: task(1)})
    r.clock.advance(17)
    stopped = r.executor.stopService()
    assert not stopped.called
    assert len(r.executor.scheduler) == 0
    http.held[0].callback([Sample("a", 1)])
    assert stopped.called
    assert r.status(1).outcome == OK and len(r.publisher.points) == 1  # the last run still counts
    r.clock.advance(600)
    assert len(http.calls) == 1 and r.clock.getDelayedCalls() == []


def test_stop_gives_up_waiting_after_its_bound_and_ignores_later_results():
    r = rig(stop_timeout=2.0)
    http = r.collectors["http"]
    http.hold = True
    r.executor.set_tasks({1: task(1)})
    r.clock.advance(17)
    stopped = r.executor.stopService()
    r.clock.advance(1.9)
    assert not stopped.called
    r.clock.advance(0.1)
    assert stopped.called and any("still going after 2.0s" in line for line in r.lines())
    reported = len(r.statuses)
    http.held[0].callback([Sample("a", 1)])
    assert len(r.statuses) == reported and r.publisher.points == []


def test_restart_schedules_the_tasks_again():
    r = rig()
    r.executor.set_tasks({1: task(1)})
    r.executor.stopService()
    r.executor.startService()
    r.clock.advance(17)
    assert len(r.collectors["http"].calls) == 1 and r.status(1).outcome == OK


def test_a_run_in_flight_when_the_config_turns_bad_does_not_overwrite_the_error():
    r = rig()
    http = r.collectors["http"]
    http.hold = True
    r.executor.set_tasks({1: task(1)})
    r.clock.advance(17)
    r.executor.set_tasks({1: task(1, config={"/raintank/apps/http": {"bad": "x"}})})
    assert r.status(1).error == "config: bad: x"
    http.held[0].callback([Sample("a", 1)])
    assert r.status(1).outcome == ERROR and r.publisher.points == []


def test_slots_passed_over_by_a_late_reactor_count_as_skipped():
    r = rig()
    r.executor.set_tasks({1: task(1)})
    r.clock.advance(17)
    r.clock.advance(200)  # slots +60, +120, +180 due at once: one run, two passed over
    assert r.status(1).runs == 2 and r.status(1).skipped == 2
    assert [p.time for p in r.publisher.points] == [FIRST, FIRST + 180]
    assert any(name == "builtin.lateness" and ms == 140_000 for kind, name, ms, _ in r.stats.calls)


def test_a_sample_value_that_is_not_a_finite_number_is_the_runs_error_naming_the_series():
    r = rig()
    http = r.collectors["http"]
    r.executor.set_tasks({1: task(1)})
    for value, error in [(None, "x.y: value is not a number (NoneType)"),
                         ("n/a", "x.y: value is not a number (str)"),
                         (float("nan"), "x.y: value nan is not finite"),
                         (float("-inf"), "x.y: value -inf is not finite")]:
        http.answer = [Sample("a.b", 1), Sample("x.y", value)]
        r.clock.advance(17 if r.clock.seconds() == START else 60)
        assert (r.status(1).outcome, r.status(1).error) == (ERROR, error)
    assert r.publisher.points == [] and r.status(1).failures == 4
    http.answer = [Sample("a.b", 2), Sample("x.y", "1.5")]  # what float() takes is fine
    r.clock.advance(60)
    assert r.status(1).outcome == OK and [p.value for p in r.publisher.points] == [2.0, 1.5]
    assert all(type(p.value) is float for p in r.publisher.points)


def test_a_task_event_on_a_large_set_looks_only_at_the_task_that_changed(monkeypatch):
    import taskd.agent.builtin.executor as module

    fingerprinted: list[int] = []
    real = module._fingerprint
    monkeypatch.setattr(module, "_fingerprint", lambda t: fingerprinted.append(t["id"]) or real(t))
    r = rig()
    tasks = {i: task(i) for i in range(1, 1001)}
    r.executor.set_tasks(tasks)  # as the cache hands it: the same dicts each time, a changed task is a new one
    assert len(fingerprinted) == 1000 and r.collectors["http"].parsed == 1000
    fingerprinted.clear()
    tasks = {**tasks, 1001: task(1001)}
    r.executor.set_tasks(tasks)
    tasks = {**tasks, 5: task(5, interval=30, updated="2026-11-28T09:00:00Z")}
    r.executor.set_tasks(tasks)
    assert fingerprinted == [1001, 5] and r.collectors["http"].parsed == 1002
    assert r.executor.scheduler.job(5).interval == 30


def test_tasks_created_in_the_same_second_start_spread_over_it_and_are_stamped_with_it():
    r = rig(spread=None)  # the executor's own spread
    r.executor.set_tasks({i: task(i) for i in range(1, 21)})
    r.clock.advance(17)
    assert r.collectors["http"].calls == []  # none at the very start of the second
    for _ in range(100):
        r.clock.advance(0.01)
    starts = [at for _, _, at in r.collectors["http"].calls]
    assert len(starts) == 20 and all(FIRST < at < FIRST + 1 for at in starts)
    assert len({round(at, 2) for at in starts}) == 20  # twenty different instants
    # each tenth of the second holds two of the twenty, not a burst in one of them
    assert sorted({int((at - FIRST) * 10) for at in starts}) == list(range(10))
    assert {p.time for p in r.publisher.points} == {FIRST}
    r.clock.advance(59)  # and at the same instants every interval
    for _ in range(100):
        r.clock.advance(0.01)
    again = [at - 60 for _, _, at in r.collectors["http"].calls[20:]]
    assert len(again) == 20 and all(abs(a - b) < 0.02 for a, b in zip(again, starts))  # (one 0.01 s step)


def test_an_agent_behind_skips_late_runs_with_one_warning_and_says_when_it_caught_up():
    r = rig(max_run_lateness=1.0)
    r.executor.set_tasks({i: task(i) for i in (1, 2, 3)})
    r.clock.advance(17)  # on time: all three run
    assert [r.status(i).runs for i in (1, 2, 3)] == [1, 1, 1]
    r.clock.advance(62)  # the next slots fire 2 s late: none starts
    assert [(r.status(i).runs, r.status(i).skipped) for i in (1, 2, 3)] == [(1, 1)] * 3
    behind = [line for line in r.lines() if "out of CPU" in line]
    assert len(behind) == 1 and "more than 1s late" in behind[0] and "max-run-lateness" in behind[0]
    assert sum(n for kind, name, n, _ in r.stats.calls if name == "builtin.skipped") == 3
    r.clock.advance(58)  # on time again
    assert [(r.status(i).runs, r.status(i).skipped) for i in (1, 2, 3)] == [(2, 1)] * 3
    assert "caught up: runs start on time again; 3 run(s) were skipped while behind" in r.lines()
    assert not any("previous run still going" in line or "passed while" in line for line in r.lines())


def test_a_large_task_set_is_frozen_out_of_the_collectors_sight_once_per_growth_by_half(monkeypatch):
    import gc

    from taskd.agent.builtin.executor import FREEZE_MIN_TASKS

    freezes = []
    real_freeze = gc.freeze
    monkeypatch.setattr(gc, "freeze", lambda: (freezes.append(1), real_freeze()))
    r = rig()
    try:
        r.executor.set_tasks({i: task(i) for i in range(1, FREEZE_MIN_TASKS)})
        assert freezes == []  # small: left alone
        r.executor.set_tasks({i: task(i) for i in range(1, FREEZE_MIN_TASKS + 1)})
        assert len(freezes) == 1 and gc.get_freeze_count() > 0
        r.executor.set_tasks({i: task(i) for i in range(1, FREEZE_MIN_TASKS + 11)})  # grew by 1 %: not again
        assert len(freezes) == 1
        r.executor.set_tasks({i: task(i) for i in range(1, FREEZE_MIN_TASKS * 3 // 2 + 1)})  # by half: again
        assert len(freezes) == 2
    finally:
        gc.unfreeze()
