"""Classic text log lines (``log-format = text``), the same text as Twisted's
``textFileLogObserver`` writes, for less CPU.

A server logs a line or two per API write and per task pushed to an agent, so under
load the formatting of log lines was a fifth of its reactor thread (profile of
POST /api/v1/tasks at ~750 req/s, bench/analysis.md). Twisted's formatter computes the
local time zone's offset for every event and formats every message through
``string.Formatter`` with its call-syntax mapping. Here:

- the timestamp prefix is formatted once per second of log time (a zone's offset only
  changes on a second boundary, so it is the same text);
- a message whose format has no call syntax (``{x()}``) is formatted with
  ``str.format_map``, which resolves fields, attributes, indexes, conversions and
  specs exactly as ``string.Formatter`` does.

Anything else — a failure (its traceback), a legacy event (``log_system``, flattened),
a bytes format, call syntax, a format that raises — goes through Twisted's own
formatter unchanged, so the rare cases keep Twisted's behaviour to the byte.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from twisted.logger import FileLogObserver, formatEventAsClassicLogText, formatTime, timeFormatRFC3339

_TWISTED_ONLY = ("log_failure", "log_flattened", "log_system")


class ClassicText:
    """A ``FileLogObserver`` formatter: one event to one classic line (or None)."""

    def __init__(self, time_format: str = timeFormatRFC3339) -> None:
        self.time_format = time_format
        self._second: int | None = None
        self._stamp = "-"

    def time(self, when: float | None) -> str:
        if when is None:
            return formatTime(when, self.time_format)
        # The second datetime.fromtimestamp will show (it rounds to microseconds).
        second = math.floor(when + 5e-7)
        if second != self._second:
            self._stamp, self._second = formatTime(when, self.time_format), second
        return self._stamp

    def __call__(self, event: dict[str, Any]) -> str | None:
        fmt = event.get("log_format")
        if not isinstance(fmt, str) or "()" in fmt or any(key in event for key in _TWISTED_ONLY):
            return self._twisted(event)
        try:
            text = fmt.format_map(event)
        except Exception:
            return self._twisted(event)  # its "Unable to format event" text
        if not text:
            return None
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
        return f"{self.time(event.get('log_time'))} [{system}] {text}".replace("\n", "\n\t") + "\n"

    def _twisted(self, event: dict[str, Any]) -> str | None:
        return formatEventAsClassicLogText(event, formatTime=self.time)


def text_file_observer(out: Any, time_format: str = timeFormatRFC3339) -> FileLogObserver:
    """What ``twisted.logger.textFileLogObserver(out)`` builds, with :class:`ClassicText`."""
    formatter: Callable[[dict[str, Any]], str | None] = ClassicText(time_format)
    return FileLogObserver(out, formatter)
