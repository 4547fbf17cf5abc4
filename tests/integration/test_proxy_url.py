"""The agent's `proxy-url` (issue 14 item 1): the http collector's checks go through a
real HTTP CONNECT proxy on loopback (a small one, started here), for http:// and https://
alike, with the proxy's credentials; blocked-nets still applies to the checked host."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol

from taskd.agent.builtin.collector import CollectError
from taskd.agent.builtin.collectors.http import HttpCollector
from taskd.agent.builtin.netpolicy import NetPolicy
from taskd.agent.settings import load_agent_settings
from tests.integration.test_collectors import by_name, collect, web  # noqa: F401 (fixture)


class _Relay(Protocol):
    def __init__(self, peer: Protocol) -> None:
        self.peer = peer

    def connectionMade(self) -> None:
        self.peer.relay = self
        self.peer.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.peer.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        self.peer.transport.write(data)

    def connectionLost(self, reason=None) -> None:
        self.peer.transport.loseConnection()


class ConnectProxy(Protocol):
    """CONNECT host:port, then bytes both ways. `seen` records the CONNECT lines;
    `required` (a Proxy-Authorization value) refuses others with 407."""

    seen: list[str] = []
    required: str | None = None

    def connectionMade(self) -> None:
        self.buffer, self.relay = b"", None

    def dataReceived(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.transport.write(data)
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        head, rest = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        ConnectProxy.seen.append(lines[0])
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        if self.required and headers.get("Proxy-Authorization") != self.required:
            self.transport.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
            self.transport.loseConnection()
            return
        host, port = lines[0].split()[1].rsplit(":", 1)
        self.transport.pauseProducing()
        relay = _Relay(self)
        connectProtocol(TCP4ClientEndpoint(reactor, host, int(port)), relay).addCallback(
            lambda _: rest and relay.transport.write(rest))


@pytest.fixture
def proxy():
    ConnectProxy.seen, ConnectProxy.required = [], None
    port = reactor.listenTCP(0, Factory.forProtocol(ConnectProxy), interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}"
    port.stopListening()


def through(proxy_url: str, netpolicy: NetPolicy | None = None) -> HttpCollector:
    collector = HttpCollector(reactor=reactor, settings=SimpleNamespace(proxy_url=proxy_url))
    collector.netpolicy = netpolicy
    return collector


@pytest_twisted.ensureDeferred
async def test_http_and_https_checks_go_through_the_proxy(web, proxy):
    got = by_name(await collect(through(proxy), {"url": web.http + "/ok"}))
    assert got["status_code"].value == 200 and got["body_size"].value == 1234
    tls = by_name(await collect(through(proxy), {"url": web.https + "/ok", "insecure": True}))
    assert tls["status_code"].value == 200 and 29.99 < tls["tls_expiry_days"].value <= 30.0
    hosts = [line.split()[1] for line in ConnectProxy.seen]
    assert hosts == [web.http.removeprefix("http://"), web.https.removeprefix("https://")]


@pytest_twisted.ensureDeferred
async def test_proxy_credentials_and_a_refusal(web, proxy):
    ConnectProxy.required = "Basic dTpwQHNz"  # u:p@ss
    refused = through(proxy)
    with pytest.raises(CollectError) as caught:
        await collect(refused, {"url": web.http + "/ok"})
    assert "the proxy refused CONNECT" in str(caught.value) and "407" in str(caught.value)
    allowed = through(proxy.replace("http://", "http://u:p%40ss@"))
    assert by_name(await collect(allowed, {"url": web.http + "/ok"}))["status_code"].value == 200


@pytest_twisted.ensureDeferred
async def test_blocked_nets_still_apply_behind_the_proxy(web, proxy):
    public = NetPolicy("auto")
    public.server_said({"x-taskd-agent-public": "true"})
    with pytest.raises(CollectError, match=r"127\.0\.0\.1 is blocked by blocked-nets"):
        await collect(through(proxy, public), {"url": web.http + "/ok"})
    assert ConnectProxy.seen == []  # the proxy was never asked


def test_the_setting_is_checked_and_never_shown(tmp_path):
    settings = load_agent_settings(str(tmp_path / "absent.ini"), env={"TASKAGENT_PROXY_URL": "http://u:pw@proxy:3128"})
    assert settings.proxy_url == "http://u:pw@proxy:3128" and "pw" not in repr(settings)
    from taskd.config import ConfigError
    with pytest.raises(ConfigError, match="proxy-url"):
        load_agent_settings(str(tmp_path / "absent.ini"), env={"TASKAGENT_PROXY_URL": "socks5://proxy:1080"})
