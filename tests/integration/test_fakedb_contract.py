"""The fakes of tests/fakes/fakedb.py behave as the real stores: one fake per store of
the connector, same methods, same signatures, and the same behaviour tests pass on the
fake and on the real database (sqlite and MariaDB)."""
from __future__ import annotations

import inspect
from datetime import datetime, timezone

import pytest
import pytest_twisted
from twisted.internet import reactor

from taskd.db import migrate
from taskd.db.agents import AgentFilter, AgentStore
from taskd.db.catalog import CatalogStore, MetricFilter
from taskd.db.connector import Database
from taskd.db.engine import create_engine
from taskd.db.listing import Page
from taskd.db.routes import RouteStore
from taskd.db.sessions import SessionStore
from taskd.db.taskstatus import StatusStore, TaskStatusRow
from taskd.db.tasks import Route, TaskFilter, TaskSpec, TaskStore
from taskd.errors import Conflict, Invalid, NotFound
from taskd.db.servers import ServerInstance, ServerStore
from tests.fakes.fakedb import (FakeAgentStore, FakeCatalogStore, FakeDatabase, FakeRouteStore, FakeServerStore,
                                FakeSessionStore, FakeStatusStore, FakeTaskStore)

# real store -> (its fake, {real method the fake leaves out: why})
PAIRS = [
    (TaskStore, FakeTaskStore, {}),
    (AgentStore, FakeAgentStore, {}),
    (CatalogStore, FakeCatalogStore, {}),
    (SessionStore, FakeSessionStore, {}),
    (StatusStore, FakeStatusStore, {}),
    (RouteStore, FakeRouteStore, {}),
    (ServerStore, FakeServerStore, {}),
]


def public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_")}


@pytest.mark.parametrize("real, fake, left_out", PAIRS, ids=lambda p: getattr(p, "__name__", ""))
def test_each_fake_has_the_real_stores_methods_and_signatures(real, fake, left_out):
    real_methods, fake_methods = public_methods(real), public_methods(fake)
    assert set(fake_methods) <= set(real_methods), "the fake offers what the real store does not"
    assert set(real_methods) - set(fake_methods) == set(left_out)
    assert all(reason for reason in left_out.values())
    for name, sig in fake_methods.items():
        assert sig == real_methods[name], f"{fake.__name__}.{name}{sig} != {real.__name__}.{name}{real_methods[name]}"


def test_the_fake_connector_holds_a_fake_of_every_store_of_the_real_one(tmp_path):
    engine = create_engine("sqlite3", str(tmp_path / "shape.db"), pool_size=1)
    real, fake = vars(Database.open(engine, reactor)), vars(FakeDatabase())
    stores = {name: type(store) for name, store in real.items() if name not in ("pool", "heartbeat_pool")}
    assert sorted(stores) == ["agents", "catalog", "routes", "servers", "sessions", "status", "tasks"]
    fakes = {r: f for r, f, _ in PAIRS}
    assert {name: type(fake[name]) for name in stores} == {name: fakes[cls] for name, cls in stores.items()}
    for method in ("start", "stop"):
        assert inspect.signature(getattr(FakeDatabase, method)) == inspect.signature(getattr(Database, method))
    engine.dispose()


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
    spec = TaskSpec("t", "", {}, 60, Route("byTags", {"tags": ["x"]}), {}, True)
    return (await db.tasks.create(1, spec)).id


def spec(name: str, route: Route, *, metrics: dict | None = None, enabled: bool = True,
         interval: int = 60) -> TaskSpec:
    return TaskSpec(name, "builtin", {"/x": {"a": 1}}, interval, route, metrics or {}, enabled)


