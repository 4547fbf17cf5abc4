"""Self-metrics: a small statsd client over UDP, and a no-op stand-in when stats are off.

The Go daemons sent their counters and gauges to statsd (``stats-enabled``,
``statsd-addr``, ``statsd-type``). txstatsd, the Twisted statsd library, is Python 2
only; the maintained clients (``statsd``, ``datadog``) would each be a new dependency
for a few lines of protocol, resolve the host with a blocking call, and only one of them
speaks datadog tags. So this is a Twisted ``DatagramProtocol`` of our own:

* one *connected* UDP socket to ``statsd-addr``; a host name is resolved once at start
  with ``reactor.resolve`` (never blocking the reactor), and again every
  ``retry_interval`` seconds while it does not resolve;
* metrics are queued as lines and sent together, several per datagram (at most
  ``max_datagram`` = 1432 bytes, which fits an Ethernet MTU), every ``flush_interval``
  seconds on an injectable clock, or at once when a datagram is full;
* statsd being down never hurts the daemon: a refused or failed send is swallowed and
  counted (``errors``; lines lost in ``dropped``), and logged at most once every
  ``warn_interval`` seconds. An ICMP "port unreachable" may close the connected socket
  (Twisted's epoll reactor does); a new one is opened ``reopen_delay`` seconds later,
  doubling up to ``retry_interval`` while statsd stays away (Twisted logs a line for
  every UDP socket opened and closed), back to ``reopen_delay`` once a socket has lived
  a minute.

Line formats (``prefix`` joined with a dot)::

    standard:  raintank_apps.host1.task_server.api.tasks_create:1|c
    datadog:   raintank_apps.task_server.dispatch.latency:3.2|ms|#host:host1,event:taskAdd

Tags are only sent in the datadog flavour; standard statsd has no tags, so there the
same metric name aggregates across them. The prefix key ``stats-prefix`` may contain
``$hostname`` (this machine's name, dots as underscores, as the Go daemons did); the
datadog flavour leaves that segment out of the name and sends ``host:<name>`` as a tag
on every line instead, as Datadog users expect.

Callers get either a :class:`StatsClient` or a :class:`NullStats` and call ``incr`` /
``gauge`` / ``timing`` unconditionally.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any, Callable, Mapping

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from taskd.timers import RepeatingTimer

__all__ = ["NullStats", "NULL_STATS", "StatsClient", "GaugeReporter", "format_line",
           "expand_prefix", "parse_stats_prefix", "make_stats", "SERVER_PREFIX", "AGENT_PREFIX"]

SERVER_PREFIX = "raintank_apps.$hostname.task_server"
AGENT_PREFIX = "raintank_apps.$hostname.task_agent"
MAX_DATAGRAM = 1432  # 1500-byte Ethernet MTU minus IPv6 and UDP headers, with room to spare

Tags = Mapping[str, Any] | None

_PREFIX_OK = re.compile(r"[A-Za-z0-9_$-]+(?:\.[A-Za-z0-9_$-]+)*")
_NAME_BAD = re.compile(r"[^A-Za-z0-9_.-]")
_TAG_BAD = re.compile(r"[|,#\s]")


def parse_stats_prefix(raw: str) -> str:
    """The ``stats-prefix`` key: dot-separated words of letters, digits, ``_ - $``."""
    text = raw.strip().strip(".")
    if text and not _PREFIX_OK.fullmatch(text):
        raise ValueError("is not a dot-separated metric prefix (letters, digits, '_', '-',"
                         " '$hostname')")
    return text


def expand_prefix(prefix: str, hostname: str | None = None) -> str:
    """``$hostname`` → this host's name with dots as underscores (so it is one word)."""
    if "$hostname" in prefix:
        host = (hostname if hostname is not None else socket.gethostname()) or "unknown"
        prefix = prefix.replace("$hostname", _NAME_BAD.sub("_", host.replace(".", "_")))
    return prefix.strip(".")


def _num(value: float | int | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.3f}".rstrip("0").rstrip(".")


def format_line(prefix: str, name: str, value: float | int, kind: str, tags: Tags = None,
                flavour: str = "standard", constant: Tags = None) -> str:
    """One statsd line: ``prefix.name:value|kind`` (+ ``|#k:v,…`` for datadog, the
    `constant` tags such as ``host`` first)."""
    full = _NAME_BAD.sub("_", f"{prefix}.{name}" if prefix else name)
    line = f"{full}:{_num(value)}|{kind}"
    if flavour == "datadog" and constant:
        tags = {**constant, **(tags or {})}
    if flavour == "datadog" and tags:
        line += "|#" + ",".join(
            f"{_TAG_BAD.sub('_', str(k)).replace(':', '_')}:{_TAG_BAD.sub('_', str(v))}"
            for k, v in tags.items())
    return line


class NullStats(Service):
    """Stats switched off: every call does nothing."""

    name = "stats"
    enabled = False
    errors = dropped = 0

    def incr(self, name: str, n: int = 1, tags: Tags = None) -> None:
        pass

    def gauge(self, name: str, value: float | int, tags: Tags = None) -> None:
        pass

    def timing(self, name: str, ms: float, tags: Tags = None) -> None:
        pass

    def flush(self) -> None:
        pass


