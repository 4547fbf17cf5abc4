"""The fakes of tests/fakes/fakedb.py behave as the real stores: same methods, same
signatures, and the same behaviour tests pass on the fake and on the real database
(sqlite and MariaDB)."""
from __future__ import annotations

import inspect
from datetime import datetime, timezone

import pytest
import pytest_twisted
from twisted.internet import reactor

from taskd.db import migrate
from taskd.db.agents import AgentStore
from taskd.db.connector import Database
from taskd.db.engine import create_engine
from taskd.db.sessions import SessionStore
from taskd.db.taskstatus import StatusStore, TaskStatusRow
from taskd.db.tasks import Route, TaskSpec
from taskd.errors import Conflict
from tests.fakes.fakedb import FakeAgentStore, FakeDatabase, FakeSessionStore, FakeStatusStore

# real store -> (its fake, the real methods the fake leaves out on purpose)
PAIRS = [
    (AgentStore, FakeAgentStore, {"list", "update", "delete"}),
    (SessionStore, FakeSessionStore, set()),
    (StatusStore, FakeStatusStore, set()),
]


def public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_")}


@pytest.mark.parametrize("real, fake, left_out", PAIRS, ids=lambda p: getattr(p, "__name__", ""))
def test_each_fake_has_the_real_stores_methods_and_signatures(real, fake, left_out):
    real_methods, fake_methods = public_methods(real), public_methods(fake)
    assert set(fake_methods) <= set(real_methods), "the fake offers what the real store does not"
    assert set(real_methods) - set(fake_methods) == left_out
    for name, sig in fake_methods.items():
        assert sig == real_methods[name], f"{fake.__name__}.{name}{sig} != {real.__name__}.{name}{real_methods[name]}"


@pytest.fixture(params=["fake", "sqlite", "mysql"])
def db(request, tmp_path):
    if request.param == "fake":
        yield FakeDatabase()
        return
    if request.param == "sqlite":
        db_config = ("sqlite3", str(tmp_path / "task-server.db"))
    else:
        mysql_dbs = request.getfixturevalue("mysql_dbs")
        db_config = ("mysql", mysql_dbs.dsn(request.getfixturevalue("shared_mysql_db")))
    engine = create_engine(*db_config, pool_size=2)
    migrate.upgrade(engine)
    from tests.conftest import wipe

    wipe(engine)
    real = Database.open(engine, reactor)
    real.start()
    yield real
    real.stop()


async def make_task(db) -> int:
    if isinstance(db, FakeDatabase):
        db.seed_task(41)
        return 41
    spec = TaskSpec("t", "", {}, 60, Route("byTags", {"tags": ["x"]}), {}, True)
    return (await db.tasks.create(1, spec)).id


@pytest_twisted.ensureDeferred
async def test_agents_are_found_by_id_and_name_and_names_are_unique_per_org(db):
    a = await db.agents.create(1, "a1", enabled=True, public=False, tags=["x"])
    b = await db.agents.create(2, "a1", enabled=False, public=True, tags=[])
    assert (await db.agents.get(a.id)) == a and (await db.agents.get(b.id)) == b
    assert (a.org_id, a.name, a.enabled, a.tags, a.online) == (1, "a1", True, ("x",), False)
    assert (await db.agents.get_by_name(2, "a1")) == b
    assert (await db.agents.get_by_name(3, "a1")) is None
    assert await db.agents.get_many_by_name([(1, "a1"), (2, "a1"), (1, "nope")]) == {(1, "a1"): a, (2, "a1"): b}
    with pytest.raises(Conflict):
        await db.agents.create(1, "a1", enabled=True, public=False, tags=[])


@pytest_twisted.ensureDeferred
async def test_an_agent_is_online_while_it_holds_any_session(db):
    a = await db.agents.create(1, "a1", enabled=True, public=False, tags=[])
    s1, change = await db.sessions.open(a.id, version=1, remote_ip="10.0.0.1", server="A")
    assert (change.agent_id, change.online) == (a.id, True)
    (s2, again), = await db.sessions.open_many([(a.id, 1, "10.0.0.2")], server="B")
    assert again is None and (await db.agents.get(a.id)).online
    assert await db.sessions.close(s1, a.id) is None  # still held by B
    gone = await db.sessions.close(s2, a.id)
    assert (gone.agent_id, gone.online) == (a.id, False) and not (await db.agents.get(a.id)).online


@pytest_twisted.ensureDeferred
async def test_sessions_of_a_missing_agent_are_not_opened_and_a_server_clears_only_its_own(db):
    a = await db.agents.create(1, "a1", enabled=True, public=False, tags=[])
    b = await db.agents.create(1, "b1", enabled=True, public=False, tags=[])
    opened = await db.sessions.open_many([(a.id, 1, "ip"), (987654, 1, "ip"), (b.id, 1, "ip")], server="A")
    assert opened[1] == (None, None) and all(sid for sid, _ in (opened[0], opened[2]))
    await db.sessions.open(b.id, version=1, remote_ip="ip", server="B")
    changes = db.sessions.clear_server_now("A") if isinstance(db, FakeDatabase) else \
        await db.sessions.clear_server("A")
    assert [(c.agent_id, c.online) for c in changes] == [(a.id, False)]  # b is still held by B
    assert (await db.agents.get(b.id)).online


@pytest_twisted.ensureDeferred
async def test_statuses_are_written_for_agents_held_by_the_writer_and_read_back(db):
    a = await db.agents.create(1, "a1", enabled=True, public=False, tags=[])
    other = await db.agents.create(2, "private", enabled=True, public=False, tags=[])
    await db.sessions.open(a.id, version=1, remote_ip="ip", server="A")
    await db.sessions.open(other.id, version=1, remote_ip="ip", server="B")
    task_id = await make_task(db)
    when = datetime(2026, 12, 1, tzinfo=timezone.utc).replace(tzinfo=None)
    rows = [TaskStatusRow(task_id, a.id, "builtin", "error", error="boom", runs=3, failures=1, updated=when),
            TaskStatusRow(task_id, other.id, "builtin", "ok", runs=1, updated=when),
            TaskStatusRow(task_id + 1000, a.id, "builtin", "ok", updated=when)]  # no such task
    written, refused = await db.status.apply(rows, [], "A")
    assert (written, refused) == (1, [])  # the other agent is held by server B
    got = await db.status.for_task(task_id, visible_to=1)
    assert [(r.agent_id, r.agent_name, r.outcome, r.error, r.runs) for r in got] == [(a.id, "a1", "error", "boom", 3)]
    assert await db.status.failing_counts([a.id, other.id]) == {a.id: 1, other.id: 0}
    await db.status.apply([], [(task_id, a.id)], "A")
    assert await db.status.for_task(task_id) == []


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
