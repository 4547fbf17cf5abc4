"""The Snap driver against the Snap emulator on a real loopback port.

HTTP goes through treq for real; every timer of the driver (and the emulator's task
clock) is one ``task.Clock``, advanced by the tests. ``driver.idle()`` waits until the
work a tick started (probe, reconcile, catalog) has finished.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from taskd.agent.snap import (PREFIX, SnapDriver, catalog_record, snap_task_request,
                              updated_after_creation)
from tests.fakes.snap import SnapEmulator, metric
from tests.waiting import until

T0 = 1714557600  # 2024-05-01T10:00:00Z
UPDATED = "2024-05-01T09:00:00.123456Z"
AGENT, TSDB, API_KEY = "agent-eu-1", "http://tsdb-gw:80/", "eyJrIjoic2VjcmV0LWFwaS1rZXktZm9yLXRlc3RzIn0="
NS = "/raintank/apps/ns1/zones/*/qps"
NS_CONFIG = {"/raintank/apps/ns1": {"ns1_key": "abc123", "zone": "example.com"}}
CATALOG = [
    metric(NS, 1, policy=[{"name": "ns1_key", "type": "string", "required": True},
                          {"name": "zone", "type": "string", "required": False}],
           dynamic_elements=[{"index": 4, "name": "zone", "description": "DNS Zone Slug"}]),
    metric("/raintank/apps/ping/avg", 2),
]


def server_task(tid: int, *, interval: int = 60, updated: str = UPDATED, org: int = 1,
                metrics: dict | None = None, config: dict | None = None) -> dict[str, Any]:
    return {"id": tid, "name": f"task-{tid}", "taskType": "", "orgId": org,
            "config": NS_CONFIG if config is None else config, "interval": interval,
            "route": {"type": "any", "config": {}}, "metrics": metrics or {NS: 1},
            "enabled": True, "created": "2024-05-01T08:00:00.000001Z", "updated": updated}


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(T0)
    return c


@pytest.fixture
def logs():
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def lines(logs: list[dict], text: str = "") -> list[str]:
    """The driver's log lines at info level and above that contain ``text``."""
    out = [formatEvent(e) for e in logs if str(e.get("log_namespace", "")).startswith("taskd.agent.snap")
           and e.get("log_level") != LogLevel.debug]
    return [line for line in out if text in line]


@pytest_twisted.async_yield_fixture
async def snap(clock):
    s = SnapEmulator(clock=clock, strict=True, catalog=CATALOG).start()
    yield s
    await s.stop()


@pytest_twisted.async_yield_fixture
async def make(snap, clock):
    made: list[SnapDriver] = []

    def factory(**kw: Any) -> SnapDriver:
        sent: list[list[dict]] = []
        kw.setdefault("send_catalog", sent.append)
        driver = SnapDriver(snap_url=snap.url + "/", agent_name=AGENT, tsdb_url=TSDB,
                            api_key=API_KEY, clock=clock, **kw)
        driver.sent = sent  # type: ignore[attr-defined]
        made.append(driver)
        return driver

    yield factory
    for driver in made:
        if driver.running:
            await driver.stopService()


async def started(driver: SnapDriver, tasks: dict | None = None) -> SnapDriver:
    if tasks is not None:
        driver.set_tasks(tasks)
    driver.startService()
    await driver.idle()
    return driver


async def advance(clock: Clock, driver: SnapDriver, seconds: float, step: float = 1.0) -> None:
    """Let ``seconds`` of driver time pass, finishing each tick's work before the next."""
    while seconds > 1e-9:
        s = min(step, seconds)
        clock.advance(s)
        seconds -= s
        await driver.idle()


async def drive(clock: Clock, cond: Callable[[], Any], step: float = 0.25, timeout: float = 10.0) -> None:
    """Advance the clock in small steps, without waiting for idleness (the driver may be
    sleeping on the clock), until ``cond`` holds; fail after ``timeout`` real seconds."""
    def held_or_advance() -> bool:
        if cond():
            return True
        clock.advance(step)
        return False

    await until(held_or_advance, timeout, what=lambda: f"condition (driver clock at {clock.seconds()}s)", interval=0.005)


