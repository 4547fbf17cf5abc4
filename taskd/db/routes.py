"""Route queries: who a task goes to, what an agent runs, and the `any` assignments.

The byIds/byTags indexes are written with the task (tasks.py). The `any` index is
written here, race-safely, because several servers may try to (re)assign the same task
at once: inserts rely on the unique task_id, moves are conditional on the previous
agent, so exactly one server wins and only the winner announces the change.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from twisted.internet.defer import Deferred

from taskd.db import models as m
from taskd.db.pool import DBPool
from taskd.db.agents import Agent, load_agents
from taskd.db.staleness import with_staleness
from taskd.db.taskstatus import TaskStatusRow
from taskd.db.taskstatus import for_task as status_for_task
from taskd.db.tasks import ANY, BY_IDS, BY_TAGS, Task, _tasks, load_task
from taskd.routing import Candidate, can_run, covers, pick, visible
from taskd.timeutil import utcnow


def load_candidates(conn: Connection, where: sa.ColumnElement[bool] | None = None) -> list[Candidate]:
    a = m.agent.c
    stmt = sa.select(a.id, a.org_id, a.public, a.online)
    if where is not None:
        stmt = stmt.where(where)
    rows = conn.execute(stmt).all()
    ids = [r.id for r in rows]
    owner = {r.id: r.org_id for r in rows}
    tags: dict[int, set[str]] = {i: set() for i in ids}
    org_tags: dict[int, set[tuple[int, str]]] = {i: set() for i in ids}
    catalogs: dict[int, set[tuple[str, int]]] = {i: set() for i in ids}
    if ids:
        t = m.agent_tag.c
        for agent_id, org_id, tag in conn.execute(sa.select(t.agent_id, t.org_id, t.tag).where(t.agent_id.in_(ids))):
            if org_id == owner[agent_id]:
                tags[agent_id].add(tag)
            else:
                org_tags[agent_id].add((org_id, tag))
        am = m.agent_metric.c
        for agent_id, ns, ver in conn.execute(
            sa.select(am.agent_id, am.namespace, am.version).where(am.agent_id.in_(ids))
        ):
            catalogs[agent_id].add((ns, ver))
    return [
        Candidate(r.id, r.org_id, bool(r.public), bool(r.online), frozenset(tags[r.id]), frozenset(catalogs[r.id]),
                  frozenset(org_tags[r.id]))
        for r in rows
    ]


def any_assignee(conn: Connection, task_id: int) -> int | None:
    return conn.execute(
        sa.select(m.route_by_any_index.c.agent_id).where(m.route_by_any_index.c.task_id == task_id)
    ).scalar()


def routed_agents(conn: Connection, task: Task, among: Iterable[int] | None = None) -> set[int]:
    """Agents that should run `task` now (ignoring `enabled`), optionally only among some
    agent ids. Two queries whatever the number of agents: the online agents the route
    selects, then the catalogs of just those (by subquery, not a list of their ids);
    `among` (the agents a server holds) is applied here in Python, never as an SQL list
    of thousands of ids (bench/analysis.md, fan-out)."""
    a = m.agent.c
    if task.route.type == ANY:
        agent_id = any_assignee(conn, task.id)
        routed = {agent_id} if agent_id is not None else set()
    else:
        if task.route.type == BY_IDS:  # visible to the task's org now (taskd.routing.visible)
            where = sa.and_(a.id.in_(task.route.ids), sa.or_(a.org_id == task.org_id, a.public.is_(True)))
        elif task.route.type == BY_TAGS:  # the task's org's tags, on agents it may see now
            where = sa.and_(a.id.in_(
                sa.select(m.agent_tag.c.agent_id).where(
                    m.agent_tag.c.org_id == task.org_id, m.agent_tag.c.tag.in_(task.route.tags)
                )
            ), sa.or_(a.org_id == task.org_id, a.public.is_(True)))
        else:
            return set()
        selected = sa.select(a.id).where(where, a.online.is_(True))
        routed = set(conn.execute(selected).scalars())
        if routed and task.metrics:  # an empty metric list is covered by any catalog
            am = m.agent_metric.c
            catalogs: dict[int, set[tuple[str, int]]] = {}
            for agent_id, ns, ver in conn.execute(
                sa.select(am.agent_id, am.namespace, am.version).where(am.agent_id.in_(selected))
            ):
                catalogs.setdefault(agent_id, set()).add((ns, ver))
            routed = {i for i in routed if covers(catalogs.get(i, ()), task.metrics)}
    return routed if among is None else routed & set(among)


def tasks_for_agents(conn: Connection, agent_ids: Sequence[int]) -> dict[int, list[Task]]:
    """The enabled tasks each agent should run, in one round of queries for all of them."""
    out: dict[int, list[Task]] = {i: [] for i in agent_ids}
    if not agent_ids:
        return out
    agents = {c.id: c for c in load_candidates(conn, m.agent.c.id.in_(list(agent_ids)))}
    pairs: set[tuple[int, int]] = set()
    for table in (m.route_by_id_index, m.route_by_any_index):
        for task_id, agent_id in conn.execute(
            sa.select(table.c.task_id, table.c.agent_id).where(table.c.agent_id.in_(list(agents)))
        ):
            pairs.add((agent_id, task_id))
    tag_rows = conn.execute(
        sa.select(m.agent_tag.c.agent_id, m.route_by_tag_index.c.task_id).select_from(
            m.agent_tag.join(
                m.route_by_tag_index,
                sa.and_(
                    m.route_by_tag_index.c.org_id == m.agent_tag.c.org_id,
                    m.route_by_tag_index.c.tag == m.agent_tag.c.tag,
                ),
            )
        ).where(m.agent_tag.c.agent_id.in_(list(agents)))
    )
    pairs.update((agent_id, task_id) for agent_id, task_id in tag_rows)
    task_ids = {t for _, t in pairs}
    tasks = {}
    if task_ids:
        rows = conn.execute(sa.select(m.task).where(m.task.c.id.in_(task_ids), m.task.c.enabled.is_(True)))
        tasks = {t.id: t for t in _tasks(conn, rows)}
    for agent_id, task_id in sorted(pairs, key=lambda p: (p[0], tasks[p[1]].name if p[1] in tasks else "")):
        task = tasks.get(task_id)
        if task is not None and visible(agents[agent_id], task.org_id) and covers(agents[agent_id].catalog,
                                                                                   task.metrics):
            out[agent_id].append(task)
    return out


def _visible_online(conn: Connection, org_id: int, exclude: int | None = None) -> list[Candidate]:
    a = m.agent.c
    where = sa.and_(a.online.is_(True), sa.or_(a.org_id == org_id, a.public.is_(True)))
    if exclude is not None:
        where = sa.and_(where, a.id != exclude)
    return load_candidates(conn, where)


def ensure_any_assignment(conn: Connection, task: Task) -> int | None:
    """Give an `any` task an agent if it has none or its agent no longer qualifies.
    Returns the agent id. (A task whose route stops being `any` loses its assignment
    when the task is written: tasks._write_children.)"""
    idx = m.route_by_any_index
    if task.route.type != ANY:
        return None
    current = any_assignee(conn, task.id)
    if current is not None:
        found = load_candidates(conn, m.agent.c.id == current)
        if found and can_run(found[0], task.org_id, task.metrics):
            return current
    chosen = pick([c for c in _visible_online(conn, task.org_id) if can_run(c, task.org_id, task.metrics)])
    if current is not None:
        conn.execute(sa.delete(idx).where(idx.c.task_id == task.id, idx.c.agent_id == current))
    if chosen is None:
        return None
    try:
        with conn.begin_nested():
            conn.execute(sa.insert(idx).values(task_id=task.id, agent_id=chosen.id, created=utcnow()))
    except IntegrityError:  # another server assigned it first
        return any_assignee(conn, task.id)
    return chosen.id


def _move_any_tasks(conn: Connection, agent_id: int, tasks: Sequence[Task]) -> list[tuple[Task, int | None]]:
    """Give each of `agent_id`'s `any` tasks another qualifying online agent, or none.
    Conditional on the task still being on `agent_id`, so concurrent movers cannot
    both win; returns the moves this caller made."""
    idx = m.route_by_any_index
    moved = []
    for task in tasks:
        chosen = pick([c for c in _visible_online(conn, task.org_id, exclude=agent_id)
                       if can_run(c, task.org_id, task.metrics)])
        if chosen is None:
            result = conn.execute(sa.delete(idx).where(idx.c.task_id == task.id, idx.c.agent_id == agent_id))
        else:
            result = conn.execute(
                sa.update(idx).where(idx.c.task_id == task.id, idx.c.agent_id == agent_id)
                .values(agent_id=chosen.id, created=utcnow())
            )
        if result.rowcount == 1:
            moved.append((task, chosen.id if chosen else None))
    return moved


def _any_tasks_of(conn: Connection, agent_id: int) -> list[Task]:
    idx = m.route_by_any_index
    task_ids = conn.execute(sa.select(idx.c.task_id).where(idx.c.agent_id == agent_id)).scalars().all()
    if not task_ids:
        return []
    return _tasks(conn, conn.execute(sa.select(m.task).where(m.task.c.id.in_(task_ids))))


def relocate_from(conn: Connection, agent_id: int) -> list[tuple[Task, int | None]]:
    """Move the `any` tasks of an agent that is (still) offline; returns (task, new agent)
    for the moves this caller won. Nothing moves if the agent came back online."""
    online = conn.execute(sa.select(m.agent.c.online).where(m.agent.c.id == agent_id)).scalar()
    if online:
        return []
    return _move_any_tasks(conn, agent_id, _any_tasks_of(conn, agent_id))


def release_unqualified(conn: Connection, agent_id: int) -> list[tuple[Task, int | None]]:
    """Move the `any` tasks an online agent no longer qualifies for (its catalog or
    visibility changed), so they do not sit on an agent that will not run them."""
    found = load_candidates(conn, m.agent.c.id == agent_id)
    if not found or not found[0].online:
        return []
    agent = found[0]
    unqualified = [t for t in _any_tasks_of(conn, agent_id) if not can_run(agent, t.org_id, t.metrics)]
    return _move_any_tasks(conn, agent_id, unqualified)


def release_unqualified_many(conn: Connection, agent_ids: Sequence[int]) -> list[tuple[Task, int | None]]:
    """`release_unqualified` for each of `agent_ids` that holds an `any` task (one query
    finds them; usually none do)."""
    if not agent_ids:
        return []
    idx = m.route_by_any_index
    holders = conn.execute(
        sa.select(idx.c.agent_id).where(idx.c.agent_id.in_(sorted(set(agent_ids)))).distinct()
    ).scalars().all()
    moved = []
    for agent_id in sorted(holders):
        moved.extend(release_unqualified(conn, agent_id))
    return moved


def connect_assignments(conn: Connection, agent_ids: Sequence[int]) -> tuple[
        list[tuple[Task, int | None]], list[tuple[Task, int | None]], dict[int, frozenset[tuple[str, int]]],
        dict[int, Agent]]:
    """For agents that just connected, in one transaction: move the `any` tasks they no
    longer qualify for, then give them unassigned ones they do. Returns (moved, assigned),
    each as (task, its agent now), each agent's catalog, and each agent as it is now (the
    one its websocket was accepted with was read before its session was held here, so an
    `agent.updated` in between reached no session)."""
    moved = release_unqualified_many(conn, agent_ids)
    assigned = assign_unassigned(conn, agent_ids)
    return (moved, [(task, any_assignee(conn, task.id)) for task in assigned], catalogs_of(conn, agent_ids),
            load_agents(conn, agent_ids))


def catalogs_of(conn: Connection, agent_ids: Sequence[int]) -> dict[int, frozenset[tuple[str, int]]]:
    """Each agent's advertised (namespace, version) pairs (empty for none)."""
    out: dict[int, set[tuple[str, int]]] = {i: set() for i in agent_ids}
    if out:
        am = m.agent_metric.c
        for agent_id, ns, ver in conn.execute(
            sa.select(am.agent_id, am.namespace, am.version).where(am.agent_id.in_(sorted(out)))
        ):
            out[agent_id].add((ns, ver))
    return {i: frozenset(c) for i, c in out.items()}


