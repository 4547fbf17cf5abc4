"""The one database pool: every SQL statement runs here, in threads, never on the reactor.

Modelled on Buildbot's ``pool.do(fn)``: callers hand over a plain synchronous function
that receives a SQLAlchemy connection inside a transaction; it commits when the function
returns and rolls back when it raises, so writes that belong together are one
transaction. Transient failures (the server went away, a deadlock, sqlite busy) roll back
and the whole function is run again a few times, so it must only touch the database
(but not a lost connection while an outage is already known: that fails at once).

Every operation has a deadline (`db-timeout`, queue wait included): a stalled or
unreachable database must not hang the API or the agents' sessions, so past it the
caller gets `DatabaseUnavailable` at once. The thread still running the work is not
interrupted (it cannot be), but it is told: it stops retrying, and if the work finishes
it rolls back instead of committing, so a write its caller was told failed does not
appear later. Work whose COMMIT is already on the wire when the deadline strikes is
given `COMMIT_GRACE` more seconds to report how it ended (right after a stall, many
deadlines fall in the moment everything commits at once); only a COMMIT that takes
longer still leaves the outcome unknown, as with any client of a networked database.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from taskd.stats import NULL_STATS
from taskd.db.availability import Availability, DatabaseUnavailable
from taskd.db.engine import COMMITTED

T = TypeVar("T")

DEFAULT_TIMEOUT = 5.0
"""Seconds an operation may take, queue wait included (`db-timeout`)."""

COMMIT_GRACE = 0.5
"""Seconds past its deadline an operation whose COMMIT is on the wire may take to tell
whether it committed, before its caller is answered `DatabaseUnavailable` anyway."""

# MySQL client codes meaning the server cannot be reached or dropped the connection:
# can't connect, gone away, lost connection (also a read/write timeout), connection
# killed, disconnected for inactivity.
_CONNECTION_MYSQL = {2003, 2006, 2013, 1927, 4031}
# ... and, worth a retry as well: deadlock, lock wait timeout.
_TRANSIENT_MYSQL = _CONNECTION_MYSQL | {1213, 1205}


def _mysql_code(exc: DBAPIError) -> int | None:
    args = getattr(exc.orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def is_transient(exc: BaseException) -> bool:
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    if _mysql_code(exc) in _TRANSIENT_MYSQL:
        return True
    return "database is locked" in str(exc.orig)


def is_connection_error(exc: BaseException) -> bool:
    """The database cannot be reached (as opposed to refusing or deadlocking a statement)."""
    return isinstance(exc, DBAPIError) and (exc.connection_invalidated or _mysql_code(exc) in _CONNECTION_MYSQL)


def _lost_connection(exc: BaseException | None) -> bool:
    """A driver error (raw or wrapped) or socket error saying the connection is gone."""
    orig = getattr(exc, "orig", exc)
    args = getattr(orig, "args", ())
    return isinstance(orig, OSError) or bool(args and isinstance(args[0], int) and args[0] in _CONNECTION_MYSQL)


class _QuietResetFailures(logging.Filter):
    """SQLAlchemy logs, at error level and with a traceback, a connection it could not
    reset (roll back) when it went back to the pool. When the reason is that the
    database dropped the connection, that is the outage the pool reports once
    (taskd.db.availability), not an error: the record is dropped (one debug line
    instead) and the connection is discarded as usual."""

    log = Logger()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Exception during reset") and record.exc_info \
                and _lost_connection(record.exc_info[1]):
            self.log.debug("database: a connection dropped by the database could not be reset; discarded ({error})",
                           error=str(record.exc_info[1])[:200])
            return False
        return True


def _quiet_reset_failures(engine: Engine) -> None:
    pool_logger = logging.getLogger(f"{type(engine.pool).__module__}.{type(engine.pool).__name__}")
    if not any(isinstance(f, _QuietResetFailures) for f in pool_logger.filters):
        pool_logger.addFilter(_QuietResetFailures())


def _first_line(exc: DBAPIError) -> str:
    return (str(exc.orig).splitlines() or [type(exc.orig).__name__])[0][:200]


class _Abandoned(Exception):
    """The caller was already answered `DatabaseUnavailable`: roll back, do not retry."""


class _Deadline:
    """Decides, once and under a lock, who answers the caller of one `do`: the deadline
    (in the reactor) or the work (in its thread). Work that has begun to COMMIT before
    the deadline struck answers itself, so that a write is never both committed and
    reported failed just because the two crossed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.expired = False
        self._committing = False

    def expire(self) -> bool:
        """The deadline struck: True when the caller is to be answered now, False when
        the work is committing (and will answer, or the grace timer will)."""
        with self._lock:
            self.expired = True
            return not self._committing

    def begin_commit(self) -> bool:
        """The work is done and about to commit: False if the deadline struck first."""
        with self._lock:
            if self.expired:
                return False
            self._committing = True
            return True

    def commit_failed(self) -> bool:
        """The COMMIT raised: True if the deadline has struck meanwhile (give up)."""
        with self._lock:
            self._committing = False
            return self.expired


