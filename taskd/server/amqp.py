"""RabbitMQ transport for domain events, so that several task-servers behave as one.

Servers sharing one database must all see every `agent.*` / `task.*` event: each one
pushes task changes to the agents *it* holds and relocates tasks when an agent goes
offline anywhere. Events travel through a durable topic exchange (routing key = event
type); each server consumes from its own queue bound with `#`, so it also receives its
own events (the caller filters on `source`).

Delivery is at-least-once and survives a broker restart or a cut connection on either
side: the publish channel is in confirm mode and an event leaves the local buffer only
when the broker acks it (persistent messages are acked once written to disk). On a nack
or a lost connection every unconfirmed event is resent, in order, once a channel is
available again. Each server's queue is durable and named after the server instance
(`taskd.<exchange>.<instance>`), not exclusive: it outlives a disconnection and a broker
restart, keeping what arrived meanwhile, and the broker deletes it only after it has had
no consumer for `queue_expiry` seconds (a server that is gone for good). Resends and
redeliveries mean an event can arrive twice; the bus drops repeats by event id
(taskd.server.events). While disconnected, events are buffered (bounded; the oldest are
dropped past `max_pending`, counted in `dropped`). The connection is retried forever
with capped, jittered exponential backoff.
"""
from __future__ import annotations

import json
import random
from collections import OrderedDict, deque
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import pika
from pika.adapters.twisted_connection import TwistedChannel, TwistedProtocolConnection
from pika.exceptions import AMQPConnectionError, ChannelClosedByBroker, NackError
from twisted.application.service import Service
from twisted.internet.defer import (CancelledError, Deferred, TimeoutError, ensureDeferred,
                                    maybeDeferred, succeed)
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

_PROPS = pika.BasicProperties(content_type="application/json", delivery_mode=2)
CONNECT_TIMEOUT, STOP_FLUSH_TIMEOUT, STOP_CLOSE_TIMEOUT = 15.0, 2.0, 2.0
QUEUE_EXPIRY = 600.0
"""Seconds a server's queue outlives its last consumer (rabbitmq-queue-expiry)."""


def queue_name(exchange: str, instance_id: str) -> str:
    """The queue of one server instance; stable across reconnections, so nothing sent
    while the instance was away is lost."""
    return f"taskd.{exchange}.{instance_id}"


def redact_url(url: str) -> str:
    """The URL with its password replaced by `***` (safe to log)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{hostport}"))


def backoff_delay(attempt: int, cap: float, initial: float = 0.5) -> float:
    """Delay before retry number `attempt` (0-based): doubling from `initial`, capped,
    with "equal jitter" (between half and all of the capped value)."""
    base = min(cap, initial * 2 ** min(attempt, 32))
    return base / 2 + random.uniform(0, base / 2)


class _Protocol(TwistedProtocolConnection):
    """pika's protocol plus `when_lost()`: fires with why the connection ended."""

    def __init__(self, params: pika.URLParameters, reactor: Any) -> None:
        super().__init__(params, custom_reactor=reactor)
        self.lost_reason: Any = None
        self._lost_waiters: list[Deferred] | None = []  # None once lost

    def when_lost(self) -> Deferred:
        if self._lost_waiters is None:
            return succeed(self.lost_reason)
        d: Deferred = Deferred()
        self._lost_waiters.append(d)
        return d

    def _on_connection_failed(self, _connection: Any, error: Any = None) -> None:
        # pika's own version reports only "AMQPConnectionError: 1"; keep the cause.
        d, self.ready = self.ready, None
        error = self.lost_reason or error
        if d is not None:
            d.errback(error if isinstance(error, Exception) else AMQPConnectionError(error))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # pika's adapter replaces the broker's reason (e.g. CONNECTION_FORCED) with
        # ConnectionDone when the TCP close follows; keep the informative one.
        self.lost_reason = getattr(self._impl, "_error", None)
        try:
            super().connectionLost(reason)
        finally:
            self.lost_reason = self.lost_reason or reason.value
            waiters, self._lost_waiters = self._lost_waiters or [], None
            for d in waiters:
                d.callback(self.lost_reason)


