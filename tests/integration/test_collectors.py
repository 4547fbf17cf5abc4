"""The built-in collectors against real servers on 127.0.0.1.

http/https: a twisted.web site (TLS with a self-signed certificate made here that expires
in 30 days); tcp: a listening and a closed port; dns: a twisted.names authoritative
server over UDP and TCP, and a UDP port that never answers; ns1: the NS1 emulator.
Timeouts are short real deadlines of the collector; the one case no local server can
produce (a TCP connect that hangs) runs on a MemoryReactorClock.
"""
from __future__ import annotations

import datetime
import socket
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent
from twisted.names import authority, common, dns, server
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from taskd.agent.builtin.collector import CollectError, Sample, TaskInfo
from taskd.agent.builtin.collectors.dns import DnsCollector
from taskd.agent.builtin.collectors.http import HttpCollector
from taskd.agent.builtin.collectors.ns1 import Ns1Collector
from taskd.agent.builtin.collectors.tcp import TcpCollector
from taskd.agent.settings import AgentSettings
from tests.fakes.ns1 import Ns1Emulator
from tests.waiting import until

TASK = TaskInfo(id=7, name="My Site", org_id=1, interval=60)
SETTINGS = AgentSettings()


def by_name(samples: list[Sample]) -> dict[str, Sample]:
    return {s.name.rsplit(".", 1)[1]: s for s in samples}


async def collect(collector: Any, config: dict, task: TaskInfo = TASK) -> list[Sample]:
    return await collector.collect(collector.parse_config(config, task), task)


async def failure(collector: Any, config: dict) -> str:
    with pytest.raises(CollectError) as caught:
        await collect(collector, config)
    return str(caught.value)


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def stop(*ports: Any) -> None:
    for port in ports:
        await port.stopListening()


# -- http -----------------------------------------------------------------------------