async def online(db, org_id: int, name: str, *, public: bool = False, tags=(), catalog=()):
    """An agent of `org_id` holding a session (so online), advertising `catalog`."""
    agent = await db.agents.create(org_id, name, enabled=True, public=public, tags=list(tags))
    await db.sessions.open(agent.id, version=1, remote_ip="ip", server="A")
    if catalog:
        await db.catalog.replace_agent_catalog(agent.id, [(ns, ver, None) for ns, ver in catalog])
    return agent


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
async def test_agents_are_listed_by_visibility_and_filters_updated_and_deleted_with_what_hangs_on_them(db):
    a = await db.agents.create(1, "a-web", enabled=True, public=False, tags=["web", "db"])
    b = await db.agents.create(1, "b-db", enabled=False, public=False, tags=["db"])
    p = await db.agents.create(2, "p-pub", enabled=True, public=True, tags=["web"])
    await db.agents.create(2, "hidden", enabled=True, public=False, tags=["web"])
    await db.catalog.replace_agent_catalog(b.id, [("/cpu/load", 1, None)])
    names = lambda agents: [x.name for x in agents]  # noqa: E731
    listed = lambda flt, page=Page("name"): db.agents.list(1, flt, page)  # noqa: E731
    assert names(await listed(AgentFilter())) == ["a-web", "b-db", "p-pub"]
    assert names(await listed(AgentFilter(public=True))) == ["p-pub"]
    assert names(await listed(AgentFilter(public=False), Page("name", descending=True))) == ["b-db", "a-web"]
    # Tags filter by the listing org's own tags: org 2's tags on its public agent are not org 1's.
    assert names(await listed(AgentFilter(tags=("web",)))) == ["a-web"]
    old_p, tagged = await db.agents.set_org_tags(p.id, 1, ["web", "edge"])
    assert old_p == p and tagged.tags == ("web",) and tagged.tags_for(1) == ("edge", "web")
    assert names(await listed(AgentFilter(tags=("web",)))) == ["a-web", "p-pub"]
    with pytest.raises(NotFound):  # org 2's private agent is not org 1's to tag
        await db.agents.set_org_tags(p.id + 1, 1, ["web"])
    assert names(await listed(AgentFilter(name="*-*", enabled=True), Page("id", limit=1, page=2))) == ["p-pub"]
    assert names(await listed(AgentFilter(metric="/cpu/*"))) == ["b-db"]
    assert names(await listed(AgentFilter(), Page("enabledChange"))) == ["b-db", "a-web", "p-pub"]  # NULL first
    old, new = await db.agents.update(b.id, name="b2", enabled=True, public=True, tags=["x", "x"])
    assert old == b and (new.name, new.enabled, new.public, new.tags, new.created) == ("b2", True, True, ("x",), b.created)
    assert new.enabled_change is not None and await db.agents.get(b.id) == new
    assert [(m.namespace, m.public) for m in await db.catalog.list(3, MetricFilter(), Page("namespace"))] \
        == [("/cpu/load", True)]  # its catalog is public with it
    with pytest.raises(Conflict):
        await db.agents.update(b.id, name="a-web", enabled=True, public=True, tags=[])
    with pytest.raises(NotFound):
        await db.agents.update(987654, name="z", enabled=True, public=True, tags=[])
    task = await db.tasks.create(1, spec("any", Route("any")))
    await db.sessions.open(b.id, version=1, remote_ip="ip", server="A")
    assert await db.routes.assign_unassigned(None) == [task]
    now_online = await db.agents.get(b.id)
    assert now_online.online and await db.agents.delete(b.id) == now_online and await db.agents.delete(b.id) is None
    assert await db.routes.snapshot(task.id) == (task, set())  # its assignment went with it
    assert await db.catalog.list(1, MetricFilter(), Page("namespace")) == []
    assert names(await listed(AgentFilter())) == ["a-web", "p-pub"]
    assert p.tags == ("web",) and (await db.agents.get(p.id)).tags_for(2) == ("web",)


