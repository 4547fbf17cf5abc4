"""TsdbGwPublisher on a task.Clock with a fake treq-style client: batching, one request
in flight, backoff, 4xx handling, the queue bound and its log, the final flush."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cramjam
import pytest
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived

from taskd.agent.builtin.collector import Point
from taskd.agent.builtin.metricdata import encode_message
from taskd.agent.builtin.tsdbgw import TsdbGwPublisher, backoff_delay, loggable_url

KEY = "eyJrIjoidHNkYi1zZWNyZXQta2V5In0="


def pts(n: int, start: int = 0) -> list[Point]:
    return [Point(1, f"m.{i}", float(i), 1500000000 + i, 10) for i in range(start, start + n)]


@dataclass
class Call:
    url: str
    data: bytes
    headers: dict
    d: Deferred
    cancelled: bool = False

    def names(self) -> list[str]:
        import msgpack
        raw = bytes(cramjam.snappy.decompress(self.data)) if self.data[:1] == b"\xff" else self.data
        return [m["Name"] for m in msgpack.unpackb(raw[9:])]


class Response:
    def __init__(self, code: int, body: bytes) -> None:
        self.code, self._body = code, body

    def content(self) -> Deferred:
        return succeed(self._body)


@dataclass
class FakeHttp:
    """``post`` as treq's HTTPClient.post is called; answers are given by the test
    (``answer``) or at once (``auto``: a status code or an exception)."""

    auto: Any = None
    calls: list[Call] = field(default_factory=list)
    on_cancel: Any = None  # what a cancelled request fails with (default: CancelledError)

    def post(self, url: str, data: bytes, headers: dict) -> Deferred:
        if isinstance(self.auto, Exception):
            d = fail(self.auto)  # one Deferred: a second, never-awaited one is an unhandled error at GC
            self.calls.append(Call(url, data, headers, d))
            return d
        if self.auto is not None:
            d = succeed(Response(self.auto, b'"auto"'))
            self.calls.append(Call(url, data, headers, d))
            return d
        call = Call(url, data, headers, Deferred())

        def cancel(d: Deferred) -> None:
            call.cancelled = True
            if self.on_cancel is not None:
                d.errback(self.on_cancel)

        call.d = Deferred(cancel)
        self.calls.append(call)
        return call.d

    @property
    def pending(self) -> list[Call]:
        return [c for c in self.calls if not c.d.called]

    def answer(self, code: int = 200, body: bytes = b'"ok"') -> Call:
        call = self.pending[0]
        call.d.callback(Response(code, body))
        return call


class TopRng:
    """Always the upper bound of the jitter range, so delays are exact."""

    def __init__(self) -> None:
        self.ranges: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.ranges.append((a, b))
        return b


class Stats:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def incr(self, name: str, n: int = 1, tags: Any = None) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def gauge(self, name: str, value: float, tags: Any = None) -> None:
        pass


def lines(events: list[dict], text: str = "") -> list[str]:
    out = [formatEvent(e) for e in events if str(e.get("log_namespace", "")).startswith("taskd.agent.builtin.tsdbgw")]
    return [line for line in out if text in line]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def http() -> FakeHttp:
    return FakeHttp()


def make(clock: Clock, http: FakeHttp, **kw: Any) -> TsdbGwPublisher:
    kw.setdefault("batch_size", 3)
    kw.setdefault("queue_size", 100)
    kw.setdefault("rng", TopRng())
    pub = TsdbGwPublisher(url="http://gw.example:8080/", key=KEY, clock=clock, http=http, **kw)
    pub.startService()
    return pub


def test_request_shape(clock, http):
    pub = make(clock, http, snappy=True)
    pub.add(pts(3))
    [call] = http.calls
    assert call.url == "http://gw.example:8080/metrics"
    assert call.headers[b"Authorization"] == [b"Bearer " + KEY.encode()]
    assert call.headers[b"Content-Type"] == [b"rt-metric-binary-snappy"]
    assert bytes(cramjam.snappy.decompress(call.data)) == encode_message(pts(3))
    plain = make(clock, FakeHttp(), snappy=False, batch_size=1)
    plain.add(pts(1))
    [call] = plain._http.calls
    assert call.headers[b"Content-Type"] == [b"rt-metric-binary"]
    assert call.data == encode_message(pts(1))


def test_a_full_batch_goes_at_once_a_partial_one_at_the_flush_interval(clock, http):
    pub = make(clock, http, batch_size=3, flush_interval=1.0)
    pub.add(pts(2))
    clock.advance(0.99)
    assert http.calls == []
    pub.add(pts(1, 2))
    assert [c.names() for c in http.calls] == [["m.0", "m.1", "m.2"]]
    http.answer()
    pub.add(pts(1, 3))
    clock.advance(0.005)  # the tick at 1.0 s is not reached yet
    assert len(http.calls) == 1
    clock.advance(0.01)
    assert http.calls[1].names() == ["m.3"]
    http.answer()
    assert pub.published == 4 and pub.queued == 0


def test_one_request_in_flight_and_order_kept(clock, http):
    pub = make(clock, http, batch_size=2)
    pub.add(pts(7))
    assert len(http.pending) == 1
    pub.add(pts(2, 7))
    assert len(http.pending) == 1
    seen = []
    while http.pending:
        seen.append(http.answer().names())
        assert len(http.pending) <= 1
        clock.advance(1.0)
    assert seen == [["m.0", "m.1"], ["m.2", "m.3"], ["m.4", "m.5"], ["m.6", "m.7"], ["m.8"]]
    assert pub.published == 9


def test_backoff_doubles_from_a_tenth_and_is_capped(clock, http):
    rng = TopRng()
    pub = make(clock, http, batch_size=1, max_backoff=1.0, rng=rng)
    pub.add(pts(1))
    times = []
    for _ in range(7):
        times.append(clock.seconds())
        http.answer(503, b'"kafka down"')
        clock.advance(0.001)
        while not http.pending:
            clock.advance(0.001)
    gaps = [round(b - a, 2) for a, b in zip(times, times[1:])]
    assert gaps == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert rng.ranges[:6] == [(0.0, 0.1), (0.0, 0.2), (0.0, 0.4), (0.0, 0.8), (0.0, 1.0), (0.0, 1.0)]
    http.answer(200)
    assert pub.published == 1 and pub.retries == 7


def test_backoff_delay_is_full_jitter():
    class Low:
        def uniform(self, a, b):
            return a
    assert backoff_delay(0, 30.0, Low()) == 0.0
    assert backoff_delay(1000, 30.0, TopRng()) == 30.0


def test_connection_errors_and_timeouts_are_retried(clock, http, logs):
    pub = make(clock, http, batch_size=1, timeout=5.0)
    pub.add(pts(1))
    clock.advance(4.9)
    assert len(http.calls) == 1
    clock.advance(0.2)  # the request timed out: cancelled, then retried after <= 0.1 s
    assert http.calls[0].cancelled
    clock.advance(0.1)
    assert len(http.calls) == 2
    http.pending[0].d.errback(ConnectionRefusedError("127.0.0.1"))
    clock.advance(0.2)
    assert len(http.calls) == 3
    http.answer()
    assert pub.published == 1 and pub.rejected == 0
    assert lines(logs, "no answer within 5 s") and lines(logs, "ConnectionRefusedError")
    assert lines(logs, "accepted 1 metrics after 2 retries")


def test_a_4xx_drops_that_batch_once_and_the_next_batches_flow(clock, http, logs):
    pub = make(clock, http, batch_size=2)
    pub.add(pts(6))
    http.answer(400, b'"metric 0: invalid mtype"')
    http.answer(200)
    http.answer(401, b'"invalid key"')
    assert http.pending == [] and len(http.calls) == 3  # nothing was retried
    assert (pub.published, pub.rejected) == (2, 4)
    refused = lines(logs, "refused")
    assert len(refused) == 2
    assert "400" in refused[0] and "invalid mtype" in refused[0] and "2 metrics" in refused[0]
    assert "http://gw.example:8080/metrics" in refused[0]


def test_a_retried_batch_blocks_later_ones_which_keep_queueing(clock, http):
    pub = make(clock, http, batch_size=2, max_backoff=0.1)
    pub.add(pts(2))
    for i in range(5):
        http.answer(502)
        pub.add(pts(1, 2 + i))
        clock.advance(0.1)
    assert [c.names() for c in http.calls] == [["m.0", "m.1"]] * 6
    assert pub.queued == 7
    http.answer(200)
    sent = [http.answer().names() for _ in range(2)]
    assert sent == [["m.2", "m.3"], ["m.4", "m.5"]]
    clock.advance(1.0)
    assert http.answer().names() == ["m.6"]
    assert pub.published == 7


def test_drops_above_the_bound_are_exact_and_logged_once_per_interval(clock, http, logs):
    stats = Stats()
    pub = make(clock, http, batch_size=5, queue_size=10, flush_interval=1.0, stats=stats)
    pub.add(pts(4))
    pub.add(pts(4, 4))  # the first 5 are in flight (never answered), 3 wait
    for i in range(20):
        pub.add(pts(3, 8 + 3 * i))  # 2 fit, then 58 are dropped
    assert pub.queued == 10
    assert pub.dropped == 58 == stats.counts["tsdbgw.dropped"]
    assert lines(logs, "dropped") == []  # not per point, not per add
    clock.advance(1.0)
    assert lines(logs, "dropped") == [
        "dropped 58 metrics: queue full (bound 10); tsdb-gw at http://gw.example:8080/metrics is slow or down"]
    clock.advance(1.0)
    assert len(lines(logs, "dropped")) == 1  # nothing new, no new line
    pub.add(pts(7, 100))
    clock.advance(1.0)
    assert lines(logs, "dropped")[1].startswith("dropped 7 metrics: queue full (bound 10)")
    http.answer()  # in-flight batch done: room for 5 again
    pub.add(pts(6, 200))
    assert pub.dropped == 66


def test_invalid_points_never_reach_a_batch(clock, http, logs):
    pub = make(clock, http, batch_size=2)
    pub.add([Point(1, "ok", 1.0, 1, 10), Point(1, "bad", 1.0, 1, 10, tags=("dc:ams",)), Point(1, "ok2", 1.0, 1, 10)])
    assert http.calls[0].names() == ["ok", "ok2"]
    assert pub.invalid == 1
    clock.advance(1.0)
    assert len(lines(logs, "dropped 1 invalid metrics")) == 1


def test_add_never_raises(clock, http):
    pub = make(clock, http)
    pub.add([None])  # type: ignore[list-item]
    pub.add(pts(1))
    assert pub.queued == 1


def test_final_flush_sends_what_is_queued(clock, http, logs):
    pub = make(clock, http, batch_size=3, flush_interval=10.0)
    pub.add(pts(5))
    done = pub.stopService()
    http.answer()
    assert not done.called
    assert http.pending[0].names() == ["m.3", "m.4"]
    http.answer()
    assert done.called and pub.published == 5 and pub.lost == 0
    assert lines(logs, "final flush sent 5 metrics")
    pub.add(pts(2))
    pub.add(pts(2))
    assert pub.lost == 4 and len(lines(logs, "added from now on are lost")) == 1


def test_final_flush_gives_up_after_the_stop_timeout(clock, http, logs):
    pub = make(clock, http, batch_size=2, stop_timeout=3.0, max_backoff=0.5)
    pub.add(pts(5))
    done = pub.stopService()
    while clock.seconds() < 2.9:
        if http.pending:
            http.answer(500, f'"bad key {KEY}"'.encode())
        clock.advance(0.05)
    assert not done.called
    clock.advance(0.2)
    assert done.called
    assert pub.lost == 5 and pub.published == 0
    assert lines(logs, "5 metrics lost")
    assert all(KEY not in line for line in lines(logs))
    assert any("<key>" in line for line in lines(logs))


def test_the_key_and_url_credentials_are_never_logged(clock, http, logs):
    http.auto = ConnectionRefusedError(f"refused {KEY}")
    pub = TsdbGwPublisher(url="https://user:pw@gw.example/", key=KEY, clock=clock, http=http, batch_size=1)
    pub.startService()
    pub.add(pts(1))
    clock.advance(1.0)
    text = "\n".join(lines(logs))
    assert "https://gw.example/metrics" in text
    assert KEY not in text and "pw@" not in text
    assert loggable_url("http://a:b@h:1/p") == "http://h:1/p"


@pytest.mark.parametrize("cancel_error", [
    ResponseNeverReceived([Failure(CancelledError())]),  # what twisted.web raises while waiting
    ConnectingCancelledError(None),                      # ... and while connecting
])
def test_a_timeout_is_logged_as_no_answer_whatever_the_cancel_raised(clock, http, logs, cancel_error):
    http.on_cancel = cancel_error
    pub = make(clock, http, batch_size=1, timeout=5.0)
    pub.add(pts(1))
    clock.advance(5.0)
    assert http.calls[0].cancelled
    assert lines(logs, "retrying") == [
        "tsdb-gw at http://gw.example:8080/metrics: no answer within 5 s; retrying 1 metrics (1 queued)"]


def test_values_that_are_not_finite_numbers_are_invalid_and_the_batch_still_goes(clock, http, logs):
    pub = make(clock, http, batch_size=2)
    pub.add([Point(1, "ok", 1.0, 1, 10), Point(1, "none", None, 1, 10), Point(1, "na", "n/a", 1, 10),
             Point(1, "nan", float("nan"), 1, 10), Point(1, "ok2", 2, 1, 10)])
    assert http.calls[0].names() == ["ok", "ok2"]
    assert pub.invalid == 3
    clock.advance(1.0)
    assert lines(logs, "invalid") == ["dropped 3 invalid metrics (tsdb-gw would refuse them), e.g. 'nan': "
                                      "value nan is not a finite number"]


def test_a_batch_that_cannot_be_encoded_is_dropped_counted_and_logged_and_the_next_goes(clock, http, logs):
    stats = Stats()
    pub = make(clock, http, batch_size=2, stats=stats)
    pub.add([Point(1, "ok", 1.0, 1, 10), Point(1, b"bytes-name", 1.0, 1, 10)])  # type: ignore[arg-type]
    assert http.calls == [] and pub.invalid == 2 == stats.counts["tsdbgw.invalid"]
    assert pub.queued == 0 and lines(logs, "encoding 2 metrics failed; batch dropped")
    pub.add(pts(2))
    assert http.calls[0].names() == ["m.0", "m.1"]


def test_refusals_with_one_status_are_logged_once_then_once_per_flush_interval(clock, http, logs):
    pub = make(clock, http, batch_size=1, flush_interval=1.0)
    for i in range(5):
        pub.add(pts(1, i))
        http.answer(401, b'"invalid key"')
    pub.add(pts(1, 5))
    http.answer(400, b'"bad mtype"')
    assert pub.rejected == 6
    assert lines(logs, "refused") == [
        'tsdb-gw at http://gw.example:8080/metrics refused 1 metrics with 401: "invalid key"; batch dropped',
        'tsdb-gw at http://gw.example:8080/metrics refused 1 metrics with 400: "bad mtype"; batch dropped']
    clock.advance(1.0)
    assert lines(logs, "refused")[2:] == [
        'tsdb-gw at http://gw.example:8080/metrics refused 4 more metrics with 401 (last: "invalid key"); dropped']
    for i in range(3):  # more in the next interval: summed into its line
        pub.add(pts(1, 6 + i))
        http.answer(401, b'"invalid key"')
    assert len(lines(logs, "refused")) == 3
    clock.advance(1.0)
    assert lines(logs, "refused")[3:] == [
        'tsdb-gw at http://gw.example:8080/metrics refused 3 more metrics with 401 (last: "invalid key"); dropped']
    clock.advance(1.0)  # a quiet interval: the next refusal is news again
    pub.add(pts(1, 9))
    http.answer(401, b'"invalid key"')
    assert lines(logs, "refused")[4:] == [
        'tsdb-gw at http://gw.example:8080/metrics refused 1 metrics with 401: "invalid key"; batch dropped']
    assert pub.rejected == 10
