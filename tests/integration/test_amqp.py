"""AmqpTransport against the real RabbitMQ on 127.0.0.1:5672: two transports ("server A"
and "server B") in one reactor, each test on its own exchange (deleted afterwards).

Waiting is always "poll until a condition holds, with a deadline" (`until`); no fixed
waits and no elapsed-time bounds (a stopped transport is shown final by its connection loop
having ended).
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any

import pika
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import LogLevel, formatEvent
from twisted.protocols import portforward

from tests.integration.private_rabbit import PrivateRabbit
from tests.waiting import until
from taskd.server.amqp import AmqpTransport, backoff_delay, redact_url
from taskd.server.events import EVENT_TYPES, EventBus

HOST, PORT = "127.0.0.1", 5672
URL = f"amqp://guest:guest@{HOST}:{PORT}/"
RABBITMQCTL = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"


async def rabbitmqctl(*args: str) -> str:
    out, err, code = await getProcessOutputAndValue(RABBITMQCTL, args, env=dict(os.environ))
    assert code == 0, f"rabbitmqctl {' '.join(args)} failed: {out!r} {err!r}"
    return out.decode()


async def close_connections_of(server: Server) -> int:
    """Close (broker side) every connection whose connection_name is `server`'s."""
    out = await rabbitmqctl("list_connections", "--no-table-headers", "pid", "client_properties")
    pids = [line.split("\t", 1)[0] for line in out.splitlines()
            if f'{{"connection_name","taskd {server.id}"}}' in line]
    for pid in pids:
        await rabbitmqctl("close_connection", pid, "test cut")
    return len(pids)


def blocking(url: str = URL) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(url))


def delete_queue(name: str, url: str = URL) -> None:
    conn = blocking(url)
    try:
        conn.channel().queue_delete(name)
    except pika.exceptions.ChannelClosedByBroker as exc:
        assert exc.reply_code == 404, exc  # gone already
    finally:
        if conn.is_open:
            conn.close()


def event(type_: str, payload: Any, source: str = "test") -> dict:
    return {"type": type_, "timestamp": "2026-01-01T00:00:00.000000Z", "payload": payload,
            "source": source, "attempts": 0}


class Server:
    """One transport plus what its on_event received."""

    def __init__(self, label: str, exchange: str, url: str = URL, *, broker: str = URL,
                 instance: str = "", **kwargs: Any) -> None:
        self.id = instance or f"{label}-{uuid.uuid4().hex[:8]}"
        self.broker = broker  # the broker itself, for clean-up (`url` may be a proxy)
        self.received: list[dict] = []
        self.t = AmqpTransport(url=url, exchange=exchange, instance_id=self.id,
                               on_event=self._on_event, reactor=reactor, **kwargs)

    def _on_event(self, ev: dict) -> None:
        self.received.append(ev)
        if ev["payload"] == "boom":
            raise RuntimeError("handler failure (expected by the test)")

    def publish(self, type_: str, payload: Any) -> None:
        self.t.publish(event(type_, payload, source=self.id))

    def seqs(self, source: Server) -> list[int]:
        return [e["payload"]["seq"] for e in self.received
                if e["source"] == source.id and isinstance(e["payload"], dict)]


@pytest.fixture(scope="session", autouse=True)
def broker() -> None:
    try:
        blocking().close()
    except Exception as exc:
        pytest.fail(f"RabbitMQ at {URL} is required (rabbitmq-server -detached): {exc!r}")


@pytest.fixture
def exchange():
    name = f"taskd-test-{uuid.uuid4().hex[:12]}"
    yield name
    conn = blocking()
    conn.channel().exchange_delete(name)
    conn.close()


def lines_of(logs: list[dict], server: Server, text: str = "") -> list[str]:
    """What `server` logged at info level or above (debug shows every retry)."""
    return [formatEvent(e) for e in logs if e.get("log_source") is server.t
            and e["log_level"] >= LogLevel.info and text in formatEvent(e)]


@pytest_twisted.async_yield_fixture
async def servers(exchange):
    """Factory of started Servers on this test's exchange; all stopped afterwards."""
    made: list[Server] = []

    def make(label: str, **kwargs: Any) -> Server:
        kwargs.setdefault("max_backoff", 1.0)
        server = Server(label, exchange, **kwargs)
        server.t.startService()
        made.append(server)
        return server

    yield make
    for server in made:
        if server.t.running:
            await server.t.stopService()
    for server in made:  # durable queues outlive their server: leave none on the broker
        delete_queue(server.t.queue, url=server.broker)