@pytest_twisted.ensureDeferred
async def test_an_agent_is_online_while_it_holds_any_session(db):
    a = await db.agents.create(1, "a1", enabled=True, public=False, tags=[])
    s1, change = await db.sessions.open(a.id, version=1, remote_ip="10.0.0.1", server="A")
    assert (change.agent_id, change.online) == (a.id, True)
    (s2, again), = await db.sessions.open_many([(a.id, 1, "10.0.0.2")], server="B")
    assert again is None and (await db.agents.get(a.id)).online
    assert await db.sessions.close(s1, a.id) is None  # still held by B (whose open replaced it)
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
async def test_a_silent_server_is_reaped_once_with_its_sessions_and_a_live_one_is_listed(db):
    from datetime import timedelta

    from taskd.timeutil import utcnow

    now = utcnow().replace(microsecond=0)
    old, new = now - timedelta(minutes=10), now - timedelta(minutes=1)
    dead = ServerInstance("id-dead", "A", "host1", ":8082", "1", old, old)
    alive = ServerInstance("id-alive", "B", "host2", ":8082", "1", new, new)
    for instance in (dead, alive):
        await db.servers.register(instance)
    a = await db.agents.create(1, "a1", enabled=True, public=False, tags=[])
    b = await db.agents.create(1, "b1", enabled=True, public=False, tags=[])
    await db.sessions.open(a.id, version=1, remote_ip="ip", server="A")
    await db.sessions.open(b.id, version=1, remote_ip="ip", server="B")
    cutoff = now - timedelta(minutes=5)
    assert [i.id for i in await db.servers.silent(cutoff, exclude="id-alive")] == ["id-dead"]
    reaped = await db.servers.reap(dead, cutoff)
    assert reaped.instance.id == "id-dead" and [(c.agent_id, c.online) for c in reaped.changes] == [(a.id, False)]
    assert await db.servers.reap(dead, cutoff) is None  # someone reaped it already
    assert await db.servers.beat("id-dead") is False and await db.servers.beat("id-alive") is True
    [listed] = await db.servers.live(cutoff)
    assert (listed.id, listed.name, listed.agents) == ("id-alive", "B", 1)
    await db.servers.unregister("id-alive")
    assert await db.servers.live(cutoff) == []


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
    assert await db.status.failing_counts([a.id, other.id]) == {a.id: (1, 0), other.id: (0, 0)}
    await db.status.apply([], [(task_id, a.id)], "A")
    assert await db.status.for_task(task_id) == []


@pytest_twisted.ensureDeferred
async def test_the_newest_session_wins_a_server_that_lost_the_agent_writes_nothing_for_it(db):
    a = await db.agents.create(1, "a1", enabled=True, public=False, tags=[])
    s_a, _ = await db.sessions.open(a.id, version=1, remote_ip="ip", server="A")
    (s_b, change), = await db.sessions.open_many([(a.id, 1, "ip2")], server="B")
    assert change is None  # online all along
    task_id = await make_task(db)
    when = datetime(2026, 12, 1, tzinfo=timezone.utc).replace(tzinfo=None)
    late = [TaskStatusRow(task_id, a.id, "builtin", "error", error="stale", updated=when)]
    assert await db.status.apply(late, [], "A") == (0, [])  # A's late flush: no longer its agent
    assert await db.sessions.close(s_a, a.id) is None and (await db.agents.get(a.id)).online
    assert await db.status.apply(late, [], "B") == (1, [])
    gone = await db.sessions.close(s_b, a.id)
    assert (gone.agent_id, gone.online) == (a.id, False)


# -- tasks -------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_tasks_are_written_read_back_in_pages_and_names_are_unique_per_org(db):
    tags = Route("byTags", {"tags": ["x"]})
    b = await db.tasks.create(1, spec("b-task", tags, metrics={"/m/b": 2, "/m/a": 0}))
    a = await db.tasks.create(1, spec("a-task", tags, enabled=False))
    other = await db.tasks.create(2, spec("b-task", tags))
    assert (b.org_id, b.name, b.route, b.metrics, b.enabled) == (1, "b-task", tags, {"/m/a": 0, "/m/b": 2}, True)
    assert list(b.metrics) == ["/m/a", "/m/b"] and other.org_id == 2
    with pytest.raises(Conflict):
        await db.tasks.create(1, spec("a-task", tags))
    names = lambda tasks: [t.name for t in tasks]  # noqa: E731
    assert names(await db.tasks.list(1, TaskFilter(), Page("name"))) == ["a-task", "b-task"]
    assert names(await db.tasks.list(1, TaskFilter(), Page("name", descending=True, limit=1))) == ["b-task"]
    assert names(await db.tasks.list(1, TaskFilter(), Page("id", limit=1, page=2))) == ["a-task"]
    assert names(await db.tasks.list(1, TaskFilter(name="*-t*"), Page("id"))) == ["b-task", "a-task"]
    assert names(await db.tasks.list(1, TaskFilter(metric="/m/*", enabled=True), Page("id"))) == ["b-task"]
    assert names(await db.tasks.list(1, TaskFilter(name="a-task", enabled=True), Page("id"))) == []
    assert await db.tasks.count_by_enabled() == (2, 1)


