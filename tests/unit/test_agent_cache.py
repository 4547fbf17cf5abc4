"""The agent's task cache: server frames in, the full desired set out to the executor."""
from __future__ import annotations

from taskd.agent.taskcache import TaskCache
from taskd.wire import framing
from taskd.wire.framing import decode, encode, encode_json


def cache():
    applied = []
    return TaskCache(lambda tasks: applied.append(dict(tasks))), applied


def task(id, **kw):
    return {"id": id, "name": f"t{id}", "interval": 60, **kw}


def test_task_list_replaces_everything():
    c, applied = cache()
    c.handle(decode(encode_json("taskList", [task(1), task(2)])))
    c.handle(decode(encode_json("taskList", [task(2)])))
    assert applied == [{1: task(1), 2: task(2)}, {2: task(2)}]


def test_null_task_list_means_none():
    c, applied = cache()
    c.handle(decode(encode_json("taskAdd", task(1))))
    c.handle(decode(encode_json("taskList", None)))
    assert applied[-1] == {}


def test_add_update_remove():
    c, applied = cache()
    c.handle(decode(encode_json("taskList", [])))
    c.handle(decode(encode_json("taskAdd", task(1))))
    c.handle(decode(encode_json("taskUpdate", task(1, interval=10))))
    c.handle(decode(encode_json("taskRemove", task(1))))
    assert applied == [{}, {1: task(1)}, {1: task(1, interval=10)}, {}]


def test_repeats_do_not_reapply():
    c, applied = cache()
    c.handle(decode(encode_json("taskList", [])))
    for _ in range(3):
        c.handle(decode(encode_json("taskAdd", task(1))))
    c.handle(decode(encode_json("taskRemove", task(9))))
    assert applied == [{}, {1: task(1)}]


def test_events_before_the_first_task_list_are_recorded_but_not_applied():
    """A lone taskAdd must not make an executor reconcile to a one-task set (the Snap
    executor would delete the agent's other tasks until the list came)."""
    c, applied = cache()
    c.handle(decode(encode_json("taskAdd", task(1))))
    c.handle(decode(encode_json("taskUpdate", task(2))))
    c.handle(decode(encode_json("taskRemove", task(1))))
    assert applied == [] and c.tasks == {2: task(2)}
    c.handle(decode(encode_json("taskList", [task(3)])))
    assert applied == [{3: task(3)}]


def test_undecodable_payloads_are_ignored():
    c, applied = cache()
    c.handle(decode(encode("taskAdd", b"{not json")))
    c.handle(decode(encode_json("taskAdd", {"name": "no id"})))
    c.handle(decode(encode_json("taskAdd", {"id": True})))
    c.handle(decode(encode_json("taskList", {"not": "a list"})))
    c.handle(decode(encode_json("whatever", [])))
    c.handle(decode(encode(framing.HEARTBEAT, b"2026-01-01T00:00:00Z")))
    assert applied == [] and c.tasks == {}


def test_first_task_list_is_applied_even_when_empty():
    """The executor waits for the server's word before removing anything."""
    c, applied = cache()
    c.handle(decode(encode_json("taskList", [])))
    c.handle(decode(encode_json("taskList", [])))
    assert applied == [{}]


def test_a_long_task_list_is_logged_as_one_short_line():
    from twisted.logger import formatEvent, globalLogPublisher

    seen: list[str] = []
    observer = lambda e: seen.append(formatEvent(e)) if e.get("log_namespace", "").startswith("taskd.agent") else None  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        c, _ = cache()
        c.handle(decode(encode_json(framing.TASK_LIST, [task(i) for i in range(1, 1001)])))
    finally:
        globalLogPublisher.removeObserver(observer)
    [line] = seen
    assert line.startswith("task list: 1000 task(s): 1 (t1), 2 (t2)") and line.endswith(", and 980 more")
    assert "21 (t21)" not in line
