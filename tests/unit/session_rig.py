"""What the session-timer and agent-view unit tests share: a transport that records the
frames (and their order across agents), tasks, and the taskList reads made of the
FakeDatabase (tests/fakes/fakedb.py) the dispatcher reads them from."""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from taskd.db.tasks import Route, Task
from taskd.wire import framing
from tests.fakes.fakedb import FakeDatabase

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

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def take(self) -> list[tuple[str, Any]]:
        frames, self.frames = self.frames, []
        return [(event, json.loads(payload)) for event, payload in frames]


def task_list_reads(db: FakeDatabase) -> list[list[int]]:
    """The agent ids of each `tasks_for_agents` read, in order."""
    return [list(ids) for ids, in db.called(db.routes.tasks_for_agents)]


def task(task_id: int, interval: int = 60, name: str | None = None, to: tuple[int, ...] = ()) -> Task:
    """A task routed by tag, or to the agents `to` by id."""
    route = Route("byIds", {"ids": list(to)}) if to else Route("byTags", {"tags": ["t"]})
    return Task(task_id, 1, name or f"task-{task_id}", "", {"/x": {"a": 1}}, interval, route, {}, True, T0, T0)