def ours(snap: SnapEmulator) -> dict[str, list]:
    out: dict[str, list] = {}
    for t in snap.tasks.values():
        if t.name.startswith(PREFIX):
            out.setdefault(t.name, []).append(t)
    return out


def posts(snap: SnapEmulator) -> int:
    return snap.requests.count(("POST", "/v1/tasks"))


# --- global config --------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_global_config_is_set_with_three_puts_and_restored_after_a_snap_restart(make, snap, clock):
    driver = await started(make())
    assert driver.snap_reachable
    assert snap.global_config == {"raintank_agent_name": AGENT, "raintank_tsdb_url": TSDB,
                                  "raintank_api_key": API_KEY}
    puts = [json.loads(b) for m, p, b in snap.request_log if m == "PUT"]
    assert puts == [{"raintank_agent_name": AGENT}, {"raintank_tsdb_url": TSDB}, {"raintank_api_key": API_KEY}]
    assert all(p == "/v1/plugins////config" for m, p, _ in snap.request_log if m in ("PUT", "GET")
               and "plugins" in p)
    await advance(clock, driver, 5)
    assert sum(1 for m, _ in snap.requests if m == "PUT") == 3
    assert snap.requests.count(("GET", "/v1/plugins////config")) == 6
    snap.wipe()  # snapd restarted: the node is empty again
    await advance(clock, driver, 1)
    assert snap.global_config["raintank_api_key"] == API_KEY
    assert sum(1 for m, _ in snap.requests if m == "PUT") == 6


@pytest_twisted.ensureDeferred
async def test_a_quick_snap_restart_recreates_the_tasks_at_once(make, snap, clock):
    driver = await started(make(), {1: server_task(1)})
    snap.wipe()  # restarted between two probes: no probe failed
    await advance(clock, driver, 1)
    assert len(ours(snap)["raintank-apps:1"]) == 1
    assert len(driver.sent) == 2


@pytest_twisted.ensureDeferred
async def test_a_changed_value_is_put_again(make, snap, clock):
    snap.global_config.update(raintank_agent_name=AGENT, raintank_tsdb_url=TSDB, raintank_api_key="old")
    await started(make())
    assert [json.loads(b) for m, _, b in snap.request_log if m == "PUT"] == [{"raintank_api_key": API_KEY}]


# --- catalog --------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_catalog_is_sent_on_reachability_then_every_five_minutes(make, snap, clock):
    driver = await started(make())
    assert len(driver.sent) == 1
    records = driver.sent[0]
    assert [r["namespace"] for r in records] == ["/raintank/apps/ns1/zones/*/qps", "/raintank/apps/ping/avg"]
    assert records[0]["version"] == 1 and records[0]["policy"][0]["name"] == "ns1_key"
    assert records[0]["dynamic"] is True and "href" not in records[0]
    assert records[1] == {"namespace": "/raintank/apps/ping/avg", "version": 2, "policy": [], "dynamic": False}
    assert driver.last_catalog == records
    snap.catalog.append(metric("/raintank/apps/new", 1))
    await advance(clock, driver, 299, step=299)
    assert len(driver.sent) == 1
    await advance(clock, driver, 1)
    assert len(driver.sent) == 2 and len(driver.sent[1]) == 3
    driver.resend_catalog()
    assert driver.sent[2] == driver.sent[1]


def test_catalog_record_conversion():
    assert catalog_record({"namespace": "/a", "dynamic": False, "href": "x"}) == \
        {"namespace": "/a", "version": 0, "policy": [], "dynamic": False}
    assert catalog_record({"version": 1}) is None
    assert catalog_record({"namespace": "/a", "version": "1"}) is None