def test_redact_url_and_backoff():
    assert redact_url("amqp://u:s3cret@h:5672/v") == "amqp://u:***@h:5672/v"
    assert redact_url("amqp://h/") == "amqp://h/"
    delays = [backoff_delay(n, 30.0) for n in range(40)]
    assert 0.25 <= delays[0] <= 0.5 and all(0 < d <= 30.0 for d in delays)
    assert min(delays[10:]) >= 15.0  # capped, with jitter below the cap


@pytest_twisted.ensureDeferred
async def test_event_reaches_other_server_and_self_with_routing_key(servers, exchange):
    a, b = servers("A"), servers("B")
    await until(lambda: a.t.connected and b.t.connected, what="A and B connected")
    probe = blocking()
    ch = probe.channel()
    queue = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(queue, exchange, routing_key="agent.online")
    try:
        sent = [event(t, {"id": i, "name": "n\u00e9", "orgId": 1}, a.id)
                for i, t in enumerate(EVENT_TYPES)]
        for ev in sent:
            a.t.publish(ev)
        await until(lambda: len(b.received) == len(sent) and len(a.received) == len(sent))
        assert b.received == sent and a.received == sent  # body intact, own events too
        assert all(e["source"] == a.id for e in a.received)
        got: list = []
        await until(lambda: got.append(ch.basic_get(queue, auto_ack=True)) or got[-1][0])
        method, props, body = got[-1]
        assert method.routing_key == "agent.online"
        assert props.content_type == "application/json" and props.delivery_mode == 2
        assert json.loads(body.decode("utf-8")) == sent[EVENT_TYPES.index("agent.online")]
        assert ch.basic_get(queue, auto_ack=True)[0] is None  # only the bound key routed
        await until(lambda: a.t.pending == 0, what="all confirmed")
    finally:
        probe.close()


@pytest_twisted.ensureDeferred
async def test_order_preserved_for_200_events(servers):
    a, b = servers("A"), servers("B")
    await until(lambda: a.t.connected and b.t.connected)
    for seq in range(200):
        a.publish("task.updated", {"seq": seq})
    await until(lambda: len(b.seqs(a)) >= 200)
    assert b.seqs(a) == list(range(200))


@pytest_twisted.ensureDeferred
async def test_connection_cut_while_publishing_loses_nothing(servers, logs):
    a, b = servers("A", max_backoff=2.0), servers("B")
    await until(lambda: a.t.connected and b.t.connected)
    cut: list[int] = []
    for seq in range(100):
        a.publish("task.created", {"seq": seq})
        if seq == 30:
            ensureDeferred(close_connections_of(a)).addCallback(cut.append)
        if seq >= 70:  # the cut happens while events 31..99 are still being published
            await until(lambda: cut, what="rabbitmqctl close_connection")
        # one event at a time: confirmed, or in flight when the connection goes
        await until(lambda: a.t.pending == 0 or not a.t.connected, what=f"event {seq} confirmed or connection lost")
    assert cut == [1]
    await until(lambda: set(b.seqs(a)) >= set(range(100)), what="all 100 events at B")
    await until(lambda: a.t.connected and a.t.pending == 0, what="A reconnected by itself")
    assert len(lines_of(logs, a, "connection lost")) == 1
    assert "CONNECTION_FORCED" in lines_of(logs, a, "connection lost")[0]
    assert len(lines_of(logs, a, "connected to")) == 2


class _GateServer(portforward.ProxyServer):
    def dataReceived(self, data: bytes) -> None:
        if not self.factory.swallow:
            super().dataReceived(data)


class _Gate(portforward.ProxyFactory):
    """TCP proxy to the broker that can refuse new connections (`is_open`), swallow
    what its clients send (`swallow`) and cut every connection (`cut`)."""

    is_open, swallow = True, False

    def __init__(self, port: int = PORT) -> None:
        super().__init__(HOST, port)
        self.conns: list[_GateServer] = []

    def buildProtocol(self, addr: Any) -> Any:
        if not self.is_open:
            return None
        proto = _GateServer()
        proto.factory = self
        self.conns.append(proto)
        return proto

    def cut(self) -> None:
        conns, self.conns = self.conns, []
        for proto in conns:
            proto.transport.abortConnection()


