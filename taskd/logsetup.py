"""Honour the operators' ``log-level`` (Go's 0 TRACE … 6 FATAL) under twistd.

twistd builds its log observer before the plugin has read the config file, and it
only accepts a custom observer as a dotted name (``--logger``) that it resolves
itself. So the plugin installs a level *predicate* early, names
``taskd.logsetup.twistd_observer`` as the logger, and sets the level on the
predicate once the settings are known: the observer twistd builds later filters
by whatever level the config chose. Output goes where twistd's own ``--logfile``
and ``--nodaemon`` would have sent it.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile

_LEVELS = (LogLevel.debug, LogLevel.debug, LogLevel.info, LogLevel.warn,
           LogLevel.error, LogLevel.critical, LogLevel.critical)
TWISTD_LOGGER = "taskd.logsetup.twistd_observer"
"""What the plugin puts in twistd's ``--logger`` option."""


def log_level(level: int) -> LogLevel:
    """Go log-level 0..6 → the twisted.logger level; Twisted has no TRACE or FATAL."""
    if not 0 <= level < len(_LEVELS):
        raise ValueError(f"log level {level} is not in 0..6")
    return _LEVELS[level]


def make_predicate(level: int = 2) -> LogLevelFilterPredicate:
    return LogLevelFilterPredicate(defaultLogLevel=log_level(level))


def set_level(predicate: LogLevelFilterPredicate, level: int) -> None:
    """Change the level of a live predicate (its default alone is read only once)."""
    predicate.defaultLogLevel = log_level(level)
    predicate.setLogLevelForNamespace("", predicate.defaultLogLevel)


def _open_output(logfile: str | None, nodaemon: bool) -> TextIO | LogFile:
    """Where twistd's UnixAppLogger would write, given its options."""
    if logfile == "-":
        if not nodaemon:
            sys.exit("Daemons cannot log to stdout, exiting!")
        return sys.stdout
    if nodaemon and not logfile:
        return sys.stdout
    return LogFile.fromFullPath(logfile or "twistd.log")


def observer_factory(predicate: LogLevelFilterPredicate, logfile: str | None,
                     nodaemon: bool) -> Callable[[], ILogObserver]:
    """A twistd observer factory: text lines, filtered by ``predicate``."""
    def make_observer() -> ILogObserver:
        text = textFileLogObserver(_open_output(logfile, nodaemon))
        return FilteringLogObserver(text, [predicate])
    return make_observer


_factory: Callable[[], ILogObserver] | None = None


def twistd_observer() -> ILogObserver:
    """Called by twistd, by name, to build the process's log observer."""
    if _factory is None:
        raise RuntimeError("taskd.logsetup.install_twistd_logger() was not called")
    return _factory()


def install_twistd_logger(parent: MutableMapping[str, Any] | None,
                          predicate: LogLevelFilterPredicate) -> bool:
    """Make twistd log through ``predicate``; False if the user chose a logger.

    ``parent`` is twistd's ServerOptions (None when a plugin's options are parsed
    alone, as in unit tests). An explicit ``--logger`` or ``--syslog`` wins.
    """
    global _factory
    if parent is None or parent.get("logger") is not None or parent.get("syslog"):
        return False
    _factory = observer_factory(predicate, parent.get("logfile"),
                                bool(parent.get("nodaemon")))
    parent["logger"] = TWISTD_LOGGER
    return True
