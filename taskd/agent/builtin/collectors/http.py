"""The ``http`` collector: one request to a URL, timed, with the status as data.

A response of any status is a successful run (a 500 is what the operator wants to
graph and alert on); only a request that gets no response - refused, TLS failure,
timeout - is the run's error. Redirects are not followed: a 301 is the status measured.
For https the days until the server certificate expires are measured too, read from the
very connection the request used.
"""
from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping
from urllib.parse import urlsplit

import hyperlink
from OpenSSL import SSL
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS
from twisted.web.client import Agent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

import taskd
from taskd.agent.builtin.collector import Collector, Sample, TaskInfo
from taskd.agent.builtin.collectors.common import Field, catalog, parse_fields, read_body, run, series
from taskd.agent.builtin.netpolicy import CheckedEndpointFactory
from taskd.agent.httpclient import QuietEndpointFactory

METHODS = ("GET", "HEAD")
BODY_CAP = 10 * 1024 * 1024  # bytes read at most; body_size stops counting there
METRICS = ("status_code", "total_time", "ttfb", "body_size", "tls_expiry_days")


def _url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL are not supported (send an Authorization header)")
    try:
        parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    return hyperlink.parse(value).to_uri().to_text()  # IDN host -> punycode, non-ASCII -> %XX


def _method(value: str) -> str:
    if value.upper() not in METHODS:
        raise ValueError(f"must be one of {', '.join(METHODS)}")
    return value.upper()


_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _headers(value: dict[str, str]) -> dict[str, str]:
    for name, text in value.items():
        if not _TOKEN.match(name):
            raise ValueError(f"{name!r} is not a valid header name")
        if "\r" in text or "\n" in text or "\0" in text:
            raise ValueError(f"the value of {name} contains a line break")
    return value


FIELDS = (
    Field("url", "string", required=True, check=_url),
    Field("method", "string", default="GET", check=_method),
    Field("headers", "map", default=MappingProxyType({}), check=_headers),
    Field("insecure", "bool", default=False),
)


@dataclass(frozen=True)
class HttpConfig:
    url: str
    method: str
    headers: Mapping[str, str]
    insecure: bool
    timeout: float


@implementer(IOpenSSLClientConnectionCreator)
class _Recording:
    """Wraps a connection creator and keeps the TLS connection, for its peer certificate."""

    def __init__(self, inner: Any, sni: bytes | None) -> None:
        self.inner, self.sni = inner, sni
        self.connection: SSL.Connection | None = None

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        self.connection = self.inner.clientConnectionForTLS(tlsProtocol)
        if self.sni is not None:
            self.connection.set_tlsext_host_name(self.sni)
        return self.connection


@implementer(IPolicyForHTTPS)
class _TlsPolicy:
    """The platform's trust (or none at all with ``insecure``), remembering the connection."""

    def __init__(self, insecure: bool) -> None:
        self.insecure = insecure
        self.creator: _Recording | None = None

    def creatorForNetloc(self, hostname: bytes, port: int) -> _Recording:
        host = hostname.decode("ascii")
        if self.insecure:
            is_ip = isIPAddress(host) or isIPv6Address(host)
            self.creator = _Recording(CertificateOptions(verify=False), None if is_ip else hostname)
        else:
            self.creator = _Recording(optionsForClientTLS(host), None)
        return self.creator

    def expiry(self, now: float) -> float | None:
        """Days from ``now`` to the peer certificate's notAfter, if a TLS connection was made."""
        conn = self.creator.connection if self.creator is not None else None
        crypto = _peer_certificate(conn) if conn is not None else None
        if crypto is None:
            return None
        not_after = getattr(crypto, "not_valid_after_utc", None) or \
            crypto.not_valid_after.replace(tzinfo=datetime.timezone.utc)
        return (not_after.timestamp() - now) / 86400.0


def _peer_certificate(conn: SSL.Connection) -> Any:
    """The peer's certificate as a cryptography object (older pyOpenSSL lacks as_cryptography)."""
    try:
        return conn.get_peer_certificate(as_cryptography=True)
    except TypeError:
        cert = conn.get_peer_certificate()
        return cert.to_cryptography() if cert is not None else None


class HttpCollector(Collector):
    """taskType ``http``: status_code, total_time, ttfb, body_size, tls_expiry_days (https)."""

    name = "http"
    namespace = "/raintank/apps/http"
    catalog = catalog(name, METRICS, FIELDS)
    body_cap = BODY_CAP

    def parse_config(self, config: Mapping[str, Any], task: TaskInfo) -> HttpConfig:
        return HttpConfig(**parse_fields(self.namespace, config, FIELDS, task))

    async def collect(self, config: HttpConfig, task: TaskInfo) -> list[Sample]:
        return await run(self.reactor, config.timeout, f"{config.method} {config.url}",
                         self._request(config, task))

    async def _request(self, cfg: HttpConfig, task: TaskInfo) -> list[Sample]:
        policy = _TlsPolicy(cfg.insecure)
        net = self.netpolicy
        if net is not None and net.active:  # only addresses it resolved and checked itself
            agent = Agent.usingEndpointFactory(self.reactor, CheckedEndpointFactory(net, self.reactor, policy,
                                                                                    cfg.timeout))
        else:  # as Agent's default, without a "Starting factory" log line per run
            agent = Agent.usingEndpointFactory(self.reactor, QuietEndpointFactory(self.reactor, policy, cfg.timeout))
        headers = Headers({b"User-Agent": [f"taskd/{taskd.__version__}".encode()]})
        for key, value in cfg.headers.items():
            headers.setRawHeaders(key, [value])
        start = self.reactor.seconds()
        response = await agent.request(cfg.method.encode("ascii"), cfg.url.encode("ascii"), headers)
        ttfb = self.reactor.seconds() - start
        expiry = policy.expiry(self.reactor.seconds())
        size, _ = await read_body(response, self.body_cap, keep=False)
        total = self.reactor.seconds() - start

        def sample(metric: str, value: float, unit: str = "") -> Sample:
            return Sample(series(self.name, task, metric), float(value), unit)

        samples = [sample("status_code", response.code), sample("total_time", total * 1000, "ms"),
                   sample("ttfb", ttfb * 1000, "ms"), sample("body_size", size, "bytes")]
        if expiry is not None:
            samples.append(sample("tls_expiry_days", expiry, "days"))
        return samples
