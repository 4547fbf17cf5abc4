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
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from taskd.agent.builtin.collector import Point
from taskd.agent.builtin.metricdata import finite_value
from taskd.agent.builtin.queueing import QueueingPublisher, backoff_delay
from taskd.stats import NULL_STATS, split_host_port

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


class GraphitePublisher(QueueingPublisher):
    """Publishes points to carbon; see the module docstring. Counters since start:
    ``published`` (lines written to carbon's connection), ``dropped`` (queue full),
    ``invalid`` (refused in `add`), ``lost`` (unsent at stop, or added after it). The
    queue and stop: :mod:`.queueing`; here the connection and writing lines to it."""

    name = "graphite"
    log = Logger()  # namespace: taskd.agent.builtin.graphite.GraphitePublisher
    label = "graphite publisher"
    stats_prefix = "graphite"

    def __init__(self, *, addr: str, queue_size: int = 200000, flush_interval: float = 1.0,
                 max_backoff: float = 30.0, connect_timeout: float = 10.0,
                 stop_timeout: float = 10.0, reactor: Any = None, clock: Any = None,
                 rng: random.Random | None = None, stats: Any = NULL_STATS) -> None:
        """``addr``: ``HOST:PORT`` (or ``[IPv6]:PORT``). ``flush_interval``: how often
        drops are summarized in the log. Timers run on ``clock`` (default ``reactor``)."""
        super().__init__(queue_size=queue_size, flush_interval=flush_interval,
                         stop_timeout=stop_timeout, reactor=reactor, clock=clock, rng=rng,
                         stats=stats)
        self.addr = addr
        self.host, self.port = split_host_port(addr)
        self.max_backoff = max_backoff
        self.connect_timeout = connect_timeout
        self.connections = 0  # successful connects, since start
        self._protocol: _CarbonProtocol | None = None
        self._connecting = False
        self._attempt = 0
        self._connected_at = 0.0
        self._retry: Any = None
        self._down_logged = False
        self._closed: Deferred | None = None

    @property
    def connected(self) -> bool:
        return self._protocol is not None

    # -- the queue (hooks of QueueingPublisher) -----------------------------------------------

    def _item(self, point: Point) -> bytes | None:
        try:
            return carbon_line(point)
        except Exception:  # noqa: BLE001 - e.g. a name that is not a str: this point is invalid
            return None

    def _full_because(self) -> str:
        return f"carbon at {self.addr} is down or slow"

    def _added(self) -> None:
        self._drain()

    def _started(self) -> None:
        self._connect()

    async def _flush(self) -> None:
        self._closed = Deferred()
        if self._protocol is not None:
            self._close()
        elif self._queue:
            self._reconnect_now()
        else:
            self._give_up()
        await self._closed

    def _log_stopped(self, *, lost: int, pending: int, sent: int, took: float) -> None:
        if lost:
            self.log.warn("graphite publisher stopped: {lost} metrics lost (carbon at {addr} unreachable"
                          " for {t:g} s)", lost=lost, addr=self.addr, t=self.stop_timeout)
        elif pending:
            self.log.info("graphite publisher stopped: final flush wrote {n} metrics to {addr}",
                          n=sent, addr=self.addr)

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
