"""The whole agent, end to end: a real task-server, the real agent service, the Snap emulator.

Everything runs in the test's reactor over real loopback sockets: the task-server
(`harness.start_server`, sqlite), the agent (`taskd.agent.assembly.Agent`, the same
object `twistd taskagent` builds) and the Snap emulator (`tests/fakes/snap.py`). Snap's
loops are shortened through `snap_intervals`; every wait is a deadline (`until`,
`eventually`), never a sleep.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Awaitable, Callable

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher

from taskd.agent.assembly import Agent
from taskd.agent.settings import AgentSettings
from tests.fakes.snap import SnapEmulator, metric
from tests.integration.daemons import free_port
from tests.integration.harness import ADMIN_KEY, RunningServer, start_server, stop_server
from tests.waiting import until

AGENTS = "/api/v1/agents"
TASKS = "/api/v1/tasks"
PREFIX = "raintank-apps:"
TSDB_URL = "http://tsdb-gw.invalid:80/"
INTERVALS = {"supervise_interval": 0.2, "sweep_interval": 1.0, "catalog_interval": 2.0}
CATALOG = [metric("/example-task/foo", 1), metric("/example-task/bar", 2)]
TASK = {
    "name": "example-task-1",
    "metrics": {"/example-task/*": 0},
    "config": {"/example-task": {"param1": "value1", "param2": "value2"}},
    "interval": 60,
    "route": {"type": "any"},
    "enabled": True,
}


# -- helpers ---------------------------------------------------------------------------

async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 10.0,
                     what: str = "condition") -> Any:
    """Poll an async `check` until it returns something truthy."""
    return await until(check, timeout, what, interval=0.05)


class Logs:
    """taskd's log lines (agent and in-process server), debug included."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, event: dict) -> None:
        if event.get("log_namespace", "").startswith("taskd.") and event.get("log_level") is not None:
            self.lines.append(formatEvent(event))

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)


