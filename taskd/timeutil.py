"""Time as taskd stores and shows it: naive UTC in the database, RFC 3339 on the wire,
and Go durations (the form the Go originals wrote in config files and Snap answers in).
"""
from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

ZERO_TIME = "0001-01-01T00:00:00Z"  # how the original (Go) rendered "never"


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def rfc3339(value: datetime | None) -> str:
    if value is None:
        return ZERO_TIME
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    return value.isoformat(timespec="microseconds") + "Z"


_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_NS = {"ns": 1, "us": 1e3, "µs": 1e3, "μs": 1e3, "ms": 1e6, "s": 1e9, "m": 60e9, "h": 3600e9}


def parse_go_duration(text: Any) -> int:
    """A Go duration (``"60s"``, ``"1m0s"``, ``"1h30m"``, ``"0"``) → nanoseconds.

    The one parser of Go's ``time.Duration`` text: the config files (via
    ``taskd.configtypes.parse_duration``) and Snap's answers both use it. Unsigned only:
    nothing taskd reads may be negative. Raises ValueError naming the text.
    """
    if not isinstance(text, str) or not text:
        raise ValueError(f"not a duration: {text!r}")
    if text == "0":
        return 0
    pos, total = 0, 0.0
    while pos < len(text):
        m = _GO_DURATION_PART.match(text, pos)
        if m is None:
            raise ValueError(f"not a duration: {text!r}")
        total += float(m.group(1)) * _UNIT_NS[m.group(2)]
        pos = m.end()
    return round(total)
