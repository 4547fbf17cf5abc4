"""GraphitePublisher against a plain Twisted line receiver on loopback: lines arrive,
the publisher reconnects after the receiver restarts, the queue bound holds, stop flushes.
(A real carbon-cache is exercised in test_graphite_carbon.py.)"""
from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver

from taskd.agent.builtin.collector import Point
from taskd.agent.builtin.graphite import GraphitePublisher
from tests.waiting import until


def pts(n: int, start: int = 0) -> list[Point]:
    return [Point(1, f"m.{i}", float(i), 1500000000 + i, 10) for i in range(start, start + n)]


class _Line(LineReceiver):
    delimiter = b"\n"

    def connectionMade(self) -> None:
        self.factory.connections.add(self)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.connections.discard(self)
        if not self.factory.connections:
            waiting, self.factory.waiting = self.factory.waiting, []
            for d in waiting:
                d.callback(None)

    def lineReceived(self, line: bytes) -> None:
        self.factory.lines.append(line.decode())


class LineServer(Factory):
    """Records every line received; can stop (dropping connections) and restart on the same port."""

    protocol = _Line
    noisy = False

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.connections: set[_Line] = set()
        self.waiting: list[Deferred] = []
        self.port = 0
        self._listener: Any = None

    def start(self) -> LineServer:
        self._listener = reactor.listenTCP(self.port, self, interface="127.0.0.1")
        self.port = self._listener.getHost().port
        return self

    async def stop(self) -> None:
        if self._listener is not None:
            listener, self._listener = self._listener, None
            await maybeDeferred(listener.stopListening)
        if self.connections:
            d: Deferred = Deferred()
            self.waiting.append(d)
            for p in list(self.connections):
                p.transport.abortConnection()
            await d

    def names(self) -> list[str]:
        return [line.split()[0] for line in self.lines]


@pytest_twisted.async_yield_fixture
async def server():
    s = LineServer().start()
    yield s
    await s.stop()


@pytest_twisted.async_yield_fixture
async def make(server):
    made: list[GraphitePublisher] = []

    def factory(**kw: Any) -> GraphitePublisher:
        kw.setdefault("flush_interval", 0.05)
        kw.setdefault("max_backoff", 0.2)
        pub = GraphitePublisher(addr=f"127.0.0.1:{server.port}", **kw)
        pub.startService()
        made.append(pub)
        return pub

    yield factory
    for pub in made:
        if pub.running:
            await pub.stopService()


@pytest_twisted.ensureDeferred
async def test_lines_arrive(server, make):
    pub = make()
    pub.add([Point(1, "a.b", 1.5, 1500000000, 10, tags=("k2=v", "k1=v"))] + pts(2))
    await until(lambda: len(server.lines) == 3, what="3 lines")
    assert server.lines == ["a.b;k1=v;k2=v 1.5 1500000000", "m.0 0.0 1500000000", "m.1 1.0 1500000001"]


@pytest_twisted.ensureDeferred
async def test_reconnects_after_the_receiver_restarts(server, make):
    pub = make()
    await until(lambda: pub.connected, what="connected")
    pub.add(pts(3))
    await until(lambda: len(server.lines) == 3, what="first lines")
    await server.stop()
    await until(lambda: not pub.connected, what="the publisher noticing the lost connection")
    pub.add(pts(4, 3))
    await until(lambda: pub.connections == 1 and pub._attempt >= 2, what="failed reconnects")
    server.start()
    await until(lambda: len(server.lines) == 7, what="queued lines after the restart")
    assert server.names() == [f"m.{i}" for i in range(7)]
    assert pub.connections == 2 and pub.dropped == 0


@pytest_twisted.ensureDeferred
async def test_queue_bound_while_the_receiver_is_down(server, make):
    await server.stop()
    pub = make(queue_size=10)
    pub.add(pts(25))
    assert pub.dropped == 15 and pub.queued == 10
    server.start()
    await until(lambda: len(server.lines) == 10, what="the 10 queued lines")
    pub.add(pts(2, 100))
    await until(lambda: len(server.lines) == 12, what="later lines")
    assert server.names() == [f"m.{i}" for i in range(10)] + ["m.100", "m.101"]
    assert pub.dropped == 15


@pytest_twisted.ensureDeferred
async def test_stop_flushes_the_queue(server, make):
    pub = make()
    await until(lambda: pub.connected, what="connected")
    pub._protocol.pauseProducing()  # as if the socket buffer were full: lines stay queued
    pub.add(pts(500))
    assert pub.queued == 500
    await pub.stopService()
    await until(lambda: len(server.lines) == 500, what="all lines after stop")
    assert pub.lost == 0
