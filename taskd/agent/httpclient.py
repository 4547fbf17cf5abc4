"""The agent's HTTP client to Snap and tsdb-gw: a persistent connection pool that does not
log a "Starting factory" line per request (one per poll while the far side is down).

Built on public Twisted API only: an ``IAgentEndpointFactory`` doing what Agent's default
does (``HostnameEndpoint``; for https, ``optionsForClientTLS`` as the browser-like
policy) and switching off the connection factory's public ``noisy`` flag.
"""
from __future__ import annotations

from typing import Any

from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer


def quiet_http_client(reactor: Any) -> tuple[Any, Any]:
    """A treq ``HTTPClient`` on a persistent quiet pool, and the pool (to close at stop)."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    return HTTPClient(Agent.usingEndpointFactory(reactor, QuietEndpointFactory(reactor), pool=pool)), pool


class _QuietEndpoint:
    """Connects with the pool's factory made quiet: not a "Starting factory" log line
    per poll while Snap is down (``noisy`` is the factory's public switch)."""

    def __init__(self, endpoint: Any) -> None:
        self._endpoint = endpoint

    def connect(self, factory: Any) -> Any:
        factory.noisy = False
        return self._endpoint.connect(factory)


@implementer(IAgentEndpointFactory)
class QuietEndpointFactory:
    """``IAgentEndpointFactory`` as Agent's default (HostnameEndpoint, browser-like TLS
    for https), but with quiet connection factories."""

    def __init__(self, reactor: Any, tls: Any = None, timeout: float = 30.0) -> None:
        """`tls`: an IPolicyForHTTPS (default: the browser-like one); `timeout`: the
        connect timeout in seconds."""
        self.reactor = reactor
        self.tls = tls
        self.timeout = timeout

    def endpointForURI(self, uri: Any) -> Any:
        from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
        from twisted.internet.ssl import optionsForClientTLS

        endpoint = HostnameEndpoint(self.reactor, uri.host, uri.port, timeout=self.timeout)
        if uri.scheme == b"https":
            creator = (self.tls.creatorForNetloc(uri.host, uri.port) if self.tls is not None
                       else optionsForClientTLS(uri.host.decode("idna")))
            endpoint = wrapClientTLS(creator, endpoint)
        return _QuietEndpoint(endpoint)