@pytest_twisted.ensureDeferred
async def test_resend_before_any_catalog_sends_nothing_and_a_failing_sender_is_survived(make, snap, clock, logs):
    calls: list[int] = []

    def broken(records: list[dict]) -> None:
        calls.append(len(records))
        raise RuntimeError("socket gone")

    driver = make(send_catalog=broken)
    driver.resend_catalog()
    assert calls == []
    await started(driver, {1: server_task(1)})
    assert calls == [2]
    assert lines(logs, "sending the catalog to the server failed")
    await advance(clock, driver, 300, step=100)
    assert calls == [2, 2]
    assert len(ours(snap)) == 1  # the loops kept going


# --- creating -------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_creates_one_snap_task_per_task_as_the_go_agent_did(make, snap, clock):
    other = server_task(7, interval=30, org=5, metrics={"/raintank/apps/ping/avg": 0}, config={})
    await started(make(), {1: server_task(1), 7: other})
    tasks = ours(snap)
    assert sorted(tasks) == ["raintank-apps:1", "raintank-apps:7"]
    [one], [seven] = tasks["raintank-apps:1"], tasks["raintank-apps:7"]
    assert one.state == seven.state == "Running"
    assert (one.interval_ns, one.deadline_ns, one.max_failures) == (60 * 10**9, 300 * 10**9, 100)
    assert one.workflow == {"collect": {
        "metrics": {NS: {"version": 1}}, "config": NS_CONFIG,
        "publish": [{"plugin_name": "rt-hostedtsdb", "plugin_version": 0,
                     "config": {"interval": 60, "orgId": 1}, "target": ""}]}}
    assert seven.workflow["collect"]["metrics"] == {"/raintank/apps/ping/avg": {"version": 0}}
    assert "config" not in seven.workflow["collect"]
    assert seven.workflow["collect"]["publish"][0]["config"] == {"interval": 30, "orgId": 5}
    bodies = [json.loads(b) for m, p, b in snap.request_log if (m, p) == ("POST", "/v1/tasks")]
    first = next(b for b in bodies if b["name"] == "raintank-apps:1")
    assert list(first) == ["name", "version", "deadline", "workflow", "schedule", "start", "max-failures"]
    assert first == snap_task_request(1, server_task(1))
    assert (first["version"], first["deadline"], first["schedule"], first["start"], first["max-failures"]) == \
        (0, "300s", {"type": "simple", "interval": "60s"}, True, 100)


@pytest_twisted.ensureDeferred
async def test_tasks_given_before_snap_answers_are_created_after_the_config(make, snap, clock):
    await snap.set_down(True)
    driver = make()
    driver.set_tasks({1: server_task(1)})
    await started(driver)
    assert not driver.snap_reachable and snap.tasks == {}
    await snap.set_down(False)
    await advance(clock, driver, 1)
    assert len(ours(snap)["raintank-apps:1"]) == 1  # strict Snap: the config came first


@pytest_twisted.ensureDeferred
async def test_a_burst_of_set_tasks_is_coalesced(make, snap, clock):
    driver = await started(make())
    before = snap.requests.count(("GET", "/v1/tasks"))
    for n in range(1, 6):
        driver.set_tasks({i: server_task(i) for i in range(1, n + 1)})
    await driver.idle()
    assert snap.requests.count(("GET", "/v1/tasks")) - before == 2
    assert sorted(ours(snap)) == [f"raintank-apps:{i}" for i in range(1, 6)]
    assert posts(snap) == 5


@pytest_twisted.ensureDeferred
async def test_a_task_snap_cannot_run_is_logged_and_skipped(make, snap, clock, logs):
    bad = dict(server_task(2), interval=0)
    driver = await started(make(), {1: server_task(1), 2: bad})
    assert sorted(ours(snap)) == ["raintank-apps:1"]
    assert len(lines(logs, "task 2 cannot be run by Snap: interval 0")) == 1
    await advance(clock, driver, 120, step=30)
    assert len(lines(logs, "task 2 cannot be run by Snap")) == 1