def assign_unassigned(conn: Connection, agent_ids: Sequence[int] | None = None) -> list[Task]:
    """Give unassigned `any` tasks to qualifying online agents (optionally only to the
    given ones, e.g. an agent that just connected); returns the tasks assigned. The
    route type is filtered by the database (JSON path, on sqlite and MySQL alike): this
    runs on every agent connect, so it must not decode every task's route."""
    idx = m.route_by_any_index
    rows = _tasks(conn, conn.execute(sa.select(m.task).where(
        m.task.c.route["type"].as_string() == ANY, ~m.task.c.id.in_(sa.select(idx.c.task_id)),
    )))
    if not rows:
        return []
    a = m.agent.c
    where = a.online.is_(True)
    if agent_ids is not None:
        where = sa.and_(where, a.id.in_(list(agent_ids)))
    candidates = load_candidates(conn, where)
    assigned = []
    for task in rows:
        chosen = pick([c for c in candidates if can_run(c, task.org_id, task.metrics)])
        if chosen is None:
            continue
        try:
            with conn.begin_nested():
                conn.execute(sa.insert(idx).values(task_id=task.id, agent_id=chosen.id, created=utcnow()))
            assigned.append(task)
        except IntegrityError:
            continue
    return assigned


def stale_holders(conn: Connection, offline_for: float) -> list[int]:
    """Agents offline for longer than `offline_for` seconds that still hold an enabled
    `any` task."""
    idx, a, t = m.route_by_any_index.c, m.agent.c, m.task.c
    cutoff = utcnow() - timedelta(seconds=offline_for)
    return sorted(conn.execute(
        sa.select(idx.agent_id).distinct()
        .join(m.agent, a.id == idx.agent_id).join(m.task, t.id == idx.task_id)
        .where(a.online.is_(False), t.enabled.is_(True),
               sa.or_(a.online_change.is_(None), a.online_change <= cutoff))
    ).scalars().all())


