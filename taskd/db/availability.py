"""Whether the database answers: the error callers get when it does not, and the one
place that notices an outage start and end.

A stalled or stopped database is an expected condition for a daemon that must keep its
agents connected, not a bug: callers get `DatabaseUnavailable` (the API turns it into a
503, session work retries it), and the operator gets one warning when the outage starts
and one when it ends — no traceback per failed statement.
"""
from __future__ import annotations

import math
from typing import Any

from twisted.logger import Logger


class DatabaseUnavailable(Exception):
    """The database did not answer within the deadline, or cannot be reached.

    Nothing of the unit of work was committed (the pool rolls back work that finishes
    after its caller was told this), so the caller may simply try again later;
    `retry_after` is a sensible wait in whole seconds."""

    def __init__(self, reason: str, retry_after: float = 5.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = max(1, math.ceil(retry_after))


class Availability:
    """The last-known state of the database, updated by every pool operation.

    Only the reactor thread calls `failed`/`succeeded` (the pool reports outcomes from
    its Deferred callbacks), so no lock is needed."""

    log = Logger()

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.available = True
        self.since: float = clock.seconds()  # when `available` last changed
        self.reason = ""
        self.outages = 0  # outages started since start-up

    def failed(self, reason: str, started: float | None = None) -> None:
        """An operation (begun at clock time `started`) found the database unavailable.
        One begun before the database last came back says nothing new (it was waiting
        through the outage that just ended): no second outage for it."""
        if not self.available or (started is not None and started < self.since):
            return
        self.available = False
        self.since = self.clock.seconds()
        self.reason = reason
        self.outages += 1
        self.log.warn("database unavailable ({reason}); API calls answer 503 and session work is retried"
                      " until it answers again", reason=reason)

    def succeeded(self) -> None:
        if self.available:
            return
        now = self.clock.seconds()
        self.log.warn("database available again after {seconds:.1f}s", seconds=now - self.since)
        self.available = True
        self.since = now
        self.reason = ""

    def state(self) -> dict[str, Any]:
        """For `GET /`: never waits on the database."""
        if self.available:
            return {"database": "available"}
        return {"database": "unavailable", "unavailableSeconds": round(self.clock.seconds() - self.since, 1)}


def is_unavailable(failure_or_exc: Any) -> bool:
    """A Failure or exception that is a database outage (for callers that retry)."""
    return isinstance(getattr(failure_or_exc, "value", failure_or_exc), DatabaseUnavailable)


RETRY_DELAY = 1.0
"""Seconds before work that met an outage is tried again (each try is itself bounded by
db-timeout, so a long outage is retried about every db-timeout + this)."""


def log_failure(log: Logger, failure: Any, fmt: str, **kwargs: Any) -> None:
    """`log.failure(fmt)`, except for an outage, which the pool already reported once:
    then a debug line without traceback."""
    if is_unavailable(failure):
        log.debug(fmt + " (database unavailable: {reason})", reason=failure.value.reason, **kwargs)
    else:
        log.failure(fmt, failure, **kwargs)