@pytest_twisted.ensureDeferred
async def test_a_list_or_object_in_config_is_that_tasks_error_and_never_sent_to_snap(make, snap, clock, logs):
    """The server takes lists and objects for the built-in collectors; Snap takes scalars."""
    listed = server_task(2, config={NS: {"codes": [200, 301]}})
    mapped = server_task(3, config={NS: {"headers": {"X-A": "1"}}})
    driver = await started(make(), {1: server_task(1), 2: listed, 3: mapped})
    assert sorted(ours(snap)) == ["raintank-apps:1"]
    assert posts(snap) == 1
    assert len(lines(logs, f"task 2 cannot be run by Snap: config['{NS}']['codes'] is a list;"
                           " Snap plugins take only strings, numbers and booleans")) == 1
    assert len(lines(logs, f"task 3 cannot be run by Snap: config['{NS}']['headers'] is a JSON object")) == 1
    await advance(clock, driver, 60, step=30)
    assert posts(snap) == 1


# --- out of date ----------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_same_updated_is_never_recreated(make, snap, clock):
    driver = await started(make(), {1: server_task(1)})
    [first] = ours(snap)["raintank-apps:1"]
    for _ in range(5):
        driver.set_tasks({1: server_task(1)})
        await advance(clock, driver, 61, step=61 / 4)  # sweeps, catalog, probes
    assert [t.id for t in ours(snap)["raintank-apps:1"]] == [first.id]
    assert posts(snap) == 1


@pytest_twisted.ensureDeferred
async def test_an_update_recreates_once(make, snap, clock):
    driver = await started(make(), {1: server_task(1)})
    [old] = ours(snap)["raintank-apps:1"]
    clock.advance(0.4)  # same second as the creation: timestamps alone could not tell
    driver.set_tasks({1: server_task(1, interval=10, updated="2024-05-01T10:00:00.400000Z")})
    await driver.idle()
    [new] = ours(snap)["raintank-apps:1"]
    assert new.id != old.id and new.interval_ns == 10 * 10**9
    # newer `updated`, same content: re-created once too
    driver.set_tasks({1: server_task(1, interval=10, updated="2024-05-01T10:00:00.400001Z")})
    await driver.idle()
    [newer] = ours(snap)["raintank-apps:1"]
    assert newer.id != new.id
    await advance(clock, driver, 130, step=10)
    assert [t.id for t in ours(snap)["raintank-apps:1"]] == [newer.id]
    assert posts(snap) == 3


@pytest_twisted.ensureDeferred
async def test_after_an_agent_restart_current_tasks_are_adopted_and_stale_ones_recreated(make, snap, clock):
    first = await started(make(), {1: server_task(1), 2: server_task(2)})
    await first.stopService()
    ids = {name: copies[0].id for name, copies in ours(snap).items()}
    clock.advance(30)
    # A new process: task 1 unchanged (even if `updated` moved on), task 2 changed
    # within the creation second, which timestamps could not see.
    second = await started(make(), {
        1: server_task(1, updated="2024-05-01T10:00:20.000000Z"),
        2: server_task(2, interval=120, updated="2024-05-01T10:00:00.500000Z")})
    now = {name: copies[0].id for name, copies in ours(snap).items()}
    assert now["raintank-apps:1"] == ids["raintank-apps:1"]
    assert now["raintank-apps:2"] != ids["raintank-apps:2"]
    assert posts(snap) == 3
    await advance(clock, second, 130, step=10)
    assert posts(snap) == 3


@pytest.mark.parametrize("updated, created, recreate", [
    ("2024-05-01T10:00:00.999999Z", T0, False),   # same second: cannot tell, keep
    ("2024-05-01T10:00:01.000000Z", T0, False),   # = C + 1: not strictly later
    ("2024-05-01T10:00:01.000001Z", T0, True),
    ("2024-05-01T09:59:59.000000Z", T0, False),
    ("2024-05-01T12:00:01+02:00", T0, False),      # offsets are honoured (10:00:01Z)
    ("not a time", T0, False),
    (None, T0, False),
])
def test_timestamp_rule_for_tasks_whose_content_cannot_be_compared(updated, created, recreate):
    assert updated_after_creation(updated, created) is recreate


