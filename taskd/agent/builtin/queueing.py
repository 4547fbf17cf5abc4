"""The bounded queue both built-in publishers (tsdb-gw, graphite) stand on.

Why one base: `add` is called from a collector's loop, so it must never block and never
raise, and a destination that is down or slow must cost bounded memory. Both publishers
therefore hold points in one bounded queue (``queue_size``), drop and count exactly what
goes beyond it (``dropped``), log those drops once per ``flush_interval`` (never once per
point), count as ``lost`` what is added after stop or is still queued when the final flush
gives up after ``stop_timeout``, and say how the final flush went. That part is written
here once; a subclass says only how a point becomes a queued item and how items reach its
destination (the hooks at the end of :class:`QueueingPublisher`).

Also here: the reconnect/retry backoff both use (capped exponential, full jitter), so that a
restarted destination is not hit by every agent at once.
"""
from __future__ import annotations

import random
from collections import deque
from typing import Any, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from taskd.agent.builtin.collector import Point
from taskd.stats import NULL_STATS
from taskd.timers import RepeatingTimer

__all__ = ["QueueingPublisher", "backoff_delay", "MIN_BACKOFF"]

MIN_BACKOFF = 0.1  # seconds: the first retry's upper bound, as task-agent-ng's backoff


def backoff_delay(attempt: int, cap: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(cap, 0.1 s * 2**attempt)] (attempt 0 is the first retry)."""
    return rng.uniform(0.0, min(cap, MIN_BACKOFF * 2.0 ** min(attempt, 60)))


class QueueingPublisher(Service):
    """A publisher service over a bounded queue; see the module docstring.

    Counters since start: ``published`` (the subclass counts what its destination took),
    ``dropped`` (queue full), ``invalid`` (points `_item` refused), ``lost`` (unsent at
    stop, or added after it). Subclasses set ``name``, ``log``, ``label`` (how log lines
    name the publisher), ``stats_prefix`` and ``timer_what``.
    """

    label = "publisher"
    stats_prefix = "publisher"
    timer_what = "timer"
    log = Logger()

    def __init__(self, *, queue_size: int, flush_interval: float, stop_timeout: float,
                 reactor: Any = None, clock: Any = None, rng: random.Random | None = None,
                 stats: Any = NULL_STATS) -> None:
        """Timers run on ``clock`` (default ``reactor``, default the global reactor)."""
        if reactor is None:
            from twisted.internet import reactor as _reactor
            reactor = _reactor
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.queue_size = max(1, queue_size)
        self.flush_interval = flush_interval
        self.stop_timeout = stop_timeout
        self.rng = rng or random.Random()
        self.stats = stats
        self.published = self.dropped = self.invalid = self.lost = 0
        self._queue: deque[Any] = deque()
        self._timer: RepeatingTimer | None = None
        self._stopping = self._late_logged = False
        self._window_dropped = 0  # drops since the last `_report_drops`

    # -- the Publisher contract ------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Points held (what ``queue_size`` bounds)."""
        return len(self._queue)

    def add(self, points: Sequence[Point]) -> None:
        """Queue ``points``; never blocks, never raises (beyond the bound they are dropped)."""
        try:
            self._add(points)
        except Exception:  # noqa: BLE001 - the collector's loop must never see our bugs
            self.log.failure("{label}: adding {n} metrics failed", label=self.label, n=len(points))

    def _add(self, points: Sequence[Point]) -> None:
        if self._stopping:
            if not self._late_logged:
                self._late_logged = True
                self.log.warn("{label} is stopped: metrics added from now on are lost"
                              " ({n} in this call)", label=self.label, n=len(points))
            self.lost += len(points)
            return
        dropped = 0
        for point in points:
            item = self._item(point)
            if item is None:
                self.invalid += 1
            elif self.queued >= self.queue_size:
                dropped += 1
            else:
                self._queue.append(item)
        if dropped:
            self.dropped += dropped
            self._window_dropped += dropped
            self.stats.incr(f"{self.stats_prefix}.dropped", dropped)
        self._added()

    # -- service ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._timer = RepeatingTimer(self.clock, self.flush_interval, self._tick,
                                     what=f"{self.label}: {self.timer_what}", log=self.log)
        self._timer.startService()
        self._started()

    def stopService(self) -> Deferred:
        """Final flush: send what is queued (at most ``stop_timeout`` s), then close."""
        super().stopService()
        if self._timer is not None:
            self._timer.stopService()
        self._stopping = True
        self._report_drops()
        self._stop_requested()
        return Deferred.fromCoroutine(self._final_flush())

    async def _final_flush(self) -> None:
        start, pending, published = self.clock.seconds(), self.queued, self.published
        give_up = self.clock.callLater(self.stop_timeout, self._give_up)
        try:
            await self._flush()
        finally:
            if give_up.active():
                give_up.cancel()
        lost = self.queued
        self._discard()
        self.lost += lost
        self._report_drops()  # whatever the final flush itself refused
        self._log_stopped(lost=lost, pending=pending, sent=self.published - published,
                          took=self.clock.seconds() - start)
        await self._closed_down()

    def _tick(self) -> None:
        self._report_drops()
        self.stats.gauge(f"{self.stats_prefix}.queued", self.queued)
        self._ticked()

    def _report_drops(self) -> None:
        """The once-per-interval log of points refused by `add` (never one line per point)."""
        if self._window_dropped:
            self.log.warn("dropped {n} metrics: queue full (bound {bound}); {why}",
                          n=self._window_dropped, bound=self.queue_size, why=self._full_because())
            self._window_dropped = 0

    # -- what a subclass says ----------------------------------------------------------------

    def _item(self, point: Point) -> Any:
        """What to queue for ``point``; None if the destination could not take it (invalid)."""
        raise NotImplementedError

    def _full_because(self) -> str:
        """The end of the queue-full log line: who is slow or down."""
        raise NotImplementedError

    async def _flush(self) -> None:
        """Send what is queued; returns when done or when `_give_up` has ended it."""
        raise NotImplementedError

    def _give_up(self) -> None:
        """``stop_timeout`` passed during the final flush: end it now."""
        raise NotImplementedError

    def _log_stopped(self, *, lost: int, pending: int, sent: int, took: float) -> None:
        """Say how the final flush went (``pending`` points were queued at stop)."""
        raise NotImplementedError

    def _added(self) -> None:
        """Points were just queued (say, to send a full batch now)."""

    def _started(self) -> None:
        """The service started (say, to connect)."""

    def _stop_requested(self) -> None:
        """The service is stopping; the final flush starts right after this."""

    def _ticked(self) -> None:
        """Once per ``flush_interval``, after the drop report."""

    def _discard(self) -> None:
        """Forget what is still held after the final flush (it is counted lost)."""
        self._queue.clear()

    async def _closed_down(self) -> None:
        """Release what the transport holds, after the final flush."""
