"""Time as taskd stores and shows it: naive UTC in the database, RFC 3339 on the wire."""
from __future__ import annotations

from datetime import datetime, timezone

ZERO_TIME = "0001-01-01T00:00:00Z"  # how the original (Go) rendered "never"


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def rfc3339(value: datetime | None) -> str:
    if value is None:
        return ZERO_TIME
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    return value.isoformat(timespec="microseconds") + "Z"
