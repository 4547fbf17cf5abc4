"""The statsd client: line formats, batching, failures swallowed, and the no-op stand-in.

The network is a fake reactor (a UDP "port" that records datagrams or fails) and time is
a `task.Clock`; tests/integration/test_stats.py reads real datagrams from a real socket.
"""
from __future__ import annotations

import dataclasses
import socket
import errno
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import DNSLookupError
from twisted.internet.task import Clock

from taskd.agent.taskcache import TaskCache
from taskd.agent.settings import AgentSettings, load_agent_settings
from taskd.server.render import task_json
from taskd.server.settings import ServerSettings, load_server_settings
from taskd.stats import (
    NULL_STATS,
    GaugeReporter,
    NullStats,
    StatsClient,
    expand_prefix,
    format_line,
    make_stats,
    parse_stats_prefix,
    split_host_port,
)
from taskd.wire import framing
from taskd.wire.framing import Frame
from tests.unit.test_dispatch import Rig, make_task


class FakePort:
    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.datagrams: list[bytes] = []
        self.peer: tuple[str, int] | None = None
        self.fail: Exception | None = None
        self.closed = False

    def connect(self, host: str, port: int) -> None:
        self.peer = (host, port)

    def write(self, data: bytes) -> None:
        if self.fail is not None:
            raise self.fail
        self.datagrams.append(data)

    def stopListening(self) -> None:
        self.closed = True

    def lines(self) -> list[str]:
        return [line for d in self.datagrams for line in d.decode().split("\n")]


class FakeReactor:
    def __init__(self) -> None:
        self.ports: list[tuple[str, FakePort]] = []
        self.lookups: dict[str, Deferred] = {}

    def listenUDP(self, port: int, protocol: Any, interface: str = "") -> FakePort:
        udp = FakePort(protocol)
        protocol.transport = udp
        self.ports.append((interface, udp))
        return udp

    def resolve(self, name: str) -> Deferred:
        self.lookups[name] = Deferred()
        return self.lookups[name]

    @property
    def port(self) -> FakePort:
        return self.ports[-1][1]


def client(addr: str = "127.0.0.1:8125", **kw: Any) -> tuple[StatsClient, FakeReactor, Clock]:
    reactor, clock = FakeReactor(), Clock()
    stats = StatsClient(addr, reactor=reactor, clock=clock, **{"prefix": "raintank_apps.h.task_server", **kw})
    stats.startService()
    return stats, reactor, clock


# -- line formats ------------------------------------------------------------------------

def test_standard_lines_for_each_type():
    p = "raintank_apps.host1.task_server"
    assert format_line(p, "api.tasks_create", 1, "c") == "raintank_apps.host1.task_server.api.tasks_create:1|c"
    assert format_line(p, "agents.connected", 3, "g") == "raintank_apps.host1.task_server.agents.connected:3|g"
    assert format_line(p, "dispatch.latency", 2.5, "ms") == "raintank_apps.host1.task_server.dispatch.latency:2.5|ms"
    assert format_line(p, "dispatch.latency", 1.23456, "ms") == \
        "raintank_apps.host1.task_server.dispatch.latency:1.235|ms"
    assert format_line(p, "x", 4.0, "g") == "raintank_apps.host1.task_server.x:4|g"
    assert format_line(p, "x", True, "g") == "raintank_apps.host1.task_server.x:1|g"
    assert format_line("", "running", 1, "g") == "running:1|g"


def test_standard_flavour_drops_tags_and_datadog_appends_them():
    tags = {"event": "taskAdd", "source": "local"}
    assert format_line("p", "dispatch.latency", 3, "ms", tags) == "p.dispatch.latency:3|ms"
    assert format_line("p", "dispatch.latency", 3, "ms", tags, "datadog") == \
        "p.dispatch.latency:3|ms|#event:taskAdd,source:local"
    assert format_line("p", "c", 1, "c", None, "datadog") == "p.c:1|c"


def test_names_and_tags_cannot_break_the_line_protocol():
    assert format_line("p", "a:b|c", 1, "c") == "p.a_b_c:1|c"
    assert format_line("p", "n", 1, "c", {"st|a,t#us": "4 0:1|x,y"}, "datadog") == "p.n:1|c|#st_a_t_us:4_0:1_x_y"


