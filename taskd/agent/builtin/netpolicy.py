"""Which addresses the built-in collectors may reach (`blocked-nets`).

A public agent runs other orgs' tasks: without a rule, anyone with an API key could make
it fetch http://169.254.169.254/ (the cloud's metadata and credentials), scan the
agent's LAN or reach services bound to its loopback, and read the answer back as
metrics and errors. So every built-in collector connects only to addresses it has
resolved itself and checked here (a name that resolves to a blocked address is refused,
and it is never resolved a second time, so a DNS rebind cannot slip past), for every
connection it makes, each redirect hop included.

`blocked-nets = auto` (the default) blocks `DEFAULT_BLOCKED` while the server says this
agent is public, and until it has said (a resumed task list runs before the first
connection); a private agent runs only its own org's tasks, so it blocks nothing.
An explicit CIDR list applies whatever the agent is; `none` blocks nothing.
"""
from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IResolutionReceiver
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

AUTO, NONE = "auto", "none"


class BlockedAddress(Exception):
    """A connection this agent may not make; the message names the address and rule
    (a run's error reads "GET http://x/: 10.1.2.3 is blocked by blocked-nets (...)")."""

#: What `auto` blocks on a public agent: (CIDR, why), each named in a refused run's error.
DEFAULT_BLOCKED: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "this network"),
    ("127.0.0.0/8", "loopback"),
    ("10.0.0.0/8", "RFC 1918 private"),
    ("172.16.0.0/12", "RFC 1918 private"),
    ("192.168.0.0/16", "RFC 1918 private"),
    ("169.254.0.0/16", "link-local, cloud metadata"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("198.18.0.0/15", "benchmarking"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("fe80::/10", "link-local"),
    ("fc00::/7", "unique local"),
)

_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known NAT64 prefix (RFC 6052)

#: The header the task-server answers an agent's websocket upgrade with (see docs/protocol.md).
PUBLIC_HEADER = "x-taskd-agent-public"


def parse_blocked_nets(text: str) -> str:
    """The `blocked-nets` value normalised: `auto`, `none`, or comma-separated CIDRs.
    Raises ValueError naming the entry that is not a network."""
    value = text.strip().lower()
    if value in (AUTO, NONE, ""):
        return value or NONE
    nets = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        try:
            nets.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValueError(f"{item!r} is not a network (CIDR such as 10.0.0.0/8 or fc00::/7),"
                             " nor auto or none") from None
    return ",".join(nets) or NONE


class NetPolicy:
    """The addresses the collectors may not connect to, for this agent as it is now."""

    def __init__(self, setting: str = NONE) -> None:
        self.setting = parse_blocked_nets(setting)
        self.public: bool | None = None  # as the server last said (None: not yet)
        self._explicit: tuple[tuple[Network, str], ...] = tuple(
            (ipaddress.ip_network(cidr), "blocked-nets") for cidr in self.setting.split(",")
        ) if self.setting not in (AUTO, NONE) else ()
        self._default = tuple((ipaddress.ip_network(cidr), why) for cidr, why in DEFAULT_BLOCKED)

    def server_said(self, headers: dict[str, Any]) -> None:
        """The upgrade answer's headers: whether the server says this agent is public.
        A server that does not say (an older one) leaves `auto` blocking."""
        value = headers.get(PUBLIC_HEADER)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        self.public = None if value is None else str(value).strip().lower() == "true"

    @property
    def rules(self) -> tuple[tuple[Network, str], ...]:
        if self.setting == AUTO:
            return () if self.public is False else self._default
        return self._explicit

    @property
    def active(self) -> bool:
        return bool(self.rules)

    def blocked_by(self, address: str) -> str | None:
        """The rule that blocks `address` ("10.0.0.0/8, RFC 1918 private"), or None."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
        elif isinstance(ip, ipaddress.IPv6Address) and ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)  # 64:ff9b::10.0.0.1 reaches 10.0.0.1
        for net, why in self.rules:
            if ip.version == net.version and ip in net:
                return f"{net}, {why}"
        return None

    def check(self, address: str) -> None:
        rule = self.blocked_by(address)
        if rule is not None:
            raise BlockedAddress(f"{address} is blocked by blocked-nets ({rule})")

    async def resolve(self, reactor: Any, host: str, port: int, family: str = "any") -> list[str]:
        """The addresses of `host` this agent may connect to, in resolver order (`family`
        "4" or "6": of that IP version only); a BlockedAddress naming the rule when every
        one is blocked."""
        if isIPAddress(host) or isIPv6Address(host):
            addresses = [host]
        else:
            addresses = await resolve_host(reactor, host, port)
        if family in ("4", "6"):
            addresses = [a for a in addresses if (":" in a) == (family == "6")]
            if not addresses:
                raise BlockedAddress(f"{host} has no IPv{family} address (ip_version {family})")
        if not self.rules:  # (NO_RULES: every check of an agent without blocked-nets)
            return addresses
        allowed = [a for a in addresses if self.blocked_by(a) is None]
        if not allowed:
            first = addresses[0]
            raise BlockedAddress(f"{host} resolves to {first}, blocked by blocked-nets ({self.blocked_by(first)})"
                               if first != host else f"{host} is blocked by blocked-nets ({self.blocked_by(first)})")
        return allowed


#: A policy that blocks nothing: for the checked-connection path (an `ip_version` asked)
#: on an agent with no rules.
NO_RULES = NetPolicy("none")


@implementer(IResolutionReceiver)
class _Addresses:
    def __init__(self) -> None:
        self.done: Deferred[list[str]] = Deferred()
        self.found: list[str] = []

    def resolutionBegan(self, resolution: Any) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        if address.host not in self.found:
            self.found.append(address.host)

    def resolutionComplete(self) -> None:
        if not self.done.called:  # a run that timed out cancelled the wait
            self.done.callback(self.found)


async def resolve_host(reactor: Any, host: str, port: int) -> list[str]:
    """Every address of `host` (A and AAAA), through the reactor's non-blocking resolver."""
    from twisted.internet.error import DNSLookupError

    receiver = _Addresses()
    reactor.nameResolver.resolveHostName(receiver, host, portNumber=port)
    found = await receiver.done
    if not found:
        raise DNSLookupError(host)
    return found


async def connect_checked(policy: NetPolicy, reactor: Any, host: str, port: int, factory: Any,
                          timeout: float, family: str = "any") -> Any:
    """Connect `factory` to the first of `host`'s allowed addresses that answers (each
    tried in turn, as HostnameEndpoint would, but only ever by address)."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
    from twisted.internet.error import ConnectError

    last: Exception | None = None
    for address in await policy.resolve(reactor, host, port, family):
        kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        try:
            return await kind(reactor, address, port, timeout=timeout).connect(factory)
        except ConnectError as exc:
            last = exc
    assert last is not None
    raise last


class CheckedEndpoint:
    """An IStreamClientEndpoint to host:port that resolves and checks before connecting."""

    def __init__(self, policy: NetPolicy, reactor: Any, host: str, port: int, timeout: float,
                 family: str = "any") -> None:
        self.policy, self.reactor, self.host, self.port, self.timeout = policy, reactor, host, port, timeout
        self.family = family

    def connect(self, factory: Any) -> Deferred:
        factory.noisy = False
        return Deferred.fromCoroutine(connect_checked(self.policy, self.reactor, self.host, self.port, factory,
                                                      self.timeout, self.family))


@implementer(IAgentEndpointFactory)
class CheckedEndpointFactory:
    """For twisted.web's Agent: every request's connection (each redirect hop's too)
    through `CheckedEndpoint`; https wrapped with `tls.creatorForNetloc`, so the
    certificate is still checked against the host name, not the address."""

    def __init__(self, policy: NetPolicy, reactor: Any, tls: Any, timeout: float, family: str = "any",
                 proxy_url: str = "") -> None:
        self.policy, self.reactor, self.tls, self.timeout, self.family = policy, reactor, tls, timeout, family
        self.proxy_url = proxy_url

    def endpointForURI(self, uri: Any) -> Any:
        from twisted.internet.endpoints import wrapClientTLS

        host = uri.host.decode("idna") if isinstance(uri.host, bytes) else uri.host
        if self.proxy_url:
            from taskd.agent.builtin.proxy import ProxiedEndpoint

            endpoint: Any = ProxiedEndpoint(self.policy, self.reactor, host.strip("[]"), uri.port, self.timeout,
                                            self.family, self.proxy_url)
        else:
            endpoint = CheckedEndpoint(self.policy, self.reactor, host.strip("[]"), uri.port, self.timeout,
                                       self.family)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self.tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint

