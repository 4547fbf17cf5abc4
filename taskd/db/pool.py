"""The one database pool: every SQL statement runs here, in threads, never on the reactor.

Modelled on Buildbot's ``pool.do(fn)``: callers hand over a plain synchronous function
that receives a SQLAlchemy connection inside a transaction; it commits when the function
returns and rolls back when it raises, so writes that belong together are one
transaction. Transient failures (the server went away, a deadlock, sqlite busy) roll back
and the whole function is run again a few times, so it must only touch the database.

Every operation has a deadline (`db-timeout`, queue wait included): a stalled or
unreachable database must not hang the API or the agents' sessions, so past it the
caller gets `DatabaseUnavailable` at once. The thread still running the work is not
interrupted (it cannot be), but it is told: it stops retrying, and if the work finishes
it rolls back instead of committing, so a write its caller was told failed does not
appear later. (Only a deadline striking while COMMIT itself is on the wire leaves the
outcome unknown, as with any client of a networked database.)
"""
from __future__ import annotations

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

T = TypeVar("T")

DEFAULT_TIMEOUT = 5.0
"""Seconds an operation may take, queue wait included (`db-timeout`)."""

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


def _first_line(exc: DBAPIError) -> str:
    return (str(exc.orig).splitlines() or [type(exc.orig).__name__])[0][:200]


class _Abandoned(Exception):
    """The caller was already answered `DatabaseUnavailable`: roll back, do not retry."""


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
        answered = threading.Event()  # set: the caller has its answer; the thread must not commit
        outer: Deferred = Deferred()
        timer = None
        started = self.reactor.seconds()

        def expired() -> None:
            answered.set()
            reason = f"no answer within {self.timeout:g}s (db-timeout)"
            self.availability.failed(reason)
            outer.errback(DatabaseUnavailable(reason, self.retry_after))

        def finished(result: Any) -> None:
            if timer is not None and timer.active():
                timer.cancel()
            self.stats.timing("db.duration", (self.reactor.seconds() - started) * 1000.0)
            if isinstance(result, Failure):
                if result.check(_Abandoned):
                    return None  # rolled back; the caller was answered when the deadline passed
                if result.check(DatabaseUnavailable):
                    self.availability.failed(result.value.reason)
                elif not is_transient(result.value):  # (a deadlock retried to the end says nothing)
                    self.availability.succeeded()  # the database answered, with a refusal
            else:
                self.availability.succeeded()
            if not outer.called:
                answered.set()
                if isinstance(result, Failure):
                    outer.errback(result)
                else:
                    outer.callback(result)
            return None

        if self.timeout is not None:
            timer = self.reactor.callLater(self.timeout, expired)
        deferToThreadPool(self.reactor, self.threadpool, self._run, fn, args, kwargs, answered).addBoth(finished)
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

    def _run(self, fn: Callable[..., T], args: tuple, kwargs: dict, answered: threading.Event | None = None) -> T:
        """In a pool thread (or the caller's, for `run_sync`)."""
        attempt = 0
        while True:
            if answered is not None and answered.is_set():
                raise _Abandoned()  # waited in the queue past the deadline: do not start
            try:
                with self.engine.begin() as conn:
                    result = fn(conn, *args, **kwargs)
                    if answered is not None and answered.is_set():
                        raise _Abandoned()  # rolls back: the caller was told it failed
                    return result
            except DBAPIError as exc:
                if answered is not None and answered.is_set():
                    raise _Abandoned() from None
                if attempt >= self.retries or not is_transient(exc):
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