class Stack:
    """Server + agent + emulator; every part started is stopped by `close()`."""

    def __init__(self, db: tuple[str, str], snap: SnapEmulator) -> None:
        self.db = db
        self.snap = snap
        self.port = free_port()
        self.server: RunningServer | None = None
        self.agent: Agent | None = None
        self.logs = Logs()
        globalLogPublisher.addObserver(self.logs)

    async def start_server(self, *, wipe: bool = True, **settings: Any) -> RunningServer:
        self.server = await start_server(*self.db, wipe=wipe, addr=f"tcp:{self.port}:interface=127.0.0.1",
                                         **settings)
        return self.server

    async def stop_server(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            await stop_server(server)

    def start_agent(self, intervals: dict | None = None, **overrides: Any) -> Agent:
        settings = dataclasses.replace(
            AgentSettings(),
            server_url=f"ws://127.0.0.1:{self.port}/api/v1", api_key=ADMIN_KEY, name="agent1",
            snap_url=self.snap.url, tsdb_url=TSDB_URL, heartbeat_interval=2.0,
            reconnect_max_backoff=1.0, **overrides)
        self.agent = Agent(settings, reactor, snap_intervals={**INTERVALS, **(intervals or {})})
        self.agent.service.startService()
        return self.agent

    async def close(self) -> None:
        try:
            if self.agent is not None and self.agent.service.running:
                await self.agent.service.stopService()
        finally:
            try:
                await self.stop_server()
            finally:
                globalLogPublisher.removeObserver(self.logs)
                await self.snap.stop()

    # -- looking at things ------------------------------------------------------------

    @property
    def api(self) -> RunningServer:
        assert self.server is not None
        return self.server

    def copies(self, task_id: int) -> list:
        """The Snap tasks of one server task."""
        return [t for t in self.snap.tasks.values() if t.name == f"{PREFIX}{task_id}"]

    def ours(self) -> list:
        return [t for t in self.snap.tasks.values() if t.name.startswith(PREFIX)]

    def one_running(self, task_id: int, not_id: str | None = None):
        """The single Running Snap copy of the task (other than `not_id`), else None."""
        copies = self.copies(task_id)
        if len(copies) == 1 and copies[0].state == "Running" and copies[0].id != not_id:
            return copies[0]
        return None

    def posts(self, task_id: int) -> list[dict]:
        """Bodies of every POST /v1/tasks for the task, in order."""
        bodies = [json.loads(body) for method, path, body in self.snap.request_log
                  if method == "POST" and path == "/v1/tasks"]
        return [b for b in bodies if b.get("name") == f"{PREFIX}{task_id}"]

    async def agent_row(self) -> dict | None:
        rows = await self.api.ok("GET", AGENTS, params={"name": "agent1"})
        return rows[0] if rows else None

    async def wait_online(self, timeout: float = 10.0) -> dict:
        async def check():
            row = await self.agent_row()
            return row if row and row["online"] else None

        return await eventually(check, timeout, what="agent1 online")

    async def wait_catalog(self, records: list[dict], timeout: float = 10.0) -> None:
        row = await self.wait_online()
        wanted = sorted((m["namespace"], m["version"]) for m in records)

        async def check():
            got = await self.api.ok("GET", f"{AGENTS}/{row['id']}/metrics")
            return sorted((m["namespace"], m["version"]) for m in got) == wanted

        await eventually(check, timeout, what=f"catalog {wanted} on the server")

    async def settled(self, sweeps: int = 2) -> None:
        """Wait until the driver has listed Snap's tasks `sweeps` more times (so a whole
        reconcile pass started after now has finished) and is idle."""
        def lists() -> int:
            return sum(1 for r in self.snap.requests if r == ("GET", "/v1/tasks"))

        start = lists()
        await until(lambda: lists() >= start + sweeps, timeout=10, what=f"{sweeps} more task listings")
        await self.agent.driver.idle()

    async def create(self, body: dict) -> dict:
        return await self.api.ok("POST", TASKS, json_body=body)

    async def update(self, task: dict, **changes: Any) -> dict:
        return await self.api.ok("PUT", TASKS, json_body={**task, **changes})


def expected_post(task: dict) -> dict:
    """docs/snap.md, "The task posted to Snap", for a server task."""
    return {
        "name": f"{PREFIX}{task['id']}",
        "version": 0,
        "deadline": "300s",
        "workflow": {
            "collect": {
                "metrics": {ns: {"version": v} for ns, v in task["metrics"].items()},
                "config": task["config"],
                "publish": [{"plugin_name": "rt-hostedtsdb", "plugin_version": 0,
                             "config": {"interval": task["interval"], "orgId": task["orgId"]},
                             "target": ""}],
            }
        },
        "schedule": {"type": "simple", "interval": f"{task['interval']}s"},
        "start": True,
        "max-failures": 100,
    }


def assert_runs(snap_task, task: dict) -> None:
    """The emulator's stored Snap task is the server task."""
    assert snap_task.name == f"{PREFIX}{task['id']}"
    assert snap_task.state == "Running"
    assert snap_task.schedule == {"type": "simple"}
    assert snap_task.interval_ns == task["interval"] * 10**9
    assert snap_task.deadline_ns == 300 * 10**9
    assert snap_task.max_failures == 100
    collect = snap_task.workflow["collect"]
    assert collect["metrics"] == {ns: {"version": v} for ns, v in task["metrics"].items()}
    assert collect["config"] == task["config"]
    assert collect["publish"] == [{"plugin_name": "rt-hostedtsdb", "plugin_version": 0,
                                   "config": {"interval": task["interval"], "orgId": task["orgId"]},
                                   "target": ""}]


@pytest_twisted.async_yield_fixture
async def stack(sqlite_only):
    """Server + agent + a strict Snap emulator (metrics must be in its catalog, the
    publisher's tsdb url and api key in its global config) — not started yet."""
    built = Stack(sqlite_only, SnapEmulator(strict=True, catalog=CATALOG).start())
    try:
        yield built
    finally:
        await built.close()


async def running_stack(stack: Stack, **agent_kw: Any) -> Stack:
    await stack.start_server()
    stack.start_agent(**agent_kw)
    await stack.wait_online()
    return stack


# -- 1. connected, Snap configured, catalog on the server ------------------------------

@pytest_twisted.ensureDeferred
async def test_agent_comes_online_configures_snap_and_advertises_its_catalog(stack):
    await running_stack(stack)
    row = await stack.wait_online()
    assert row["name"] == "agent1" and row["online"] is True
    await until(lambda: "raintank_api_key" in stack.snap.global_config, what="Snap global config")
    assert stack.snap.global_config == {
        "raintank_agent_name": "agent1",
        "raintank_tsdb_url": TSDB_URL,
        "raintank_api_key": ADMIN_KEY,
    }
    await stack.wait_catalog([{"namespace": "/example-task/foo", "version": 1},
                              {"namespace": "/example-task/bar", "version": 2}])
    [session] = stack.api.server.sessions.sessions.values()
    assert session.agent.name == "agent1" and session.version == 1
    assert stack.agent.connection.connected and stack.agent.driver.snap_reachable
    assert stack.logs.count("connected to ws://127.0.0.1") == 1


# -- 2. the task lifecycle through the API --------------------------------------------

@pytest_twisted.ensureDeferred
async def test_task_lifecycle_through_the_api_drives_exactly_one_snap_task(stack):
    await running_stack(stack)
    await stack.wait_catalog(CATALOG)  # routing then sees a capable agent

    # create
    task = await stack.create(TASK)
    tid = task["id"]
    await until(lambda: stack.one_running(tid), what="Snap task created")
    first = stack.one_running(tid)
    assert_runs(first, task)
    assert stack.posts(tid) == [expected_post(task)]
    await stack.settled()
    assert stack.copies(tid) == [first] and len(stack.posts(tid)) == 1

    # update: re-created exactly once, with the new interval
    task = await stack.update(task, interval=120)
    await until(lambda: stack.one_running(tid, not_id=first.id), what="Snap task re-created")
    second = stack.one_running(tid)
    assert_runs(second, task)
    assert second.interval_ns == 120 * 10**9
    assert first.id not in stack.snap.tasks
    await stack.settled()
    assert stack.copies(tid) == [second]
    assert stack.posts(tid) == [expected_post({**task, "interval": 60}), expected_post(task)]

    # disable: removed
    task = await stack.update(task, enabled=False)
    await until(lambda: not stack.copies(tid), what="Snap task removed on disable")
    assert ("DELETE", f"/v1/tasks/{second.id}") in stack.snap.requests

    # re-enable: created again
    task = await stack.update(task, enabled=True)
    await until(lambda: stack.one_running(tid), what="Snap task re-created on enable")
    third = stack.one_running(tid)
    assert third.id not in (first.id, second.id)
    assert_runs(third, task)
    await stack.settled()
    assert stack.copies(tid) == [third] and len(stack.posts(tid)) == 3

    # delete: removed
    await stack.api.ok("DELETE", f"{TASKS}/{tid}")
    await until(lambda: not stack.ours(), what="Snap task removed on delete")
    await stack.settled()
    assert not stack.ours() and len(stack.posts(tid)) == 3


# -- 3. a task Snap disabled is re-created by the sweep --------------------------------

@pytest.mark.parametrize("how", ["force_disabled", "max_failures_runs"])
@pytest_twisted.ensureDeferred
async def test_task_snap_disabled_is_removed_and_recreated_by_the_sweep(stack, how):
    await running_stack(stack)
    await stack.wait_catalog(CATALOG)
    task = await stack.create(TASK)
    tid = task["id"]
    await until(lambda: stack.one_running(tid), what="Snap task created")
    old = stack.one_running(tid)
    if how == "force_disabled":
        stack.snap.force_disabled(old.id, "tsdb-gw said no")
    else:
        stack.snap.fail_task(old.id, "tsdb-gw said no", times=100)
        assert stack.snap.tick(100) == 100
    assert old.state == "Disabled" and old.failed_count == 100

    await until(lambda: stack.one_running(tid, not_id=old.id), timeout=10, what="re-created after the sweep")
    new = stack.one_running(tid)
    assert_runs(new, task)
    assert old.id not in stack.snap.tasks
    # Removal followed the rule: enable the Disabled task first, then delete it.
    ops = [r for r in stack.snap.requests if r[1].startswith(f"/v1/tasks/{old.id}") and r[0] != "GET"]
    assert ops == [("PUT", f"/v1/tasks/{old.id}/enable"), ("DELETE", f"/v1/tasks/{old.id}")]
    await stack.settled()
    assert stack.copies(tid) == [new] and len(stack.posts(tid)) == 2
    assert stack.logs.count("re-creating it") == 1


# -- 4. a server restart: reconnect and reconcile without duplicates -------------------

@pytest_twisted.ensureDeferred
async def test_server_restart_reconnects_and_reconciles_without_duplicates(stack):
    # A long catalog interval: only the reconnection itself can send the catalog again.
    await running_stack(stack, intervals={"catalog_interval": 300.0})
    await stack.wait_catalog(CATALOG)
    task = await stack.create(TASK)
    tid = task["id"]
    await until(lambda: stack.one_running(tid), what="Snap task created")
    before = stack.one_running(tid)
    advertised = "agent agent1 advertises 2 metric(s)"  # the server's debug line
    await until(lambda: stack.logs.count(advertised) == 1, what="first catalog stored")
    assert stack.logs.count("sent catalog") == 1

    await stack.stop_server()
    await until(lambda: not stack.agent.connection.connected, what="disconnect noticed")
    await stack.settled()  # the driver keeps supervising Snap while the server is gone
    assert stack.copies(tid) == [before] and before.state == "Running"

    await stack.start_server(wipe=False)  # same port, same sqlite file
    assert [t["id"] for t in await stack.api.ok("GET", TASKS)] == [tid]
    row = await stack.wait_online(timeout=15)
    assert stack.logs.count("connected to ws://127.0.0.1") == 2
    # The reconnection re-sends the catalog (the server may be another one).
    await until(lambda: stack.logs.count(advertised) == 2, what="catalog re-sent and stored")
    assert stack.logs.count("sent catalog") == 2
    assert len(await stack.api.ok("GET", f"{AGENTS}/{row['id']}/metrics")) == len(CATALOG)
    await stack.settled()
    assert stack.ours() == [before] and before.state == "Running"
    assert len(stack.posts(tid)) == 1  # nothing re-created

    # The new server's changes reach Snap as usual.
    other = await stack.create({**TASK, "name": "example-task-2", "interval": 30})
    await until(lambda: stack.one_running(other["id"]), what="task of the new server created")
    await stack.settled()
    assert sorted(t.name for t in stack.ours()) == sorted([f"{PREFIX}{tid}", f"{PREFIX}{other['id']}"])
    assert stack.copies(tid) == [before]


# -- 5. Snap down at start, then up ----------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_snap_down_at_start_then_up_converges(stack):
    await stack.snap.set_down(True)
    await stack.start_server()
    agent = stack.start_agent()
    await stack.wait_online()
    await until(lambda: agent.cache.have_list, what="first task list")
    task = await stack.create(TASK)  # no catalog yet: the agent counts as capable
    tid = task["id"]
    await until(lambda: tid in agent.cache.tasks, what="task handed to the agent")
    await until(lambda: stack.logs.count("is unreachable"), what="Snap reported unreachable")
    assert not agent.driver.snap_reachable and agent.driver.last_catalog is None
    assert stack.snap.tasks == {} and stack.snap.global_config == {}

    await stack.snap.set_down(False)
    await until(lambda: stack.one_running(tid), what="Snap task created once Snap is up")
    assert stack.snap.global_config == {"raintank_agent_name": "agent1",
                                        "raintank_tsdb_url": TSDB_URL, "raintank_api_key": ADMIN_KEY}
    assert_runs(stack.one_running(tid), task)
    await stack.wait_catalog(CATALOG)
    await stack.settled()
    assert len(stack.ours()) == 1 and len(stack.posts(tid)) == 1
    assert stack.logs.count("is unreachable") == 1 and stack.logs.count("is reachable") == 1


# -- 6. the catalog decides which tasks the agent runs ---------------------------------

@pytest_twisted.ensureDeferred
async def test_catalog_routes_only_covered_tasks_to_the_agent(sqlite_only):
    # Not strict: Snap would accept any metric, so only routing can keep a task away.
    stack = Stack(sqlite_only, SnapEmulator(catalog=[metric("/other/thing", 1)]).start())
    try:
        await running_stack(stack)
        await stack.wait_catalog([{"namespace": "/other/thing", "version": 1}])
        agent_id = (await stack.agent_row())["id"]
        by_id = {"type": "byIds", "config": {"ids": [agent_id]}}

        uncovered = await stack.create({**TASK, "name": "uncovered", "route": by_id})
        covered = await stack.create({**TASK, "name": "covered", "route": by_id,
                                      "metrics": {"/other/*": 0}, "config": {}})
        await until(lambda: stack.one_running(covered["id"]), what="covered task run")
        await stack.settled()
        assert [t.name for t in stack.ours()] == [f"{PREFIX}{covered['id']}"]
        assert set(stack.agent.cache.tasks) == {covered["id"]}
        assert (await stack.api.ok("GET", f"{TASKS}/{uncovered['id']}"))["agents"] == []
        assert (await stack.api.ok("GET", f"{TASKS}/{covered['id']}"))["agents"] == [agent_id]
        assert not stack.posts(uncovered["id"])
    finally:
        await stack.close()


# -- 5. a Snap that stops running tasks while the agent stays connected ------------------

@pytest_twisted.ensureDeferred
async def test_a_stalled_snap_turns_the_task_stale_while_the_socket_stays_up(stack):
    """Snap keeps the task Running but runs nothing (wedged): the agent is online and
    reports, yet no run; within max(3 intervals, stale-min-window) the task reads stale."""
    from twisted.internet.task import LoopingCall

    await stack.start_server(stale_min_window=1.0, status_flush_interval=0.2)
    stack.start_agent(status_interval=0.2)
    await stack.wait_online()
    await stack.wait_catalog(CATALOG)
    task = await stack.create({**TASK, "interval": 1})  # stale after max(3 x 1 s, 1 s)
    await until(lambda: stack.one_running(task["id"]), what="Snap task created")
    runs = LoopingCall(stack.snap.tick)
    runs.start(0.2)
    try:
        async def status(outcome: str):
            body = await stack.api.ok("GET", f"{TASKS}/{task['id']}")
            return body if body["status"] and body["status"][0]["outcome"] == outcome else None

        running = await eventually(lambda: status("ok"), timeout=15, what="runs reported")
        assert running["status"][0]["runs"] > 0
    finally:
        runs.stop()  # Snap stalls: the task stays Running, nothing runs
    stale = await eventually(lambda: status("stale"), timeout=30, what="the task reading stale")
    assert stale["status"][0]["error"].startswith("no run reported for")
    agent = await stack.agent_row()
    assert agent["online"] and agent["staleTasks"] == 1 and agent["failingTasks"] == 1
