"""TsdbGwPublisher with real treq against the tsdb-gw emulator on loopback, and the
emulator's own checks (it must refuse what the real gateway refuses)."""
from __future__ import annotations

from typing import Any

import cramjam
import msgpack
import pytest
import pytest_twisted
import treq
from twisted.logger import formatEvent

from taskd.agent.builtin.collector import Point
from taskd.agent.builtin.metricdata import encode_message, envelope, metric_id
from taskd.agent.builtin.tsdbgw import TsdbGwPublisher
from tests.fakes.tsdbgw import TsdbGwEmulator
from tests.waiting import until

KEY = "admin-key-for-tests"


def pts(n: int, start: int = 0, **kw: Any) -> list[Point]:
    return [Point(1, f"m.{i}", float(i), 1500000000 + i, 10, **kw) for i in range(start, start + n)]


@pytest_twisted.async_yield_fixture
async def gw():
    g = TsdbGwEmulator(admin_key=KEY, org_keys={"org-7-key": 7}).start()
    yield g
    await g.stop()


@pytest_twisted.async_yield_fixture
async def make(gw):
    made: list[TsdbGwPublisher] = []

    def factory(**kw: Any) -> TsdbGwPublisher:
        kw.setdefault("key", KEY)
        kw.setdefault("flush_interval", 0.05)
        kw.setdefault("max_backoff", 0.2)
        kw.setdefault("timeout", 2.0)
        pub = TsdbGwPublisher(url=gw.url + "/", **kw)
        pub.startService()
        made.append(pub)
        return pub

    yield factory
    for pub in made:
        if pub.running:
            await pub.stopService()


def names(gw: TsdbGwEmulator) -> list[str]:
    return [m["Name"] for m in gw.metrics]


@pytest.mark.parametrize("snappy", [True, False], ids=["snappy", "plain"])
@pytest_twisted.ensureDeferred
async def test_metrics_arrive_decoded_with_ids_and_signed_types(gw, make, snappy):
    pub = make(snappy=snappy, batch_size=100)
    points = [
        Point(1, "raintank.apps.ns1.zones.example-com.qps", 1.5, 1500000000, 60, unit="ms"),
        Point(1, "some.metric", 7, 1500000001, 10, unit="unknown", tags=("host=web01", "env=prod")),
        Point(128, "x" * 40, -2.25, 2 ** 31 + 5, 32768, mtype="counter"),
    ]
    pub.add(points)
    await until(lambda: pub.published == 3, what="3 metrics accepted by the emulator")
    assert gw.errors == []
    assert {r.content_type for r in gw.requests} == {"rt-metric-binary-snappy" if snappy else "rt-metric-binary"}
    a, c, big = gw.metrics
    assert a["Id"] == "1.70418cbc67ae889195a8d97d9c0d0e4e"
    assert c["Id"] == "1.07987a332ecbac48cf65d0227b3a1a3e"
    assert c["Tags"] == ["env=prod", "host=web01"] and c["Value"] == 7.0
    assert big["Id"] == metric_id(128, "x" * 40, "", "counter", 32768)
    assert (big["OrgId"], big["Interval"], big["Time"], big["Value"]) == (128, 32768, 2 ** 31 + 5, -2.25)
    assert [m["_types"]["OrgId"] for m in gw.metrics] == [0x01, 0x01, 0xD1]
    assert [m["_types"]["Interval"] for m in gw.metrics] == [0x3C, 0x0A, 0xD2]
    assert [m["_types"]["Time"] for m in gw.metrics] == [0xD2, 0xD2, 0xD3]
    assert {m["_types"]["Value"] for m in gw.metrics} == {0xCB}
    assert big["_types"]["Name"] == big["_types"]["Metric"] == 0xD9
    assert len(gw.metrics) == 3


@pytest_twisted.ensureDeferred
async def test_gateway_down_then_up_loses_nothing_below_the_bound(gw, make):
    pub = make(batch_size=10, queue_size=1000)
    await gw.set_down(True)
    for i in range(5):
        pub.add(pts(20, 20 * i))
    await until(lambda: pub.retries >= 3, what="retries while the gateway is down")
    await gw.set_down(False)
    await until(lambda: pub.published == 100, what="all 100 metrics after the gateway is back")
    assert names(gw) == [f"m.{i}" for i in range(100)]  # in order, no duplicates
    assert pub.dropped == 0


@pytest_twisted.ensureDeferred
async def test_gateway_down_drops_exactly_what_is_above_the_bound(gw, make, logs):
    pub = make(batch_size=10, queue_size=30)
    await gw.set_down(True)
    pub.add(pts(25))
    await until(lambda: pub.retries >= 1, what="a failed attempt")
    pub.add(pts(25, 25))
    assert pub.dropped == 20 and pub.queued == 30
    await gw.set_down(False)
    await until(lambda: len(gw.metrics) == 30, what="the 30 queued metrics")
    assert names(gw) == [f"m.{i}" for i in range(30)]
    await until(lambda: any("dropped 20 metrics: queue full (bound 30)" in formatEvent(e) for e in logs),
                what="the drop log line")
    pub.add(pts(5, 100))
    await until(lambda: len(gw.metrics) == 35, what="later metrics")
    assert pub.dropped == 20


