"""What the session-timer and agent-view unit tests share: a transport that records the
frames (and their order across agents), and a pool that answers `tasks_for_agents`
reads (at once, or when the test says so)."""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from twisted.internet.defer import Deferred, succeed

from taskd.db.tasks import Route, Task
from taskd.wire import framing

T0 = datetime(2024, 1, 2, 3, 4, 5)


class Transport:
    def __init__(self, log: list) -> None:
        self.log = log  # shared by all transports: the order frames were written in
        self.frames: list[tuple[str, Any]] = []

    def send_frame(self, data: bytes) -> None:
        frame = framing.decode(data)
        self.frames.append((frame.event, frame.payload))
        self.log.append((self, frame.event))

    def close(self, code: int, reason: str) -> None:
        pass

    def take(self) -> list[tuple[str, Any]]:
        frames, self.frames = self.frames, []
        return [(event, json.loads(payload)) for event, payload in frames]


class Pool:
    def __init__(self, tasks: dict[int, list[Task]] | None = None) -> None:
        self.tasks = tasks or {}
        self.reads: list[list[int]] = []

    def do(self, fn, ids):
        assert fn.__name__ == "tasks_for_agents"
        self.reads.append(list(ids))
        return succeed({i: list(self.tasks.get(i, [])) for i in ids})


class StalledPool(Pool):
    """A database that does not answer until the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Deferred] = []

    def do(self, fn, ids):
        assert fn.__name__ == "tasks_for_agents"
        self.reads.append(list(ids))
        self.held.append(Deferred())
        return self.held[-1]


def task(task_id: int, interval: int = 60, name: str | None = None) -> Task:
    return Task(task_id, 1, name or f"task-{task_id}", "", {"/x": {"a": 1}}, interval,
                Route("byTags", {"tags": ["t"]}), {}, True, T0, T0)