# --- removing -------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_tasks_no_longer_desired_are_removed(make, snap, clock):
    driver = await started(make(), {1: server_task(1), 2: server_task(2)})
    driver.set_tasks({1: server_task(1)})
    await driver.idle()
    assert sorted(ours(snap)) == ["raintank-apps:1"]
    driver.set_tasks({1: dict(server_task(1), enabled=False)})
    await driver.idle()
    assert ours(snap) == {}


@pytest_twisted.ensureDeferred
async def test_nothing_is_removed_before_the_server_gave_a_task_list(make, snap, clock):
    leftover = await snap_create(snap, "raintank-apps:9")
    driver = await started(make())
    await advance(clock, driver, 61, step=61 / 3)
    assert leftover in snap.tasks
    driver.set_tasks({})
    await driver.idle()
    assert leftover not in snap.tasks


@pytest_twisted.ensureDeferred
async def test_a_disabled_task_is_removed_and_recreated_on_the_sweep(make, snap, clock, logs):
    driver = await started(make(), {1: server_task(1)})
    [old] = ours(snap)["raintank-apps:1"]
    snap.force_disabled(old.id, "publish failed: 401 Unauthorized")
    driver.set_tasks({1: server_task(1)})  # a reconcile alone keeps it, like the Go agent
    await advance(clock, driver, 59, step=59 / 2)
    assert [t.id for t in ours(snap)["raintank-apps:1"]] == [old.id]
    await advance(clock, driver, 1)
    [new] = ours(snap)["raintank-apps:1"]
    assert new.id != old.id and new.state == "Running" and old.id not in snap.tasks
    assert ("PUT", f"/v1/tasks/{old.id}/enable") in snap.requests
    [line] = lines(logs, "Snap disabled task")
    assert "after 100 failed runs" in line and "publish failed: 401 Unauthorized" in line


async def snap_create(snap: SnapEmulator, name: str, **over: Any) -> str:
    """A task created in Snap behind the driver's back; its id."""
    request = snap_task_request(1, server_task(1))
    request.update(name=name, **over)
    snap.strict = False
    try:
        return snap.create(json.dumps(request).encode(), "localhost:8181")["id"]
    finally:
        snap.strict = True


@pytest_twisted.ensureDeferred
async def test_foreign_tasks_are_never_touched(make, snap, clock):
    foreign = [await snap_create(snap, n) for n in ("my-own-task", "raintank-apps", "RAINTANK-APPS:1")]
    disabled = await snap_create(snap, "someone-elses")
    snap.force_disabled(disabled)
    stopped = await snap_create(snap, "stopped-one", start=False)
    driver = await started(make(), {1: server_task(1)})
    driver.set_tasks({})
    await advance(clock, driver, 121, step=121 / 4)
    for tid in foreign + [disabled, stopped]:
        assert tid in snap.tasks
    assert snap.tasks[disabled].state == "Disabled" and snap.tasks[stopped].state == "Stopped"
    touched = {p.split("/")[3] for m, p in snap.requests if p.startswith("/v1/tasks/")}
    assert touched.isdisjoint(foreign + [disabled, stopped])


@pytest_twisted.ensureDeferred
async def test_duplicates_are_collapsed_to_one(make, snap, clock):
    a = await snap_create(snap, "raintank-apps:1")
    clock.advance(2)
    b = await snap_create(snap, "raintank-apps:1")
    c = await snap_create(snap, "raintank-apps:1", start=False)
    await snap_create(snap, "raintank-apps:2")
    await snap_create(snap, "raintank-apps:2")
    await started(make(), {1: server_task(1), 2: server_task(2)})
    copies = ours(snap)
    assert [t.id for t in copies["raintank-apps:1"]] == [b]  # the newest running copy
    assert len(copies["raintank-apps:2"]) == 1
    assert a not in snap.tasks and c not in snap.tasks
    assert posts(snap) == 0