def test_prefix_key_and_hostname_expansion():
    assert expand_prefix("raintank_apps.$hostname.task_agent", "web-1.example.com") == \
        "raintank_apps.web-1_example_com.task_agent"
    assert expand_prefix("fixed.prefix.", "h") == "fixed.prefix"
    assert parse_stats_prefix(" my.prefix. ") == "my.prefix"
    assert parse_stats_prefix("") == ""
    for bad in ("a b", "a:b", "a..b", "a|b", "a#b"):
        with pytest.raises(ValueError):
            parse_stats_prefix(bad)


def test_settings_defaults_and_keys(tmp_path):
    assert ServerSettings().stats_prefix == "raintank_apps.$hostname.task_server"
    assert AgentSettings().stats_prefix == "raintank_apps.$hostname.task_agent"
    assert ServerSettings().log_format == AgentSettings().log_format == "text"
    path = tmp_path / "s.ini"
    path.write_text("log-format = json\n[stats]\nenabled = true\nprefix = ops.$hostname\n")
    s = load_server_settings(str(path), env={})
    assert (s.log_format, s.stats_enabled, s.stats_prefix) == ("json", True, "ops.$hostname")
    a = load_agent_settings(None, env={"TASKAGENT_STATS_PREFIX": "agents.x", "TASKAGENT_LOG_FORMAT": "JSON"})
    assert (a.stats_prefix, a.log_format) == ("agents.x", "json")


def test_split_host_port():
    assert split_host_port("statsd:8125") == ("statsd", 8125)
    assert split_host_port("[::1]:9125") == ("::1", 9125)


# -- the no-op -------------------------------------------------------------------------

def test_stats_disabled_gives_a_no_op_that_accepts_every_call():
    stats = make_stats(ServerSettings(stats_enabled=False), "p")
    assert isinstance(stats, NullStats) and not stats.enabled
    stats.startService()
    stats.incr("a", 2, tags={"x": 1})
    stats.gauge("b", -1)
    stats.timing("c", 1.5, tags={"y": "z"})
    stats.flush()
    stats.stopService()
    assert NULL_STATS.errors == NULL_STATS.dropped == 0


def test_stats_enabled_gives_a_client_with_the_expanded_prefix():
    settings = dataclasses.replace(ServerSettings(), stats_enabled=True, statsd_addr="127.0.0.1:9",
                                   statsd_type="datadog", stats_prefix="ops.$hostname.srv")
    stats = make_stats(settings, "unused", FakeReactor())
    assert isinstance(stats, StatsClient) and stats.flavour == "datadog"
    # Datadog's convention: the host is a tag on every line, not part of the name.
    assert stats.prefix == "ops.srv" and stats.constant_tags == {"host": socket.gethostname()}
    assert (stats.host, stats.port) == ("127.0.0.1", 9)
    assert format_line(stats.prefix, "dispatch.latency", 3, "ms", {"event": "taskAdd"}, "datadog",
                       stats.constant_tags) == f"ops.srv.dispatch.latency:3|ms|#host:{socket.gethostname()},event:taskAdd"
    standard = make_stats(dataclasses.replace(settings, statsd_type="standard"), "unused", FakeReactor())
    assert standard.prefix == expand_prefix("ops.$hostname.srv") != "ops.srv"  # standard: the name keeps the host
    assert format_line(standard.prefix, "c", 1, "c", {"a": "b"}, "standard", {"host": "h"}) == f"{standard.prefix}.c:1|c"


# -- the client ------------------------------------------------------------------------

def test_metrics_are_batched_and_flushed_on_the_clock():
    stats, reactor, clock = client()
    assert reactor.port.peer == ("127.0.0.1", 8125)
    stats.incr("api.tasks_create")
    stats.gauge("agents.connected", 2)
    stats.timing("dispatch.latency", 4.25, tags={"event": "taskAdd"})
    assert reactor.port.datagrams == []  # not yet: waits for the flush interval
    clock.advance(stats.flush_interval)
    assert reactor.port.datagrams == [
        b"raintank_apps.h.task_server.api.tasks_create:1|c\n"
        b"raintank_apps.h.task_server.agents.connected:2|g\n"
        b"raintank_apps.h.task_server.dispatch.latency:4.25|ms"]
    clock.advance(stats.flush_interval)
    assert len(reactor.port.datagrams) == 1  # nothing queued: nothing sent


