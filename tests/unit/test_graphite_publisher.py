"""GraphitePublisher on a MemoryReactorClock: the line format, queueing while
disconnected or paused, the bound and its log, reconnect backoff, the final flush."""
from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent
from twisted.python.failure import Failure

from taskd.agent.builtin.collector import Point
from taskd.agent.builtin.graphite import GraphitePublisher, carbon_line


def pts(n: int, start: int = 0) -> list[Point]:
    return [Point(1, f"m.{i}", float(i), 1500000000 + i, 10) for i in range(start, start + n)]


def sent(transport: StringTransport) -> list[str]:
    return transport.value().decode().splitlines()


class TopRng:
    def uniform(self, a: float, b: float) -> float:
        return b


def lines(events: list[dict], text: str = "") -> list[str]:
    out = [formatEvent(e) for e in events
           if str(e.get("log_namespace", "")).startswith("taskd.agent.builtin.graphite")]
    return [line for line in out if text in line]


@pytest.fixture
def reactor() -> MemoryReactorClock:
    return MemoryReactorClock()


def make(reactor: MemoryReactorClock, **kw: Any) -> GraphitePublisher:
    kw.setdefault("rng", TopRng())
    pub = GraphitePublisher(addr="carbon.example:2003", reactor=reactor, **kw)
    pub.startService()
    return pub


def connect(reactor: MemoryReactorClock) -> tuple[Any, StringTransport]:
    """Complete the latest connection attempt."""
    host, port, factory, timeout, _ = reactor.tcpClients[-1]
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def refuse(reactor: MemoryReactorClock) -> None:
    factory = reactor.tcpClients[-1][2]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))


def test_line_format():
    assert carbon_line(Point(1, "a.b", 1.5, 1500000000, 10)) == b"a.b 1.5 1500000000\n"
    assert carbon_line(Point(1, "a.b", 3, 1500000000, 10)) == b"a.b 3.0 1500000000\n"
    p = Point(1, "a b", -2.0, 7, 10, tags=("z=1", "host=web 01"))
    assert carbon_line(p) == b"a_b;host=web_01;z=1 -2.0 7\n"
    assert carbon_line(Point(1, "a", float("nan"), 7, 10)) is None
    assert carbon_line(Point(1, "", 1.0, 7, 10)) is None
    assert carbon_line(Point(1, "a", None, 7, 10)) is None  # type: ignore[arg-type]
    assert carbon_line(Point(1, "a", "n/a", 7, 10)) is None  # type: ignore[arg-type]


def test_points_that_cannot_be_written_are_counted_invalid_and_the_rest_of_the_call_still_goes(reactor):
    pub = make(reactor)
    _, transport = connect(reactor)
    pub.add([Point(1, "a", None, 7, 10), Point(1, b"bytes", 1.0, 7, 10),  # type: ignore[arg-type]
             Point(1, "b", "n/a", 7, 10), Point(1, "ok", 2, 7, 10)])  # type: ignore[arg-type]
    assert sent(transport) == ["ok 2.0 7"]
    assert (pub.published, pub.invalid) == (1, 3)


def test_writes_when_connected(reactor):
    pub = make(reactor)
    host, port, _, timeout, _ = reactor.tcpClients[0]
    assert (host, port, timeout) == ("carbon.example", 2003, 10.0)
    _, transport = connect(reactor)
    pub.add(pts(2))
    pub.add([Point(1, "bad", float("inf"), 1, 10)])
    assert sent(transport) == ["m.0 0.0 1500000000", "m.1 1.0 1500000001"]
    assert (pub.published, pub.invalid) == (2, 1)


def test_queued_while_disconnected_then_sent_in_order(reactor):
    pub = make(reactor)
    pub.add(pts(3))
    refuse(reactor)
    pub.add(pts(2, 3))
    assert pub.queued == 5
    reactor.advance(0.1)
    assert len(reactor.tcpClients) == 2
    _, transport = connect(reactor)
    assert [line.split()[0] for line in sent(transport)] == [f"m.{i}" for i in range(5)]
    assert pub.queued == 0 and pub.published == 5


def test_paused_by_the_transport_it_queues(reactor):
    pub = make(reactor)
    proto, transport = connect(reactor)
    assert transport.producer is proto and transport.streaming
    proto.pauseProducing()
    pub.add(pts(3))
    assert transport.value() == b"" and pub.queued == 3
    proto.resumeProducing()
    assert len(sent(transport)) == 3 and pub.queued == 0


def test_drops_above_the_bound_are_exact_and_logged_once_per_interval(reactor, logs):
    pub = make(reactor, queue_size=5, flush_interval=1.0)
    for _ in range(4):
        pub.add(pts(3))
    assert pub.queued == 5 and pub.dropped == 7
    assert lines(logs, "dropped") == []
    reactor.advance(1.0)
    assert [line for line in lines(logs, "dropped")] == [
        "dropped 7 metrics: queue full (bound 5); carbon at carbon.example:2003 is down or slow"]
    reactor.advance(1.0)
    assert len(lines(logs, "dropped")) == 1


def test_reconnect_backoff_is_capped_and_restarts_after_a_stable_connection(reactor, logs):
    pub = make(reactor, max_backoff=0.5)
    gaps = []
    for _ in range(5):
        refuse(reactor)
        gaps.append(round(pub._retry.getTime() - reactor.seconds(), 6))
        n = len(reactor.tcpClients)
        reactor.advance(gaps[-1])
        assert len(reactor.tcpClients) == n + 1
    assert gaps == [0.1, 0.2, 0.4, 0.5, 0.5]
    assert len(lines(logs, "cannot connect")) == 1  # once per outage, not per attempt
    proto, _ = connect(reactor)
    reactor.advance(30)
    proto.connectionLost(Failure(ConnectionDone()))
    reactor.advance(0.1)
    assert len(reactor.tcpClients) == 7  # reconnected after the first (0.1 s) delay again
    assert lines(logs, "connection lost")


def test_final_flush_writes_the_queue_and_closes(reactor, logs):
    pub = make(reactor)
    proto, transport = connect(reactor)
    proto.pauseProducing()
    pub.add(pts(4))
    done = pub.stopService()
    assert len(sent(transport)) == 4 and transport.disconnecting
    assert not done.called
    proto.connectionLost(Failure(ConnectionDone()))
    assert done.called and pub.lost == 0
    pub.add(pts(2))
    assert pub.lost == 2


def test_final_flush_connects_if_needed_and_gives_up_after_the_timeout(reactor, logs):
    pub = make(reactor, stop_timeout=2.0)
    refuse(reactor)
    pub.add(pts(3))
    done = pub.stopService()
    assert len(reactor.tcpClients) == 2  # tried at once, not after the backoff
    refuse(reactor)
    reactor.advance(1.0)
    refuse(reactor)
    reactor.advance(1.0)
    assert done.called and pub.lost == 3
    assert lines(logs, "3 metrics lost")


def test_final_flush_after_a_late_connect(reactor):
    pub = make(reactor)
    pub.add(pts(2))
    done = pub.stopService()
    proto, transport = connect(reactor)
    assert len(sent(transport)) == 2 and transport.disconnecting
    proto.connectionLost(Failure(ConnectionDone()))
    assert done.called and pub.published == 2 and pub.lost == 0