# --- failures -------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_snap_down_at_start_then_up_converges_with_one_log_line_per_change(make, snap, clock, logs):
    await snap.set_down(True)
    driver = await started(make(), {1: server_task(1)})
    await advance(clock, driver, 3)  # (each refused probe costs 0.3 s of real time)
    assert not driver.snap_reachable and driver.sent == []
    assert len(lines(logs, "is unreachable")) == 1
    await snap.set_down(False)
    await advance(clock, driver, 1)
    assert driver.snap_reachable and len(driver.sent) == 1
    assert len(ours(snap)["raintank-apps:1"]) == 1
    assert len(lines(logs, "is reachable")) == 1
    # down again, snapd restarts (empty), up again: everything is put back
    await snap.set_down(True)
    snap.wipe()
    await advance(clock, driver, 2)
    await snap.set_down(False)
    await advance(clock, driver, 1)
    assert snap.global_config["raintank_agent_name"] == AGENT
    assert len(ours(snap)["raintank-apps:1"]) == 1 and len(driver.sent) == 2
    assert len(lines(logs, "is unreachable")) == 2 and len(lines(logs, "is reachable")) == 2


@pytest_twisted.ensureDeferred
async def test_500s_are_retried_with_backoff_and_converge_without_duplicates(make, snap, clock, logs):
    snap.error_mode = True
    driver = await started(make(), {1: server_task(1), 2: server_task(2)})
    assert not driver.snap_reachable  # a probe answered with 500 is not a usable Snap
    snap.error_mode = lambda method, path: method == "POST"
    await advance(clock, driver, 1)
    assert driver.snap_reachable and ours(snap) == {}
    await advance(clock, driver, 20)
    failed = posts(snap)
    assert 4 <= failed <= 10  # retried with a doubling backoff, not every second
    assert len(lines(logs, "task 1: creating the Snap task failed: HTTP 500")) == 1
    snap.error_mode = False
    await advance(clock, driver, 60)
    assert {n: len(c) for n, c in ours(snap).items()} == {"raintank-apps:1": 1, "raintank-apps:2": 1}
    await advance(clock, driver, 60)
    assert posts(snap) == failed + 2


@pytest_twisted.ensureDeferred
async def test_a_half_succeeded_create_converges_without_duplicates(make, snap, clock):
    snap.half_create = 1
    driver = await started(make(), {1: server_task(1)})
    [left] = ours(snap)["raintank-apps:1"]
    assert left.state == "Stopped"  # the create answered 500 but stored the task
    await advance(clock, driver, 2)
    [good] = ours(snap)["raintank-apps:1"]
    assert good.state == "Running" and left.id not in snap.tasks
    # a create whose answer was lost: the running copy is adopted, not duplicated
    snap.drop_create_response = 1
    driver.set_tasks({1: server_task(1), 2: server_task(2)})
    await driver.idle()
    await advance(clock, driver, 5)
    assert len(ours(snap)["raintank-apps:2"]) == 1
    assert posts(snap) == 3


@pytest_twisted.ensureDeferred
async def test_stopping_is_waited_out(make, snap, clock):
    snap.stop_delay = 1.5
    driver = await started(make(), {1: server_task(1)})
    [old] = ours(snap)["raintank-apps:1"]
    driver.set_tasks({1: server_task(1, interval=30, updated="2024-05-01T10:00:05.000000Z")})
    await drive(clock, lambda: old.id not in snap.tasks and len(ours(snap).get("raintank-apps:1", [])) == 1)
    await driver.idle()
    [new] = ours(snap)["raintank-apps:1"]
    assert new.interval_ns == 30 * 10**9
    assert snap.requests.count(("DELETE", f"/v1/tasks/{old.id}")) == 1  # waited, then deleted


@pytest_twisted.ensureDeferred
async def test_a_long_stopping_is_retried_on_later_cycles(make, snap, clock, logs):
    snap.stop_delay = 40.0
    driver = await started(make(stop_timeout=2.0), {1: server_task(1)})
    [old] = ours(snap)["raintank-apps:1"]
    driver.set_tasks({})
    await drive(clock, lambda: bool(lines(logs, "still Stopping after 2 s")))
    assert old.id in snap.tasks
    await drive(clock, lambda: old.id not in snap.tasks, step=1.0)
    await driver.idle()
    assert ours(snap) == {}