def test_datagrams_never_exceed_the_limit():
    stats, reactor, clock = client(max_datagram=100)
    for i in range(20):
        stats.incr(f"counter_{i:02d}")
    clock.advance(stats.flush_interval)
    sent = reactor.port.datagrams
    assert len(sent) > 1 and all(len(d) <= 100 for d in sent)
    assert reactor.port.lines() == [f"raintank_apps.h.task_server.counter_{i:02d}:1|c" for i in range(20)]


def test_a_full_datagram_is_sent_at_once():
    stats, reactor, clock = client(max_datagram=120)
    stats.incr("a" * 50)
    assert reactor.port.datagrams == []
    stats.incr("b" * 50)  # would not fit with the first: the first goes now
    assert len(reactor.port.datagrams) == 1


def test_negative_gauge_is_set_to_zero_first():
    stats, reactor, clock = client(prefix="")
    stats.gauge("g", -3)
    stats.flush()
    assert reactor.port.lines() == ["g:0|g", "g:-3|g"]


def test_send_errors_are_swallowed_and_counted():
    stats, reactor, clock = client()
    reactor.port.fail = OSError(errno.ENOBUFS, "No buffer space available")
    stats.incr("a")
    stats.incr("b")
    stats.flush()  # must not raise
    assert stats.errors == 1 and stats.dropped == 2
    reactor.port.protocol.connectionRefused()  # ICMP port unreachable for an earlier datagram
    assert stats.errors == 2
    reactor.port.fail = None
    stats.incr("c")
    stats.flush()
    assert reactor.port.lines() == ["raintank_apps.h.task_server.c:1|c"]


def test_a_socket_closed_by_an_icmp_error_is_reopened():
    """Twisted's epoll reactor closes a connected UDP socket on "port unreachable"."""
    stats, reactor, clock = client()
    first = reactor.port
    first.protocol.stopProtocol()  # what udp.Port.connectionLost calls
    assert stats.errors == 1
    stats.incr("while_closed")
    clock.advance(stats.flush_interval)
    assert len(reactor.ports) == 1  # waits reopen_delay
    clock.advance(stats.reopen_delay)
    assert len(reactor.ports) == 2 and reactor.port.peer == ("127.0.0.1", 8125)
    stats.flush()
    assert reactor.port.lines() == ["raintank_apps.h.task_server.while_closed:1|c"]
    # Closed again at once (statsd still away): the waits double, up to retry_interval.
    waits = []
    for _ in range(7):
        reactor.port.protocol.stopProtocol()
        before = len(reactor.ports)
        waited = 0.0
        while len(reactor.ports) == before:
            clock.advance(stats.flush_interval)
            waited += stats.flush_interval
        waits.append(round(waited))
    assert waits == [2, 4, 8, 16, 30, 30, 30]
    clock.advance(61)  # a socket that lived a minute: statsd was back
    reactor.port.protocol.stopProtocol()
    clock.advance(stats.reopen_delay)
    assert reactor.port.peer is not None and stats._reopen_wait == stats.reopen_delay
    errors = stats.errors
    stats.stopService()  # closing it ourselves is not an error
    reactor.port.protocol.stopProtocol()
    assert stats.errors == errors


def test_the_queue_is_bounded_while_statsd_cannot_be_reached():
    stats, reactor, clock = client("statsd.invalid:8125", max_queued=5)
    assert reactor.ports == [] and "statsd.invalid" in reactor.lookups
    for i in range(8):
        stats.incr(f"c{i}")
    assert stats.dropped == 3
    reactor.lookups["statsd.invalid"].errback(DNSLookupError("statsd.invalid"))
    assert stats.errors == 1
    clock.advance(stats.flush_interval)
    assert reactor.ports == []  # not retried before retry_interval
    del reactor.lookups["statsd.invalid"]
    clock.advance(stats.retry_interval)
    reactor.lookups["statsd.invalid"].callback("10.1.2.3")  # resolved on the retry
    assert reactor.port.peer == ("10.1.2.3", 8125)
    assert reactor.port.lines() == [f"raintank_apps.h.task_server.c{i}:1|c" for i in range(5)]


