"""The ``ping`` collector: `count` ICMP echo requests to a host, their round trips and loss.

The host is resolved (and checked against `blocked-nets`) once per run; the echoes go
out `SPACING` seconds apart and every reply that arrives before the run's timeout
counts. A run with at least one reply succeeds (loss is data, graphed as `loss_ratio`);
no reply at all fails the run, with `success` 0 and the counts still published. See
taskd.agent.builtin.icmp for the socket (unprivileged where Linux allows it, else raw).
"""
from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from typing import Any, Mapping

from twisted.internet import defer
from twisted.internet.task import deferLater

from taskd.agent.builtin.collector import CollectError, Collector, ConfigError, Sample, TaskInfo
from taskd.agent.builtin.collectors.common import Field, catalog, host_name, ip_version, parse_fields, run, series
from taskd.agent.builtin.icmp import NoIcmp, Pinger
from taskd.agent.builtin.netpolicy import NO_RULES

METRICS = ("sent", "received", "loss_ratio", "rtt_min", "rtt_avg", "rtt_max", "rtt_stddev", "success")
SPACING = 0.2  # seconds between two echo requests of one run
MAX_COUNT = 20

def _count(value: int) -> int:
    if not 1 <= value <= MAX_COUNT:
        raise ValueError(f"must be 1-{MAX_COUNT}")
    return value


FIELDS = (
    Field("host", "string", required=True, check=host_name),
    Field("count", "integer", default=3, check=_count),
    Field("ip_version", "string", default="any", check=ip_version),
)


@dataclass(frozen=True)
class PingConfig:
    host: str
    count: int
    ip_version: str
    timeout: float


class PingCollector(Collector):
    """taskType ``ping``: sent, received, loss_ratio, rtt_min/avg/max/stddev (ms), success."""

    name = "ping"
    namespace = "/raintank/apps/ping"
    catalog = catalog(name, METRICS, FIELDS)

    def __init__(self, *, reactor: Any, settings: Any) -> None:
        super().__init__(reactor=reactor, settings=settings)
        self._pinger: Pinger | None = None

    def parse_config(self, config: Mapping[str, Any], task: TaskInfo) -> PingConfig:
        cfg = PingConfig(**parse_fields(self.namespace, config, FIELDS, task))
        if (cfg.count - 1) * SPACING >= cfg.timeout:
            raise ConfigError(f"count: {cfg.count} echoes {SPACING:g}s apart do not fit in the timeout"
                              f" ({cfg.timeout:g}s); lower count or raise timeout")
        return cfg

    async def collect(self, config: PingConfig, task: TaskInfo) -> list[Sample]:
        outcome: dict[str, Any] = {"sent": 0, "rtts": []}
        try:
            await run(self.reactor, config.timeout, f"ping {config.host}", self._ping(config, outcome))
        except CollectError as exc:
            if "timeout after" not in str(exc) or not outcome["sent"]:
                raise CollectError(str(exc), self._samples(task, outcome, success=False)) from None
        if not outcome["rtts"]:
            raise CollectError(f"ping {config.host}: no reply to {outcome['sent']} echo request(s)"
                               f" within {config.timeout:g}s", self._samples(task, outcome, success=False))
        return self._samples(task, outcome, success=True)

    async def _ping(self, cfg: PingConfig, outcome: dict[str, Any]) -> None:
        net = self.netpolicy if self.netpolicy is not None and self.netpolicy.active else NO_RULES
        address = (await net.resolve(self.reactor, cfg.host, 0, cfg.ip_version))[0]
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        if self._pinger is None:
            self._pinger = Pinger(self.reactor)
        replies = []
        forget = []
        try:  # whatever ends the run (its timeout included), no waiter outlives it
            for i in range(cfg.count):
                if i:
                    await deferLater(self.reactor, SPACING, lambda: None)
                reply: defer.Deferred[float] = defer.Deferred()
                sent_at = self.reactor.seconds()
                try:
                    forget.append(self._pinger.send(family, address, os.urandom(16), reply.callback))
                except NoIcmp as exc:
                    raise CollectError(f"ping {cfg.host}: {exc}") from None
                except OSError as exc:
                    raise CollectError(f"ping {cfg.host}: cannot send to {address}: {exc.strerror or exc}") from None
                outcome["sent"] += 1
                replies.append(reply.addCallback(lambda arrival, t=sent_at: outcome["rtts"].append(arrival - t))
                               .addErrback(lambda f: f.trap(defer.CancelledError)))  # the run's timeout
            await defer.gatherResults(replies, consumeErrors=True)  # all answered, or the run's timeout
        finally:
            for f in forget:
                f()

    def _samples(self, task: TaskInfo, outcome: dict[str, Any], *, success: bool) -> list[Sample]:
        sent, rtts = outcome["sent"], [r * 1000.0 for r in outcome["rtts"]]

        def sample(metric: str, value: float, unit: str = "") -> Sample:
            return Sample(series(self.name, task, metric), float(value), unit)

        out = [sample("sent", sent), sample("received", len(rtts)),
               sample("loss_ratio", (1 - len(rtts) / sent) if sent else 1.0), sample("success", 1 if success else 0)]
        if rtts:
            avg = sum(rtts) / len(rtts)
            out += [sample("rtt_min", min(rtts), "ms"), sample("rtt_avg", avg, "ms"),
                    sample("rtt_max", max(rtts), "ms"),
                    sample("rtt_stddev", math.sqrt(sum((r - avg) ** 2 for r in rtts) / len(rtts)), "ms")]
        return out
