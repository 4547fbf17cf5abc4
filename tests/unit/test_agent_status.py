"""The agent's status reporting: coalescing, removal markers, resend on reconnect, and
the Snap executor's status derived from Snap's counters."""
from __future__ import annotations

from twisted.internet.task import Clock

from taskd.agent.contract import ERROR, OK, PENDING, TaskStatus
from taskd.agent.snap.status import SnapStatusTracker
from taskd.agent.statusreporter import StatusReporter
from taskd.wire import framing


class Wire:
    """Stands in for ServerConnection.send(event, value) -> bool."""

    def __init__(self) -> None:
        self.connected = True
        self.frames: list[tuple[str, list]] = []

    def send(self, event: str, value: list) -> bool:
        if not self.connected:
            return False
        self.frames.append((event, value))
        return True


def reporter(interval: float = 10.0, max_batch: int = 1000) -> tuple[StatusReporter, Wire, Clock]:
    wire, clock = Wire(), Clock()
    r = StatusReporter(send=wire.send, clock=clock, interval=interval, max_batch=max_batch)
    r.startService()
    return r, wire, clock


def st(tid: int, outcome: str = OK, runs: int = 1, **kw) -> TaskStatus:
    return TaskStatus(task_id=tid, executor="builtin", outcome=outcome, runs=runs, **kw)


def test_many_reports_of_one_task_in_an_interval_are_one_entry_with_the_latest():
    r, wire, clock = reporter()
    for n in range(1, 101):
        r.report(st(7, runs=n))
    assert wire.frames == []
    clock.advance(10)
    assert wire.frames == [(framing.TASK_STATUS, [st(7, runs=100).to_wire()])]


def test_an_outcome_change_is_sent_within_a_second_other_changes_wait_for_the_interval():
    r, wire, clock = reporter()
    r.report(st(1, runs=1))
    clock.advance(1)  # first news of the task: urgent
    assert [v for _, v in wire.frames] == [[st(1, runs=1).to_wire()]]
    r.report(st(1, runs=2))  # same outcome: waits for the 10 s tick
    clock.advance(5)
    assert len(wire.frames) == 1
    r.report(st(1, outcome=ERROR, runs=3, error="GET http://x/: connection refused"))
    clock.advance(0.99)
    assert len(wire.frames) == 1
    clock.advance(0.01)  # failing now: sent 1 s after it was reported
    assert wire.frames[-1][1] == [st(1, outcome=ERROR, runs=3, error="GET http://x/: connection refused").to_wire()]
    r.report(st(1, outcome=ERROR, runs=4, error="GET http://x/: connection refused"))
    clock.advance(1)
    assert len(wire.frames) == 2  # still failing: no hurry
    r.report(st(1, runs=5))
    clock.advance(1)
    assert wire.frames[-1][1] == [st(1, runs=5).to_wire()]  # recovered: sent at once


def test_nothing_is_sent_when_nothing_changed():
    r, wire, clock = reporter()
    r.report(st(1))
    clock.advance(10)
    r.report(st(1))  # the same status again
    clock.advance(10)
    assert len(wire.frames) == 1


def test_a_dropped_task_is_announced_once_with_a_removal_marker():
    r, wire, clock = reporter()
    r.report(st(1))
    r.report(st(2))
    clock.advance(10)
    r.retain([2])
    clock.advance(10)
    clock.advance(10)
    assert wire.frames[1:] == [(framing.TASK_STATUS, [{"taskId": 1, "removed": True}])]


def test_reconnection_sends_everything_known_at_once():
    r, wire, clock = reporter()
    r.report(st(1))
    r.report(st(2, outcome=ERROR, error="boom"))
    clock.advance(10)
    wire.frames.clear()
    r.connected()
    clock.advance(0)
    assert wire.frames == [(framing.TASK_STATUS, [st(1).to_wire(), st(2, outcome=ERROR, error="boom").to_wire()])]


def test_while_disconnected_changes_are_kept_until_a_flush_can_send_them():
    r, wire, clock = reporter()
    wire.connected = False
    r.report(st(3, runs=1))
    clock.advance(10)
    r.report(st(3, runs=2))
    wire.connected = True
    clock.advance(10)
    assert wire.frames == [(framing.TASK_STATUS, [st(3, runs=2).to_wire()])]


def test_large_updates_are_split_into_frames_of_max_batch():
    r, wire, clock = reporter(max_batch=400)
    for tid in range(1000):
        r.report(st(tid))
    clock.advance(10)
    assert [len(v) for _, v in wire.frames] == [400, 400, 200]
    assert sorted(e["taskId"] for _, v in wire.frames for e in v) == list(range(1000))