class AmqpTransport(Service):
    """Publishes events to, and consumes them from, the RabbitMQ exchange `exchange`."""

    log = Logger()
    name = "amqp"

    def __init__(self, *, url: str, exchange: str, instance_id: str,
                 on_event: Callable[[dict], None], reactor: Any = None,
                 max_backoff: float = 30.0, max_pending: int = 100_000,
                 queue_expiry: float = QUEUE_EXPIRY) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._reactor, self._exchange, self._instance = reactor, exchange, instance_id
        self._on_event, self._max_backoff, self._max_pending = on_event, max_backoff, max_pending
        self.queue = queue_name(exchange, instance_id)
        self._queue_args = {"x-expires": max(1000, int(queue_expiry * 1000))}
        self._safe_url = redact_url(url)
        try:
            params = pika.URLParameters(url)
        except Exception as exc:
            raise ValueError(f"bad rabbitmq-url {self._safe_url}: {type(exc).__name__}") from None
        params.client_properties = {"connection_name": f"taskd {instance_id}"}
        self._endpoint = HostnameEndpoint(reactor, params.host, params.port,
                                          timeout=CONNECT_TIMEOUT)
        if urlsplit(url).scheme == "amqps":
            self._endpoint = wrapClientTLS(optionsForClientTLS(params.host), self._endpoint)
        self._factory = Factory.forProtocol(lambda: _Protocol(params, reactor))
        self._factory.noisy = False  # no "Starting factory" line per attempt
        self._pending: OrderedDict[int, tuple[str, bytes]] = OrderedDict()  # unconfirmed
        self._to_send: deque[int] = deque()  # not yet sent on the current publish channel
        self._seq = self._resends = 0  # _resends: publish channels lost since a confirm
        self._proto: _Protocol | None = None  # set while connected and set up
        self.connections = 0  # connections set up so far: a change means events may have been missed
        self._pub: TwistedChannel | None = None  # the publish channel (confirm mode)
        self._loop: Deferred | None = None
        self._drain_waiters: list[Deferred] = []
        self._closing = False  # stopService gave up flushing: no more reconnects
        self.dropped = self._dropped_unreported = 0  # events dropped, buffer being full

    @property
    def connected(self) -> bool:
        return self._proto is not None

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- publishing ------------------------------------------------------------------

    def publish(self, event: dict) -> None:
        """Queue `event` for the exchange; it is sent (and resent) until confirmed.
        Never raises, never blocks."""
        try:
            event = {"source": self._instance, "attempts": 0, **event}
            key = event["type"]
            body = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        except Exception as exc:  # never log the event itself: task config may be secret
            self.log.error("amqp: cannot publish an event: {error}", error=_describe(exc))
            return
        while self._pending and len(self._pending) >= self._max_pending:
            self._pending.popitem(last=False)
            self.dropped += 1
            self._dropped_unreported += 1
            if self._dropped_unreported == 1:
                self.log.warn("amqp: {max} events awaiting the broker; dropping the oldest",
                              max=self._max_pending)
        self._seq += 1
        self._pending[self._seq] = (key, body)
        self._to_send.append(self._seq)
        self._flush()

    def _flush(self) -> None:
        ch = self._pub
        while ch is not None and ch.is_open and self._to_send:
            seq = self._to_send.popleft()
            if (item := self._pending.get(seq)) is None:
                continue  # dropped (buffer full) or already confirmed
            key, body = item
            try:
                d = ch.basic_publish(self._exchange, key, body, properties=_PROPS)
            except Exception:  # channel closing: it is reopened and everything resent
                return
            d.addCallbacks(self._confirmed, self._rejected, callbackArgs=(seq,),
                           errbackArgs=(ch,))

    def _confirmed(self, _frame: Any, seq: int) -> None:
        self._pending.pop(seq, None)
        self._resends = 0
        if not self._pending:
            waiters, self._drain_waiters = self._drain_waiters, []
            for d in waiters:
                d.callback(None)

    def _rejected(self, failure: Failure, ch: TwistedChannel) -> None:
        # Channel or connection lost: nothing to do, the next channel resends the event.
        # A nack: reopen the channel so that all unconfirmed events are resent in order.
        if failure.check(NackError) and ch is self._pub and ch.is_open:
            if not self._resends:
                self.log.warn("amqp: the broker nacked an event (a queue refused it?)")
            ch.close()

    # -- connection ------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._closing = False
        self.log.info("amqp: connecting to {url} (exchange {exchange!r})",
                      url=self._safe_url, exchange=self._exchange)
        self._loop = ensureDeferred(self._run())
        self._loop.addErrback(lambda f: None if f.check(CancelledError) else
                              self.log.failure("amqp: connection loop failed", f))

    async def _run(self) -> None:
        failures = 0
        while not self._closing:
            try:
                proto = await ensureDeferred(self._connect()).addTimeout(
                    CONNECT_TIMEOUT, self._reactor)
            except (CancelledError, GeneratorExit):
                raise
            except Exception as exc:
                failures += 1  # one warning, then the retries only at debug level
                self.log.emit(LogLevel.warn if failures == 1 else LogLevel.debug,
                              "amqp: cannot connect to {url}: {reason}; retrying with backoff "
                              "up to {cap}s", url=self._safe_url, reason=_describe(exc),
                              cap=self._max_backoff, attempt=failures)
                await deferLater(self._reactor, backoff_delay(failures, self._max_backoff))
                continue
            self.log.info("amqp: connected to {url}, exchange {exchange!r}, {pending} events "
                          "to send", url=self._safe_url, exchange=self._exchange,
                          pending=len(self._pending), instance=self._instance)
            if self._dropped_unreported:
                self.log.warn("amqp: {n} events were dropped while the buffer was full",
                              n=self._dropped_unreported)
                self._dropped_unreported = 0
            failures = 0
            reason = await proto.when_lost()
            self._proto = self._pub = None
            self.log.warn("amqp: connection lost ({reason}); reconnecting, {pending} events "
                          "unconfirmed", reason=_describe(reason), pending=len(self._pending),
                          instance=self._instance)
            await deferLater(self._reactor, backoff_delay(0, self._max_backoff))

    async def _connect(self) -> _Protocol:
        proto = await self._endpoint.connect(self._factory)
        try:
            await proto.ready
            pub = await self._open_publisher(proto)  # declares the exchange
            consume = await proto.channel()
            await consume.basic_qos(prefetch_count=1000)
            consume = await self._declare_queue(proto, consume)
            await consume.queue_bind(queue=self.queue, exchange=self._exchange, routing_key="#")
            messages, _tag = await consume.basic_consume(queue=self.queue, auto_ack=False)
            if not (pub.is_open and consume.is_open):
                raise RuntimeError("channel closed during set-up")
        except BaseException:
            proto.transport.abortConnection()
            raise
        consume.on_closed.addBoth(self._consumer_closed, proto)
        ensureDeferred(self._consume(messages))
        self._proto = proto
        self.connections += 1
        self._use_publisher(pub)  # only now: our own queue is bound and gets them too
        return proto

    async def _declare_queue(self, proto: _Protocol, ch: TwistedChannel) -> TwistedChannel:
        """Declare this server's queue; one declared with other arguments (an earlier
        rabbitmq-queue-expiry) is replaced, since the broker refuses to change them."""
        try:
            await ch.queue_declare(queue=self.queue, durable=True, arguments=self._queue_args)
            return ch
        except ChannelClosedByBroker as exc:
            if exc.reply_code != 406:  # PRECONDITION_FAILED: same name, other arguments
                raise
        self.log.warn("amqp: queue {queue!r} exists with other arguments; re-creating it "
                      "(events waiting in it are lost; the periodic reconciliation covers "
                      "them)", queue=self.queue)
        ch = await proto.channel()
        await ch.queue_delete(queue=self.queue)
        await ch.queue_declare(queue=self.queue, durable=True, arguments=self._queue_args)
        await ch.basic_qos(prefetch_count=1000)
        return ch

    async def _open_publisher(self, proto: _Protocol) -> TwistedChannel:
        ch = await proto.channel()
        await ch.exchange_declare(exchange=self._exchange, exchange_type="topic", durable=True)
        await ch.confirm_delivery()
        ch.on_closed.addBoth(self._publisher_closed, proto)
        return ch

    def _use_publisher(self, ch: TwistedChannel) -> None:
        """Send every unconfirmed event, in order, on the new publish channel."""
        self._pub, self._to_send = ch, deque(self._pending)
        self._flush()

    def _publisher_closed(self, reason: Any, proto: _Protocol) -> None:
        if proto is self._proto and proto.is_open and not self._closing:
            self._pub = None
            self._resends += 1
            if self._resends == 1:
                self.log.info("amqp: publish channel closed ({reason}); reopening it to resend "
                              "unconfirmed events", reason=_describe(reason))
            ensureDeferred(self._reopen_publisher(proto)).addErrback(
                lambda f: proto.transport.loseConnection())

    async def _reopen_publisher(self, proto: _Protocol) -> None:
        if self._resends > 1:  # lost again before any confirm: no tight resend loop
            await deferLater(self._reactor, backoff_delay(self._resends - 2, self._max_backoff))
        if proto is self._proto and not self._closing:
            ch = await self._open_publisher(proto)
            if proto is self._proto:
                self._use_publisher(ch)

    def _consumer_closed(self, reason: Any, proto: _Protocol) -> None:
        if proto is self._proto and proto.is_open and not self._closing:
            self.log.warn("amqp: consumer channel closed ({reason}); reconnecting",
                          reason=_describe(reason))
            proto.transport.loseConnection()

    # -- consuming -------------------------------------------------------------------

    async def _consume(self, messages: Any) -> None:
        while True:
            try:
                msg = await messages.get()
            except BaseException:
                return  # the channel closed; the next connection consumes again
            self._deliver(msg)

    def _deliver(self, msg: Any) -> None:
        key = msg.method.routing_key
        try:
            event = json.loads(msg.body.decode("utf-8"))
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise ValueError("not an event object")
        except ValueError as exc:  # includes UnicodeDecodeError and JSONDecodeError
            self.log.warn("amqp: dropping malformed message (routing key {key!r}): {error}",
                          key=key, error=exc)
        else:  # a failing handler (raising, or returning a failing Deferred) is logged
            maybeDeferred(self._on_event, event).addErrback(lambda f: self.log.failure(
                "amqp: event handler failed for {type}", f, LogLevel.error, type=event["type"]))
        try:
            msg.channel.basic_ack(delivery_tag=msg.method.delivery_tag)
        except Exception:
            pass  # channel gone: the broker redelivers it on the next connection

    # -- stopping --------------------------------------------------------------------

    def stopService(self) -> Deferred:
        """Flush for up to 2 s, then close the connection and stop reconnecting."""
        super().stopService()
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self._pending:
            waiter: Deferred = Deferred()
            self._drain_waiters.append(waiter)
            try:
                await waiter.addTimeout(STOP_FLUSH_TIMEOUT, self._reactor)
            except TimeoutError:
                self.log.warn("amqp: stopping with {n} events not confirmed by the broker "
                              "(given up)", n=len(self._pending))
        self._closing = True
        if self._loop is not None:
            self._loop.cancel()
        proto, self._proto, self._pub = self._proto, None, None
        if proto is not None and proto.is_open:
            proto.close()
            try:
                await proto.when_lost().addTimeout(STOP_CLOSE_TIMEOUT, self._reactor)
            except TimeoutError:
                proto.transport.abortConnection()
        self.log.info("amqp: disconnected from {url}", url=self._safe_url)


def _describe(reason: Any) -> str:
    reason = reason.value if isinstance(reason, Failure) else reason
    return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