@pytest_twisted.ensureDeferred
async def test_tasks_are_updated_and_deleted_only_within_their_org(db):
    tags = Route("byTags", {"tags": ["x"]})
    task = await db.tasks.create(1, spec("t1", tags))
    await db.tasks.create(1, spec("t2", tags))
    old, new = await db.tasks.update(1, task.id, spec("t1-renamed", tags, interval=5, enabled=False))
    assert old == task and (new.id, new.name, new.interval, new.enabled) == (task.id, "t1-renamed", 5, False)
    assert (await db.tasks.list(1, TaskFilter(name="t1-renamed"), Page("id"))) == [new]
    with pytest.raises(Conflict):
        await db.tasks.update(1, task.id, spec("t2", tags))
    for call in (lambda: db.tasks.update(2, task.id, spec("x", tags)), lambda: db.tasks.delete(2, task.id),
                 lambda: db.tasks.delete(1, 987654)):
        with pytest.raises(NotFound):
            await call()
    assert await db.tasks.delete(1, task.id) == new
    assert [t.name for t in await db.tasks.list(1, TaskFilter(), Page("id"))] == ["t2"]


@pytest_twisted.ensureDeferred
async def test_a_by_ids_route_must_name_agents_the_org_may_see(db):
    mine = await db.agents.create(1, "mine", enabled=True, public=False, tags=[])
    shared = await db.agents.create(2, "shared", enabled=True, public=True, tags=[])
    private = await db.agents.create(2, "private", enabled=True, public=False, tags=[])
    ok = await db.tasks.create(1, spec("ok", Route("byIds", {"ids": [mine.id, shared.id]})))
    assert ok.route.ids == [mine.id, shared.id]
    with pytest.raises(Invalid) as bad:
        await db.tasks.create(1, spec("bad", Route("byIds", {"ids": [private.id, mine.id, 987654]})))
    assert bad.value.message == f"route.config.ids: no agent visible to this org has id {private.id}, 987654"


# -- catalog -----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_an_agents_catalog_is_replaced_and_the_org_catalog_follows(db):
    a = await db.agents.create(1, "a", enabled=True, public=False, tags=[])
    p = await db.agents.create(2, "p", enabled=True, public=True, tags=[])
    assert await db.catalog.replace_agent_catalog(a.id, [("/b", 1, None), ("/a", 2, {"x": 1}), ("/a", 2, None)]) == 2
    assert await db.catalog.replace_agent_catalog(p.id, [("/pub", 1, None)]) == 1
    assert await db.catalog.replace_agent_catalog(987654, [("/z", 1, None)]) == 0
    got = await db.catalog.agent_metrics(a.id)
    assert [(m.namespace, m.version, m.policy, m.public) for m in got] == [("/a", 2, {"x": 1}, False), ("/b", 1, None, False)]
    listed = lambda org, flt=MetricFilter(), page=Page("namespace"): db.catalog.list(org, flt, page)  # noqa: E731
    assert [(m.namespace, m.public) for m in await listed(1)] == [("/a", False), ("/b", False), ("/pub", True)]
    assert [m.namespace for m in await listed(3)] == ["/pub"]  # another org sees only what is public
    assert [m.namespace for m in await listed(1, MetricFilter(namespace="/p*"))] == ["/pub"]
    assert [m.namespace for m in await listed(1, MetricFilter(version=1), Page("namespace", descending=True))] \
        == ["/pub", "/b"]
    assert await db.catalog.replace_agent_catalog(a.id, [("/b", 1, None)]) == 1
    assert [m.namespace for m in await listed(1)] == ["/b", "/pub"]  # nobody provides /a any more
    assert [m.namespace for m in await db.catalog.agent_metrics(a.id)] == ["/b"]


