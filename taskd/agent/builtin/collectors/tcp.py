"""The ``tcp`` collector: can a TCP (or TLS) connection to host:port be made, how fast,
and does the service answer as expected.

A connect that fails (refused, unreachable, timeout) is the run's error, so the task's
status shows why; a connect that succeeds yields ``connect_time`` and ``success`` = 1.
With `tls` the handshake must complete too (and ``tls_expiry_days`` is measured). With
`query` and/or `expect` (blackbox_exporter's query/expect dialogue, one step): `query` is
sent once connected, and the service's answer must match the `expect` regex before the
timeout (read up to 64 KB) — an SMTP or Redis banner, say; a mismatch fails the run,
naming the regex and what was seen, with ``success`` 0 published. Then the connection
is closed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS
from zope.interface import implementer

from taskd.agent.builtin.collector import CollectError, Collector, Sample, TaskInfo
from taskd.agent.builtin.collectors.common import (Field, catalog, days_until, host_name, parse_fields, run, series,
                                                   server_name)
from taskd.agent.builtin.netpolicy import CheckedEndpoint

METRICS = ("connect_time", "success", "tls_expiry_days")
READ_CAP = 64 * 1024
ANSWER_SHARE = 0.9  # of the timeout, spent waiting for `expect` to match


def _port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError("must be 1-65535")
    return value


def _expect(value: str) -> re.Pattern | None:
    if not value:
        return None
    try:
        return re.compile(value)
    except re.error as exc:
        raise ValueError(f"is not a valid regular expression: {exc}") from None


FIELDS = (
    Field("host", "string", required=True, check=host_name),
    Field("port", "integer", required=True, check=_port),
    Field("tls", "bool", default=False),
    Field("insecure", "bool", default=False),
    Field("server_name", "string", default="", check=server_name),
    Field("query", "string", default=""),
    Field("expect", "string", default=None, check=_expect),
)


@implementer(IHandshakeListener)
class _Dialogue(Protocol):
    """Sends `query`, collects what comes back until `expect` matches (or the cap, or the
    peer hangs up); with TLS, waits for the handshake first."""

    def __init__(self, query: bytes, expect: re.Pattern | None, tls: bool) -> None:
        self.query, self.expect, self.tls = query, expect, tls
        self.received = b""
        self.ready: defer.Deferred[None] = defer.Deferred()   # connected (TLS: handshake done)
        self.answered: defer.Deferred[bool] = defer.Deferred()  # expect matched (True) or not (False)

    def connectionMade(self) -> None:
        if not self.tls:
            self._ready()

    def handshakeCompleted(self) -> None:
        self._ready()

    def _ready(self) -> None:
        if self.query:
            self.transport.write(self.query)
        if not self.ready.called:
            self.ready.callback(None)
        if self.expect is None and not self.answered.called:
            self.answered.callback(True)

    def dataReceived(self, data: bytes) -> None:
        if self.answered.called:
            return
        self.received = (self.received + data)[:READ_CAP]
        if self.expect.search(self.received.decode("utf-8", "replace")):
            self.answered.callback(True)
        elif len(self.received) >= READ_CAP:
            self.answered.callback(False)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.ready.called:
            self.ready.errback(reason)
        if not self.answered.called:
            self.answered.callback(False)


class _OneShot(Factory):
    """No "Starting factory" / "Stopping factory" lines: two per run would be most of an
    agent's log at 1,000 tcp tasks."""

    noisy = False

    def __init__(self, protocol: _Dialogue) -> None:
        self.instance = protocol

    def buildProtocol(self, addr: Any) -> _Dialogue:
        return self.instance


@dataclass(frozen=True)
class TcpConfig:
    host: str
    port: int
    tls: bool
    insecure: bool
    server_name: str
    query: str
    expect: re.Pattern | None
    timeout: float