def sweep_any(conn: Connection, offline_for: float) -> tuple[list[tuple[Task, int | None]], list[Task]]:
    """The level-triggered half of `any` routing, run periodically and at start-up by
    every server: move each enabled `any` task whose agent has been offline for longer
    than `offline_for` (the relocation delay) exactly as `relocate_from` would have on
    that agent's `agent.offline` (to a capable online agent, or unassigned), then assign
    the unassigned ones. So the end state does not depend on the event having been
    seen, lost, or never sent (a server SIGKILLed, a restart that marked its agents
    offline before its dispatcher ran). Returns (moved as (task, new agent), assigned)."""
    moved = []
    for agent_id in stale_holders(conn, offline_for):
        tasks = [task for task in _any_tasks_of(conn, agent_id) if task.enabled]
        moved.extend(_move_any_tasks(conn, agent_id, tasks))
    return moved, assign_unassigned(conn, None)


def routing_snapshot(conn: Connection, task_id: int) -> tuple[Task | None, set[int]]:
    """The task as it is now and every agent it is routed to (one transaction); the
    caller picks the agents it holds."""
    from taskd.db.tasks import load_task_by_id

    task = load_task_by_id(conn, task_id)
    if task is None:
        return None, set()
    return task, routed_agents(conn, task)


@dataclass(frozen=True)
class TaskDetail:
    """A task with whom it is routed to and what each of them reported: the answer to
    `GET /api/v1/tasks/<id>`, read in one transaction so the three parts agree."""

    task: Task
    agents: list[int]
    statuses: list[TaskStatusRow]
    unrouted: list[tuple[int, str]] = field(default_factory=list)  # byIds: (agent id, why not)