@pytest_twisted.ensureDeferred
async def test_a_hanging_snap_counts_as_unreachable(make, snap, clock, logs):
    snap.hang = True
    driver = await started(make(request_timeout=0.2), {1: server_task(1)})
    assert not driver.snap_reachable
    assert lines(logs, "no answer within 0.2 s")
    snap.hang = False
    await snap.set_down(True)  # drop the hung connections
    await snap.set_down(False)
    await advance(clock, driver, 1)
    assert driver.snap_reachable and len(ours(snap)["raintank-apps:1"]) == 1


@pytest_twisted.ensureDeferred
async def test_the_api_key_never_appears_in_logs(make, snap, clock, logs):
    snap.error_message = f"bad key {API_KEY} rejected"
    snap.error_mode = lambda method, path: method in ("POST", "PUT")
    driver = await started(make(), {1: server_task(1)})
    await advance(clock, driver, 5)
    snap.error_mode = True
    await advance(clock, driver, 3)
    await snap.set_down(True)
    await advance(clock, driver, 3)
    await snap.set_down(False)
    snap.error_mode = False
    await advance(clock, driver, 70, step=5)
    assert len(ours(snap)["raintank-apps:1"]) == 1
    text = lines(logs)
    assert any("<api-key>" in line for line in text)  # the echoed key was redacted
    for e in logs:
        blob = formatEvent(e) + repr({k: v for k, v in e.items() if k not in ("log_logger", "log_source")})
        if "log_failure" in e:
            blob += e["log_failure"].getTraceback()
        assert API_KEY not in blob


@pytest_twisted.ensureDeferred
async def test_stop_service_cancels_work_quietly(make, snap, clock, logs):
    snap.hang = True
    driver = make()
    driver.set_tasks({1: server_task(1)})
    driver.startService()
    await driver.stopService()
    assert not [e for e in logs if "log_failure" in e]
    snap.hang = False


# --- task status (issue 7) --------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_status_follows_snaps_counters_every_status_interval(make, snap, clock):
    reports: list = []
    driver = await started(make(report_status=reports.append, status_interval=10.0), {1: server_task(1)})
    [task] = ours(snap)["raintank-apps:1"]
    snap.tick(2)
    await advance(clock, driver, 10)
    assert (reports[-1].task_id, reports[-1].executor, reports[-1].outcome, reports[-1].runs) == (1, "snap", "ok", 2)
    snap.fail_task(task.id, "publish failed: 401 Unauthorized")
    snap.tick(1)
    await advance(clock, driver, 10)
    assert (reports[-1].outcome, reports[-1].error, reports[-1].failures) == \
        ("error", "publish failed: 401 Unauthorized", 1)
    snap.heal_task(task.id)
    snap.tick(1)
    await advance(clock, driver, 10)
    assert (reports[-1].outcome, reports[-1].error, reports[-1].runs) == ("ok", "", 4)


@pytest_twisted.ensureDeferred
async def test_a_task_snap_cannot_run_is_reported_as_an_error(make, snap, clock):
    reports: list = []
    await started(make(report_status=reports.append), {3: dict(server_task(3), interval=0)})
    assert [(s.task_id, s.outcome) for s in reports] == [(3, "error")]
    assert reports[0].error.startswith("cannot be run by Snap")


@pytest_twisted.ensureDeferred
async def test_polls_of_a_down_snap_log_no_factory_lines(make, snap, clock, logs):
    """The connection pool's factories are quiet: no "Starting factory" line per poll."""
    await snap.set_down(True)
    driver = await started(make(), {1: server_task(1)})
    await advance(clock, driver, 3)
    assert not driver.snap_reachable
    await snap.set_down(False)
    await advance(clock, driver, 1)
    assert driver.snap_reachable
    assert not [e for e in logs if "Starting factory" in formatEvent(e)
                or "Stopping factory" in formatEvent(e)]