class TcpCollector(Collector):
    """taskType ``tcp``: connect_time (ms) and success (1.0/0.0) of a TCP connect (and TLS
    handshake, and query/expect dialogue); tls_expiry_days with `tls`."""

    name = "tcp"
    namespace = "/raintank/apps/tcp"
    catalog = catalog(name, METRICS, FIELDS)

    def parse_config(self, config: Mapping[str, Any], task: TaskInfo) -> TcpConfig:
        return TcpConfig(**parse_fields(self.namespace, config, FIELDS, task))

    async def collect(self, config: TcpConfig, task: TaskInfo) -> list[Sample]:
        where = f"[{config.host}]" if ":" in config.host else config.host
        return await run(self.reactor, config.timeout, f"connect to {where}:{config.port}", self._connect(config, task),
                         success=series(self.name, task, "success"))

    def _endpoint(self, cfg: TcpConfig) -> Any:
        net = self.netpolicy
        if net is not None and net.active:  # resolved and checked here, connected by address
            endpoint: Any = CheckedEndpoint(net, self.reactor, cfg.host, cfg.port, cfg.timeout)
        elif isIPAddress(cfg.host):
            # An IP literal is connected to directly (HostnameEndpoint would "resolve" it in
            # the thread pool); a name goes through HostnameEndpoint, which resolves without
            # blocking and tries the IPv6/IPv4 addresses in turn.
            endpoint = TCP4ClientEndpoint(self.reactor, cfg.host, cfg.port, timeout=cfg.timeout)
        elif isIPv6Address(cfg.host):
            endpoint = TCP6ClientEndpoint(self.reactor, cfg.host, cfg.port, timeout=cfg.timeout)
        else:
            endpoint = HostnameEndpoint(self.reactor, cfg.host, cfg.port, timeout=cfg.timeout)
        if cfg.tls:
            name = cfg.server_name or cfg.host
            creator = CertificateOptions(verify=False) if cfg.insecure else optionsForClientTLS(name)
            endpoint = wrapClientTLS(creator, endpoint)
        return endpoint

    async def _connect(self, cfg: TcpConfig, task: TaskInfo) -> list[Sample]:
        dialogue = _Dialogue(cfg.query.encode("utf-8"), cfg.expect, cfg.tls)
        start = self.reactor.seconds()
        await self._endpoint(cfg).connect(_OneShot(dialogue))
        try:
            await dialogue.ready
            elapsed = self.reactor.seconds() - start
            samples = [Sample(series(self.name, task, "connect_time"), elapsed * 1000, "ms")]
            if cfg.tls:
                days = _expiry_days(dialogue.transport, self.reactor.seconds())
                if days is not None:
                    samples.append(Sample(series(self.name, task, "tls_expiry_days"), days, "days"))
            # Wait for a matching answer until just before the run's deadline, so that a
            # service that says something else (and keeps the line open) is reported
            # with what it said rather than as a bare timeout.
            remaining = max(0.0, ANSWER_SHARE * cfg.timeout - (self.reactor.seconds() - start))
            try:
                matched = await dialogue.answered.addTimeout(remaining, self.reactor)
            except defer.TimeoutError:
                matched = False
            if not matched:
                seen = dialogue.received.decode("utf-8", "replace")[:100]
                raise CollectError(f"connect to {cfg.host}:{cfg.port}: the answer does not match expect"
                                   f" {cfg.expect.pattern!r} (got {seen!r})",
                                   [*samples, Sample(series(self.name, task, "success"), 0.0)])
            return [*samples, Sample(series(self.name, task, "success"), 1.0)]
        finally:
            if dialogue.transport is not None:
                dialogue.transport.loseConnection()


def _expiry_days(transport: Any, now: float) -> float | None:
    """Days to the peer certificate's notAfter, from the TLS transport (None if unknown)."""
    get = getattr(transport, "getPeerCertificate", None)
    cert = get() if get is not None else None
    if cert is None:
        return None
    return days_until(cert.to_cryptography(), now)
