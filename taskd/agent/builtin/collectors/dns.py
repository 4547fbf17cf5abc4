"""The ``dns`` collector: one query to one name server, counting and checking the answers.

The server asked is the configured one, not the system resolver, so the check measures
that server. By default NXDOMAIN is an answer (``answers`` = 0: the name is gone, which
is data); no answer in time, or a reply whose rcode is not in `valid_rcodes`, is the
run's error. `fail_if_answer_matches` / `_not_matches` (blackbox_exporter's names) check
the answer records as zone-file lines (``www.example.com 300 IN A 192.0.2.1``), and
`min_answers` / `max_answers` bound their count; a failed check still publishes the
run's measurements with `success` 0. Over UDP a truncated reply is asked again over TCP,
as resolvers do.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Any, Mapping

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.error import ConnectionLost
from twisted.names import client, dns

from taskd.agent.builtin.collector import CollectError, Collector, Sample, TaskInfo
from taskd.agent.builtin.collectors.common import Field, catalog, parse_fields, regex_list, run, series

METRICS = ("answers", "query_time", "success")
RECORD_TYPES = ("A", "AAAA", "CNAME", "MX", "NS", "TXT", "SOA", "PTR", "SRV")
RCODES = {dns.OK: "NOERROR", dns.EFORMAT: "FORMERR", dns.ESERVER: "SERVFAIL", dns.ENAME: "NXDOMAIN",
          dns.ENOTIMP: "NOTIMP", dns.EREFUSED: "REFUSED"}
RCODE_NAMES = {name: code for code, name in RCODES.items()}


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


def _rcodes(value: list) -> frozenset[int]:
    if not value:
        raise ValueError("must list at least one rcode")
    out = set()
    for i, item in enumerate(value):
        if not isinstance(item, str) or item.upper() not in RCODE_NAMES:
            raise ValueError(f"item {i} must be one of {', '.join(RCODE_NAMES)}")
        out.add(RCODE_NAMES[item.upper()])
    return frozenset(out)


def _count(value: int) -> int:
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


FIELDS = (
    Field("name", "string", required=True, check=_name),
    Field("type", "string", default="A", check=_type),
    Field("server", "string", required=True, check=split_server),
    Field("protocol", "string", default="udp", check=_protocol),
    Field("valid_rcodes", "list", default=frozenset({dns.OK, dns.ENAME}), check=_rcodes),
    Field("fail_if_answer_matches", "list", default=(), check=regex_list),
    Field("fail_if_answer_not_matches", "list", default=(), check=regex_list),
    Field("min_answers", "integer", default=0, check=_count),
    Field("max_answers", "integer", default=None, check=_count),
)


@dataclass(frozen=True)
class DnsConfig:
    name: str
    type: str
    server: tuple[str, int]
    protocol: str
    valid_rcodes: frozenset[int]
    fail_if_answer_matches: tuple[re.Pattern, ...]
    fail_if_answer_not_matches: tuple[re.Pattern, ...]
    min_answers: int
    max_answers: int | None
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
        return await run(self.reactor, config.timeout, what, self._query(config, task, what),
                         success=series(self.name, task, "success"))

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
        rcode = RCODES.get(message.rCode, f"rcode {message.rCode}")
        if message.rCode not in cfg.valid_rcodes:
            wanted = ", ".join(n for c, n in RCODES.items() if c in cfg.valid_rcodes)
            raise CollectError(f"{what}: server answered {rcode}, not one of valid_rcodes ({wanted})",
                               [Sample(series(self.name, task, "query_time"), elapsed * 1000, "ms"),
                                Sample(series(self.name, task, "success"), 0.0)])
        answers = message.answers if message.rCode == dns.OK else []
        samples = [Sample(series(self.name, task, "answers"), float(len(answers))),
                   Sample(series(self.name, task, "query_time"), elapsed * 1000, "ms")]
        failed = _check_answers(cfg, [record_line(rr) for rr in answers])
        if failed:
            raise CollectError(f"{what}: {failed}", [*samples, Sample(series(self.name, task, "success"), 0.0)])
        return [*samples, Sample(series(self.name, task, "success"), 1.0)]

    async def _tcp(self, host: str, port: int, cfg: DnsConfig) -> dns.Message:
        endpoint = HostnameEndpoint(self.reactor, host, port, timeout=cfg.timeout)
        protocol = await connectProtocol(endpoint, dns.DNSProtocol(_TcpController(), reactor=self.reactor))
        try:
            return await protocol.query([cfg.query], timeout=cfg.timeout)
        finally:
            protocol.transport.loseConnection()


def record_line(rr: dns.RRHeader) -> str:
    """An answer as a zone-file line: ``www.example.com 300 IN A 192.0.2.1``."""
    kind = dns.QUERY_TYPES.get(rr.type, f"TYPE{rr.type}")
    payload = rr.payload
    if isinstance(payload, (dns.Record_A, dns.Record_AAAA)):
        data = payload.dottedQuad() if isinstance(payload, dns.Record_A) else socket.inet_ntop(socket.AF_INET6,
                                                                                                payload.address)
    elif isinstance(payload, dns.Record_MX):
        data = f"{payload.preference} {payload.name}"
    elif isinstance(payload, dns.Record_SRV):
        data = f"{payload.priority} {payload.weight} {payload.port} {payload.target}"
    elif isinstance(payload, dns.Record_TXT):
        data = " ".join('"' + d.decode("utf-8", "replace") + '"' for d in payload.data)
    elif isinstance(payload, dns.Record_SOA):
        data = (f"{payload.mname} {payload.rname} {payload.serial} {payload.refresh} {payload.retry}"
                f" {payload.expire} {payload.minimum}")
    elif hasattr(payload, "name"):  # CNAME, NS, PTR
        data = str(payload.name)
    else:
        data = repr(payload)
    return f"{rr.name} {rr.ttl} IN {kind} {data}"


def _check_answers(cfg: "DnsConfig", lines: list[str]) -> str | None:
    if len(lines) < cfg.min_answers:
        return f"{len(lines)} answer(s), fewer than min_answers {cfg.min_answers}"
    if cfg.max_answers is not None and len(lines) > cfg.max_answers:
        return f"{len(lines)} answer(s), more than max_answers {cfg.max_answers}"
    for pattern in cfg.fail_if_answer_matches:
        for line in lines:
            if pattern.search(line):
                return f"answer {line!r} matches fail_if_answer_matches {pattern.pattern!r}"
    for pattern in cfg.fail_if_answer_not_matches:
        if not any(pattern.search(line) for line in lines):
            return f"no answer matches fail_if_answer_not_matches {pattern.pattern!r} (answers: {lines[:3]})"
    return None
