"""log-format: JSON lines through the twistd observer factory, and what goes in them."""
from __future__ import annotations

import io
import json

import pytest
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure
from twisted.python.reflect import namedAny

from taskd import logsetup
from taskd.server.plugin import ServerOptions, TaskServerMaker


def capture(**fields) -> dict:
    """The event a taskd Logger call produces."""
    events: list[dict] = []
    publisher = LogPublisher(events.append)
    log = Logger(namespace="taskd.test", observer=publisher)
    level = fields.pop("level", LogLevel.info)
    log.emit(level, fields.pop("fmt"), **fields)
    return events[0]


def test_json_line_has_time_level_namespace_message_and_plain_fields():
    event = capture(fmt="agent {name} ({id}) connected from {ip}", name="agent1", id=7, ip="10.0.0.1")
    event["log_time"] = 1767225600.25  # 2026-01-01T00:00:00.25Z
    line = logsetup.json_line(event)
    assert line.endswith("\n") and "\n" not in line[:-1]
    assert json.loads(line) == {
        "time": "2026-01-01T00:00:00.250000Z", "level": "info", "namespace": "taskd.test",
        "message": "agent agent1 (7) connected from 10.0.0.1", "name": "agent1", "id": 7, "ip": "10.0.0.1"}


def test_json_line_skips_objects_and_credential_named_fields_and_keeps_lists():
    event = capture(fmt="x {obj} {tags}", level=LogLevel.warn, obj=object(), tags=["a", "b"],
                    api_key="SECRET-1", token="SECRET-2", password="SECRET-3", rabbitmq_url="amqp://u:SECRET-4@h/")
    record = json.loads(logsetup.json_line(event))
    assert record["level"] == "warn" and record["tags"] == ["a", "b"]
    assert "obj" not in record and "SECRET" not in json.dumps({k: v for k, v in record.items() if k != "message"})


def test_json_line_carries_the_traceback_of_a_failure():
    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    event = capture(fmt="pushing task {id} failed", id=3, level=LogLevel.critical)
    event["log_failure"] = failure
    record = json.loads(logsetup.json_line(event))
    assert record["message"] == "pushing task 3 failed" and "ZeroDivisionError" in record["traceback"]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_format_chosen_in_the_config_reaches_the_twistd_observer(tmp_path, monkeypatch, fmt):
    """twistd builds its observer after makeService: the format read from the settings
    then decides the lines, as the level does."""
    config = tmp_path / "s.ini"
    config.write_text(f"log-format = {fmt}\nlog-level = 2\n")
    parent = {"logger": None, "logfile": None, "nodaemon": True}
    options = ServerOptions()
    options.parent = parent
    options.parseOptions(["-c", str(config)])
    monkeypatch.setattr("taskd.server.assembly.make_service", lambda settings: "service")
    assert TaskServerMaker().makeService(options, env={}) == "service"
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    observer = namedAny(parent["logger"])()
    observer({"log_level": LogLevel.debug, "log_namespace": "t", "log_format": "dropped", "log_time": 0.0})
    observer({"log_level": LogLevel.info, "log_namespace": "t", "log_format": "kept {n}", "n": 1,
              "log_time": 0.0})
    text = out.getvalue()
    assert "dropped" not in text and "kept 1" in text
    if fmt == "json":
        assert json.loads(text) == {"time": "1970-01-01T00:00:00.000000Z", "level": "info", "namespace": "t",
                                    "message": "kept 1", "n": 1}
    else:
        with pytest.raises(ValueError):
            json.loads(text)


def test_install_keeps_working_without_a_style():
    parent = {"logger": None, "logfile": None, "nodaemon": True}
    assert logsetup.install_twistd_logger(parent, logsetup.make_predicate(2)) is True
    assert parent["logger"] == logsetup.TWISTD_LOGGER


def test_autobahn_debug_lines_never_pass_even_at_log_level_0():
    """They carry the websocket handshake, Authorization header included."""
    from twisted.logger import PredicateResult

    predicate = logsetup.make_predicate(0)
    logsetup.set_level(predicate, 0)

    def passes(namespace: str, level: LogLevel) -> bool:
        return predicate({"log_namespace": namespace, "log_level": level}) != PredicateResult.no

    assert passes("taskd.server.sessions", LogLevel.debug)
    assert not passes("autobahn.twisted.websocket.WebSocketClientProtocol", LogLevel.debug)
    assert passes("autobahn.twisted.websocket.WebSocketClientProtocol", LogLevel.info)
    logsetup.set_level(predicate, 4)
    assert not passes("autobahn.x", LogLevel.warn) and passes("autobahn.x", LogLevel.error)
