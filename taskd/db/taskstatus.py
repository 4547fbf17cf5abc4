"""Task status: the latest state each agent reported for each task it runs.

Agents report often (every task, every status-interval, again on every reconnect), so
writes arrive here already coalesced by taskd.server.statusintake and go in as one multi-row
upsert per chunk rather than a statement per status. A status can outlive its task or
agent by a flush interval (the row was buffered when either was deleted); those rows are
dropped silently instead of failing the whole batch on a foreign key.

A flush is retried whole when it fails (the service puts the batch back), so one row the
database refuses would otherwise fail every later flush, for every agent of the server:
such a row is found by splitting the failing statement in savepoints and dropped alone
(`refused`), while the rest of the flush is written.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred

from taskd.db import models as m
from taskd.db.pool import DBPool, is_transient
from taskd.outcomes import STATUS_ERROR as ERROR

CHUNK = 500
"""Rows per statement: 500 x 12 columns stays far below sqlite's and MySQL's placeholder
and packet limits, and a chunk is still one round trip for a whole agent's tasks."""

MAX_REFUSALS = 16
"""Failed statements in one flush, with nothing written, after which the database (full
disk, read-only, ...) rather than the data is blamed: the flush fails and is retried
whole, instead of every row being tried alone and dropped."""

_COLUMNS = ("task_id", "agent_id", "executor", "outcome", "error", "last_run", "duration", "metrics",
            "runs", "failures", "skipped", "updated")
_KEY = ("task_id", "agent_id")


@dataclass(frozen=True)
class TaskStatusRow:
    task_id: int
    agent_id: int
    executor: str
    outcome: str
    error: str = ""
    last_run: datetime | None = None
    duration: float | None = None
    metrics: int | None = None
    runs: int = 0
    failures: int = 0
    skipped: int = 0
    updated: datetime | None = None  # when the server stored it; set by the writer
    agent_name: str = ""             # filled by for_task only

    def values(self) -> dict:
        d = asdict(self)
        return {k: d[k] for k in _COLUMNS}


def _chunks(items: Sequence, size: int = CHUNK) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _existing(conn: Connection, table: sa.Table, ids: set[int]) -> set[int]:
    found: set[int] = set()
    ordered = sorted(ids)
    for chunk in _chunks(ordered):
        found.update(conn.execute(sa.select(table.c.id).where(table.c.id.in_(chunk))).scalars())
    return found


def _upsert(conn: Connection, rows: list[dict]) -> None:
    """One multi-row INSERT that replaces the row of an existing (task, agent)."""
    t = m.task_status
    if conn.dialect.name == "sqlite":
        ins = sqlite.insert(t).values(rows)
        stmt = ins.on_conflict_do_update(
            index_elements=[t.c.task_id, t.c.agent_id],
            set_={c: ins.excluded[c] for c in _COLUMNS if c not in _KEY},
        )
    elif conn.dialect.name in ("mysql", "mariadb"):
        ins = mysql.insert(t).values(rows)
        stmt = ins.on_duplicate_key_update({c: ins.inserted[c] for c in _COLUMNS if c not in _KEY})
    else:  # pragma: no cover - taskd supports only the two
        raise NotImplementedError(f"no upsert for {conn.dialect.name}")
    conn.execute(stmt)


class _Refusals:
    """What `_upsert_isolating` found: the rows refused alone, and the failures so far."""

    def __init__(self) -> None:
        self.rows: list[tuple[TaskStatusRow, str]] = []
        self.failures = 0
        self.first: BaseException | None = None


def _transient(exc: BaseException | None) -> bool:
    """`exc` or what it happened while handling is transient: e.g. a deadlock (which
    ends the whole transaction on MySQL) followed by the failed rollback to the savepoint."""
    while exc is not None:
        if is_transient(exc):
            return True
        exc = exc.__context__
    return False


