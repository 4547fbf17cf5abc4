"""The ``tcp`` collector: can a TCP connection to host:port be made, and how fast.

A connect that fails (refused, unreachable, timeout) is the run's error, so the task's
status shows why; a connect that succeeds yields ``connect_time`` and ``success`` = 1.
The connection is closed at once; nothing is sent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol

from taskd.agent.builtin.collector import Collector, Sample, TaskInfo
from taskd.agent.builtin.collectors.common import Field, catalog, parse_fields, run, series
from taskd.agent.builtin.netpolicy import connect_checked

METRICS = ("connect_time", "success")


def _host(value: str) -> str:
    host = value.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise ValueError("must be a host name or IP address")
    return host


def _port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError("must be 1-65535")
    return value


FIELDS = (
    Field("host", "string", required=True, check=_host),
    Field("port", "integer", required=True, check=_port),
)


class _QuietFactory(Factory):
    """No "Starting factory" / "Stopping factory" lines: two per run would be most of an
    agent's log at 1,000 tcp tasks."""

    noisy = False
    protocol = Protocol


@dataclass(frozen=True)
class TcpConfig:
    host: str
    port: int
    timeout: float


class TcpCollector(Collector):
    """taskType ``tcp``: connect_time (ms) and success (1.0) of a TCP connect."""

    name = "tcp"
    namespace = "/raintank/apps/tcp"
    catalog = catalog(name, METRICS, FIELDS)

    def parse_config(self, config: Mapping[str, Any], task: TaskInfo) -> TcpConfig:
        return TcpConfig(**parse_fields(self.namespace, config, FIELDS, task))

    async def collect(self, config: TcpConfig, task: TaskInfo) -> list[Sample]:
        where = f"[{config.host}]" if ":" in config.host else config.host
        return await run(self.reactor, config.timeout, f"connect to {where}:{config.port}",
                         self._connect(config, task))

    async def _connect(self, cfg: TcpConfig, task: TaskInfo) -> list[Sample]:
        # An IP literal is connected to directly (HostnameEndpoint would "resolve" it in the
        # thread pool); a name goes through HostnameEndpoint, which resolves without
        # blocking and tries the IPv6/IPv4 addresses in turn.
        start = self.reactor.seconds()
        net = self.netpolicy
        if net is not None and net.active:  # resolved and checked here, connected by address
            protocol = await connect_checked(net, self.reactor, cfg.host, cfg.port, _QuietFactory(), cfg.timeout)
            return self._connected(protocol, start, task)
        if isIPAddress(cfg.host):
            endpoint: Any = TCP4ClientEndpoint(self.reactor, cfg.host, cfg.port, timeout=cfg.timeout)
        elif isIPv6Address(cfg.host):
            endpoint = TCP6ClientEndpoint(self.reactor, cfg.host, cfg.port, timeout=cfg.timeout)
        else:
            endpoint = HostnameEndpoint(self.reactor, cfg.host, cfg.port, timeout=cfg.timeout)
        start = self.reactor.seconds()
        return self._connected(await endpoint.connect(_QuietFactory()), start, task)

    def _connected(self, protocol: Any, start: float, task: TaskInfo) -> list[Sample]:
        elapsed = self.reactor.seconds() - start
        protocol.transport.loseConnection()
        return [Sample(series(self.name, task, "connect_time"), elapsed * 1000, "ms"),
                Sample(series(self.name, task, "success"), 1.0)]
