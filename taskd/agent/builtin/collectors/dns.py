"""The ``dns`` collector: one query to one name server, counting the answers.

The server asked is the configured one, not the system resolver, so the check measures
that server. NXDOMAIN is an answer (``answers`` = 0: the name is gone, which is data);
no answer in time, or a SERVFAIL/REFUSED/... reply, is the run's error. Over UDP a
truncated reply is asked again over TCP, as resolvers do.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Mapping

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.error import ConnectionLost
from twisted.names import client, dns

from taskd.agent.builtin.collector import CollectError, Collector, Sample, TaskInfo
from taskd.agent.builtin.collectors.common import Field, catalog, parse_fields, run, series

METRICS = ("answers", "query_time")
RECORD_TYPES = ("A", "AAAA", "CNAME", "MX", "NS", "TXT", "SOA", "PTR", "SRV")
RCODES = {dns.EFORMAT: "FORMERR", dns.ESERVER: "SERVFAIL", dns.ENOTIMP: "NOTIMP", dns.EREFUSED: "REFUSED"}


def _name(value: str) -> str:
    name = value.strip()
    if not name or any(c.isspace() for c in name) or ".." in name or len(name.rstrip(".")) > 253:
        raise ValueError("must be a domain name")
    try:
        name.encode("idna")
    except UnicodeError:
        raise ValueError("must be a domain name") from None
    return name


def _type(value: str) -> str:
    if value.upper() not in RECORD_TYPES:
        raise ValueError(f"must be one of {', '.join(RECORD_TYPES)}")
    return value.upper()


def split_server(value: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address -> (host, port); port 53 by default."""
    text = value.strip()
    host, port = text, "53"
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError("must be host or host:port")
        port = rest[1:] or "53"
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise ValueError("must be host or host:port")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("port must be 1-65535")
    return host, int(port)


def _protocol(value: str) -> str:
    if value.lower() not in ("udp", "tcp"):
        raise ValueError("must be udp or tcp")
    return value.lower()


FIELDS = (
    Field("name", "string", required=True, check=_name),
    Field("type", "string", default="A", check=_type),
    Field("server", "string", required=True, check=split_server),
    Field("protocol", "string", default="udp", check=_protocol),
)


@dataclass(frozen=True)
class DnsConfig:
    name: str
    type: str
    server: tuple[str, int]
    protocol: str
    timeout: float

    @property
    def query(self) -> dns.Query:
        name = self.name.rstrip(".")
        if self.type == "PTR":  # an address asks for its reverse name
            try:
                name = ipaddress.ip_address(name).reverse_pointer
            except ValueError:
                pass
        return dns.Query(name.encode("idna"), getattr(dns, self.type), dns.IN)


class _TcpController:
    """What a DNSProtocol reports to; a hang-up fails the queries still waiting."""

    def connectionMade(self, protocol: dns.DNSProtocol) -> None:
        pass

    def connectionLost(self, protocol: dns.DNSProtocol) -> None:
        for d, call in list(protocol.liveMessages.values()):
            if call.active():
                call.cancel()
            if not d.called:
                d.errback(ConnectionLost())
        protocol.liveMessages.clear()

    def messageReceived(self, message: dns.Message, protocol: Any, address: Any = None) -> None:
        pass  # not an answer to a query of ours


class DnsCollector(Collector):
    """taskType ``dns``: answers (count of answer records) and query_time (ms)."""

    name = "dns"
    namespace = "/raintank/apps/dns"
    catalog = catalog(name, METRICS, FIELDS)

    def parse_config(self, config: Mapping[str, Any], task: TaskInfo) -> DnsConfig:
        return DnsConfig(**parse_fields(self.namespace, config, FIELDS, task))

    async def collect(self, config: DnsConfig, task: TaskInfo) -> list[Sample]:
        host, port = config.server
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        what = f"{config.type} {config.name} @{where}/{config.protocol}"
        return await run(self.reactor, config.timeout, what, self._query(config, task, what))

    async def _query(self, cfg: DnsConfig, task: TaskInfo, what: str) -> list[Sample]:
        host, port = cfg.server
        net = self.netpolicy
        if net is not None and net.active:  # the server asked is one this agent may reach
            host = (await net.resolve(self.reactor, host, port))[0]
        elif not (isIPAddress(host) or isIPv6Address(host)):
            host = await self.reactor.resolve(host)  # UDP needs an address to send to
        start = self.reactor.seconds()
        if cfg.protocol == "udp":
            resolver = client.Resolver(servers=[(host, port)], reactor=self.reactor)
            message = await resolver.queryUDP([cfg.query], timeout=(cfg.timeout,))
            if message.trunc:
                message = await self._tcp(host, port, cfg)
        else:
            message = await self._tcp(host, port, cfg)
        elapsed = self.reactor.seconds() - start
        if message.rCode == dns.ENAME:
            count = 0
        elif message.rCode == dns.OK:
            count = len(message.answers)
        else:
            raise CollectError(f"{what}: server answered {RCODES.get(message.rCode, f'rcode {message.rCode}')}")
        return [Sample(series(self.name, task, "answers"), float(count)),
                Sample(series(self.name, task, "query_time"), elapsed * 1000, "ms")]

    async def _tcp(self, host: str, port: int, cfg: DnsConfig) -> dns.Message:
        endpoint = HostnameEndpoint(self.reactor, host, port, timeout=cfg.timeout)
        protocol = await connectProtocol(endpoint, dns.DNSProtocol(_TcpController(), reactor=self.reactor))
        try:
            return await protocol.query([cfg.query], timeout=cfg.timeout)
        finally:
            protocol.transport.loseConnection()
