"""The dns and tcp collectors' checks (issue 14 item 3) against real local servers: the
twisted.names zone of test_collectors, the machine's real Redis, a banner server, a TLS
listener. Each failure names the check and what was seen, and publishes success 0."""
from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from taskd.agent.builtin.collector import CollectError, ConfigError
from taskd.agent.builtin.collectors.dns import DnsCollector
from taskd.agent.builtin.collectors.tcp import TcpCollector
from tests.integration.test_collectors import SETTINGS, TASK, by_name, collect, dns_server, make_cert, stop  # noqa: F401

REDIS = ("127.0.0.1", 6379)  # the machine's Redis (the env notes: it runs on every machine of this kind)


def dns() -> DnsCollector:
    return DnsCollector(reactor=reactor, settings=SETTINGS)


def tcp() -> TcpCollector:
    return TcpCollector(reactor=reactor, settings=SETTINGS)


async def failed(collector, config: dict) -> CollectError:
    with pytest.raises(CollectError) as caught:
        await collect(collector, config)
    assert by_name(caught.value.samples)["success"].value == 0
    return caught.value


@pytest_twisted.ensureDeferred
async def test_dns_rcodes(dns_server):
    gone = await collect(dns(), {"name": "nope.example.test", "server": dns_server["udp"]})
    assert by_name(gone)["answers"].value == 0 and by_name(gone)["success"].value == 1  # the default allows NXDOMAIN
    strict = await failed(dns(), {"name": "nope.example.test", "server": dns_server["udp"], "valid_rcodes": ["NOERROR"]})
    assert str(strict).endswith("server answered NXDOMAIN, not one of valid_rcodes (NOERROR)")


@pytest_twisted.ensureDeferred
async def test_dns_answer_regexes_and_counts(dns_server):
    base = {"name": "www.example.test", "server": dns_server["udp"]}
    ok = by_name(await collect(dns(), {**base, "fail_if_answer_not_matches": [r"IN A 192\.0\.2\.1$"],
                                       "min_answers": 2, "max_answers": 2}))
    assert ok["success"].value == 1 and ok["answers"].value == 2
    matched = await failed(dns(), {**base, "fail_if_answer_matches": [r"192\.0\.2\.2"]})
    assert "matches fail_if_answer_matches '192\\\\.0\\\\.2\\\\.2'" in str(matched)
    assert "www.example.test" in str(matched) and "IN A 192.0.2.2" in str(matched)
    assert by_name(matched.samples)["answers"].value == 2
    absent = await failed(dns(), {**base, "fail_if_answer_not_matches": ["198\\.51\\.100\\."]})
    assert "no answer matches fail_if_answer_not_matches" in str(absent)
    few = await failed(dns(), {**base, "min_answers": 3})
    assert str(few).endswith("2 answer(s), fewer than min_answers 3")
    many = await failed(dns(), {**base, "max_answers": 1})
    assert str(many).endswith("2 answer(s), more than max_answers 1")
    mx = await collect(dns(), {"name": "example.test", "type": "MX", "server": dns_server["udp"],
                               "fail_if_answer_not_matches": ["IN MX 10 mail\\.example\\.test$"]})
    assert by_name(mx)["success"].value == 1


@pytest_twisted.ensureDeferred
async def test_tcp_query_and_expect_against_the_real_redis():
    host, port = REDIS
    pong = by_name(await collect(tcp(), {"host": host, "port": port, "query": "PING\r\n", "expect": r"^\+PONG"}))
    assert pong["success"].value == 1 and pong["connect_time"].unit == "ms"
    wrong = await failed(tcp(), {"host": host, "port": port, "query": "PING\r\n", "expect": "^-ERR", "timeout": 1})
    assert str(wrong) == f"connect to {host}:{port}: the answer does not match expect '^-ERR' (got '+PONG\\r\\n')"


@pytest_twisted.ensureDeferred
async def test_tcp_expects_a_banner():
    class Banner(Protocol):
        def connectionMade(self):
            self.transport.write(b"220 mail.example.test ESMTP ready\r\n")

    listener = reactor.listenTCP(0, Factory.forProtocol(Banner), interface="127.0.0.1")
    port = listener.getHost().port
    try:
        got = by_name(await collect(tcp(), {"host": "127.0.0.1", "port": port, "expect": "^220 "}))
        assert got["success"].value == 1
        silent = await failed(tcp(), {"host": "127.0.0.1", "port": port, "expect": "^554", "timeout": 0.5})
        assert "does not match expect '^554'" in str(silent) and "220 mail.example.test" in str(silent)
    finally:
        await stop(listener)


@pytest_twisted.ensureDeferred
async def test_tcp_tls_handshake_and_expiry():
    listener = reactor.listenSSL(0, Factory.forProtocol(Protocol), make_cert(30), interface="127.0.0.1")
    port = listener.getHost().port
    try:
        got = by_name(await collect(tcp(), {"host": "127.0.0.1", "port": port, "tls": True, "insecure": True}))
        assert got["success"].value == 1 and 29.99 < got["tls_expiry_days"].value <= 30.0
        untrusted = await failed(tcp(), {"host": "127.0.0.1", "port": port, "tls": True})
        assert "certificate verify failed" in str(untrusted) or "TLS error" in str(untrusted), str(untrusted)
    finally:
        await stop(listener)


@pytest.mark.parametrize("collector, config, says", [
    (DnsCollector, {"name": "x.test", "server": "127.0.0.1", "valid_rcodes": ["BOGUS"]}, "valid_rcodes: item 0 must be"),
    (DnsCollector, {"name": "x.test", "server": "127.0.0.1", "valid_rcodes": []}, "valid_rcodes: must list"),
    (DnsCollector, {"name": "x.test", "server": "127.0.0.1", "fail_if_answer_matches": ["("]},
     "fail_if_answer_matches: item 0 is not a valid regular expression"),
    (DnsCollector, {"name": "x.test", "server": "127.0.0.1", "min_answers": -1}, "min_answers: must be 0 or more"),
    (TcpCollector, {"host": "h", "port": 1, "expect": "("}, "expect: is not a valid regular expression"),
    (TcpCollector, {"host": "h", "port": 1, "tls": "yes"}, "tls: expected a boolean"),
    (TcpCollector, {"host": "h", "port": 1, "server_name": "a b"}, "server_name: must be a host name"),
])
def test_bad_config_names_the_key(collector, config, says):
    with pytest.raises(ConfigError) as caught:
        collector(reactor=reactor, settings=SETTINGS).parse_config(config, TASK)
    assert says in str(caught.value)
