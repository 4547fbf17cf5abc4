"""Honour the operators' ``log-level`` (Go's 0 TRACE … 6 FATAL) under twistd.

twistd builds its log observer before the plugin has read the config file, and it
only accepts a custom observer as a dotted name (``--logger``) that it resolves
itself. So the plugin installs a level *predicate* early, names
``taskd.logsetup.twistd_observer`` as the logger, and sets the level on the
predicate once the settings are known: the observer twistd builds later filters
by whatever level the config chose. Output goes where twistd's own ``--logfile``
and ``--nodaemon`` would have sent it. ``log-format`` works the same way: a
:class:`LogStyle` is handed to the factory early and its ``format`` set once the
settings are known (twistd builds the observer after ``makeService``), choosing classic
text lines or JSON lines (:func:`json_line`).
"""
from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, MutableMapping
from datetime import datetime, timezone
from typing import Any, TextIO

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from twisted.python.logfile import LogFile

from taskd.logtext import text_file_observer

_LEVELS = (LogLevel.debug, LogLevel.debug, LogLevel.info, LogLevel.warn,
           LogLevel.error, LogLevel.critical, LogLevel.critical)
TWISTD_LOGGER = "taskd.logsetup.twistd_observer"
"""What the plugin puts in twistd's ``--logger`` option."""


def log_level(level: int) -> LogLevel:
    """Go log-level 0..6 → the twisted.logger level; Twisted has no TRACE or FATAL."""
    if not 0 <= level < len(_LEVELS):
        raise ValueError(f"log level {level} is not in 0..6")
    return _LEVELS[level]


QUIET_NAMESPACES = ("autobahn",)
"""Never logged below info, whatever log-level says: autobahn's debug lines carry the raw
websocket handshake, ``Authorization: Bearer <key>`` included. (txaio keeps them from
being emitted at all unless its own level is lowered, which taskd never does.)"""


def make_predicate(level: int = 2) -> LogLevelFilterPredicate:
    predicate = LogLevelFilterPredicate(defaultLogLevel=log_level(level))
    set_level(predicate, level)
    return predicate


def set_level(predicate: LogLevelFilterPredicate, level: int) -> None:
    """Change the level of a live predicate (its default alone is read only once)."""
    predicate.defaultLogLevel = log_level(level)
    predicate.setLogLevelForNamespace("", predicate.defaultLogLevel)
    for namespace in QUIET_NAMESPACES:
        predicate.setLogLevelForNamespace(namespace, max(predicate.defaultLogLevel, LogLevel.info))


def _open_output(logfile: str | None, nodaemon: bool) -> TextIO | LogFile:
    """Where twistd's UnixAppLogger would write, given its options."""
    if logfile == "-":
        if not nodaemon:
            sys.exit("Daemons cannot log to stdout, exiting!")
        return sys.stdout
    if nodaemon and not logfile:
        return sys.stdout
    return LogFile.fromFullPath(logfile or "twistd.log")


class LogStyle:
    """The ``log-format`` chosen (``text`` or ``json``); read when the observer is built."""

    def __init__(self, format: str = "text") -> None:
        self.format = format


# Event keys that are Twisted's own bookkeeping or legacy-log plumbing, not fields.
_NOT_FIELDS = {"message", "format", "isError", "system", "time", "failure", "why",
               "log_trace", "log_io", "log_text", "log_legacy"}
# Field names that could carry a credential: never copied into a JSON line (the
# message text is still there; log calls never put a secret in one).
_SECRET_NAME = re.compile(r"key|token|passw|secret|credential|authorization|cookie|dsn|url",
                          re.IGNORECASE)
_FIXED = ("time", "level", "namespace", "message", "traceback")


def _plain(value: Any) -> bool:
    """A value JSON can carry as is (scalars, and short lists/dicts of them)."""
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return value == value and value not in (float("inf"), float("-inf"))
    if isinstance(value, (list, tuple)):
        return len(value) <= 50 and all(_plain(v) for v in value)
    if isinstance(value, dict):
        return len(value) <= 50 and all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def json_line(event: dict) -> str:
    """One log event as one line of JSON: ``time`` (RFC 3339, UTC), ``level``,
    ``namespace``, ``message`` (the formatted text), ``traceback`` for failures, then
    the event's own fields that are plain JSON values — except Twisted's internals and
    any whose name suggests a credential (key, token, password, url...)."""
    when = event.get("log_time")
    record: dict[str, Any] = {
        "time": (datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="microseconds")
                 .replace("+00:00", "Z") if isinstance(when, (int, float)) else None),
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = "(unable to obtain traceback)"
    for key, value in event.items():
        if key.startswith("log_") or key in _NOT_FIELDS or key in record or key in _FIXED:
            continue
        if not isinstance(key, str) or _SECRET_NAME.search(key) or not _plain(value):
            continue
        record[key] = value
    return json.dumps(record, ensure_ascii=False, default=str) + "\n"


def observer_factory(predicate: LogLevelFilterPredicate, logfile: str | None,
                     nodaemon: bool, style: LogStyle | None = None) -> Callable[[], ILogObserver]:
    """A twistd observer factory: text or JSON lines (``style``), filtered by ``predicate``."""
    def make_observer() -> ILogObserver:
        out = _open_output(logfile, nodaemon)
        if style is not None and style.format == "json":
            lines: ILogObserver = FileLogObserver(out, json_line)
        else:
            lines = text_file_observer(out)
        return FilteringLogObserver(lines, [predicate])
    return make_observer


_factory: Callable[[], ILogObserver] | None = None


def twistd_observer() -> ILogObserver:
    """Called by twistd, by name, to build the process's log observer."""
    if _factory is None:
        raise RuntimeError("taskd.logsetup.install_twistd_logger() was not called")
    return _factory()


def install_twistd_logger(parent: MutableMapping[str, Any] | None,
                          predicate: LogLevelFilterPredicate,
                          style: LogStyle | None = None) -> bool:
    """Make twistd log through ``predicate`` (in ``style``); False if the user chose a
    logger.

    ``parent`` is twistd's ServerOptions (None when a plugin's options are parsed
    alone, as in unit tests). An explicit ``--logger`` or ``--syslog`` wins.
    """
    global _factory, _installed
    if parent is None or parent.get("logger") is not None or parent.get("syslog"):
        return False
    _factory = observer_factory(predicate, parent.get("logfile"),
                                bool(parent.get("nodaemon")), style)
    _installed = predicate
    parent["logger"] = TWISTD_LOGGER
    return True


_installed: LogLevelFilterPredicate | None = None


def level_enabled(namespace: str, level: LogLevel) -> bool:
    """Would an event at ``level`` in ``namespace`` be written? For hot paths that
    would otherwise build an event per request only for the filter to drop it. True
    when taskd did not install the process's observer (tests, another ``--logger``)."""
    predicate = _installed
    return predicate is None or level >= predicate.logLevelForNamespace(namespace)
