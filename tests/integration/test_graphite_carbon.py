"""GraphitePublisher against a real carbon-cache: the points end up in whisper files,
including a tagged series, and survive a carbon restart (queued, then sent on reconnect).

Fails (does not skip) when carbon-cache is not installed; see tests/integration/carbon.py.
"""
from __future__ import annotations

import time
import uuid
from typing import Any

import pytest_twisted

from taskd.agent.builtin.collector import Point
from taskd.agent.builtin.graphite import GraphitePublisher
from tests.integration.carbon import CarbonCache
from tests.waiting import until, value_of


@pytest_twisted.async_yield_fixture
async def carbon(tmp_path):
    c = CarbonCache(tmp_path / "carbon")
    await c.start()
    yield c
    await c.stop()


@pytest_twisted.async_yield_fixture
async def publisher(carbon):
    made: list[GraphitePublisher] = []

    def factory(**kw: Any) -> GraphitePublisher:
        kw.setdefault("max_backoff", 0.5)
        pub = GraphitePublisher(addr=carbon.addr, **kw)
        pub.startService()
        made.append(pub)
        return pub

    yield factory
    for pub in made:
        if pub.running:
            await pub.stopService()


async def stored(carbon: CarbonCache, name: str, since: int, want: dict[int, float],
                 timeout: float = 30.0) -> None:
    """Poll whisper (with a deadline) until ``want`` is stored for ``name``."""
    await value_of(lambda: carbon.fetch(name, since), lambda found: all(found.get(ts) == v for ts, v in want.items()),
                   timeout, what=lambda: f"{name}: want {want} in whisper\ncarbon log:\n{carbon.log()[-3000:]}",
                   interval=0.2)


@pytest_twisted.ensureDeferred
async def test_points_reach_whisper(carbon, publisher):
    base = f"taskd.test.g{uuid.uuid4().hex[:8]}"
    now = int(time.time())
    pub = publisher()
    pub.add([Point(1, f"{base}.plain", float(i) + 0.5, now - 10 + i, 1) for i in range(5)])
    pub.add([Point(1, f"{base}.tagged", 42.0, now - 3, 1, tags=("host=web01", "env=prod"))])
    await stored(carbon, f"{base}.plain", now - 60, {now - 10 + i: float(i) + 0.5 for i in range(5)})
    await stored(carbon, f"{base}.tagged;env=prod;host=web01", now - 60, {now - 3: 42.0})
    assert pub.published == 6 and pub.dropped == 0


@pytest_twisted.ensureDeferred
async def test_carbon_restart_loses_nothing_queued(carbon, publisher):
    name = f"taskd.test.r{uuid.uuid4().hex[:8]}"
    now = int(time.time())
    pub = publisher(queue_size=1000)
    await until(lambda: pub.connected, what="connected to carbon")
    pub.add([Point(1, name, 1.0, now - 20, 1)])
    await stored(carbon, name, now - 60, {now - 20: 1.0})
    await carbon.stop()
    await until(lambda: not pub.connected, what="the publisher noticing carbon stopped")
    pub.add([Point(1, name, 2.0 + i, now - 10 + i, 1) for i in range(5)])
    assert pub.queued == 5
    await carbon.start()
    await until(lambda: pub.queued == 0, timeout=20.0, what="the queue sent after carbon restarted")
    await stored(carbon, name, now - 60, {now - 20: 1.0, **{now - 10 + i: 2.0 + i for i in range(5)}})
    assert pub.connections == 2 and pub.dropped == 0
