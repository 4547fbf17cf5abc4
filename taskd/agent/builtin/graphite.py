"""The graphite publisher: carbon's plaintext protocol over TCP to ``graphite-addr``.

Each point is one line, ``<name>[;k=v;k2=v2] <value> <unix seconds>\\n`` (tags are
already ``key=value``; graphite's tagged-series syntax appends them with ``;``, sorted so
one series always gets the same name). The protocol has no acknowledgement, so delivery
is at most once: what was written to a connection that then breaks may be lost.

How it behaves, and why:

* One connection, kept open; after it fails or drops, it is reopened with capped
  exponential backoff and full jitter (as the tsdb-gw publisher retries), so a restarted
  carbon is not hit by every agent at once.
* While disconnected, or while the kernel/transport buffer is full (the transport pauses
  us as a push producer), lines are queued in a bounded queue of ``queue_size`` points;
  beyond it new points are dropped, counted exactly (``dropped``) and logged once per
  ``flush_interval``, never per point. Memory stays bounded when carbon is down or slow.
* Points carbon cannot store (empty name, a value that is not a finite real number) are
  dropped in `add` and counted (``invalid``), never raised over: an exception there would
  lose the rest of the call uncounted. Whitespace in names and tags is replaced by ``_``
  (it would split the line).
* `stopService` writes what is queued and closes the connection (Twisted sends the
  buffer before closing); if carbon is unreachable it keeps trying for ``stop_timeout``
  seconds, then logs how many metrics were lost.
"""
from __future__ import annotations

import random
import re
from collections import deque
from typing import Any, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from taskd.agent.builtin.collector import Point
from taskd.agent.builtin.metricdata import finite_value
from taskd.agent.builtin.tsdbgw import backoff_delay
from taskd.stats import NULL_STATS, split_host_port
from taskd.timers import RepeatingTimer

__all__ = ["GraphitePublisher", "carbon_line"]

WRITE_CHUNK = 1000  # lines per transport.write while draining the queue
STABLE_AFTER = 10.0  # seconds a connection must live before the backoff starts over
_SPACE = re.compile(r"\s")


def carbon_line(point: Point) -> bytes | None:
    """The plaintext line for ``point`` (None if carbon could not store it)."""
    value = finite_value(point.value)
    if not point.name or value is None:
        return None
    name = _SPACE.sub("_", point.name)
    if point.tags:
        name += "".join(";" + _SPACE.sub("_", t) for t in sorted(point.tags))
    return f"{name} {value!r} {int(point.time)}\n".encode("utf-8")


@implementer(IPushProducer)
class _CarbonProtocol(Protocol):
    """One connection to carbon; a push producer so the transport can pause our writes."""

    def __init__(self, publisher: GraphitePublisher) -> None:
        self.publisher = publisher
        self.paused = False

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.publisher._connected(self)

    def dataReceived(self, data: bytes) -> None:
        pass  # carbon never answers on the line receiver

    def connectionLost(self, reason: Any = None) -> None:
        self.publisher._lost(self, reason)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.publisher._drain()

    def stopProducing(self) -> None:
        self.paused = True


class _Factory(ClientFactory):
    noisy = False

    def __init__(self, publisher: GraphitePublisher) -> None:
        self.publisher = publisher

    def buildProtocol(self, addr: Any) -> _CarbonProtocol:
        return _CarbonProtocol(self.publisher)

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.publisher._lost(None, reason)