@pytest_twisted.async_yield_fixture
async def gate():
    """(the proxy, an amqp URL that goes through it)."""
    proxy = _Gate()
    port = reactor.listenTCP(0, proxy, interface=HOST)
    yield proxy, f"amqp://guest:guest@{HOST}:{port.getHost().port}/"
    proxy.is_open, proxy.swallow = True, False
    await port.stopListening()
    proxy.cut()


@pytest_twisted.ensureDeferred
async def test_unconfirmed_events_are_resent_after_connection_death(servers, gate, logs):
    proxy, a_url = gate
    a, b = servers("A", url=a_url), servers("B")
    await until(lambda: a.t.connected and b.t.connected)
    proxy.swallow = True  # what A sends now never reaches the broker: no confirms
    for seq in range(10):
        a.publish("task.created", {"seq": seq})
    b.publish("agent.online", {"seq": 100})  # the broker -> A direction still works
    await until(lambda: a.seqs(b) == [100])
    assert a.t.pending == 10 and b.seqs(a) == []
    proxy.swallow = False
    proxy.cut()
    await until(lambda: b.seqs(a) == list(range(10)), what="the 10 events resent to B")
    await until(lambda: a.t.connected and a.t.pending == 0)
    assert "10 events unconfirmed" in lines_of(logs, a, "connection lost")[0]


@pytest_twisted.ensureDeferred
async def test_nacked_events_are_resent_with_backoff(servers, exchange, logs):
    a, b = servers("A"), servers("B")
    await until(lambda: a.t.connected and b.t.connected)
    probe = blocking()  # a full queue that refuses more: the broker nacks A's publishes
    ch = probe.channel()
    queue = ch.queue_declare("", exclusive=True, arguments={
        "x-max-length": 1, "x-overflow": "reject-publish"}).method.queue
    ch.queue_bind(queue, exchange, routing_key="#")
    try:
        for seq in range(3):
            a.publish("task.created", {"seq": seq})
        await until(lambda: lines_of(logs, a, "nacked"), what="a nack")
        # 1 and 2 are refused; 0 too if its confirm (after the broker's disk write for
        # the durable queues) was still on its way when the nack closed the channel
        assert 2 <= a.t.pending <= 3 and a.t.connected
    finally:
        probe.close()  # the refusing queue goes away: the next resend is confirmed
    await until(lambda: a.t.pending == 0, what="resent events confirmed")
    first_seen = list(dict.fromkeys(b.seqs(a)))
    assert first_seen == [0, 1, 2]  # duplicates are allowed, order of first arrival kept
    assert len(lines_of(logs, a, "nacked")) == 1 and a.t.connected


@pytest_twisted.async_yield_fixture(scope="module")
async def private_broker():
    """A RabbitMQ node of this module's own, to restart (the shared one never is)."""
    rabbit = PrivateRabbit()
    await rabbit.start()
    yield rabbit
    await rabbit.stop()


@pytest_twisted.ensureDeferred
async def test_broker_restart_buffers_and_delivers(servers, private_broker, logs):
    """Events published while the broker is down, and events waiting in a server's queue
    when the broker goes down, all arrive once it is back, whoever reconnects first."""
    url = private_broker.url
    a = servers("A", url=url, broker=url, max_backoff=1.0)
    b = servers("B", url=url, broker=url, max_backoff=1.0)
    await until(lambda: a.t.connected and b.t.connected)
    a.publish("task.created", {"seq": -1})
    await until(lambda: b.seqs(a) == [-1] and a.t.pending == 0)
    await private_broker.ctl("stop_app")
    try:
        await until(lambda: not a.t.connected and not b.t.connected, what="both lost")
        for seq in range(20):
            a.publish("task.updated", {"seq": seq})
        assert a.t.pending == 20
    finally:
        await private_broker.ctl("start_app")
    await until(lambda: set(b.seqs(a)) >= set(range(20)), timeout=60, what="20 at B")
    await until(lambda: a.t.connected and a.t.pending == 0)
    assert [s for s in b.seqs(a) if s >= 0] == list(range(20))
    assert len(lines_of(logs, a, "cannot connect")) <= 1  # one line, several attempts