class Web(Resource):
    """/ok 1234 bytes, /fail 500, /big 5000 bytes, /slow never answers, /trickle answers half;
    /redirect -> /ok, /loop -> /loop, /to?code=C&url=U a C redirect to U (no Location
    without url), /echo the method and body back (with an X-Served-By header), /auth 200
    only with basic auth u:p or bearer t0k."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []
        self.lost: list[str] = []
        self.pending: list[Any] = []

    def render(self, request):
        path = request.path.decode()
        self.seen.append((request.method, path, request.requestHeaders))
        if path == "/fail":
            request.setResponseCode(500)
            return b"boom"
        if path == "/big":
            return b"y" * 5000
        if path in ("/redirect", "/loop"):
            request.setResponseCode(302)
            request.setHeader(b"location", b"/ok" if path == "/redirect" else b"/loop")
            return b""
        if path == "/to":
            request.setResponseCode(int(request.args[b"code"][0]))
            if b"url" in request.args:
                request.setHeader(b"location", request.args[b"url"][0])
            return b"moved " * 100
        if path == "/echo":
            request.setHeader(b"x-served-by", b"taskd-test")
            return request.method + b" " + request.content.read()
        if path == "/auth":
            if request.getHeader(b"authorization") not in (b"Basic dTpw", b"Bearer t0k"):
                request.setResponseCode(401)
                return b"who are you"
            return b"welcome"
        if path in ("/slow", "/trickle"):
            self.pending.append(request)
            request.notifyFinish().addErrback(lambda _: self.lost.append(path))
            if path == "/trickle":
                request.setHeader(b"content-length", b"100")
                request.write(b"x" * 10)
            return NOT_DONE_YET
        return b"x" * 1234


@implementer(IOpenSSLContextFactory)
class ServerTLS:
    """A server context from cryptography objects (CertificateOptions wants deprecated pyOpenSSL ones)."""

    def __init__(self, cert: x509.Certificate, key: Any) -> None:
        self.context = SSL.Context(SSL.TLS_SERVER_METHOD)
        self.context.use_certificate(cert)
        self.context.use_privatekey(key)

    def getContext(self) -> SSL.Context:
        return self.context


def make_cert(days: int) -> ServerTLS:
    """A self-signed certificate for 127.0.0.1 that expires ``days`` from now."""
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=days)).sign(key, hashes.SHA256()))
    return ServerTLS(cert, key)


@pytest_twisted.async_yield_fixture
async def web():
    resource = Web()
    site = Site(resource)
    plain = reactor.listenTCP(0, site, interface="127.0.0.1")
    tls = reactor.listenSSL(0, site, make_cert(30), interface="127.0.0.1")
    resource.http = f"http://127.0.0.1:{plain.getHost().port}"
    resource.https = f"https://127.0.0.1:{tls.getHost().port}"
    yield resource
    for request in resource.pending:
        request.channel.transport.abortConnection() if request.channel else None
    await stop(plain, tls)


@pytest_twisted.ensureDeferred
async def test_http_measures_a_200(web):
    samples = await collect(HttpCollector(reactor=reactor, settings=SETTINGS),
                            {"url": web.http + "/ok", "headers": {"X-Check": "yes"}})
    assert {s.name for s in samples} == {f"raintank.apps.http.my-site.{m}" for m in
                                         ("status_code", "total_time", "ttfb", "body_size", "redirects", "success")}
    got = by_name(samples)
    assert got["status_code"].value == 200.0 and got["success"].value == 1 and got["redirects"].value == 0
    assert got["body_size"].value == 1234.0 and got["body_size"].unit == "bytes"
    assert got["total_time"].unit == got["ttfb"].unit == "ms"
    assert 0 <= got["ttfb"].value <= got["total_time"].value < 10_000
    method, _, headers = web.seen[-1]
    assert method == b"GET" and headers.getRawHeaders(b"x-check") == [b"yes"]
    assert headers.getRawHeaders(b"user-agent")[0].startswith(b"taskd/")


@pytest_twisted.ensureDeferred
async def test_http_500_fails_by_default_and_is_still_measured(web):
    """valid_status_codes defaults to 2xx (as blackbox_exporter's); the failed run keeps
    its measurements, success 0 among them."""
    with pytest.raises(CollectError) as caught:
        await collect(HttpCollector(reactor=reactor, settings=SETTINGS), {"url": web.http + "/fail"})
    assert str(caught.value) == f"GET {web.http}/fail: status 500 is not in valid_status_codes (200-299)"
    got = by_name(caught.value.samples)
    assert got["status_code"].value == 500.0 and got["body_size"].value == 4.0 and got["success"].value == 0
    allowed = by_name(await collect(HttpCollector(reactor=reactor, settings=SETTINGS),
                                    {"url": web.http + "/fail", "valid_status_codes": [200, "5xx"]}))
    assert allowed["status_code"].value == 500.0 and allowed["success"].value == 1


@pytest_twisted.ensureDeferred
async def test_http_head_reads_no_body(web):
    got = by_name(await collect(HttpCollector(reactor=reactor, settings=SETTINGS),
                                {"url": web.http + "/ok", "method": "head"}))
    assert web.seen[-1][0] == b"HEAD"
    assert got["status_code"].value == 200.0 and got["body_size"].value == 0.0


@pytest_twisted.ensureDeferred
async def test_http_body_is_read_up_to_the_cap(web):
    collector = HttpCollector(reactor=reactor, settings=SETTINGS)
    collector.body_cap = 1000
    got = by_name(await collect(collector, {"url": web.http + "/big"}))
    assert got["body_size"].value == 1000.0 and got["status_code"].value == 200.0


@pytest_twisted.ensureDeferred
async def test_http_refused_is_an_error():
    url = f"http://127.0.0.1:{free_port()}/"
    assert await failure(HttpCollector(reactor=reactor, settings=SETTINGS), {"url": url}) == \
        f"GET {url}: connection refused"


@pytest.mark.parametrize("path", ["/slow", "/trickle"])
@pytest_twisted.ensureDeferred
async def test_http_timeout_is_an_error_and_drops_the_connection(web, path):
    url = web.http + path
    message = await failure(HttpCollector(reactor=reactor, settings=SETTINGS), {"url": url, "timeout": 0.3})
    assert message == f"GET {url}: timeout after 0.3s"
    await until(lambda: path in web.lost, what="server saw the connection dropped")


@pytest_twisted.ensureDeferred
async def test_https_reports_days_until_the_certificate_expires(web):
    got = by_name(await collect(HttpCollector(reactor=reactor, settings=SETTINGS),
                                {"url": web.https + "/ok", "insecure": True}))
    assert got["status_code"].value == 200.0 and got["body_size"].value == 1234.0
    assert got["tls_expiry_days"].unit == "days"
    assert 29.99 < got["tls_expiry_days"].value <= 30.0
    assert got["tls_chain_expiry_days"].value == pytest.approx(got["tls_expiry_days"].value, abs=0.01)  # self-signed
    assert got["tls_version"].value in (1.2, 1.3)


@pytest_twisted.ensureDeferred
async def test_https_verifies_the_certificate_unless_insecure(web):
    url = web.https + "/ok"
    message = await failure(HttpCollector(reactor=reactor, settings=SETTINGS), {"url": url})
    assert message.startswith(f"GET {url}: TLS error: ") and "certificate verify failed" in message
    assert not any(path == "/ok" for _, path, _ in web.seen)


@pytest_twisted.ensureDeferred
async def test_plain_http_has_no_tls_expiry(web):
    got = by_name(await collect(HttpCollector(reactor=reactor, settings=SETTINGS), {"url": web.http + "/ok"}))
    assert "tls_expiry_days" not in got


# -- tcp ------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_tcp_connects_to_an_open_port():
    accepted: list[Protocol] = []

    class Count(Protocol):
        def connectionMade(self):
            accepted.append(self)

    port = reactor.listenTCP(0, Factory.forProtocol(Count), interface="127.0.0.1")
    try:
        samples = await collect(TcpCollector(reactor=reactor, settings=SETTINGS),
                                {"host": "127.0.0.1", "port": port.getHost().port})
        got = by_name(samples)
        assert {s.name for s in samples} == {"raintank.apps.tcp.my-site.connect_time",
                                             "raintank.apps.tcp.my-site.success"}
        assert got["success"].value == 1.0
        assert got["connect_time"].unit == "ms" and 0 <= got["connect_time"].value < 10_000
        await until(lambda: accepted, what="server accepted the connection")
        await until(lambda: not accepted[0].transport.connected, what="collector closed the connection")
    finally:
        await stop(port)


@pytest_twisted.ensureDeferred
async def test_tcp_closed_port_is_an_error():
    port = free_port()
    assert await failure(TcpCollector(reactor=reactor, settings=SETTINGS), {"host": "127.0.0.1", "port": port}) \
        == f"connect to 127.0.0.1:{port}: connection refused"


@pytest_twisted.ensureDeferred
async def test_tcp_connect_that_hangs_times_out_on_the_collectors_reactor():
    clock = MemoryReactorClock()
    collector = TcpCollector(reactor=clock, settings=SETTINGS)
    config = collector.parse_config({"host": "192.0.2.1", "port": 80, "timeout": 2}, TASK)
    d = defer.ensureDeferred(collector.collect(config, TASK))
    assert [c[1] for c in clock.tcpClients] == [80]  # (MemoryReactor resolves every name to 127.0.0.1)
    clock.advance(1.9)
    assert not d.called
    clock.advance(0.2)
    with pytest.raises(CollectError, match=r"^connect to 192\.0\.2\.1:80: timeout after 2s$"):
        await d


# -- dns ------------------------------------------------------------------------------

class Zone(authority.FileAuthority):
    """An in-memory authority for example.test (FileAuthority without the file)."""

    def __init__(self, soa: tuple, records: dict) -> None:
        common.ResolverBase.__init__(self)
        self.soa, self.records, self._cache = soa, records, {}


class Broken(common.ResolverBase):
    """Fails every lookup: the server answers SERVFAIL."""

    def _lookup(self, name, cls, type, timeout):
        return defer.fail(RuntimeError("backend down"))


def _zone() -> Zone:
    soa = dns.Record_SOA(mname=b"ns.example.test", rname=b"root.example.test", serial=1, refresh=60,
                         retry=60, expire=600, minimum=60, ttl=60)
    return Zone((b"example.test", soa), {
        b"example.test": [soa, dns.Record_NS(b"ns.example.test"), dns.Record_MX(10, b"mail.example.test")],
        b"www.example.test": [dns.Record_A("192.0.2.1"), dns.Record_A("192.0.2.2")],
    })


@pytest_twisted.async_yield_fixture
async def dns_server():
    factory = server.DNSServerFactory(authorities=[_zone()])
    udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    tcp = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield {"udp": f"127.0.0.1:{udp.getHost().port}", "tcp": f"127.0.0.1:{tcp.getHost().port}"}
    await stop(udp, tcp)


@pytest.mark.parametrize("protocol", ["udp", "tcp"])
@pytest_twisted.ensureDeferred
async def test_dns_counts_the_answers(dns_server, protocol):
    samples = await collect(DnsCollector(reactor=reactor, settings=SETTINGS),
                            {"name": "www.example.test", "server": dns_server[protocol], "protocol": protocol})
    assert {s.name for s in samples} == {"raintank.apps.dns.my-site.answers", "raintank.apps.dns.my-site.query_time",
                                         "raintank.apps.dns.my-site.success"}
    got = by_name(samples)
    assert got["answers"].value == 2.0
    assert got["query_time"].unit == "ms" and 0 <= got["query_time"].value < 10_000


@pytest_twisted.ensureDeferred
async def test_dns_asks_for_the_configured_type(dns_server):
    got = by_name(await collect(DnsCollector(reactor=reactor, settings=SETTINGS),
                                {"name": "example.test", "type": "MX", "server": dns_server["udp"]}))
    assert got["answers"].value == 1.0


@pytest_twisted.ensureDeferred
async def test_dns_nxdomain_is_zero_answers(dns_server):
    got = by_name(await collect(DnsCollector(reactor=reactor, settings=SETTINGS),
                                {"name": "nope.example.test", "server": dns_server["udp"]}))
    assert got["answers"].value == 0.0


@pytest_twisted.ensureDeferred
async def test_dns_servfail_is_an_error():
    factory = server.DNSServerFactory(authorities=[Broken()])
    udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    where = f"127.0.0.1:{udp.getHost().port}"
    try:
        assert await failure(DnsCollector(reactor=reactor, settings=SETTINGS),
                             {"name": "www.example.test", "server": where}) == \
            f"A www.example.test @{where}/udp: server answered SERVFAIL, not one of valid_rcodes (NOERROR, NXDOMAIN)"
    finally:
        await stop(udp)


@pytest_twisted.ensureDeferred
async def test_dns_silent_server_times_out():
    heard: list[bytes] = []

    class Silent(DatagramProtocol):
        def datagramReceived(self, data, addr):
            heard.append(data)

    udp = reactor.listenUDP(0, Silent(), interface="127.0.0.1")
    where = f"127.0.0.1:{udp.getHost().port}"
    try:
        assert await failure(DnsCollector(reactor=reactor, settings=SETTINGS),
                             {"name": "www.example.test", "server": where, "timeout": 0.3}) == \
            f"A www.example.test @{where}/udp: timeout after 0.3s"
        assert len(heard) == 1  # asked once, no retries beyond the deadline
    finally:
        await stop(udp)


# -- ns1 ------------------------------------------------------------------------------

KEY = "s3cret-ns1-key-do-not-leak"


@pytest_twisted.async_yield_fixture
async def ns1():
    emulator = Ns1Emulator(keys={KEY: None, "limited": {"other.com"}},
                           zones={"example.com": 12.5, "my zone/x.com": 3.0, "other.com": 1.0}).start()
    yield emulator
    await emulator.stop()


def ns1_collector(emulator: Ns1Emulator) -> Ns1Collector:
    return Ns1Collector(reactor=reactor, settings=AgentSettings(ns1_api_url=emulator.url))


@pytest_twisted.ensureDeferred
async def test_ns1_reports_the_zone_qps(ns1):
    samples = await collect(ns1_collector(ns1), {"ns1_key": KEY, "zone": "example.com"})
    assert samples == [Sample("raintank.apps.ns1.zones.example_com.qps", 12.5, "ms", "gauge")]
    assert ns1.requests == [("GET", "/v1/stats/qps/example.com", KEY)]


@pytest_twisted.ensureDeferred
async def test_ns1_quotes_the_zone_twice(ns1):
    samples = await collect(ns1_collector(ns1), {"ns1_key": KEY, "zone": "my zone/x.com"})
    assert ns1.requests[-1][1] == "/v1/stats/qps/my%2520zone%252Fx.com"
    assert [(s.name, s.value) for s in samples] == [("raintank.apps.ns1.zones.my-zone-x_com.qps", 3.0)]


@pytest_twisted.ensureDeferred
async def test_ns1_bad_key_is_reported_without_the_key(ns1, logs):
    wrong = KEY + "-wrong"
    collector = ns1_collector(ns1)
    config = collector.parse_config({"ns1_key": wrong, "zone": "example.com"}, TASK)
    with pytest.raises(CollectError) as caught:
        await collector.collect(config, TASK)
    assert str(caught.value) == "NS1 authentication failed"
    assert ns1.requests[-1][2] == wrong  # it was sent ...
    assert KEY not in repr(config) and KEY not in str(caught.value)  # ... and shown nowhere
    assert not any(KEY in formatEvent(e) or KEY in repr(e) for e in logs)


@pytest.mark.parametrize("key, zone, expected", [
    ("limited", "example.com", "NS1 access denied to zone example.com"),
    (KEY, "missing.com", "NS1 zone missing.com not found"),
])
@pytest_twisted.ensureDeferred
async def test_ns1_denied_and_unknown_zones(ns1, key, zone, expected):
    assert await failure(ns1_collector(ns1), {"ns1_key": key, "zone": zone}) == expected


@pytest_twisted.ensureDeferred
async def test_ns1_other_status_is_an_error_with_its_message(ns1):
    ns1.status, ns1.status_message = 503, f"overloaded, key {KEY}"
    message = await failure(ns1_collector(ns1), {"ns1_key": KEY, "zone": "example.com"})
    assert message == "NS1 answered 503 for zone example.com: overloaded, key ***"


@pytest_twisted.ensureDeferred
async def test_ns1_timeout(ns1):
    ns1.hang = True
    assert await failure(ns1_collector(ns1), {"ns1_key": KEY, "zone": "example.com", "timeout": 0.3}) == \
        "NS1 qps of zone example.com: timeout after 0.3s"
    assert len(ns1.requests) == 1


@pytest_twisted.ensureDeferred
async def test_ns1_unreachable_api():
    collector = Ns1Collector(reactor=reactor, settings=AgentSettings(ns1_api_url=f"http://127.0.0.1:{free_port()}"))
    assert await failure(collector, {"ns1_key": KEY, "zone": "example.com"}) == \
        "NS1 qps of zone example.com: connection refused"
