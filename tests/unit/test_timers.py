"""The repeating-timer service every loop of the daemons uses."""
from twisted.internet.task import Clock
from twisted.logger import Logger, globalLogPublisher, formatEvent

from taskd.timers import RepeatingTimer


def test_fires_every_interval_after_start_and_stops_idempotently():
    clock, calls = Clock(), []
    timer = RepeatingTimer(clock, 2.0, lambda: calls.append(clock.seconds()), what="t")
    timer.startService()
    timer.startService()  # a second start is a no-op, not a second loop
    clock.advance(1)
    assert calls == []  # not at once by default
    clock.advance(1)
    clock.advance(2)
    assert calls == [2.0, 4.0]
    timer.stopService()
    timer.stopService()
    clock.advance(10)
    assert calls == [2.0, 4.0] and not clock.getDelayedCalls()


def test_now_fires_at_start():
    clock, calls = Clock(), []
    timer = RepeatingTimer(clock, 5.0, lambda: calls.append(1), what="t", now=True)
    timer.startService()
    assert calls == [1]
    timer.stopService()


def test_a_failing_call_is_logged_in_the_owners_namespace_and_stops_only_that_loop():
    clock, events = Clock(), []
    globalLogPublisher.addObserver(events.append)
    try:
        timer = RepeatingTimer(clock, 1.0, lambda: 1 / 0, what="my flush timer",
                               log=Logger(namespace="taskd.owner"))
        timer.startService()
        clock.advance(1)
        clock.advance(1)
    finally:
        globalLogPublisher.removeObserver(events.append)
    failed = [e for e in events if "my flush timer stopped" in formatEvent(e)]
    assert len(failed) == 1 and failed[0]["log_namespace"] == "taskd.owner"
    assert failed[0]["log_failure"].check(ZeroDivisionError)
    timer.stopService()  # stopping a loop that died is fine
