"""The tsdb-gw publisher: batches points and POSTs them to ``<tsdb-url>/metrics``.

Wire format: :mod:`taskd.agent.builtin.metricdata` (``rt-metric-binary[-snappy]``,
``Authorization: Bearer <key>``; docs/tsdb-gw.md §5). How it behaves, and
why it differs from the Go publishers it replaces (§7), which retried every failure
forever and so let one bad batch block everything behind it:

* Points are queued and sent in batches of at most ``batch_size``: a full batch goes at
  once, a partial one at the next ``flush_interval`` tick.
* One request is in flight at a time, so batches arrive in order; while a batch is being
  retried, later points keep queueing behind it.
* The queue is bounded (``queue_size`` points, counting the batch in flight), so a gateway
  outage costs bounded memory. Points added beyond the bound are dropped and counted
  exactly (``dropped``), and logged once per flush interval, never per point.
* Connection errors, timeouts and 5xx are retried with capped exponential backoff and full
  jitter (uniform in [0, min(max_backoff, 0.1 s * 2^n)]), so restarted gateways are not
  hit by every agent at once. A 4xx is the gateway refusing *this* batch (bad key, bad
  data): retrying cannot help, so the batch is dropped and the next batch goes. The first
  refusal with a status is logged at once; further ones with it are summed into one line
  per flush interval (a wrong key refuses every batch).
* Points either gateway generation would reject, or whose value is not a finite number
  (``metricdata.invalid_reason``), are dropped in `add` (``invalid``): the old gateway
  refuses the whole batch for one. Should encoding a batch still fail, that batch is
  dropped, counted as ``invalid`` and logged: the sender never loses one uncounted.
* `stopService` sends what is queued, giving up after ``stop_timeout`` (default
  ``timeout``) and logging how many metrics were lost.

Log lines name the URL (never the key) and how many metrics were affected.
"""
from __future__ import annotations

import random
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from taskd.agent.builtin.collector import Point
from taskd.agent.builtin.metricdata import (CONTENT_TYPE, CONTENT_TYPE_SNAPPY, encode_message,
                                            invalid_reason, snappy_frame)
from taskd.agent.builtin.queueing import MIN_BACKOFF, QueueingPublisher, backoff_delay
from taskd.agent.httpclient import quiet_http_client
from taskd.stats import NULL_STATS

__all__ = ["TsdbGwPublisher", "backoff_delay", "MIN_BACKOFF"]  # the backoff: re-exported

RETRY_LOG_INTERVAL = 60.0  # while a batch keeps failing the same way, log it this often