@pytest_twisted.ensureDeferred
async def test_events_wait_in_the_queue_of_a_disconnected_server(servers, gate):
    """B's queue outlives B's connection: what A sends while B is cut off waits for B."""
    proxy, b_url = gate
    a, b = servers("A"), servers("B", url=b_url, max_backoff=0.5)
    await until(lambda: a.t.connected and b.t.connected)
    proxy.is_open = False
    proxy.cut()
    await until(lambda: not b.t.connected, what="B cut off")
    for seq in range(30):
        a.publish("task.updated", {"seq": seq})
    await until(lambda: a.t.pending == 0, what="A's 30 events confirmed by the broker")
    assert b.seqs(a) == []
    proxy.is_open = True
    await until(lambda: b.seqs(a) == list(range(30)), timeout=30, what="the 30 events at B")


@pytest_twisted.ensureDeferred
async def test_queue_of_a_server_gone_for_good_expires(servers, exchange):
    async def listed() -> bool:  # rabbitmqctl, since a declare (even passive) renews the lease
        return a.t.queue in (await rabbitmqctl("list_queues", "--no-table-headers", "name")).split()

    a = servers("A", queue_expiry=1.0)
    await until(lambda: a.t.connected)
    assert await listed()
    await a.t.stopService()
    async def gone() -> bool:
        return not await listed()

    await until(gone, timeout=30, interval=0.5, what="the queue deleted by the broker")


@pytest_twisted.ensureDeferred
async def test_queue_with_other_arguments_is_replaced(servers, exchange, logs):
    first = servers("A", queue_expiry=60.0)
    await until(lambda: first.t.connected)
    await first.t.stopService()
    # the same instance, restarted with another rabbitmq-queue-expiry
    again = servers("A", instance=first.id, queue_expiry=30.0)
    await until(lambda: again.t.connected, what="connected despite the old queue")
    again.publish("task.created", {"seq": 1})
    await until(lambda: again.seqs(again) == [1])
    assert len(lines_of(logs, again, "exists with other arguments")) == 1


@pytest_twisted.ensureDeferred
async def test_two_servers_at_50_events_a_second_through_a_broker_restart(private_broker, exchange):
    """The issue's case: both publish steadily while the broker restarts; each bus hands
    its handlers every event of the other exactly once."""
    buses: dict[str, EventBus] = {}
    got: dict[str, list] = {"A": [], "B": []}
    for label in ("A", "B"):
        bus = EventBus(f"{label}-{uuid.uuid4().hex[:8]}")
        bus.transport = AmqpTransport(url=private_broker.url, exchange=exchange,
                                      instance_id=bus.instance_id, on_event=bus.receive,
                                      reactor=reactor, max_backoff=0.5)
        bus.subscribe(lambda ev, label=label: got[label].append(ev))
        bus.transport.startService()
        buses[label] = bus
    sent = {"A": 0, "B": 0}

    def tick() -> None:
        for label, bus in buses.items():
            bus.publish("task.updated", {"seq": sent[label], "from": label})
            sent[label] += 1

    loop = LoopingCall(tick)
    try:
        await until(lambda: all(b.transport.connected for b in buses.values()))
        loop.start(0.02)  # 50 events/s from each server
        await until(lambda: sent["A"] >= 50)
        await private_broker.restart()
        await until(lambda: all(b.transport.connected for b in buses.values()), timeout=60,
                    what="both reconnected")
        back = sent["A"]
        await until(lambda: sent["A"] >= back + 50)  # a second of traffic after the restart
        loop.stop()
        total = dict(sent)
        for me, other in (("A", "B"), ("B", "A")):
            def seqs(me=me, other=other) -> list[int]:
                return [e.payload["seq"] for e in got[me] if e.payload["from"] == other]
            await until(lambda: len(seqs()) >= total[other], timeout=60,
                        what=lambda: f"{me} has {len(seqs())} of {other}'s {total[other]}")
            assert sorted(seqs()) == list(range(total[other])), f"{me}: lost or repeated events"
    finally:
        if loop.running:
            loop.stop()
        for bus in buses.values():
            await bus.transport.stopService()
            delete_queue(bus.transport.queue, url=private_broker.url)


