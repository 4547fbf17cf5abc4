"""The ``http`` collector: one request to a URL, timed, checked, with the status as data.

By default a response of any status in 200-299 is a successful run; `valid_status_codes`
and the `fail_if_*` assertions (blackbox_exporter's http prober's keys) say otherwise. A
failed assertion is a failed run whose error names the assertion and what was seen, and
its measurements (the status, times, `success` 0) are still published: every run has a
`success` of 1 or 0. Redirects are followed only with `follow_redirects` (each hop
through the same address checks, counted in `redirects`; see `_follow`). For https the days until the
leaf certificate and the earliest one of the chain expire, and the TLS version, are
read from the very connection the request used.
"""
from __future__ import annotations

from io import BytesIO
from typing import Any, Mapping
from urllib.parse import quote, urljoin, urlsplit

from OpenSSL import SSL
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS
from twisted.internet.defer import CancelledError
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

import taskd
from taskd.agent.builtin.collector import CollectError, Collector, ConfigError, Sample, TaskInfo
from taskd.agent.builtin.collectors.common import catalog, days_until, parse_fields, read_body, run, series
from taskd.agent.builtin.collectors.httpconfig import FIELDS, HttpConfig, check_combination
from taskd.agent.builtin.netpolicy import NO_RULES, CheckedEndpointFactory

BODY_CAP = 10 * 1024 * 1024  # bytes read at most; body_size stops counting there
METRICS = ("status_code", "total_time", "ttfb", "body_size", "tls_expiry_days", "tls_chain_expiry_days",
           "tls_version", "redirects", "success")


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
    """The platform's trust (or none at all with ``insecure``), remembering the connection.
    `server_name`: the name sent as SNI and checked in the certificate instead of the URL's."""

    def __init__(self, insecure: bool, server_name: str = "") -> None:
        self.insecure = insecure
        self.server_name = server_name
        self.creator: _Recording | None = None

    def creatorForNetloc(self, hostname: bytes, port: int) -> _Recording:
        host = self.server_name or hostname.decode("ascii")
        if self.insecure:
            is_ip = isIPAddress(host) or isIPv6Address(host)
            self.creator = _Recording(CertificateOptions(verify=False), None if is_ip else host.encode("idna"))
        else:
            self.creator = _Recording(optionsForClientTLS(host), None)
        return self.creator

    @property
    def connection(self) -> SSL.Connection | None:
        return self.creator.connection if self.creator is not None else None

    def expiry(self, now: float) -> tuple[float, float] | None:
        """Days from ``now`` to the leaf's and to the earliest chain certificate's notAfter,
        if a TLS connection was made."""
        conn = self.connection
        crypto = _peer_certificate(conn) if conn is not None else None
        if crypto is None:
            return None
        leaf = days_until(crypto, now)
        chain = [days_until(c.to_cryptography(), now) for c in (conn.get_peer_cert_chain() or [])]
        return leaf, min([leaf, *chain])

    def version(self) -> float | None:
        """1.2 for TLSv1.2, 1.3 for TLSv1.3 (None without TLS)."""
        conn = self.connection
        name = conn.get_protocol_version_name() if conn is not None else ""
        try:
            return float(name.removeprefix("TLSv")) if name.startswith("TLSv") else None
        except ValueError:
            return None


def _peer_certificate(conn: SSL.Connection) -> Any:
    """The peer's certificate as a cryptography object (older pyOpenSSL lacks as_cryptography)."""
    try:
        return conn.get_peer_certificate(as_cryptography=True)
    except TypeError:
        cert = conn.get_peer_certificate()
        return cert.to_cryptography() if cert is not None else None