class GraphitePublisher(Service):
    """Publishes points to carbon; see the module docstring. Counters since start:
    ``published`` (lines written to carbon's connection), ``dropped`` (queue full),
    ``invalid`` (refused in `add`), ``lost`` (unsent at stop, or added after it)."""

    name = "graphite"
    log = Logger()  # namespace: taskd.agent.builtin.graphite.GraphitePublisher

    def __init__(self, *, addr: str, queue_size: int = 200000, flush_interval: float = 1.0,
                 max_backoff: float = 30.0, connect_timeout: float = 10.0,
                 stop_timeout: float = 10.0, reactor: Any = None, clock: Any = None,
                 rng: random.Random | None = None, stats: Any = NULL_STATS) -> None:
        """``addr``: ``HOST:PORT`` (or ``[IPv6]:PORT``). ``flush_interval``: how often
        drops are summarized in the log. Timers run on ``clock`` (default ``reactor``)."""
        if reactor is None:
            from twisted.internet import reactor as _reactor
            reactor = _reactor
        self.addr = addr
        self.host, self.port = split_host_port(addr)
        self.queue_size = max(1, queue_size)
        self.flush_interval = flush_interval
        self.max_backoff = max_backoff
        self.connect_timeout = connect_timeout
        self.stop_timeout = stop_timeout
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.rng = rng or random.Random()
        self.stats = stats
        self.published = self.dropped = self.invalid = self.lost = 0
        self.connections = 0  # successful connects, since start
        self._queue: deque[bytes] = deque()
        self._protocol: _CarbonProtocol | None = None
        self._connecting = False
        self._attempt = 0
        self._connected_at = 0.0
        self._retry: Any = None
        self._timer: RepeatingTimer | None = None
        self._stopping = self._late_logged = False
        self._down_logged = False
        self._closed: Deferred | None = None
        self._window_dropped = 0

    # -- the Publisher contract ------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def connected(self) -> bool:
        return self._protocol is not None

    def add(self, points: Sequence[Point]) -> None:
        """Write or queue ``points``; never blocks, never raises."""
        try:
            self._add(points)
        except Exception:  # noqa: BLE001 - the collector's loop must never see our bugs
            self.log.failure("graphite publisher: adding {n} metrics failed", n=len(points))

    def _add(self, points: Sequence[Point]) -> None:
        if self._stopping:
            if not self._late_logged:
                self._late_logged = True
                self.log.warn("graphite publisher is stopped: metrics added from now on are lost"
                              " ({n} in this call)", n=len(points))
            self.lost += len(points)
            return
        dropped = 0
        for point in points:
            try:
                line = carbon_line(point)
            except Exception:  # noqa: BLE001 - e.g. a name that is not a str: this point is invalid
                line = None
            if line is None:
                self.invalid += 1
            elif len(self._queue) >= self.queue_size:
                dropped += 1
            else:
                self._queue.append(line)
        if dropped:
            self.dropped += dropped
            self._window_dropped += dropped
            self.stats.incr("graphite.dropped", dropped)
        self._drain()

    # -- service ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._timer = RepeatingTimer(self.clock, self.flush_interval, self._tick,
                                     what="graphite publisher: timer", log=self.log)
        self._timer.startService()
        self._connect()

    def stopService(self) -> Deferred:
        """Final flush: write what is queued and close (at most ``stop_timeout`` s)."""
        super().stopService()
        self._stopping = True
        if self._timer is not None:
            self._timer.stopService()
        self._report_drops()
        return Deferred.fromCoroutine(self._final_flush())

    async def _final_flush(self) -> None:
        pending, published = len(self._queue), self.published
        self._closed = Deferred()
        give_up = self.clock.callLater(self.stop_timeout, self._give_up)
        if self._protocol is not None:
            self._close()
        elif self._queue:
            self._reconnect_now()
        else:
            self._give_up()
        await self._closed
        if give_up.active():
            give_up.cancel()
        lost = len(self._queue)
        self._queue.clear()
        self.lost += lost
        if lost:
            self.log.warn("graphite publisher stopped: {lost} metrics lost (carbon at {addr} unreachable"
                          " for {t:g} s)", lost=lost, addr=self.addr, t=self.stop_timeout)
        elif pending:
            self.log.info("graphite publisher stopped: final flush wrote {n} metrics to {addr}",
                          n=self.published - published, addr=self.addr)

    def _close(self) -> None:
        """Write everything (ignoring the producer pause: it is bounded) and close."""
        protocol = self._protocol
        if protocol is None:
            return
        self._write(protocol, len(self._queue))
        protocol.transport.unregisterProducer()
        protocol.transport.loseConnection()

    def _give_up(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._protocol is not None:
            self._protocol.transport.abortConnection()
        elif self._closed is not None and not self._closed.called:
            self._closed.callback(None)

    # -- connection --------------------------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        if self._connecting or self._protocol is not None:
            return
        self._connecting = True
        self.reactor.connectTCP(self.host, self.port, _Factory(self), timeout=self.connect_timeout)

    def _reconnect_now(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._connect()

    def _connected(self, protocol: _CarbonProtocol) -> None:
        self._connecting = False
        self._protocol = protocol
        self._connected_at = self.clock.seconds()
        self.connections += 1
        self.stats.gauge("graphite.connected", 1)
        self.log.info("connected to carbon at {addr}; {n} queued metrics to send", addr=self.addr,
                      n=len(self._queue))
        self._down_logged = False
        if self._stopping:
            self._close()
        else:
            self._drain()

    def _lost(self, protocol: _CarbonProtocol | None, reason: Any) -> None:
        """A connect failed (``protocol`` None) or an open connection closed."""
        self._connecting = False
        if protocol is not None:
            if protocol is not self._protocol:
                return
            self._protocol = None
            self.stats.gauge("graphite.connected", 0)
            if self.clock.seconds() - self._connected_at >= STABLE_AFTER:
                self._attempt = 0  # not a carbon that accepts and closes at once: start over
        if self._stopping:
            closed = self._closed
            if closed is None or closed.called:
                return  # gave up already
            if protocol is not None and not self._queue:
                closed.callback(None)  # the final flush was written and the connection closed
                return
            # else keep trying to connect until stop_timeout (`_give_up`)
        why = reason.getErrorMessage() if reason is not None else "closed"
        delay = backoff_delay(self._attempt, self.max_backoff, self.rng)
        self._attempt += 1
        if not self._down_logged:
            self._down_logged = True
            self.log.warn("carbon at {addr}: {what} ({why}); reconnecting with backoff, {n} metrics queued"
                          " (bound {bound})", addr=self.addr, why=why, n=len(self._queue), bound=self.queue_size,
                          what="connection lost" if protocol is not None else "cannot connect")
        if self.running or self._stopping:
            self._retry = self.clock.callLater(delay, self._connect)

    def _drain(self) -> None:
        protocol = self._protocol
        while protocol is not None and not protocol.paused and self._queue:
            self._write(protocol, WRITE_CHUNK)

    def _write(self, protocol: _CarbonProtocol, count: int) -> None:
        lines = [self._queue.popleft() for _ in range(min(count, len(self._queue)))]
        if lines:
            protocol.transport.write(b"".join(lines))
            self.published += len(lines)
            self.stats.incr("graphite.published", len(lines))

    # -- timers ------------------------------------------------------------------------------

    def _tick(self) -> None:
        self._report_drops()
        self.stats.gauge("graphite.queued", len(self._queue))

    def _report_drops(self) -> None:
        """The once-per-interval log of points refused by `add` (never one line per point)."""
        if self._window_dropped:
            self.log.warn("dropped {n} metrics: queue full (bound {bound}); carbon at {addr} is down or slow",
                          n=self._window_dropped, bound=self.queue_size, addr=self.addr)
            self._window_dropped = 0
