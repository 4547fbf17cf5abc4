"""What a light agent was told, replayed from the frames it kept (tests.integration.agent_client).

An agent runs what its last `taskList` said, changed by the `taskAdd` / `taskUpdate` /
`taskRemove` frames after it (docs/protocol.md). `view_of` replays that; `duplicate_pushes`
lists the frames that told the agent something it already had: a `taskAdd` of a task it
holds, a `taskUpdate` identical to what it holds, a task twice in one `taskList`. The
server sends events only for a difference (taskd.server.agentview), so each of those is
a task pushed twice — for a Snap agent, a duplicate Snap task.
"""
from __future__ import annotations

from typing import Any, Iterable

from taskd.wire import framing

TASK_FRAMES = (framing.TASK_LIST, framing.TASK_ADD, framing.TASK_UPDATE, framing.TASK_REMOVE)


def _replay(frames: Iterable[Any]) -> tuple[dict[int, dict] | None, list[str]]:
    view: dict[int, dict] | None = None
    twice: list[str] = []
    for n, frame in enumerate(frames):
        event, payload = frame.event, frame.payload
        if event == framing.TASK_LIST:
            ids = [t["id"] for t in payload or []]
            twice += [f"frame {n}: task {i} {ids.count(i)} times in one taskList" for i in sorted(set(ids))
                      if ids.count(i) > 1]
            view = {t["id"]: t for t in payload or []}
        elif event in (framing.TASK_ADD, framing.TASK_UPDATE, framing.TASK_REMOVE):
            if view is None:
                view = {}  # an event before the first taskList (it is sent at once on connect)
            held = view.get(payload["id"])
            if event == framing.TASK_ADD and held is not None:
                twice.append(f"frame {n}: taskAdd of task {payload['id']}, which it holds")
            elif event == framing.TASK_UPDATE and held == payload:
                twice.append(f"frame {n}: taskUpdate of task {payload['id']} with what it holds")
            if event == framing.TASK_REMOVE:
                view.pop(payload["id"], None)
            else:
                view[payload["id"]] = payload
    return view, twice


def view_of(frames: Iterable[Any]) -> dict[int, dict] | None:
    """task id -> the task JSON the agent runs now; None before any task frame."""
    return _replay(frames)[0]


def duplicate_pushes(frames: Iterable[Any]) -> list[str]:
    return _replay(frames)[1]


def same_task(told: dict, stored: dict) -> bool:
    """The task the agent was told is the stored one (GET /api/v1/tasks/<id>)."""
    return all(told.get(k) == stored.get(k) for k in ("id", "name", "config", "interval", "route", "metrics",
                                                             "enabled", "updated"))