def task_detail(conn: Connection, org_id: int, task_id: int, stale_floor: float = 60.0) -> TaskDetail | None:
    task = load_task(conn, org_id, task_id)
    if task is None:
        return None
    agents = routed_agents(conn, task)
    statuses = with_staleness(conn, task, sorted(agents), status_for_task(conn, task.id, visible_to=org_id), utcnow(),
                              stale_floor)
    return TaskDetail(task, sorted(agents), statuses, unrouted_ids(conn, task, agents))


def unrouted_ids(conn: Connection, task: Task, routed: set[int]) -> list[tuple[int, str]]:
    """Why each agent a byIds task names does not get it now. An agent the org may no
    longer see reads as "not visible" whether it was deleted or made private, so the
    answer tells another org's tenant nothing about that org's agents."""
    if task.route.type != BY_IDS:
        return []
    missing = [i for i in task.route.ids if i not in routed]
    if not missing:
        return []
    found = {c.id: c for c in load_candidates(conn, m.agent.c.id.in_(missing))}
    out = []
    for agent_id in missing:
        agent = found.get(agent_id)
        if agent is None or not visible(agent, task.org_id):
            why = "not visible to this org (deleted, or another org's agent that is no longer public)"
        elif not agent.online:
            why = "offline"
        else:
            why = "its catalog does not provide the task's metrics"
        out.append((agent_id, why))
    return out