class DBPool:
    """A thread pool bound to one engine; ``do`` returns a Deferred of fn's result."""

    log = Logger()

    def __init__(
        self,
        engine: Engine,
        reactor: Any = None,
        *,
        max_threads: int | None = None,
        retries: int = 3,
        retry_delay: float = 0.2,
        timeout: float | None = DEFAULT_TIMEOUT,
        threadpool: Any = None,
    ) -> None:
        """`timeout`: the deadline of each `do` in seconds (None: none); `threadpool`:
        for unit tests that run the work themselves."""
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.engine = engine
        self.reactor = reactor
        if engine.dialect.name == "mysql":
            _quiet_reset_failures(engine)
        if max_threads is None:
            # sqlite has one writer; one thread avoids lock upgrades failing as "busy".
            max_threads = 1 if engine.dialect.name == "sqlite" else engine.pool.size()
        self.threadpool = threadpool or ThreadPool(minthreads=1, maxthreads=max_threads, name="taskd-db")
        self.retries = retries
        self.retry_delay = retry_delay
        self.timeout = timeout
        self.availability = Availability(reactor)
        self.stats: Any = NULL_STATS  # set by the daemon: each `do`'s latency as db.duration
        self._running = False
        self._probe: Deferred | None = None

    def start(self) -> None:
        if not self._running:
            self.threadpool.start()
            self._running = True

    def stop(self) -> None:
        """Waits for running statements to finish; called at shutdown."""
        if self._running:
            self._running = False
            self.threadpool.stop()
            self.engine.dispose()

    def do(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
        """fn's result, or `DatabaseUnavailable` once `timeout` has passed or when the
        database cannot be reached even after the retries."""
        return self.do_within(self.timeout, fn, *args, **kwargs)

    def do_within(self, timeout: float | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
        """`do` with a deadline of its own (what is left of the caller's, for work that
        has already waited elsewhere; at most 0: answered `DatabaseUnavailable` at once,
        and the work is never run)."""
        deadline = _Deadline()
        outer: Deferred = Deferred()
        timers: list[Any] = []
        started = self.reactor.seconds()

        def unavailable() -> None:
            if not outer.called:
                reason = f"no answer within {self.timeout or timeout or 0:g}s (db-timeout)"
                self.availability.failed(reason, started)
                outer.errback(DatabaseUnavailable(reason, self.retry_after))

        def expired() -> None:
            if deadline.expire():
                unavailable()
            else:  # its COMMIT is on the wire: a moment more to learn how it ended
                timers.append(self.reactor.callLater(COMMIT_GRACE, unavailable))

        def finished(result: Any) -> None:
            for timer in timers:
                if timer.active():
                    timer.cancel()
            self.stats.timing("db.duration", (self.reactor.seconds() - started) * 1000.0)
            if isinstance(result, Failure):
                if result.check(_Abandoned):
                    unavailable()  # rolled back; the caller was told (or is told now)
                    return None
                if result.check(DatabaseUnavailable):
                    self.availability.failed(result.value.reason, started)
                elif not is_transient(result.value):  # (a deadlock retried to the end says nothing)
                    self.availability.succeeded()  # the database answered, with a refusal
            else:
                self.availability.succeeded()
            if not outer.called:
                if isinstance(result, Failure):
                    outer.errback(result)
                else:
                    outer.callback(result)
            return None

        if timeout is not None:
            timers.append(self.reactor.callLater(max(0.0, timeout), expired))
        deferToThreadPool(self.reactor, self.threadpool, self._run, fn, args, kwargs, deadline).addBoth(finished)
        return outer

    @property
    def retry_after(self) -> float:
        """What to tell an API client to wait before trying again."""
        return self.timeout or DEFAULT_TIMEOUT

    def probe(self) -> Deferred:
        """Check the database in the background (one probe at a time; its outcome only
        updates `availability`), so that the last-known state `GET /` reports follows
        an outage, and its end, that no other work notices."""
        if self._probe is None and self._running:
            probe = self.do(lambda conn: conn.exec_driver_sql("SELECT 1").scalar())
            if not probe.called:
                self._probe = probe

            def done(_: Any) -> None:
                self._probe = None

            probe.addBoth(done)
            return probe
        return self._probe if self._probe is not None else succeed(None)

    def _run(self, fn: Callable[..., T], args: tuple, kwargs: dict, deadline: _Deadline | None = None) -> T:
        """In a pool thread (or the caller's, for `run_sync`)."""
        attempt = 0
        while True:
            if deadline is not None and deadline.expired:
                raise _Abandoned()  # waited in the queue past the deadline: do not start
            committing = False
            try:
                with self.engine.connect() as conn:
                    with conn.begin():
                        result = fn(conn, *args, **kwargs)
                        if deadline is not None and not deadline.begin_commit():
                            raise _Abandoned()  # rolls back: the caller was told it failed
                        committing = True
                    # Committed: the connection goes back to the pool without the
                    # ROLLBACK that would reset it (taskd.db.engine, MySQL).
                    conn.info[COMMITTED] = True
                return result
            except DBAPIError as exc:
                if deadline is not None and ((deadline.commit_failed() if committing else False) or deadline.expired):
                    raise _Abandoned() from None
                # While an outage is known, an unreachable database is answered at once:
                # retrying would only hold a thread (and the work queued behind it).
                known_outage = is_connection_error(exc) and not self.availability.available
                if attempt >= self.retries or not is_transient(exc) or known_outage:
                    if is_connection_error(exc):
                        raise DatabaseUnavailable(_first_line(exc), self.retry_after) from None
                    raise
                attempt += 1
                # A lost connection is retried quietly: if the database is down, the
                # caller's outage warning says so once (Availability), not every retry.
                log = self.log.debug if is_connection_error(exc) else self.log.warn
                log(
                    "database: transient error ({error}), retrying ({attempt}/{retries})",
                    error=_first_line(exc),
                    attempt=attempt,
                    retries=self.retries,
                )
                time.sleep(self.retry_delay * attempt)  # in a pool thread, never the reactor

    def run_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run in the calling thread: for start-up before the reactor runs, and CLIs."""
        return self._run(fn, args, kwargs)

