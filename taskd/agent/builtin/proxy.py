"""The agent's egress proxy (`proxy-url`): checks go through an HTTP proxy's CONNECT.

Where outbound traffic must leave through a proxy, the http collector tunnels every
check (http:// and https:// alike) with CONNECT; TLS runs end to end inside the tunnel,
so certificates are still checked against the target's name. `blocked-nets` still
applies: the target is resolved and checked here before the tunnel is asked for (the
proxy then resolves it again).
"""
from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from taskd.agent.builtin.netpolicy import BlockedAddress, NetPolicy
class TunnelEndpoint:
    """An IStreamClientEndpoint to host:port through an HTTP proxy's CONNECT (the agent's
    `proxy-url`): connects to the proxy, asks for the tunnel, and hands the connection to
    the caller's protocol once the proxy answers 2xx (a TLS endpoint wraps this one, so
    https goes end to end through the tunnel)."""

    def __init__(self, proxy: Any, host: str, port: int, authorization: str | None = None) -> None:
        self.proxy, self.host, self.port, self.authorization = proxy, host, port, authorization

    def connect(self, factory: Any) -> Deferred:
        factory.noisy = False
        tunnel: _Tunnel | None = None
        opened: Deferred | None = None

        def cancel(_: Deferred) -> None:  # the check timed out: drop the proxy connection too
            if opened is not None and not opened.called:
                opened.cancel()
            if tunnel is not None and tunnel.transport is not None:
                tunnel.transport.abortConnection()

        ready: Deferred = Deferred(cancel)
        where = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        tunnel = _Tunnel(where, factory, ready, self.authorization)
        opened = self.proxy.connect(_OneProtocol(tunnel))
        opened.addErrback(lambda f: None if ready.called else ready.errback(f))
        return ready


class _OneProtocol:
    noisy = False

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol

    def buildProtocol(self, addr: Any) -> Any:
        return self.protocol

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass


class _Tunnel:
    """CONNECT, then pass every byte to the inner protocol (and its loss)."""

    def __init__(self, where: str, factory: Any, ready: Deferred, authorization: str | None) -> None:
        self.where, self.factory, self.ready, self.authorization = where, factory, ready, authorization
        self.buffer = b""
        self.inner: Any = None
        self.transport: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        auth = f"Proxy-Authorization: {self.authorization}\r\n" if self.authorization else ""
        transport.write(f"CONNECT {self.where} HTTP/1.1\r\nHost: {self.where}\r\n{auth}\r\n".encode("ascii"))

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) > 16384:
                self._refused("an endless answer to CONNECT")
            return
        head, rest = self.buffer.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
        parts = status.split(" ", 2)
        if len(parts) < 2 or not parts[1].startswith("2"):
            self._refused(f"the proxy refused CONNECT {self.where}: {status[:100]}")
            return
        self.inner = self.factory.buildProtocol(self.transport.getPeer())
        self.inner.makeConnection(self.transport)
        if not self.ready.called:
            self.ready.callback(self.inner)
        if rest:
            self.inner.dataReceived(rest)

    def _refused(self, why: str) -> None:
        self.transport.abortConnection()
        if not self.ready.called:
            self.ready.errback(BlockedAddress(why))

    def connectionLost(self, reason: Any) -> None:
        if self.inner is not None:
            self.inner.connectionLost(reason)
        elif not self.ready.called:
            self.ready.errback(reason)


class ProxiedEndpoint:
    """host:port through the proxy's CONNECT. Where rules apply (blocked-nets active, or an
    ip_version asked), the host is resolved and checked here and the tunnel asked for the
    checked *address*, so the proxy cannot resolve it to somewhere else (a DNS rebind);
    otherwise by name (the ASCII form), as agents that cannot resolve outside names need."""

    def __init__(self, policy: NetPolicy, reactor: Any, host: str, port: int, timeout: float, family: str,
                 proxy_url: str) -> None:
        self.policy, self.reactor, self.host, self.port, self.timeout = policy, reactor, host, port, timeout
        self.family, self.proxy_url = family, proxy_url

    def connect(self, factory: Any) -> Deferred:
        return Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory: Any) -> Any:
        from base64 import b64encode
        from urllib.parse import unquote, urlsplit

        from twisted.internet.endpoints import HostnameEndpoint

        target = self.host.encode("idna").decode("ascii") if not self.host.isascii() else self.host
        if self.policy.active or self.family != "any":
            target = (await self.policy.resolve(self.reactor, self.host, self.port, self.family))[0]
        proxy = urlsplit(self.proxy_url)
        auth = None
        if proxy.username is not None:
            pair = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}".encode("utf-8")
            auth = "Basic " + b64encode(pair).decode("ascii")
        endpoint = HostnameEndpoint(self.reactor, proxy.hostname, proxy.port or 80, timeout=self.timeout)
        return await TunnelEndpoint(endpoint, target, self.port, auth).connect(factory)