class HttpCollector(Collector):
    """taskType ``http``: status_code, total_time, ttfb, body_size, redirects, success;
    tls_expiry_days (leaf), tls_chain_expiry_days (earliest), tls_version for https."""

    name = "http"
    namespace = "/raintank/apps/http"
    catalog = catalog(name, METRICS, FIELDS)
    body_cap = BODY_CAP
    _pool: HTTPConnectionPool | None = None

    def parse_config(self, config: Mapping[str, Any], task: TaskInfo) -> HttpConfig:
        values = parse_fields(self.namespace, config, FIELDS, task)
        problem = check_combination(values)
        if problem:
            raise ConfigError(problem)
        return HttpConfig(**values)

    async def collect(self, config: HttpConfig, task: TaskInfo) -> list[Sample]:
        return await run(self.reactor, config.timeout, f"{config.method} {config.url}", self._request(config, task),
                         success=series(self.name, task, "success"))

    def _sample(self, task: TaskInfo, metric: str, value: float, unit: str = "") -> Sample:
        return Sample(series(self.name, task, metric), float(value), unit)

    def _agent(self, cfg: HttpConfig, policy: _TlsPolicy) -> Any:
        # Always through the checked endpoint (with no rules when the agent has none): an
        # IP literal connects straight to its address, a name is resolved once; twisted's
        # HostnameEndpoint cost a third of a check's CPU (a class made per connect, a
        # resolver thread hop even for an IP literal, a happy-eyeballs LoopingCall).
        net = self.netpolicy
        proxy_url = getattr(self.settings, "proxy_url", "") or ""
        factory = CheckedEndpointFactory(net if net is not None and net.active else NO_RULES,
                                         self.reactor, policy, cfg.timeout, cfg.ip_version, proxy_url)
        if self._pool is None:  # one pool for every run; not persistent: a connection per check
            self._pool = HTTPConnectionPool(self.reactor, persistent=False)
        return Agent.usingEndpointFactory(self.reactor, factory, pool=self._pool)

    async def _request(self, cfg: HttpConfig, task: TaskInfo) -> list[Sample]:
        headers = Headers({b"User-Agent": [f"taskd/{taskd.__version__}".encode()]})
        for key, value in cfg.headers.items():
            headers.setRawHeaders(key, [value])
        if cfg.authorization():
            headers.setRawHeaders(b"Authorization", [cfg.authorization().encode("utf-8")])
        start = self.reactor.seconds()
        response, policy, redirects = await self._follow(cfg, task, headers)
        ttfb = self.reactor.seconds() - start
        expiry = policy.expiry(self.reactor.seconds())
        tls_version = policy.version()
        size, content = await read_body(response, self.body_cap, keep=cfg.reads_body)
        total = self.reactor.seconds() - start

        samples = [self._sample(task, "status_code", response.code), self._sample(task, "total_time", total * 1000, "ms"),
                   self._sample(task, "ttfb", ttfb * 1000, "ms"), self._sample(task, "body_size", size, "bytes"),
                   self._sample(task, "redirects", redirects)]
        if expiry is not None:
            samples += [self._sample(task, "tls_expiry_days", expiry[0], "days"),
                        self._sample(task, "tls_chain_expiry_days", expiry[1], "days")]
        if tls_version is not None:
            samples.append(self._sample(task, "tls_version", tls_version))
        failed = _assertion(cfg, response, content)
        if failed:
            raise CollectError(f"{cfg.method} {cfg.url}: {failed}", [*samples, self._sample(task, "success", 0)])
        return [*samples, self._sample(task, "success", 1)]

    async def _follow(self, cfg: HttpConfig, task: TaskInfo, headers: Headers) -> tuple[Any, _TlsPolicy, int]:
        """The final response, the TLS policy of the connection it came on, and the
        redirects followed. Redirects are followed here rather than by twisted's
        RedirectAgent: each hop's body is read and dropped (its socket closes instead of
        lingering), the TLS figures are the final hop's (as blackbox_exporter reports
        them), and a POST answered 301/302/303 goes on as a GET without a body, as
        browsers and Go's client do (307/308 keep the method and body)."""
        method, url, body, redirects = cfg.method, cfg.url, cfg.body, 0
        while True:
            policy = _TlsPolicy(cfg.insecure, cfg.server_name)
            producer = FileBodyProducer(BytesIO(body.encode("utf-8"))) if body else None
            response = await self._agent(cfg, policy).request(method.encode("ascii"), _ascii(url), headers, producer)
            if not cfg.follow_redirects or response.code not in REDIRECT_CODES:
                return response, policy, redirects
            location = response.headers.getRawHeaders(b"location")
            try:
                await read_body(response, REDIRECT_BODY_CAP, keep=False)
            except CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a broken redirect body does not stop the hop
                pass
            if not location:
                raise CollectError(f"{cfg.method} {cfg.url}: a {response.code} redirect without a Location header",
                                   [self._sample(task, "success", 0)])
            if redirects >= cfg.max_redirects:
                raise CollectError(f"{cfg.method} {cfg.url}: more than {cfg.max_redirects} redirects (max_redirects)",
                                   [self._sample(task, "success", 0)])
            redirects += 1
            target = urljoin(url, location[0].decode("latin-1"))
            if _origin(target) != _origin(url):  # credentials stay with the origin they were given for
                for name in SENSITIVE_HEADERS:
                    headers.removeHeader(name)
            if response.code in (301, 302, 303) and method not in ("GET", "HEAD"):
                method, body = "GET", ""
            url = target


REDIRECT_CODES = frozenset((301, 302, 303, 307, 308))
REDIRECT_BODY_CAP = 64 * 1024  # a redirect's body is read (and dropped) up to this, then its socket closed
SENSITIVE_HEADERS = (b"authorization", b"cookie", b"cookie2", b"proxy-authorization", b"www-authenticate")


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port


def _ascii(url: str) -> bytes:
    """The URL as twisted's Agent takes it: bytes, non-ASCII (a redirect's Location may
    hold UTF-8) percent-encoded."""
    try:
        return url.encode("ascii")
    except UnicodeEncodeError:
        return quote(url, safe=":/?#[]@!$&'()*+,;=%~").encode("ascii")


def _assertion(cfg: HttpConfig, response: Any, content: bytes) -> str | None:
    """The first assertion the response fails, said with what was seen; None if it passes."""
    code = response.code
    if not any(lo <= code <= hi for lo, hi in cfg.valid_status_codes):
        wanted = ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in cfg.valid_status_codes)
        return f"status {code} is not in valid_status_codes ({wanted})"
    if cfg.reads_body:
        text = content.decode("utf-8", "replace")
        for pattern in cfg.fail_if_body_matches:
            if (m := pattern.search(text)) is not None:
                return f"body matches fail_if_body_matches {pattern.pattern!r} (at byte {m.start()})"
        for pattern in cfg.fail_if_body_not_matches:
            if pattern.search(text) is None:
                return f"body does not match fail_if_body_not_matches {pattern.pattern!r}"
    for rule in cfg.fail_if_header_matches:
        for value in response.headers.getRawHeaders(rule.header, []):
            if rule.regexp.search(value.decode("latin-1") if isinstance(value, bytes) else value):
                return f"header {rule.header} matches fail_if_header_matches {rule.regexp.pattern!r}"
    for rule in cfg.fail_if_header_not_matches:
        values = response.headers.getRawHeaders(rule.header)
        if values is None:
            if not rule.allow_missing:
                return f"header {rule.header} is missing (fail_if_header_not_matches; allow_missing is false)"
            continue
        texts = [v.decode("latin-1") if isinstance(v, bytes) else v for v in values]
        if not any(rule.regexp.search(t) for t in texts):
            return f"header {rule.header} ({texts[0][:100]!r}) does not match fail_if_header_not_matches" \
                   f" {rule.regexp.pattern!r}"
    return None
