"""The one database pool: every SQL statement runs here, in threads, never on the reactor.

Modelled on Buildbot's ``pool.do(fn)``: callers hand over a plain synchronous function
that receives a SQLAlchemy connection inside a transaction; it commits when the function
returns and rolls back when it raises, so writes that belong together are one
transaction. Transient failures (the server went away, a deadlock, sqlite busy) roll back
and the whole function is run again a few times, so it must only touch the database.
"""
from __future__ import annotations

import time
from typing import Any, Callable, TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")

# MySQL client/server codes worth a retry: gone away, lost connection, can't connect,
# connection killed, deadlock, lock wait timeout.
_TRANSIENT_MYSQL = {2003, 2006, 2013, 1927, 4031, 1213, 1205}


def is_transient(exc: BaseException) -> bool:
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    args = getattr(exc.orig, "args", ())
    if args and isinstance(args[0], int) and args[0] in _TRANSIENT_MYSQL:
        return True
    return "database is locked" in str(exc.orig)


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
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.engine = engine
        self.reactor = reactor
        if max_threads is None:
            # sqlite has one writer; one thread avoids lock upgrades failing as "busy".
            max_threads = 1 if engine.dialect.name == "sqlite" else engine.pool.size()
        self.threadpool = ThreadPool(minthreads=1, maxthreads=max_threads, name="taskd-db")
        self.retries = retries
        self.retry_delay = retry_delay
        self._running = False

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
        return deferToThreadPool(self.reactor, self.threadpool, self._run, fn, args, kwargs)

    def _run(self, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
        attempt = 0
        while True:
            try:
                with self.engine.begin() as conn:
                    return fn(conn, *args, **kwargs)
            except DBAPIError as exc:
                if attempt >= self.retries or not is_transient(exc):
                    raise
                attempt += 1
                self.log.warn(
                    "database: transient error ({error}), retrying ({attempt}/{retries})",
                    error=str(exc.orig).splitlines()[0][:200],
                    attempt=attempt,
                    retries=self.retries,
                )
                time.sleep(self.retry_delay * attempt)  # in a pool thread, never the reactor

    def run_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run in the calling thread: for start-up before the reactor runs, and CLIs."""
        return self._run(fn, args, kwargs)