@pytest_twisted.ensureDeferred
async def test_a_400_drops_that_batch_and_the_next_batches_flow(gw, make, logs):
    pub = make(batch_size=5)
    gw.fail(400, times=1, body=b'"metric 0: invalid mtype"')
    pub.add(pts(5))
    await until(lambda: pub.rejected == 5, what="the batch refused")
    pub.add(pts(5, 5))
    await until(lambda: len(gw.metrics) == 5, what="the next batch")
    assert names(gw) == [f"m.{i}" for i in range(5, 10)]
    assert len(gw.requests) == 2  # the refused batch was not retried
    assert any("refused 5 metrics with 400" in formatEvent(e) and "invalid mtype" in formatEvent(e) for e in logs)


@pytest_twisted.ensureDeferred
async def test_5xx_and_timeouts_are_retried_without_duplicates(gw, make):
    pub = make(batch_size=4, timeout=0.3)
    gw.fail(503, times=3)
    pub.add(pts(4))
    await until(lambda: len(gw.metrics) == 4, what="the batch after three 503s")
    assert [r.status for r in gw.requests] == [503, 503, 503, 200]
    gw.hang = True
    pub.add(pts(4, 4))
    await until(lambda: pub.retries >= 4, what="a timed-out request retried")
    gw.hang = False
    await until(lambda: len(gw.metrics) == 8, what="the batch after the timeouts")
    assert names(gw) == [f"m.{i}" for i in range(8)]


@pytest_twisted.ensureDeferred
async def test_a_wrong_key_is_refused_and_never_logged(gw, make, logs):
    pub = make(key="wrong-key-1234", batch_size=2)
    pub.add(pts(2))
    await until(lambda: pub.rejected == 2, what="the 401")
    assert gw.requests[0].status == 401 and gw.metrics == []
    text = "\n".join(formatEvent(e) for e in logs)
    assert "401" in text and "wrong-key-1234" not in text


@pytest_twisted.ensureDeferred
async def test_stop_flushes_what_is_queued(gw, make):
    pub = make(batch_size=1000, flush_interval=60.0)
    pub.add(pts(7))
    await pub.stopService()
    assert names(gw) == [f"m.{i}" for i in range(7)] and pub.lost == 0


# -- the emulator refuses what tsdb-gw refuses ------------------------------------------

async def post(gw: TsdbGwEmulator, body: bytes, ctype: str = "rt-metric-binary", key: str = KEY) -> tuple[int, str]:
    headers = {"Content-Type": ctype}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    response = await treq.post(gw.url + "/metrics", data=body, headers=headers)
    return response.code, (await response.text())


def stock_msgpack_record(**changes: Any) -> bytes:
    record = {"Id": "1.70418cbc67ae889195a8d97d9c0d0e4e", "OrgId": 1,
              "Name": "raintank.apps.ns1.zones.example-com.qps", "Metric": "raintank.apps.ns1.zones.example-com.qps",
              "Interval": 60, "Value": 1.5, "Unit": "ms", "Time": 1500000000, "Mtype": "gauge", "Tags": []}
    record.update(changes)
    return envelope(msgpack.packb([record]))


@pytest_twisted.ensureDeferred
async def test_emulator_checks_like_the_gateway(gw):
    good = encode_message(pts(1))
    assert await post(gw, good) == (200, '"ok"')
    assert (await post(gw, good, key=""))[0] == 401
    assert (await post(gw, good, key="nope")) == (401, '"invalid key"')
    assert (await post(gw, good, ctype="application/json; charset=utf-8"))[0] == 400
    assert (await post(gw, bytes(cramjam.snappy.compress_raw(good)), ctype="rt-metric-binary-snappy"))[0] == 500
    assert (await post(gw, good[:8]))[0] == 500
    # the stock msgpack packer writes 1500000000 as uint32 (0xce): refused, as tsdb-gw does
    status, text = await post(gw, stock_msgpack_record())
    assert status == 500 and "0xce" in text
    assert (await post(gw, stock_msgpack_record(Time=100, Value=2)))[0] == 500  # an int Value
    assert (await post(gw, stock_msgpack_record(Time=100)))[0] == 200  # all fixints: fine
    status, text = await post(gw, stock_msgpack_record(Time=100, Id="1.0000"))
    assert status == 400 and "Id" in text
    assert (await post(gw, stock_msgpack_record(Time=100, Mtype="histogram"))) == (400, '"metric 0: invalid mtype"')
    assert len(gw.metrics) == 2


@pytest_twisted.ensureDeferred
async def test_emulator_non_admin_keys_force_the_org_and_2019_era_answers():
    gw = TsdbGwEmulator(admin_key=KEY, org_keys={"org-7": 7}, era="2019").start()
    try:
        body = encode_message(pts(1) + pts(1, 1, tags=("dc:ams",)))
        status, text = await post(gw, body, key="org-7")
        assert status == 200 and '"Published": 1' in text and '"invalid tag format"' in text
        assert gw.metrics[0]["OrgId"] == 7 and gw.metrics[0]["Id"] == metric_id(7, "m.0", "", "gauge", 10)
        assert (await post(gw, b"\x01" + b"\x00" * 8 + b"\xc1"))[0] == 400
    finally:
        await gw.stop()