@pytest_twisted.ensureDeferred
async def test_full_buffer_drops_oldest_and_reports_once(servers, gate, logs):
    proxy, a_url = gate
    proxy.is_open = False  # A cannot reach the broker yet
    a, b = servers("A", url=a_url, max_pending=5), servers("B")
    for seq in range(12):
        a.publish("task.created", {"seq": seq})
    assert a.t.pending == 5 and a.t.dropped == 7
    assert len(lines_of(logs, a, "dropping the oldest")) == 1
    await until(lambda: b.t.connected)
    proxy.is_open = True
    await until(lambda: b.seqs(a) == list(range(7, 12)), what="the 5 newest at B")
    assert len(lines_of(logs, a, "7 events were dropped")) == 1


@pytest_twisted.ensureDeferred
async def test_malformed_message_and_failing_handler_are_dropped(servers, exchange, logs):
    a, b = servers("A"), servers("B")
    await until(lambda: a.t.connected and b.t.connected)
    conn = blocking()
    ch = conn.channel()
    for key, body in [("task.created", b"{not json"), ("agent.online", b"\xff\xfe"),
                      ("task.deleted", b"[1, 2]"), ("agent.updated", b'{"no": "type"}')]:
        ch.basic_publish(exchange, key, body)
    conn.close()
    a.publish("task.created", "boom")  # on_event raises for this one
    a.publish("task.created", {"seq": 1})
    await until(lambda: b.seqs(a) == [1])
    assert [e["payload"] for e in b.received] == ["boom", {"seq": 1}]
    dropped = lines_of(logs, b, "malformed")
    assert len(dropped) == 4 and any("'agent.online'" in line for line in dropped)
    assert len(lines_of(logs, b, "handler failed")) == 1
    assert b.t.connected and a.t.connected


@pytest_twisted.ensureDeferred
async def test_stop_is_prompt_and_final(servers, logs):
    a = servers("A", max_backoff=0.5)
    await until(lambda: a.t.connected)
    await a.t.stopService()
    # prompt: nothing was pending, so no flush wait (the only wait that could delay it)
    assert not lines_of(logs, a, "not confirmed")
    assert not a.t.connected
    a.publish("task.created", {"seq": 1})  # never raises, even when stopped
    # final: the connection loop (the only code that reconnects) has ended, so it stays down
    await until(lambda: a.t._loop.called, what="A's connection loop ended")
    assert not a.t.connected and a.t.connections == 1 and await close_connections_of(a) == 0
    assert len(lines_of(logs, a, "connected to")) == 1
    assert not lines_of(logs, a, "connection lost")


@pytest_twisted.ensureDeferred
async def test_stop_gives_up_on_unreachable_broker(logs, exchange):
    free = reactor.listenTCP(0, Factory(), interface=HOST)
    dead_port = free.getHost().port
    await free.stopListening()  # nothing listens there now: connections are refused
    s = Server("D", exchange, url=f"amqp://guest:guest@{HOST}:{dead_port}/", max_backoff=0.2)
    s.t.startService()
    for seq in range(3):
        s.publish("task.created", {"seq": seq})
    await until(lambda: any(e.get("log_source") is s.t and e.get("attempt", 0) >= 3
                            for e in logs), what="three failed attempts")
    await s.t.stopService()  # returns (no hang) after the flush timeout, logged below
    assert len(lines_of(logs, s, "cannot connect")) == 1  # several attempts, one line
    assert len(lines_of(logs, s, "3 events not confirmed")) == 1


@pytest_twisted.ensureDeferred
async def test_password_never_logged(servers, logs):
    user, password = f"taskd-test-{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    wrong = f"wrong-{uuid.uuid4().hex}"
    await rabbitmqctl("add_user", user, password)
    try:
        await rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        a = servers("A", url=f"amqp://{user}:{password}@{HOST}:{PORT}/")
        bad = servers("X", url=f"amqp://{user}:{wrong}@{HOST}:{PORT}/")
        await until(lambda: a.t.connected and lines_of(logs, bad, "cannot connect"))
        assert await close_connections_of(a) == 1
        await until(lambda: lines_of(logs, a, "connection lost"))
        a.publish("task.created", {"seq": 1})
        await until(lambda: a.seqs(a) == [1] and a.t.connected)
        await a.t.stopService()
        await bad.t.stopService()
    finally:
        await rabbitmqctl("delete_user", user)
    assert lines_of(logs, a, "***@") and lines_of(logs, bad, "ACCESS_REFUSED")
    for ev in logs:
        text = formatEvent(ev) + repr(ev)
        if ev.get("log_failure") is not None:
            text += ev["log_failure"].getTraceback()
        assert password not in text and wrong not in text, text
