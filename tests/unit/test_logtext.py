"""taskd.logtext writes the very text Twisted's textFileLogObserver writes, event for
event, including the cases it hands back to Twisted."""
from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from twisted.logger import LogLevel, textFileLogObserver
from twisted.python.failure import Failure

from taskd.logtext import ClassicText, text_file_observer


def _failure() -> Failure:
    try:
        1 / 0
    except ZeroDivisionError:
        return Failure()


T = 1_796_300_000.25
EVENTS = [
    {"log_format": "task {id} ({name}) created in org {org}", "id": 7, "name": "web", "org": 1},
    {"log_format": "{event} task {id} to agent {agent} ({ip})", "event": "taskAdd", "id": 3, "agent": "a",
     "ip": "127.0.0.1"},
    {"log_format": "spec {x:>6.2f} repr {y!r} attr {o.v} index {l[1]} {{braces}}", "x": 3.14159, "y": "q",
     "o": SimpleNamespace(v="V"), "l": [0, "one"]},
    {"log_format": "two\nlines", "log_level": LogLevel.warn},
    {"log_format": "missing {nope}"},
    {"log_format": "positional {0}"},
    {"log_format": "called {f()}", "f": lambda: "yes"},
    {"log_format": b"bytes {a}", "a": 1},
    {"log_format": ""},
    {"log_format": None},
    {},
    {"log_format": "failed: {why}", "why": "boom", "log_failure": _failure()},
    {"log_format": "legacy", "log_system": "-"},
    {"log_format": "no time"},
]


@pytest.mark.parametrize("event", EVENTS, ids=[str(e.get("log_format"))[:20] for e in EVENTS])
@pytest.mark.parametrize("when", [T, None, 1_796_300_000.9999996])
def test_the_same_text_as_twisted(event, when):
    event = {"log_namespace": "taskd.x.Y", "log_level": LogLevel.info, **event}
    if when is not None and event.get("log_format") != "no time":
        event["log_time"] = when
    mine, theirs = io.StringIO(), io.StringIO()
    text_file_observer(mine)(dict(event))
    textFileLogObserver(theirs)(dict(event))
    assert mine.getvalue() == theirs.getvalue()


def test_the_time_prefix_follows_the_second():
    fmt = ClassicText()
    first, same, next_second = fmt.time(T), fmt.time(T + 0.5), fmt.time(T + 1)
    assert first == same != next_second
    assert fmt.time(T + 0.7) == first  # cached
    assert fmt.time(T - 10) != first  # going back in time is formatted afresh
