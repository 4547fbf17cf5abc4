"""The tasks aggregate: a task, its metrics and its route indexes, written together."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from twisted.internet.defer import Deferred, DeferredList

from taskd.db import models as m
from taskd.db.availability import DatabaseUnavailable
from taskd.errors import Conflict, Invalid, NotFound, StoreError
from taskd.db.listing import Page, match, paginate
from taskd.db.pool import DBPool
from taskd.timeutil import utcnow

from taskd.routing import ANY, BY_IDS, BY_TAGS, visible  # noqa: F401 (re-exported)

@dataclass(frozen=True)
class Route:
    type: str
    config: dict = field(default_factory=dict)  # {} | {"tags": [...]} | {"ids": [...]}

    @property
    def tags(self) -> list[str]:
        return list(self.config.get("tags", []))

    @property
    def ids(self) -> list[int]:
        return list(self.config.get("ids", []))

@dataclass(frozen=True)
class TaskSpec:
    """A validated task as a client sent it (see taskd.server.validation)."""

    name: str
    task_type: str
    config: dict
    interval: int
    route: Route
    metrics: dict[str, int]
    enabled: bool

@dataclass(frozen=True)
class Task:
    id: int
    org_id: int
    name: str
    task_type: str
    config: dict
    interval: int
    route: Route
    metrics: dict[str, int]
    enabled: bool
    created: datetime
    updated: datetime

@dataclass(frozen=True)
class TaskFilter:
    name: str | None = None
    metric: str | None = None
    enabled: bool | None = None

ORDERABLE = {
    "id": m.task.c.id,
    "name": m.task.c.name,
    "taskType": m.task.c.task_type,
    "interval": m.task.c.interval,
    "enabled": m.task.c.enabled,
    "created": m.task.c.created,
    "updated": m.task.c.updated,
}

def _tasks(conn: Connection, rows: Iterable[sa.Row]) -> list[Task]:
    rows = list(rows)
    metrics: dict[int, dict[str, int]] = {r.id: {} for r in rows}
    if rows:
        tm = m.task_metric.c
        for task_id, ns, ver in conn.execute(
            sa.select(tm.task_id, tm.namespace, tm.version).where(tm.task_id.in_(list(metrics)))
        ):
            metrics[task_id][ns] = ver
    out = []
    for r in rows:
        route = r.route or {}
        out.append(Task(
            id=r.id, org_id=r.org_id, name=r.name, task_type=r.task_type, config=r.config or {},
            interval=r.interval, route=Route(route.get("type", ANY), route.get("config") or {}),
            metrics=dict(sorted(metrics[r.id].items())), enabled=bool(r.enabled),
            created=r.created, updated=r.updated,
        ))
    return out

def load_task(conn: Connection, org_id: int, task_id: int) -> Task | None:
    found = _tasks(conn, conn.execute(
        sa.select(m.task).where(m.task.c.id == task_id, m.task.c.org_id == org_id)
    ))
    return found[0] if found else None

# Statements built once: building one per call (values(), coercions, its cache key) cost
# several times what sqlite takes to run it (bench/analysis.md, API POST).
_VISIBLE_AGENT_IDS = sa.select(m.agent.c.id).where(
    m.agent.c.id.in_(sa.bindparam("ids", expanding=True)),
    sa.or_(m.agent.c.org_id == sa.bindparam("org_id"), m.agent.c.public.is_(True)),
)
# The common case, one id, without an expanding IN: SQLAlchemy re-renders an expanding
# parameter on every execution (35 -> 24 us per check on sqlite, measured).
_VISIBLE_AGENT_ID = sa.select(m.agent.c.id).where(
    m.agent.c.id == sa.bindparam("id"),
    sa.or_(m.agent.c.org_id == sa.bindparam("org_id"), m.agent.c.public.is_(True)),
)
_INSERT_TASK = sa.insert(m.task)
# Many tasks in one statement, their ids in the order of the rows given (insertmanyvalues;
# CREATE_BATCH rows stay one statement, well under its page of 1,000).
_INSERT_TASK_RETURNING = sa.insert(m.task).returning(m.task.c.id, sort_by_parameter_order=True)
_INSERT_METRIC = sa.insert(m.task_metric)
_INSERT_BY_ID = sa.insert(m.route_by_id_index)
_INSERT_BY_TAG = sa.insert(m.route_by_tag_index)


def _check_route_ids(conn: Connection, org_id: int, ids: Sequence[int]) -> None:
    unique = set(ids)
    if len(unique) == 1:
        [one] = unique
        found = set(conn.execute(_VISIBLE_AGENT_ID, {"id": one, "org_id": org_id}).scalars())
    else:
        found = set(conn.execute(_VISIBLE_AGENT_IDS, {"ids": sorted(unique), "org_id": org_id}).scalars())
    _refuse_missing(unique - found)


def _refuse_missing(missing: Iterable[int]) -> None:
    if missing:
        raise Invalid(
            "route.config.ids: no agent visible to this org has id "
            + ", ".join(str(i) for i in sorted(missing))
        )

def _write_children(conn: Connection, task_id: int, org_id: int, spec: TaskSpec, now: datetime,
                    *, fresh: bool = False) -> None:
    """(Re)write task_metric and the byIds/byTags indexes; the `any` assignment is the
    router's business and is only dropped when the route stops being `any`. `fresh`: the
    task was just inserted, so there is nothing to delete first."""
    if not fresh:
        _delete_children(conn, task_id, keep_any=spec.route.type == ANY)
    _insert_children(conn, [(task_id, org_id, spec, now)])


def _insert_children(conn: Connection, written: Sequence[tuple[int, int, TaskSpec, datetime]]) -> None:
    """The child rows of tasks just written, one statement per table for them all."""
    metrics, by_id, by_tag = [], [], []
    for task_id, org_id, spec, now in written:
        metrics += [{"task_id": task_id, "namespace": ns, "version": ver, "created": now}
                    for ns, ver in spec.metrics.items()]
        if spec.route.type == BY_IDS:
            by_id += [{"task_id": task_id, "agent_id": i, "created": now} for i in sorted(set(spec.route.ids))]
        elif spec.route.type == BY_TAGS:
            by_tag += [{"task_id": task_id, "org_id": org_id, "tag": t, "created": now}
                       for t in sorted(set(spec.route.tags))]
    for statement, rows in ((_INSERT_METRIC, metrics), (_INSERT_BY_ID, by_id), (_INSERT_BY_TAG, by_tag)):
        if rows:
            conn.execute(statement, rows)

def _delete_children(conn: Connection, task_id: int, *, keep_any: bool = False) -> None:
    tables = [m.task_metric, m.route_by_id_index, m.route_by_tag_index]
    if not keep_any:
        tables.append(m.route_by_any_index)
    for table in tables:
        conn.execute(sa.delete(table).where(table.c.task_id == task_id))


def _conflict(name: str) -> Conflict:
    return Conflict(f"a task named {name!r} already exists in this org; choose another name")

def _name_taken(conn: Connection, org_id: int, name: str, except_id: int | None = None) -> bool:
    q = sa.select(m.task.c.id).where(m.task.c.org_id == org_id, m.task.c.name == name)
    if except_id is not None:
        q = q.where(m.task.c.id != except_id)
    return conn.execute(q).first() is not None

def _route_json(route: Route) -> dict:
    return {"type": route.type, "config": route.config}

CREATE_BATCH = 100  # creates written per transaction at most
GATHER_WAIT = 0.001
"""Seconds a create may wait for the rest of a burst to join its transaction (see
`TaskStore.create`)."""


def _create(conn: Connection, org_id: int, spec: TaskSpec, now: datetime) -> Task:
    """Insert a new task and its children; returns it as written (without reading it
    back). A taken name is found by the unique constraint, not by a query first."""
    if spec.route.type == BY_IDS:
        _check_route_ids(conn, org_id, spec.route.ids)
    try:
        task_id = conn.execute(_INSERT_TASK, _task_row(org_id, spec, now)).inserted_primary_key[0]
    except IntegrityError:  # the statement failed alone: the transaction goes on
        raise _conflict(spec.name) from None
    _write_children(conn, task_id, org_id, spec, now, fresh=True)
    return _written(conn, task_id, org_id, spec, now)


def _task_row(org_id: int, spec: TaskSpec, now: datetime) -> dict[str, Any]:
    return {"org_id": org_id, "name": spec.name, "task_type": spec.task_type, "config": spec.config,
            "interval": spec.interval, "route": _route_json(spec.route), "enabled": spec.enabled,
            "created": now, "updated": now}


def _written(conn: Connection, task_id: int, org_id: int, spec: TaskSpec, now: datetime) -> Task:
    """The task as just inserted (not read back), given its `any` agent."""
    task = Task(
        id=task_id, org_id=org_id, name=spec.name, task_type=spec.task_type, config=spec.config,
        interval=spec.interval, route=Route(spec.route.type, spec.route.config),
        metrics=dict(sorted(spec.metrics.items())), enabled=spec.enabled, created=now, updated=now,
    )
    _assign_any(conn, task)
    return task


def _create_batch(conn: Connection, batch: Sequence[tuple[int, TaskSpec, datetime]]) -> list[tuple[bool, Any]]:
    """Write the creates of one group-commit transaction in one statement per table
    (the route-id check, the tasks, each kind of child row) instead of three or four
    per task: on MariaDB each statement is a round trip plus its driver's and
    SQLAlchemy's CPU, which was most of a batch's time (bench/analysis.md, API POST).
    A bad route id fails its own create before anything is written. A taken name
    fails the one multi-row INSERT, which InnoDB undoes as a whole (it rolls back the
    statement, not the transaction), and then the creates are written one by one, so
    only that one fails. The multi-row INSERT needs RETURNING with the ids in the
    rows' order, which MariaDB >= 10.5 has; SQLAlchemy runs it row by row on sqlite
    (where a statement costs microseconds anyway), so there, as on MySQL, each task
    is inserted alone."""
    out: list[tuple[bool, Any] | None] = [None] * len(batch)
    for i, exc in _route_id_failures(conn, batch).items():
        out[i] = (False, exc)
    todo = [i for i, done in enumerate(out) if done is None]
    if len(todo) > 1 and _inserts_many_at_once(conn):
        try:
            ids = conn.execute(_INSERT_TASK_RETURNING, [_task_row(*batch[i]) for i in todo]).scalars().all()
        except IntegrityError:  # InnoDB undid that one statement, every row of it
            ids = None
        if ids is not None:
            _insert_children(conn, [(task_id, batch[i][0], batch[i][1], batch[i][2]) for task_id, i in zip(ids, todo)])
            for task_id, i in zip(ids, todo):
                out[i] = (True, _written(conn, task_id, *batch[i]))
            todo = []
    for i in todo:
        try:
            out[i] = (True, _create(conn, *batch[i]))
        except StoreError as exc:  # raised before this task wrote anything
            out[i] = (False, exc)
    return out  # type: ignore[return-value]


def _inserts_many_at_once(conn: Connection) -> bool:
    d = conn.dialect
    return d.name == "mysql" and bool(d.insert_executemany_returning_sort_by_parameter_order)


def _route_id_failures(conn: Connection, batch: Sequence[tuple[int, TaskSpec, datetime]]) -> dict[int, Invalid]:
    """The creates of `batch` whose byIds route names an agent their org cannot see, by
    position, from one SELECT for every id the batch names."""
    wanted = {i: set(spec.route.ids) for i, (_, spec, _) in enumerate(batch) if spec.route.type == BY_IDS}
    if not wanted:
        return {}
    a = m.agent.c
    ids = sorted(set().union(*wanted.values()))
    agents = {row.id: row for row in conn.execute(sa.select(a.id, a.org_id, a.public).where(a.id.in_(ids)))}
    failures: dict[int, Invalid] = {}
    for i, unique in wanted.items():
        org_id = batch[i][0]  # the rule of taskd.routing, on the rows (they carry org_id and public)
        missing = [agent_id for agent_id in unique if agent_id not in agents or not visible(agents[agent_id], org_id)]
        try:
            _refuse_missing(missing)
        except Invalid as exc:
            failures[i] = exc
    return failures


def _assign_any(conn: Connection, task: Task) -> None:
    """An `any` task gets its agent in the transaction that writes it, so no server can
    read the task without its assignment, and a failed write leaves neither."""
    if task.route.type == ANY:
        from taskd.db.routes import ensure_any_assignment  # routes builds on this module

        ensure_any_assignment(conn, task)


class TaskStore:
    def __init__(self, pool: DBPool, now: Callable[[], datetime] = utcnow) -> None:
        self.pool = pool
        self.now = now
        # waiting for a transaction: (org, spec, now, waiter, when it arrived on the pool's clock)
        self._creates: list[tuple[int, TaskSpec, datetime, Deferred, float]] = []
        self._creating = False
        self._gathering: Any = None  # the DelayedCall ending a wait for a burst to join
        self._last_batch = 1  # creates in the latest transaction
        self.create_transactions = 0

    def create(self, org_id: int, spec: TaskSpec) -> "Deferred[Task]":
        """Write a new task. Group commit: creates that arrive while another create's
        transaction runs are written together in the next one, which saves a
        transaction and two thread hops per task under load (bench/analysis.md, API
        POST). Each request still gets its own answer: a taken name or a bad route id
        fails before its task writes anything, and the batch goes on; anything else
        fails the batch's transaction, and its creates are then retried one per
        transaction, so only the one at fault fails. The pool's deadline (db-timeout)
        counts from each create's arrival, its wait for the batch before included; a
        batch the database does not answer fails all its creates at once.

        Under a steady load of N concurrent clients, the creates of a batch are
        answered together, and their clients' next creates arrive one by one: the
        first would start a transaction of its own and the others wait for it, so
        batches alternated between 1 and N-1 (on MariaDB each transaction is a few
        round trips whatever its size). So when the latest batch held more creates than
        are waiting, the next waits up to GATHER_WAIT for as many to arrive; a lone
        client's creates (batches of one) never wait."""
        waiter: Deferred = Deferred()
        self._creates.append((org_id, spec, self.now(), waiter, self.pool.reactor.seconds()))
        self._next_batch()
        return waiter

    def _next_batch(self) -> None:
        """Start the next transaction now, or once the burst has gathered (see `create`)."""
        if self._creating or not self._creates:
            return
        if len(self._creates) >= self._last_batch:
            if self._gathering is not None:
                self._gathering.cancel()
                self._gathering = None
            self._write_creates()
        elif self._gathering is None:
            self._gathering = self.pool.reactor.callLater(GATHER_WAIT, self._gathered)

    def _gathered(self) -> None:
        self._gathering = None
        self._write_creates()

    def _time_left(self, batch: list[tuple[Any, ...]]) -> float | None:
        """What is left of the deadline of the longest-waiting create of `batch`."""
        if self.pool.timeout is None:
            return None
        return min(item[4] for item in batch) + self.pool.timeout - self.pool.reactor.seconds()

    def _write_creates(self) -> None:
        batch, self._creates = self._creates[:CREATE_BATCH], self._creates[CREATE_BATCH:]
        self._creating = True
        self._last_batch = len(batch)
        self.create_transactions += 1

        def thd(conn: Connection) -> list[tuple[bool, Any]]:
            if len(batch) == 1:  # any failure rolls the whole (one-task) transaction back
                org_id, spec, now, _, _ = batch[0]
                return [(True, _create(conn, org_id, spec, now))]
            return _create_batch(conn, [item[:3] for item in batch])

        def written(results: list[tuple[bool, Any]]) -> None:
            for (ok, value), (_, _, _, waiter, _) in zip(results, batch):
                if ok:
                    waiter.callback(value)
                else:
                    waiter.errback(value)

        def failed(failure: Any) -> Any:
            if len(batch) == 1 or failure.check(DatabaseUnavailable):
                # (unanswered, the database would not answer each alone either, in time)
                for item in batch:
                    item[3].errback(failure)
                return None
            # One create broke the shared transaction: each on its own now.
            return DeferredList([
                self.pool.do_within(self._time_left([item]), _create, *item[:3]).addCallbacks(item[3].callback,
                                                                                          item[3].errback)
                for item in batch
            ], consumeErrors=True)

        def next_batch(_: Any) -> None:
            self._creating = False
            self._next_batch()

        self.pool.do_within(self._time_left(batch), thd).addCallbacks(written, failed).addBoth(next_batch)

    def update(self, org_id: int, task_id: int, spec: TaskSpec) -> "Deferred[tuple[Task, Task]]":
        now = self.now()

        def thd(conn: Connection) -> tuple[Task, Task]:
            old = load_task(conn, org_id, task_id)
            if old is None:
                raise NotFound(f"task {task_id} does not exist in this org")
            if spec.name != old.name and _name_taken(conn, org_id, spec.name, except_id=task_id):
                raise _conflict(spec.name)
            if spec.route.type == BY_IDS:
                _check_route_ids(conn, org_id, spec.route.ids)
            try:
                conn.execute(sa.update(m.task).where(m.task.c.id == task_id).values(
                    name=spec.name, task_type=spec.task_type, config=spec.config,
                    interval=spec.interval, route=_route_json(spec.route), enabled=spec.enabled,
                    updated=now,
                ))
            except IntegrityError:
                raise _conflict(spec.name) from None
            _write_children(conn, task_id, org_id, spec, now)
            new = load_task(conn, org_id, task_id)
            _assign_any(conn, new)
            return old, new

        return self.pool.do(thd)

    def delete(self, org_id: int, task_id: int) -> "Deferred[Task]":
        def thd(conn: Connection) -> Task:
            old = load_task(conn, org_id, task_id)
            if old is None:
                raise NotFound(f"task {task_id} does not exist in this org")
            _delete_children(conn, task_id)
            # Statuses outlive updates (a fixed task clears its error on the next run),
            # so they are not a child _delete_children rewrites; they go with the task.
            conn.execute(sa.delete(m.task_status).where(m.task_status.c.task_id == task_id))
            conn.execute(sa.delete(m.task).where(m.task.c.id == task_id))
            return old

        return self.pool.do(thd)

    def count_by_enabled(self) -> "Deferred[tuple[int, int]]":
        """(enabled, disabled) tasks of every org: the tasks.active/tasks.disabled gauges."""
        return self.pool.do(count_by_enabled)

    def list(self, org_id: int, flt: TaskFilter, page: Page) -> "Deferred[list[Task]]":
        t = m.task.c
        stmt = sa.select(m.task).where(t.org_id == org_id)
        if flt.name is not None:
            stmt = stmt.where(match(t.name, flt.name))
        if flt.enabled is not None:
            stmt = stmt.where(t.enabled.is_(flt.enabled))
        if flt.metric is not None:
            stmt = stmt.where(t.id.in_(
                sa.select(m.task_metric.c.task_id).where(match(m.task_metric.c.namespace, flt.metric))
            ))
        stmt = paginate(stmt, page, ORDERABLE, t.id)
        return self.pool.do(lambda conn: _tasks(conn, conn.execute(stmt)))


def load_task_by_id(conn: Connection, task_id: int) -> Task | None:
    """Any org's task: for routing, which serves every org from one server."""
    found = _tasks(conn, conn.execute(sa.select(m.task).where(m.task.c.id == task_id)))
    return found[0] if found else None


def count_by_enabled(conn: Connection) -> tuple[int, int]:
    """(enabled, disabled) tasks of every org: the tasks.active/tasks.disabled gauges."""
    t = m.task.c
    counts = dict(conn.execute(sa.select(t.enabled, sa.func.count()).group_by(t.enabled)).all())
    return int(counts.get(True, 0) or 0), int(counts.get(False, 0) or 0)