def test_stop_sends_the_last_changes():
    r, wire, clock = reporter()
    r.report(st(9))
    r.stopService()
    assert wire.frames == [(framing.TASK_STATUS, [st(9).to_wire()])]
    clock.advance(100)
    assert len(wire.frames) == 1  # the loop is gone


def test_wire_shape_is_what_the_protocol_doc_lists():
    wire = TaskStatus(task_id=4, executor="snap", outcome=ERROR, error="x", last_run=12.5,
                      duration=0.25, metrics=None, runs=3, failures=1, skipped=0).to_wire()
    assert wire == {"taskId": 4, "executor": "snap", "outcome": "error", "error": "x", "lastRun": 12.5,
                    "duration": 0.25, "metrics": None, "runs": 3, "failures": 1, "skipped": 0}


# -- Snap ----------------------------------------------------------------------------------

def snap_task(tid: int, hits: int = 0, fails: int = 0, msg: str = "", state: str = "Running",
              last_run: int = -1, created: int = 100) -> dict:
    t = {"id": f"uuid-{tid}-{created}", "name": f"raintank-apps:{tid}", "task_state": state,
         "last_run_timestamp": last_run, "creation_timestamp": created}
    if hits:
        t["hit_count"] = hits  # Snap omits zero counters
    if fails:
        t["failed_count"] = fails
    if msg:
        t["last_failure_message"] = msg
    return t


def test_snap_counters_moving_decide_the_outcome():
    tr = SnapStatusTracker()
    desired = {1: {}}
    [s] = tr.update([snap_task(1)], desired)
    assert (s.outcome, s.runs, s.failures, s.last_run) == (PENDING, 0, 0, None)
    [s] = tr.update([snap_task(1, hits=3, last_run=1500)], desired)
    assert (s.outcome, s.runs, s.last_run, s.executor) == (OK, 3, 1500.0, "snap")
    [s] = tr.update([snap_task(1, hits=4, fails=1, msg="publish failed: 401")], desired)
    assert (s.outcome, s.error, s.failures) == (ERROR, "publish failed: 401", 1)
    [s] = tr.update([snap_task(1, hits=4, fails=1, msg="publish failed: 401")], desired)
    assert s.outcome == ERROR  # nothing moved: unchanged
    [s] = tr.update([snap_task(1, hits=6, fails=1, msg="publish failed: 401")], desired)
    assert (s.outcome, s.error) == (OK, "")  # fires without new failures: recovered


def test_snap_first_sight_of_an_always_failing_or_disabled_task_is_an_error():
    tr = SnapStatusTracker()
    [s] = tr.update([snap_task(1, hits=2, fails=2, msg="bad")], {1: {}})
    assert s.outcome == ERROR and s.error == "bad"
    [s] = tr.update([snap_task(2, hits=10, fails=10, msg="bad", state="Disabled")], {2: {}})
    assert s.outcome == ERROR and "Snap disabled the task after 10 failed run(s): bad" == s.error


def test_snap_listing_ignores_foreign_and_undesired_tasks_and_prefers_the_newest_copy():
    tr = SnapStatusTracker()
    listing = [snap_task(1, hits=1, created=100), snap_task(1, hits=5, created=200),
               {"id": "x", "name": "someone-else", "hit_count": 9}, snap_task(3, hits=1)]
    out = tr.update(listing, {1: {}})
    assert [(s.task_id, s.runs) for s in out] == [(1, 5)]


def test_snap_unrunnable_task_reports_the_reason():
    tr = SnapStatusTracker()
    s = tr.unrunnable(5, "cannot be run by Snap: no metrics")
    assert (s.task_id, s.outcome, s.error) == (5, ERROR, "cannot be run by Snap: no metrics")


def test_snap_re_created_task_is_a_first_sight_not_compared_with_the_old_totals():
    tr = SnapStatusTracker()
    desired = {1: {}}
    [s] = tr.update([snap_task(1, hits=10, fails=3, msg="publish failed: 401")], desired)
    assert s.outcome == OK  # first sight, some fires worked
    [s] = tr.update([snap_task(1, hits=11, fails=4, msg="publish failed: 401")], desired)
    assert s.outcome == ERROR
    # updated: Snap's task is re-created with new counters
    [s] = tr.update([snap_task(1, created=200)], desired)
    assert (s.outcome, s.error, s.runs, s.failures) == (PENDING, "", 0, 0)
    [s] = tr.update([snap_task(1, hits=2, created=200)], desired)
    assert (s.outcome, s.runs) == (OK, 2)
    # the same Snap task id and time, but the counters went down: also a new task
    [s] = tr.update([snap_task(1, hits=5, fails=1, msg="x", created=200)], desired)
    assert s.outcome == ERROR
    t = snap_task(1, hits=1, created=200)
    [s] = tr.update([t], desired)
    assert (s.outcome, s.error, s.runs, s.failures) == (OK, "", 1, 0)