# -- routes ------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_by_ids_and_by_tags_tasks_go_to_the_online_agents_they_name_that_can_run_them(db):
    web = await online(db, 1, "web", tags=["web"], catalog=[("/x/cpu", 1)])
    bare = await online(db, 1, "bare", tags=["web"])  # advertises nothing: runs anything
    other_org = await online(db, 2, "other", public=True, tags=["web"])
    offline = await db.agents.create(1, "off", enabled=True, public=False, tags=["web"])
    wrong = await online(db, 1, "wrong", tags=["web"], catalog=[("/y/mem", 1)])
    tagged = await db.tasks.create(1, spec("tagged", Route("byTags", {"tags": ["web"]}), metrics={"/x/*": 0}))
    named = await db.tasks.create(1, spec("named", Route("byIds", {"ids": [other_org.id, offline.id]})))
    off = await db.tasks.create(1, spec("off", Route("byIds", {"ids": [web.id]}), enabled=False))
    assert await db.routes.snapshot(tagged.id) == (tagged, {web.id, bare.id})
    assert await db.routes.snapshot(named.id) == (named, {other_org.id})
    assert await db.routes.snapshot(off.id) == (off, {web.id})  # routed, though disabled
    assert await db.routes.snapshot(987654) == (None, set())
    lists = await db.routes.tasks_for_agents([web.id, bare.id, other_org.id, offline.id, wrong.id, 987654])
    assert {i: [t.name for t in ts] for i, ts in lists.items()} == {
        web.id: ["tagged"], bare.id: ["tagged"], other_org.id: ["named"], offline.id: ["named", "tagged"],
        wrong.id: [], 987654: []}
    detail = await db.routes.task_detail(1, tagged.id)
    assert (detail.task, detail.agents, detail.statuses) == (tagged, sorted([web.id, bare.id]), [])
    assert await db.routes.task_detail(2, tagged.id) is None


@pytest_twisted.ensureDeferred
async def test_an_any_task_gets_one_capable_agent_and_moves_when_it_goes_or_no_longer_qualifies(db):
    first = await online(db, 1, "first", catalog=[("/x/cpu", 1)])
    task = await db.tasks.create(1, spec("any", Route("any"), metrics={"/x/*": 0}))
    assert await db.routes.snapshot(task.id) == (task, {first.id})  # assigned as it was written
    assert await db.routes.relocate_from(first.id) == []  # still online: nothing moves
    second = await online(db, 2, "second", public=True)
    await db.catalog.replace_agent_catalog(first.id, [("/y/mem", 1, None)])
    assert await db.routes.release_unqualified(first.id) == [(task, second.id)]
    assert await db.routes.snapshot(task.id) == (task, {second.id})
    assert [t.name for t in (await db.routes.tasks_for_agents([second.id]))[second.id]] == ["any"]
    await db.sessions.clear_server("A")
    assert not (await db.agents.get(second.id)).online
    assert await db.routes.relocate_from(second.id) == [(task, None)]  # nobody qualifies: unassigned
    assert await db.routes.snapshot(task.id) == (task, set())
    third = await online(db, 1, "third")
    assert await db.routes.assign_unassigned([first.id]) == []  # offline now
    assert await db.routes.assign_unassigned(None) == [task]
    assert await db.routes.snapshot(task.id) == (task, {third.id})


@pytest_twisted.ensureDeferred
async def test_connecting_agents_get_moves_assignments_catalogs_and_their_rows_in_one_call(db):
    holder = await online(db, 1, "holder")
    held = await db.tasks.create(1, spec("held", Route("any"), metrics={"/x/*": 0}))
    await db.catalog.replace_agent_catalog(holder.id, [("/y/mem", 1, None)])
    newcomer = await online(db, 1, "newcomer", catalog=[("/x/cpu", 2)])
    loose = await db.tasks.create(2, spec("loose", Route("any")))  # org 2 has no agent yet
    public = await online(db, 2, "public", public=True)
    await db.sessions.clear_server("A")
    await db.sessions.open_many([(holder.id, 1, "ip"), (newcomer.id, 1, "ip")], server="A")
    moved, assigned, catalogs, agents = await db.routes.connect_assignments([holder.id, newcomer.id, 987654])
    assert moved == [(held, newcomer.id)] and assigned == []  # `loose` is org 2's; public is offline
    assert catalogs == {holder.id: frozenset({("/y/mem", 1)}), newcomer.id: frozenset({("/x/cpu", 2)}),
                        987654: frozenset()}
    assert sorted(agents) == [holder.id, newcomer.id] and agents[newcomer.id].online
    await db.sessions.open(public.id, version=1, remote_ip="ip", server="A")
    assert await db.routes.connect_assignments([public.id]) == ([], [(loose, public.id)], {public.id: frozenset()},
                                                                 {public.id: await db.agents.get(public.id)})


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
