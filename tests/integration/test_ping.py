"""The ping collector (issue 14 item 2) for real on loopback: ICMP echo through the
socket this machine allows (its ping_group_range is "1 0", so a raw socket as root
here; an unprivileged datagram socket where the group is covered)."""
from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from taskd.agent.builtin.collector import CollectError, ConfigError, TaskInfo, load_collectors
from taskd.agent.builtin.collectors.ping import PingCollector
from taskd.agent.builtin.icmp import checksum, echo_request
from taskd.agent.builtin.netpolicy import NetPolicy

TASK = TaskInfo(id=9, name="Loopback", org_id=1, interval=10)


def ping(netpolicy: NetPolicy | None = None) -> PingCollector:
    collector = PingCollector(reactor=reactor, settings=SimpleNamespace())
    collector.netpolicy = netpolicy
    return collector


async def run(collector: PingCollector, config: dict):
    return {s.name.rsplit(".", 1)[1]: s for s in await collector.collect(collector.parse_config(config, TASK), TASK)}


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"] + (["::1"] if _has_ipv6_loopback() else []))
@pytest_twisted.ensureDeferred
async def test_loopback_answers_every_echo(host):
    got = await run(ping(), {"host": host, "count": 3, "ip_version": "6" if host == "::1" else "4"})
    assert (got["sent"].value, got["received"].value, got["loss_ratio"].value, got["success"].value) == (3, 3, 0, 1)
    assert 0 <= got["rtt_min"].value <= got["rtt_avg"].value <= got["rtt_max"].value < 1000
    assert got["rtt_avg"].unit == "ms" and got["rtt_stddev"].value >= 0


class SilentPinger:
    """Stands in for taskd.agent.builtin.icmp.Pinger (same `send` signature, checked
    below) where no host may be made to stay silent: this machine's only unanswered
    addresses are outside it. Answers the echoes listed in `answer`, by position."""

    def __init__(self, answer: set[int], clock) -> None:
        self.answer, self.clock, self.sent = answer, clock, 0

    def send(self, family, address, token, on_reply):
        self.sent += 1
        if self.sent in self.answer:
            self.clock.callLater(0.05, lambda: on_reply(self.clock.seconds()))
        return lambda: None


def test_the_silent_pinger_has_the_real_signature():
    import inspect
    from taskd.agent.builtin.icmp import Pinger
    assert list(inspect.signature(SilentPinger.send).parameters) == list(inspect.signature(Pinger.send).parameters)


@pytest.mark.parametrize("answered, received, fails", [(set(), 0, True), ({2}, 1, False)])
def test_unanswered_echoes_are_loss_and_none_answered_fails(answered, received, fails):
    from twisted.internet.task import Clock

    clock = Clock()
    collector = PingCollector(reactor=clock, settings=SimpleNamespace())
    collector._pinger = SilentPinger(answered, clock)
    cfg = collector.parse_config({"host": "127.0.0.1", "count": 3, "timeout": 2}, TASK)
    done = defer.ensureDeferred(collector.collect(cfg, TASK))
    for _ in range(30):
        clock.advance(0.1)
    outcome = []
    done.addBoth(outcome.append)
    [result] = outcome
    if fails:
        assert isinstance(result.value, CollectError)
        assert str(result.value) == "ping 127.0.0.1: no reply to 3 echo request(s) within 2s"
        samples = result.value.samples
    else:
        samples = result
    got = {s.name.rsplit(".", 1)[1]: s.value for s in samples}
    assert (got["sent"], got["received"], got["success"]) == (3, received, 0 if fails else 1)
    assert got["loss_ratio"] == pytest.approx(1 - received / 3)


@pytest_twisted.ensureDeferred
async def test_a_public_agent_may_not_ping_its_loopback():
    public = NetPolicy("auto")
    public.server_said({"x-taskd-agent-public": "true"})
    with pytest.raises(CollectError, match=r"127\.0\.0\.1 is blocked by blocked-nets \(127\.0\.0\.0/8, loopback\)"):
        await run(ping(public), {"host": "127.0.0.1"})


@pytest.mark.parametrize("config, says", [
    ({}, "host: required"),
    ({"host": "a b"}, "host: must be a host name or IP address"),
    ({"host": "h", "count": 0}, "count: must be 1-20"),
    ({"host": "h", "count": 20, "timeout": 1}, "count: 20 echoes 0.2s apart do not fit in the timeout"),
    ({"host": "h", "ip_version": "5"}, "ip_version: must be any, 4 or 6"),
])
def test_bad_config_names_the_key(config, says):
    with pytest.raises(ConfigError) as caught:
        ping().parse_config(config, TASK)
    assert says in str(caught.value)


def test_the_echo_request_checksums_to_zero_and_the_collector_is_registered():
    packet = echo_request(socket.AF_INET, 0x1234, 7, b"payload!")
    assert checksum(packet) == 0 and packet[0] == 8
    assert "ping" in load_collectors(reactor=reactor, settings=SimpleNamespace(ns1_api_url=""))