def test_a_host_name_is_resolved_without_blocking_and_ipv6_gets_an_ipv6_socket():
    stats, reactor, clock = client("localhost:8125")
    stats.incr("early")
    reactor.lookups["localhost"].callback("127.0.0.1")
    assert reactor.port.peer == ("127.0.0.1", 8125)
    assert reactor.port.lines() == ["raintank_apps.h.task_server.early:1|c"]
    stats6, reactor6, _ = client("[::1]:8125")
    assert reactor6.ports[0][0] == "::" and reactor6.port.peer == ("::1", 8125)


def test_stopping_flushes_and_closes_the_socket():
    stats, reactor, clock = client()
    stats.incr("last")
    stats.stopService()
    assert reactor.port.lines() == ["raintank_apps.h.task_server.last:1|c"] and reactor.port.closed
    assert clock.getDelayedCalls() == []


def test_gauge_reporter_sends_running_and_collected_gauges_then_running_zero():
    stats, reactor, clock = client(prefix="")
    reporter = GaugeReporter(stats, clock, lambda: {"tasks.active": 3, "skip": None}, interval=10)
    reporter.startService()
    stats.flush()
    assert reactor.port.lines() == ["running:1|g", "tasks.active:3|g"]
    clock.advance(10)
    stats.flush()
    assert reactor.port.lines()[-2:] == ["running:1|g", "tasks.active:3|g"]
    reporter.stopService()
    assert reactor.port.lines()[-1] == "running:0|g"


# -- what the daemons count ------------------------------------------------------------

class Recorder:
    """A stats object that remembers every call."""

    enabled = True

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def incr(self, name: str, n: int = 1, tags: Any = None) -> None:
        self.calls.append(("c", name, n, tags))

    def gauge(self, name: str, value: float, tags: Any = None) -> None:
        self.calls.append(("g", name, value, tags))

    def timing(self, name: str, ms: float, tags: Any = None) -> None:
        self.calls.append(("ms", name, ms, tags))

    def of(self, kind: str, name: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == kind and c[1] == name]


def test_dispatch_latency_runs_from_the_event_to_the_frame_written():
    rig = Rig()
    try:
        rig.dispatcher.stats = stats = Recorder()
        reads = rig.db.hold(rig.db.routes.snapshot, early=False)  # each read runs when released
        rig.route(make_task(), 1)
        rig.events.publish("task.created", task_json(make_task()))  # received at t=0
        rig.clock.advance(0.25)                                     # the database read takes 250 ms
        reads.release()
        assert [e for e, _ in rig.transports[1].take()] == ["taskAdd"]
        assert stats.of("ms", "dispatch.latency") == [
            ("ms", "dispatch.latency", 250.0, {"event": "taskAdd", "source": "local"})]
        rig.remote("task.deleted", task_json(make_task()))  # from another server
        rig.db.drop_task(1)
        reads.release()
        assert stats.of("ms", "dispatch.latency")[-1] == (
            "ms", "dispatch.latency", 0.0, {"event": "taskRemove", "source": "remote"})
    finally:
        rig.dispatcher.stopService()


def test_agent_task_cache_counts_added_updated_removed_and_active():
    stats = Recorder()
    cache = TaskCache(lambda tasks: None, stats=stats)

    def frame(event: str, value: Any) -> Frame:
        return framing.decode(framing.encode_json(event, value))

    t1, t2, t3 = ({"id": i, "name": f"t{i}", "interval": 60} for i in (1, 2, 3))
    cache.handle(frame(framing.TASK_LIST, [t1, t2]))
    cache.handle(frame(framing.TASK_ADD, t3))
    cache.handle(frame(framing.TASK_UPDATE, {**t3, "interval": 30}))
    cache.handle(frame(framing.TASK_REMOVE, t1))
    cache.handle(frame(framing.TASK_REMOVE, t1))  # already gone: not counted
    cache.handle(frame(framing.TASK_LIST, [{**t2, "interval": 10}]))  # t3 gone, t2 changed
    counted = [(c[1], c[2]) for c in stats.calls if c[0] == "c"]
    assert counted == [("tasks.added", 2), ("tasks.added", 1), ("tasks.updated", 1), ("tasks.removed", 1),
                       ("tasks.removed", 1), ("tasks.updated", 1)]
    assert [c[2] for c in stats.of("g", "tasks.active")] == [2, 3, 3, 2, 1]