def loggable_url(url: str) -> str:
    """``url`` without any user:password part (it must not reach the log)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, ""))


class _Retry(Exception):
    """A failure worth retrying; the message says what happened."""


class TsdbGwPublisher(QueueingPublisher):
    """Publishes points to tsdb-gw; see the module docstring. Counters since start:
    ``published`` (accepted by the gateway), ``dropped`` (queue full), ``rejected`` (in
    batches refused with a 4xx), ``invalid`` (refused in `add`), ``lost`` (unsent at
    stop, or added after it), ``retries``. The queue and stop: :mod:`.queueing`; here the
    batching, the POST and its retries."""

    name = "tsdbgw"
    log = Logger()  # namespace: taskd.agent.builtin.tsdbgw.TsdbGwPublisher
    label = "tsdb-gw publisher"
    stats_prefix = "tsdbgw"
    timer_what = "flush timer"

    def __init__(self, *, url: str, key: str, snappy: bool = True, batch_size: int = 5000,
                 flush_interval: float = 1.0, queue_size: int = 200000, max_backoff: float = 30.0,
                 timeout: float = 10.0, stop_timeout: float | None = None, reactor: Any = None,
                 clock: Any = None, http: Any = None, rng: random.Random | None = None,
                 stats: Any = NULL_STATS) -> None:
        """``http``: a treq-compatible client (``post(url, data=, headers=)`` returning a
        Deferred response with ``.code`` and ``.content()``); default treq on ``reactor``.
        Timers (flush, backoff, timeouts) run on ``clock`` (default ``reactor``)."""
        super().__init__(queue_size=queue_size, flush_interval=flush_interval,
                         stop_timeout=timeout if stop_timeout is None else stop_timeout,
                         reactor=reactor, clock=clock, rng=rng, stats=stats)
        self.url = url.rstrip("/") + "/metrics"
        self.where = loggable_url(self.url)
        self._key = key
        self.snappy = snappy
        self.content_type = CONTENT_TYPE_SNAPPY if snappy else CONTENT_TYPE
        self.batch_size = max(1, batch_size)
        self.max_backoff = max(MIN_BACKOFF, max_backoff)
        self.timeout = timeout
        self._pool: Any = None
        if http is None:
            http, self._pool = quiet_http_client(self.reactor)
        self._http = http
        self.rejected = self.retries = 0
        self.requests = 0
        self._inflight: list[Point] = []
        self._busy = False
        self._flush_due = False
        self._giving_up = False
        self._request: Deferred | None = None
        self._wake: tuple[Deferred, Any] | None = None
        self._idle_waiters: list[Deferred] = []
        self._window_invalid = 0
        self._invalid_example = ""
        # status -> [metrics refused since the last report, last body excerpt]; a status is
        # here from its first (logged) refusal until an interval passes without another
        self._window_refused: dict[int, list] = {}

    # -- the queue (hooks of QueueingPublisher) -----------------------------------------------

    @property
    def queued(self) -> int:
        """Points held: waiting, plus the batch in flight (what ``queue_size`` bounds)."""
        return len(self._queue) + len(self._inflight)

    def _item(self, point: Point) -> Point | None:
        reason = invalid_reason(point)
        if reason is None:
            return point
        self._window_invalid += 1
        self._invalid_example = f"{point.name!r}: {reason}"
        return None

    def _full_because(self) -> str:
        return f"tsdb-gw at {self.where} is slow or down"

    def _added(self) -> None:
        if self.running and len(self._queue) >= self.batch_size:
            self._kick()

    _started = _added  # a full batch queued before the start goes at once

    def _stop_requested(self) -> None:
        self._wake_up()  # a batch waiting for its retry is tried again now

    async def _flush(self) -> None:
        if self._queue:
            self._kick()
        await self._idle()

    def _discard(self) -> None:
        self._queue.clear()
        self._inflight = []

    def _log_stopped(self, *, lost: int, pending: int, sent: int, took: float) -> None:
        if lost:
            self.log.warn("tsdb-gw publisher stopped: {lost} metrics lost (not accepted by {url} within"
                          " {t:g} s); {sent} sent at stop", lost=lost, url=self.where, t=self.stop_timeout,
                          sent=sent)
        elif pending:
            self.log.info("tsdb-gw publisher stopped: final flush sent {n} metrics to {url} in {t:.1f} s",
                          n=sent, url=self.where, t=took)

    async def _closed_down(self) -> None:
        if self._pool is not None:
            await self._pool.closeCachedConnections()

    def _give_up(self) -> None:
        self._giving_up = True
        self._wake_up()
        if self._request is not None:
            self._request.cancel()

    # -- timers and the sender ---------------------------------------------------------------

    def _ticked(self) -> None:
        if self._queue:
            self._flush_due = True
            self._kick()

    def _report_drops(self) -> None:
        """Beside the queue-full drops: invalid points and 4xx refusals, once per interval."""
        super()._report_drops()
        if self._window_invalid:
            self.log.warn("dropped {n} invalid metrics (tsdb-gw would refuse them), e.g. {example}",
                          n=self._window_invalid, example=self._invalid_example)
            self.stats.incr("tsdbgw.invalid", self._window_invalid)
            self._window_invalid = 0
        for code, (n, excerpt) in list(self._window_refused.items()):
            if not n:
                del self._window_refused[code]  # quiet for an interval: the next one is logged at once
                continue
            self.log.error("tsdb-gw at {url} refused {n} more metrics with {code} (last: {body}); dropped",
                           url=self.where, n=n, code=code, body=excerpt)
            self._window_refused[code] = [0, excerpt]

    def _kick(self) -> None:
        """Start the sender unless it runs: it is the only one sending (one request at a time)."""
        if self._busy or self._giving_up:
            return
        self._busy = True
        Deferred.fromCoroutine(self._send_all()).addErrback(
            lambda f: self.log.failure("tsdb-gw publisher: sender failed", f))

    def _idle(self) -> Deferred:
        if not self._busy:
            return succeed(None)
        d: Deferred = Deferred()
        self._idle_waiters.append(d)
        return d

    def _has_work(self) -> bool:
        if not self._queue or self._giving_up:
            return False
        return len(self._queue) >= self.batch_size or self._flush_due or self._stopping

    async def _send_all(self) -> None:
        try:
            while self._has_work():
                n = min(self.batch_size, len(self._queue))
                self._inflight = [self._queue.popleft() for _ in range(n)]
                if not self._queue:
                    self._flush_due = False
                await self._deliver(self._inflight)
                if self._giving_up:
                    return  # the batch stays counted in `queued`: the final flush counts it lost
                self._inflight = []
        finally:
            self._busy = False
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    async def _deliver(self, batch: list[Point]) -> None:
        """Send one batch until it is accepted, refused (4xx), or we give up at stop."""
        try:
            body = encode_message(batch)
            if self.snappy:
                body = snappy_frame(body)
        except Exception:  # noqa: BLE001 - a point `invalid_reason` let through: drop the batch, counted
            self.invalid += len(batch)
            self.stats.incr("tsdbgw.invalid", len(batch))
            self.log.failure("tsdb-gw publisher: encoding {n} metrics failed; batch dropped", n=len(batch))
            return
        attempt, first_failure, last_logged, last_reason = 0, None, None, ""
        while True:
            try:
                code, excerpt = await self._post(body)
            except _Retry as problem:
                if self._giving_up:
                    return
                now = self.clock.seconds()
                reason = str(problem)
                if first_failure is None:
                    first_failure = now
                if reason != last_reason or last_logged is None or now - last_logged >= RETRY_LOG_INTERVAL:
                    self.log.warn("tsdb-gw at {url}: {reason}; retrying {n} metrics ({queued} queued)",
                                  url=self.where, reason=reason, n=len(batch), queued=self.queued)
                    last_logged, last_reason = now, reason
                self.retries += 1
                self.stats.incr("tsdbgw.retries")
                await self._sleep(backoff_delay(attempt, self.max_backoff, self.rng))
                attempt += 1
                continue
            if 200 <= code < 300:
                self.published += len(batch)
                self.stats.incr("tsdbgw.published", len(batch))
                if first_failure is not None:
                    self.log.info("tsdb-gw at {url} accepted {n} metrics after {tries} retries ({t:.1f} s)",
                                  url=self.where, n=len(batch), tries=attempt,
                                  t=self.clock.seconds() - first_failure)
                return
            self.rejected += len(batch)
            self.stats.incr("tsdbgw.rejected", len(batch))
            seen = self._window_refused.get(code)
            if seen is None:
                self._window_refused[code] = [0, excerpt]
                self.log.error("tsdb-gw at {url} refused {n} metrics with {code}: {body}; batch dropped",
                               url=self.where, n=len(batch), code=code, body=excerpt)
            else:  # summed into the once-per-interval line (`_report_drops`)
                seen[0] += len(batch)
                seen[1] = excerpt
            return

    async def _post(self, body: bytes) -> tuple[int, str]:
        """One POST: (status, body excerpt) for non-5xx answers; _Retry for the rest."""
        headers = {b"Authorization": [b"Bearer " + self._key.encode("utf-8")],
                   b"Content-Type": [self.content_type.encode("ascii")]}

        async def call() -> tuple[int, bytes]:
            response = await self._http.post(self.url, data=body, headers=headers)
            return response.code, await response.content()

        # twisted.web answers a cancel with ResponseNeverReceived([CancelledError]) or
        # ConnectingCancelledError, not CancelledError, so whether the timeout fired is
        # remembered here rather than read off the exception.
        timed_out = False

        def on_timeout(result: Any, timeout: float) -> Any:
            nonlocal timed_out
            timed_out = True
            return result

        self.requests += 1
        d = Deferred.fromCoroutine(call())
        d.addTimeout(self.timeout, self.clock, onTimeoutCancel=on_timeout)
        self._request = d
        try:
            code, content = await d
        except Exception as e:  # noqa: BLE001 - any transport failure is retried
            if self._giving_up or timed_out:
                raise _Retry("gave up at stop" if self._giving_up else
                             f"no answer within {self.timeout:g} s") from None
            reasons = getattr(e, "reasons", None)
            cause = reasons[0].value if reasons else e
            raise _Retry(self._redact(f"{type(cause).__name__}: {cause}")[:300]) from None
        finally:
            self._request = None
        excerpt = self._redact(content[:300].decode("utf-8", "replace").strip()) or "empty body"
        if code >= 500:
            raise _Retry(f"answered {code}: {excerpt}")
        return code, excerpt

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "<key>") if self._key else text

    def _sleep(self, seconds: float) -> Deferred:
        """A backoff wait that `_wake_up` (stop, give up) ends early."""
        d: Deferred = Deferred()
        call = self.clock.callLater(seconds, self._wake_up)
        self._wake = (d, call)
        return d

    def _wake_up(self) -> None:
        if self._wake is None:
            return
        (d, call), self._wake = self._wake, None
        if call.active():
            call.cancel()
        d.callback(None)
