"""Stand-ins for collectors, publishers and stats, matching their contracts exactly.

The collectors subclass the real `Collector` base (same constructor, `parse_config`,
``async def collect``), so a contract change breaks these tests too. The test decides
what a run does: answer at once (`answer`), fail (`fail_with`), or hang until the test
fires the Deferred it parks in `held`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from twisted.internet.defer import Deferred

from taskd.agent.builtin.collector import CollectError, Collector, ConfigError, Point, Sample, TaskInfo


class FakeCollector(Collector):
    """Needs a ``target`` key in its config; ``bad`` in the config is a ConfigError."""

    def __init__(self, *, reactor: Any, settings: Any) -> None:
        super().__init__(reactor=reactor, settings=settings)
        self.calls: list[tuple[Any, TaskInfo, float]] = []  # (config, task, clock time)
        self.answer: list[Sample] = [Sample(f"raintank.apps.{self.name}.value", 1.0, unit="ms",
                                            tags=("probe=fake",))]
        self.fail_with: BaseException | None = None
        self.hold = False
        self.held: list[Deferred] = []
        self.parsed = 0

    def parse_config(self, config: Mapping[str, Any], task: TaskInfo) -> Any:
        self.parsed += 1
        if "bad" in config:
            raise ConfigError(f"bad: {config['bad']}")
        if "target" not in config:
            raise ConfigError("target is required")
        return {"target": config["target"]}

    async def collect(self, config: Any, task: TaskInfo) -> list[Sample]:
        self.calls.append((config, task, self.reactor.seconds()))
        if self.hold:
            d: Deferred = Deferred()
            self.held.append(d)
            return await d
        if self.fail_with is not None:
            raise self.fail_with
        return list(self.answer)


class FakeHttp(FakeCollector):
    name = "http"
    namespace = "/raintank/apps/http"
    catalog = ({"namespace": "/raintank/apps/http/*/status_code", "version": 1},
               {"namespace": "/raintank/apps/common/*/up", "version": 1})


class FakeNs1(FakeCollector):
    name = "ns1"
    namespace = "/raintank/apps/ns1"
    catalog = ({"namespace": "/raintank/apps/ns1/*/qps", "version": 1},
               {"namespace": "/raintank/apps/common/*/up", "version": 1})


class FakeTcp(FakeCollector):
    name = "tcp"
    namespace = "/raintank/apps/tcp"
    catalog = ({"namespace": "/raintank/apps/tcp/*/connect", "version": 1},)


def collectors(clock: Any) -> dict[str, FakeCollector]:
    return {cls.name: cls(reactor=clock, settings=None) for cls in (FakeHttp, FakeNs1, FakeTcp)}


class FakePublisher:
    """The Publisher protocol: `add` records the batches."""

    name = "fake"

    def __init__(self) -> None:
        self.dropped = 0
        self.published = 0
        self.batches: list[list[Point]] = []

    def add(self, points: Sequence[Point]) -> None:
        self.batches.append(list(points))
        self.published += len(points)

    @property
    def points(self) -> list[Point]:
        return [p for batch in self.batches for p in batch]


class RecordingStats:
    """The stats interface (incr/gauge/timing), remembering every call."""

    enabled = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any, Any]] = []

    def incr(self, name: str, n: int = 1, tags: Any = None) -> None:
        self.calls.append(("incr", name, n, tags))

    def gauge(self, name: str, value: float, tags: Any = None) -> None:
        self.calls.append(("gauge", name, value, tags))

    def timing(self, name: str, ms: float, tags: Any = None) -> None:
        self.calls.append(("timing", name, ms, tags))

    def total(self, name: str) -> float:
        return sum(n for kind, key, n, _ in self.calls if kind == "incr" and key == name)


__all__ = ["FakeCollector", "FakeHttp", "FakeNs1", "FakeTcp", "FakePublisher", "RecordingStats",
           "collectors", "CollectError"]