NULL_STATS = NullStats()
"""The default for every class that takes a ``stats`` parameter."""


class StatsdProtocol(DatagramProtocol):
    noisy = False  # no "Starting protocol" line per socket

    def __init__(self, client: StatsClient) -> None:
        self.client = client

    def connectionRefused(self) -> None:
        # An ICMP "port unreachable" for an earlier datagram: nothing listens there.
        self.client._failed("connection refused (is statsd listening?)")

    def stopProtocol(self) -> None:
        # The epoll reactor closes a connected UDP socket on such an ICMP error (it sees
        # EPOLLERR without EPOLLIN) instead of calling connectionRefused: open a new one.
        self.client._lost(self)


def split_host_port(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` → (host, port)."""
    text = addr.strip()
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    return host, int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class StatsClient(Service):
    """Sends metrics to statsd at ``addr``; a child service of the daemon (start it first,
    so it stops last and sends what the others report on their way down)."""

    name = "stats"
    enabled = True
    log = Logger()

    def __init__(self, addr: str, *, flavour: str = "standard", prefix: str = "",
                 reactor: Any = None, clock: Any = None, flush_interval: float = 0.25,
                 max_datagram: int = MAX_DATAGRAM, max_queued: int = 10000,
                 retry_interval: float = 30.0, reopen_delay: float = 1.0,
                 warn_interval: float = 300.0, constant_tags: Tags = None) -> None:
        """`constant_tags`: sent on every line (datadog only), e.g. ``{"host": ...}``."""
        if flavour not in ("standard", "datadog"):
            raise ValueError(f"statsd flavour {flavour!r} is not standard or datadog")
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.addr = addr
        self.host, self.port = split_host_port(addr)
        self.flavour = flavour
        self.prefix = prefix
        self.constant_tags = dict(constant_tags or {})
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.flush_interval = flush_interval
        self.max_datagram = max_datagram
        self.max_queued = max_queued
        self.retry_interval = retry_interval
        self.reopen_delay = reopen_delay
        self._reopen_wait = reopen_delay / 2  # doubled before use: the first wait is reopen_delay
        self._opened_at = 0.0
        self.warn_interval = warn_interval
        self.errors = 0      # failed sends (refused, OS errors, unresolvable host)
        self.dropped = 0     # lines lost: queue full, or in a datagram that failed
        self.sent = 0        # datagrams handed to the OS
        self._protocol: StatsdProtocol | None = None
        self._port: Any = None
        self._resolving = False
        self._retry_at = 0.0
        self._queue: list[str] = []
        self._queued_bytes = 0
        self._timer: RepeatingTimer | None = None
        self._last_warn: float | None = None
        self._unlogged = 0

    # -- the API the daemons use ---------------------------------------------------------

    def incr(self, name: str, n: int = 1, tags: Tags = None) -> None:
        self._add(format_line(self.prefix, name, n, "c", tags, self.flavour, self.constant_tags))

    def gauge(self, name: str, value: float | int, tags: Tags = None) -> None:
        if value < 0:  # a signed gauge is a *change* in statsd: set 0 first
            self._add(format_line(self.prefix, name, 0, "g", tags, self.flavour, self.constant_tags))
        self._add(format_line(self.prefix, name, value, "g", tags, self.flavour, self.constant_tags))

    def timing(self, name: str, ms: float, tags: Tags = None) -> None:
        self._add(format_line(self.prefix, name, max(0.0, ms), "ms", tags, self.flavour, self.constant_tags))

    # -- service -------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._timer = RepeatingTimer(self.clock, self.flush_interval, self.flush,
                                     what="statsd flush timer", log=self.log)
        self._timer.startService()
        self._connect()

    def stopService(self) -> Deferred | None:
        super().stopService()
        if self._timer is not None:
            self._timer.stopService()
        self.flush()
        port, self._port, self._protocol = self._port, None, None
        if port is not None:
            return maybeDeferred(port.stopListening)
        return None

    # -- plumbing ------------------------------------------------------------------------

    def _connect(self) -> None:
        self._retry_at = self.clock.seconds() + self.retry_interval
        if _is_ip(self.host):
            self._open(self.host)
            return
        self._resolving = True
        d = self.reactor.resolve(self.host)
        d.addCallbacks(self._resolved, self._unresolved)

    def _resolved(self, ip: str) -> None:
        self._resolving = False
        if self.running and self._port is None:
            self._open(ip)
            self.flush()

    def _unresolved(self, failure: Any) -> None:
        self._resolving = False
        self._failed(f"cannot resolve {self.host}: {failure.getErrorMessage()}")

    def _open(self, ip: str) -> None:
        protocol = StatsdProtocol(self)
        self._opened_at = self.clock.seconds()
        try:
            port = self.reactor.listenUDP(0, protocol, interface="::" if ":" in ip else "")
            port.connect(ip, self.port)
        except Exception as exc:
            self._failed(f"cannot open a UDP socket to {ip}:{self.port}: {exc}")
            return
        self._port, self._protocol = port, protocol

    def _lost(self, protocol: StatsdProtocol) -> None:
        """A socket we did not close went away: count it, and reopen it after a delay
        (reopen_delay, doubling up to retry_interval while sockets keep dying young)."""
        if protocol is not self._protocol:
            return
        self._port = self._protocol = None
        now = self.clock.seconds()
        if now - self._opened_at >= 60.0:
            self._reopen_wait = self.reopen_delay
        else:
            self._reopen_wait = min(self._reopen_wait * 2, max(self.retry_interval, self.reopen_delay))
        self._retry_at = now + self._reopen_wait
        self._failed("the UDP socket was closed by an error (is statsd listening?); reopening it")

    def _add(self, line: str) -> None:
        size = len(line.encode("utf-8")) + 1
        if len(self._queue) >= self.max_queued:
            self.dropped += 1
            return
        if self._queued_bytes + size > self.max_datagram and self._port is not None:
            self.flush()
        self._queue.append(line)
        self._queued_bytes += size

    def flush(self) -> None:
        """Send everything queued, packed into as few datagrams as fit."""
        if self._port is None:
            if self.running and not self._resolving and self.clock.seconds() >= self._retry_at:
                self._connect()
            return
        lines, self._queue, self._queued_bytes = self._queue, [], 0
        batch: list[str] = []
        size = 0
        for line in lines:
            n = len(line.encode("utf-8")) + 1
            if batch and size + n > self.max_datagram:
                self._send(batch)
                batch, size = [], 0
            batch.append(line)
            size += n
        if batch:
            self._send(batch)

    def _send(self, lines: list[str]) -> None:
        try:
            self._port.write("\n".join(lines).encode("utf-8"))
        except Exception as exc:  # EMSGSIZE, ENOBUFS, network down...: never the caller's problem
            self.dropped += len(lines)
            self._failed(f"{type(exc).__name__}: {exc}")
        else:
            self.sent += 1

    def _failed(self, reason: str) -> None:
        self.errors += 1
        now = self.clock.seconds()
        if self._last_warn is not None and now - self._last_warn < self.warn_interval:
            self._unlogged += 1
            return
        self.log.warn("statsd at {addr}: {reason}; metrics are lost until it answers{more}",
                      addr=self.addr, reason=reason, unlogged=self._unlogged,
                      more=f" ({self._unlogged} more errors since the last warning)" if self._unlogged else "")
        self._last_warn = now
        self._unlogged = 0


class GaugeReporter(Service):
    """Every ``interval`` seconds (and at start), sends the gauges ``collect`` returns —
    a dict ``{name: value}`` or a Deferred of one (e.g. from the database pool). Sends
    ``running 1`` each time and ``running 0`` when stopped."""

    name = "stats-gauges"
    log = Logger()

    def __init__(self, stats: Any, clock: Any, collect: Callable[[], Any],
                 interval: float = 10.0) -> None:
        self.stats = stats
        self.clock = clock
        self.collect = collect
        self.interval = interval
        self._timer: RepeatingTimer | None = None

    def startService(self) -> None:
        super().startService()
        self._timer = RepeatingTimer(self.clock, self.interval, self.report,
                                     what="stats gauge timer", now=True, log=self.log)
        self._timer.startService()

    def stopService(self) -> None:
        super().stopService()
        if self._timer is not None:
            self._timer.stopService()
        self.stats.gauge("running", 0)
        self.stats.flush()

    def report(self) -> Deferred:
        self.stats.gauge("running", 1)
        d = maybeDeferred(self.collect)

        def send(values: Mapping[str, float] | None) -> None:
            for name, value in (values or {}).items():
                if value is not None:
                    self.stats.gauge(name, value)

        def failed(f: Any) -> None:
            if self.running:  # at shutdown the pool may already be gone
                self.log.warn("collecting gauges failed: {err}", err=f.getErrorMessage())

        return d.addCallback(send).addErrback(failed)


def make_stats(settings: Any, default_prefix: str, reactor: Any = None) -> StatsClient | NullStats:
    """The stats client ``settings`` ask for (a NullStats when stats-enabled is false)."""
    if not getattr(settings, "stats_enabled", False):
        return NullStats()
    prefix = getattr(settings, "stats_prefix", default_prefix)
    if settings.statsd_type == "datadog":
        # Datadog's convention: plain names, the host (and every dimension) as tags.
        return StatsClient(settings.statsd_addr, flavour="datadog", prefix=datadog_prefix(prefix),
                           constant_tags={"host": socket.gethostname() or "unknown"}, reactor=reactor)
    return StatsClient(settings.statsd_addr, flavour=settings.statsd_type,
                       prefix=expand_prefix(prefix), reactor=reactor)


def datadog_prefix(prefix: str) -> str:
    """The prefix without its ``$hostname`` segment (sent as the ``host`` tag instead):
    ``raintank_apps.$hostname.task_server`` -> ``raintank_apps.task_server``."""
    kept = [part for part in prefix.split(".") if part != "$hostname"]
    return expand_prefix(".".join(kept))
