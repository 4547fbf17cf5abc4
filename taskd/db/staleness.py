"""Stale tasks: routed, enabled, their agent online, and no run reported for too long.

The complaint users have most about probes (an agent shown online that silently runs
nothing: a dead executor loop, a wedged Snap) is invisible in an agent's own reports,
because it stops reporting. The server knows each task's interval and each agent's last
reported run, so it can say so: a (task, agent) pair is stale when the task is routed
to the agent, enabled, the agent is online, and the latest of the agent's last reported
run of it, the agent coming online and the task's last change is older than
`window(interval)` = max(3 intervals, 60 s).

Only agents that have reported some task status are judged: agents older than the
`taskStatus` event (the Go task-agent) never report, and all their tasks would
otherwise read stale. Times are the server's (`updated` is stored by the server; a run's
`last_run` is the agent's clock, so the 60 s floor also absorbs modest clock skew).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from taskd.db import models as m
from taskd.db.taskstatus import TaskStatusRow, _chunks
from taskd.db.tasks import Task
from taskd.outcomes import STATUS_ERROR, STATUS_STALE

MIN_WINDOW = 60.0
INTERVALS = 3


def window(interval: int, floor: float = MIN_WINDOW) -> float:
    """Seconds without a reported run after which a routed task is stale (`floor`: the
    server's stale-min-window)."""
    return max(INTERVALS * float(interval), floor)


@dataclass(frozen=True)
class Staleness:
    task_id: int
    agent_id: int
    since: datetime       # the last reported run, or the baseline before any
    seconds: float        # how long ago
    window: float
    interval: int = 0

    @property
    def error(self) -> str:
        return (f"no run reported for {self.seconds:.0f}s (expected every {self.interval}s;"
                f" stale after {self.window:.0f}s): is the agent's executor running?")


def _agents(conn: Connection, agent_ids: Sequence[int]) -> dict[int, datetime | None]:
    """Online agents that report statuses -> when they came online."""
    a, s = m.agent.c, m.task_status.c
    out: dict[int, datetime | None] = {}
    for chunk in _chunks(sorted(set(agent_ids))):  # (bounded IN lists: sqlite's variable limit)
        reporting = sa.select(s.agent_id).where(s.agent_id.in_(chunk)).distinct()
        rows = conn.execute(sa.select(a.id, a.online_change).where(
            a.id.in_(chunk), a.online.is_(True), a.id.in_(reporting)))
        out.update((r.id, r.online_change) for r in rows)
    return out


def _last_runs(conn: Connection, agent_ids: Sequence[int]) -> dict[tuple[int, int], datetime | None]:
    s = m.task_status.c
    rows = conn.execute(sa.select(s.task_id, s.agent_id, s.last_run).where(s.agent_id.in_(list(agent_ids))))
    return {(r.task_id, r.agent_id): r.last_run for r in rows}


def judge(task: Task, agent_id: int, online_change: datetime | None, last_run: datetime | None,
          now: datetime, floor: float = MIN_WINDOW) -> Staleness | None:
    """Stale when the latest of its last reported run, the agent coming online and the
    task's last change (each of those starts a new window) is older than the window."""
    baseline = max(d for d in (last_run, online_change, task.updated) if d is not None)
    ago = (now - baseline).total_seconds()
    limit = window(task.interval, floor)
    return Staleness(task.id, agent_id, last_run or baseline, ago, limit, task.interval) if ago > limit else None


def stale_by_agent(conn: Connection, agent_ids: Sequence[int], now: datetime,
                   floor: float = MIN_WINDOW) -> dict[int, list[Staleness]]:
    """agent id -> its stale tasks (every id in `agent_ids` is a key)."""
    from taskd.db.routes import tasks_for_agents  # routes imports this module's users

    out: dict[int, list[Staleness]] = {i: [] for i in agent_ids}
    online = _agents(conn, agent_ids)
    if not online:
        return out
    runs = _last_runs(conn, list(online))
    for agent_id, tasks in tasks_for_agents(conn, list(online)).items():
        for task in tasks:
            verdict = judge(task, agent_id, online[agent_id], runs.get((task.id, agent_id)), now, floor)
            if verdict is not None:
                out[agent_id].append(verdict)
    return out


def stale_for_task(conn: Connection, task: Task, routed: Sequence[int], now: datetime,
                   floor: float = MIN_WINDOW) -> dict[int, Staleness]:
    """agent id -> staleness, for the agents `task` is routed to now."""
    if not task.enabled or not routed:
        return {}
    online = _agents(conn, routed)
    s = m.task_status.c
    runs = {}
    for chunk in _chunks(sorted(online)):
        runs.update((r.agent_id, r.last_run) for r in conn.execute(
            sa.select(s.agent_id, s.last_run).where(s.task_id == task.id, s.agent_id.in_(chunk))))
    out = {}
    for agent_id, came_online in online.items():
        verdict = judge(task, agent_id, came_online, runs.get(agent_id), now, floor)
        if verdict is not None:
            out[agent_id] = verdict
    return out


def with_staleness(conn: Connection, task: Task, routed: Sequence[int], statuses: list[TaskStatusRow],
                   now: datetime, floor: float = MIN_WINDOW) -> list[TaskStatusRow]:
    """`statuses` with every stale routed agent's entry marked `stale` (and one added, in
    agent-name order, for a stale agent that never reported this task)."""
    stale = stale_for_task(conn, task, routed, now, floor)
    if not stale:
        return statuses
    out = [replace(row, outcome=STATUS_STALE, error=stale[row.agent_id].error) if row.agent_id in stale else row
           for row in statuses]
    reported = {row.agent_id for row in statuses}
    missing = [agent_id for agent_id in stale if agent_id not in reported]
    if missing:
        names = {}
        for chunk in _chunks(missing):
            names.update(conn.execute(sa.select(m.agent.c.id, m.agent.c.name).where(m.agent.c.id.in_(chunk))).all())
        out += [TaskStatusRow(task_id=task.id, agent_id=agent_id, executor="", outcome=STATUS_STALE,
                              error=stale[agent_id].error, agent_name=names.get(agent_id, ""))
                for agent_id in missing]
        out.sort(key=lambda r: (r.agent_name, r.agent_id))
    return out


def counts(conn: Connection, agent_ids: Sequence[int], now: datetime,
           floor: float = MIN_WINDOW) -> dict[int, tuple[int, int]]:
    """agent id -> (failing, stale): tasks whose last report there is an error, and tasks
    stale there that are not already counted as failing. Read CHUNK agents at a time: the
    stale gauge asks for every agent a server holds (tens of thousands), and one IN list
    that long passes sqlite's variable limit and MariaDB's packet size."""
    out: dict[int, tuple[int, int]] = {}
    for chunk in _chunks(sorted(set(agent_ids))):
        out.update(_counts(conn, chunk, now, floor))
    return out


def _counts(conn: Connection, agent_ids: Sequence[int], now: datetime, floor: float) -> dict[int, tuple[int, int]]:
    from taskd.db.taskstatus import failing_counts

    failing = failing_counts(conn, agent_ids)
    stale = stale_by_agent(conn, agent_ids, now, floor)
    if not any(stale.values()):
        return {i: (failing.get(i, 0), 0) for i in agent_ids}
    s = m.task_status.c
    erring = {(r.task_id, r.agent_id) for r in conn.execute(
        sa.select(s.task_id, s.agent_id).where(s.agent_id.in_(list(agent_ids)), s.outcome == STATUS_ERROR))}
    out = {}
    for agent_id in agent_ids:
        extra = [v for v in stale.get(agent_id, ()) if (v.task_id, agent_id) not in erring]
        out[agent_id] = (failing.get(agent_id, 0) + len(extra), len(stale.get(agent_id, ())))
    return out