class RouteStore:
    """The routing aggregate behind the connector (`db.routes`): who a task goes to, what
    agents run, and the `any` assignments. Each call is one transaction in the pool."""

    def __init__(self, pool: DBPool) -> None:
        self._pool = pool
        self.stale_floor = 60.0  # the server's stale-min-window (taskd.db.staleness)

    def snapshot(self, task_id: int) -> "Deferred[tuple[Task | None, set[int]]]":
        """The task as it is now and every agent it is routed to."""
        return self._pool.do(routing_snapshot, task_id)

    def task_detail(self, org_id: int, task_id: int) -> "Deferred[TaskDetail | None]":
        """The task of `org_id`, its agents and the statuses of agents that org may see."""
        return self._pool.do(task_detail, org_id, task_id, self.stale_floor)

    def capable(self, org_id: int, metrics: dict[str, int]) -> "Deferred[list[int]]":
        """Online agents that may run a task of `org_id` with `metrics` (as for `any`):
        the org's own first, then public ones, by id."""
        def thd(conn: Connection) -> list[int]:
            found = [c for c in _visible_online(conn, org_id) if can_run(c, org_id, metrics)]
            return [c.id for c in sorted(found, key=lambda c: (c.org_id != org_id, c.id))]

        return self._pool.do(thd)

    def tasks_for_agents(self, agent_ids: Sequence[int]) -> "Deferred[dict[int, list[Task]]]":
        return self._pool.do(tasks_for_agents, list(agent_ids))

    def release_unqualified(self, agent_id: int) -> "Deferred[list[tuple[Task, int | None]]]":
        return self._pool.do(release_unqualified, agent_id)

    def assign_unassigned(self, agent_ids: Sequence[int] | None = None) -> "Deferred[list[Task]]":
        return self._pool.do(assign_unassigned, None if agent_ids is None else list(agent_ids))

    def connect_assignments(self, agent_ids: Sequence[int]) -> Deferred:
        """See `connect_assignments`: (moved, assigned, catalogs, agents)."""
        return self._pool.do(connect_assignments, list(agent_ids))

    def relocate_from(self, agent_id: int) -> "Deferred[list[tuple[Task, int | None]]]":
        return self._pool.do(relocate_from, agent_id)

    def sweep_any(self, offline_for: float) -> "Deferred[tuple[list[tuple[Task, int | None]], list[Task]]]":
        """See `sweep_any`: (moved, assigned)."""
        return self._pool.do(sweep_any, offline_for)