def _upsert_isolating(conn: Connection, rows: list[dict], written: int, refusals: _Refusals) -> int:
    """`_upsert` in a savepoint; when the database refuses it, each half again, down to
    single rows, which are dropped into `refusals`. Transient errors (connection lost,
    deadlock, lock wait) propagate: the pool retries the whole flush. Returns how many
    rows were written; `written` is how many the flush has written before this call."""
    try:
        with conn.begin_nested():
            _upsert(conn, rows)
        return len(rows)
    except Exception as exc:
        if _transient(exc):
            raise
        refusals.failures += 1
        refusals.first = refusals.first or exc
        if not written and refusals.failures >= MAX_REFUSALS:
            raise
        if len(rows) == 1:
            r = rows[0]
            refusals.rows.append((TaskStatusRow(**r), f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
            return 0
    half = len(rows) // 2
    done = _upsert_isolating(conn, rows[:half], written, refusals)
    return done + _upsert_isolating(conn, rows[half:], written + done, refusals)


def _held(conn: Connection, server: str, agent_ids: set[int]) -> set[int]:
    """Those of `agent_ids` with a session on `server`."""
    s = m.agent_session.c
    found: set[int] = set()
    for chunk in _chunks(sorted(agent_ids)):
        found.update(conn.execute(
            sa.select(s.agent_id).where(s.server == server, s.agent_id.in_(chunk)).distinct()).scalars())
    return found


def upsert_many(conn: Connection, rows: Sequence[TaskStatusRow], server: str | None = None,
                refused: list[tuple[TaskStatusRow, str]] | None = None) -> int:
    """Write `rows` (each with `updated` set), skipping those whose task or agent no
    longer exists; returns how many were written. One statement per CHUNK rows.

    `server`: write only for agents with a session on that server. An agent that moved
    to another server reports its statuses there (agents re-send all on reconnect), so a
    late flush from here (e.g. this server's last one) must not overwrite those.
    `refused`: receives (row, why) for each row the database refused (see the module
    docstring); without it, a refusal raises."""
    if not rows:
        return 0
    tasks = _existing(conn, m.task, {r.task_id for r in rows})
    agent_ids = {r.agent_id for r in rows}
    agents = _existing(conn, m.agent, agent_ids) if server is None else _held(conn, server, agent_ids)
    latest: dict[tuple[int, int], dict] = {}
    for r in rows:  # a key twice in one statement is an error on some servers: last wins
        if r.task_id in tasks and r.agent_id in agents:
            latest[(r.task_id, r.agent_id)] = r.values()
    values = [latest[k] for k in sorted(latest)]  # a fixed order keeps row locks deadlock-free
    if refused is None:
        for chunk in _chunks(values):
            _upsert(conn, list(chunk))
        return len(values)
    refusals = _Refusals()
    written = 0
    for chunk in _chunks(values):
        written += _upsert_isolating(conn, list(chunk), written, refusals)
    if refusals.rows and not written:
        raise refusals.first  # nothing could be written: more likely the database than the data
    refused.extend(refusals.rows)
    return written


def delete(conn: Connection, pairs: Iterable[tuple[int, int]]) -> None:
    """Forget the status of each (task id, agent id)."""
    c = m.task_status.c
    by_agent: dict[int, set[int]] = {}
    for task_id, agent_id in pairs:
        by_agent.setdefault(agent_id, set()).add(task_id)
    for agent_id, task_ids in sorted(by_agent.items()):
        for chunk in _chunks(sorted(task_ids)):
            conn.execute(sa.delete(m.task_status).where(c.agent_id == agent_id, c.task_id.in_(chunk)))


def apply(conn: Connection, rows: Sequence[TaskStatusRow], removals: Iterable[tuple[int, int]],
          server: str | None = None) -> tuple[int, list[tuple[TaskStatusRow, str]]]:
    """One flush: the removals and the upserts in the caller's (one) transaction, only
    for agents with a session on `server` when given (see upsert_many). Returns how many
    statuses were written and the rows the database refused, each with why."""
    removals = list(removals)
    if server is not None and removals:
        held = _held(conn, server, {agent_id for _, agent_id in removals})
        removals = [(task_id, agent_id) for task_id, agent_id in removals if agent_id in held]
    delete(conn, removals)
    refused: list[tuple[TaskStatusRow, str]] = []
    return upsert_many(conn, rows, server, refused), refused


def for_task(conn: Connection, task_id: int, visible_to: int | None = None) -> list[TaskStatusRow]:
    """Every agent's status of the task, with the agent's name, ordered by agent name.
    `visible_to`: only agents that org may see (its own and public ones)."""
    s, a = m.task_status.c, m.agent.c
    stmt = (
        sa.select(m.task_status, a.name.label("agent_name"))
        .select_from(m.task_status.join(m.agent, a.id == s.agent_id))
        .where(s.task_id == task_id)
        .order_by(a.name, a.id)
    )
    if visible_to is not None:
        stmt = stmt.where(sa.or_(a.org_id == visible_to, a.public.is_(True)))
    return [
        TaskStatusRow(
            task_id=r.task_id, agent_id=r.agent_id, executor=r.executor, outcome=r.outcome, error=r.error,
            last_run=r.last_run, duration=r.duration, metrics=r.metrics, runs=r.runs, failures=r.failures,
            skipped=r.skipped, updated=r.updated, agent_name=r.agent_name,
        )
        for r in conn.execute(stmt)
    ]


def failing_counts(conn: Connection, agent_ids: Sequence[int]) -> dict[int, int]:
    """agent id -> how many tasks last reported `error` there (0 for none), in one
    grouped query per CHUNK agents (a list page is at most 1000)."""
    out = {agent_id: 0 for agent_id in agent_ids}
    s = m.task_status.c
    for chunk in _chunks(sorted(out)):
        rows = conn.execute(
            sa.select(s.agent_id, sa.func.count())
            .where(s.agent_id.in_(chunk), s.outcome == ERROR)
            .group_by(s.agent_id)
        )
        for agent_id, n in rows:
            out[agent_id] = int(n)
    return out


class StatusStore:
    """Task statuses: the API's reads and the status service's bulk writes."""

    def __init__(self, pool: DBPool) -> None:
        self.pool = pool
        self.stale_floor = 60.0  # the server's stale-min-window (taskd.db.staleness)

    def for_task(self, task_id: int, visible_to: int | None = None) -> "Deferred[list[TaskStatusRow]]":
        return self.pool.do(for_task, task_id, visible_to)

    def failing_counts(self, agent_ids: Sequence[int]) -> "Deferred[dict[int, tuple[int, int]]]":
        """agent id -> (failing, stale): tasks whose last report is an error or that are
        stale there (taskd.db.staleness), and the stale ones alone."""
        from taskd.db.staleness import counts  # staleness reads this module's rows
        from taskd.timeutil import utcnow

        return self.pool.do(counts, list(agent_ids), utcnow(), self.stale_floor)

    def apply(self, rows: Sequence[TaskStatusRow], removals: Iterable[tuple[int, int]],
              server: str | None = None) -> Deferred:
        """Write a flush: upserts and removals in one transaction (see `apply`)."""
        return self.pool.do(apply, list(rows), list(removals), server)
