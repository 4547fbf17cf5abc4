"""The Snap emulator answers as docs/snap-api.md says snapd (ca32c9a) does.

Real HTTP on loopback through treq; task times on an injected ``task.Clock``.
"""
from __future__ import annotations

import json
import re
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet.task import Clock

from tests.fakes.snap import SnapEmulator, metric, render_json
from tests.fakes.snap_state import format_duration, parse_duration, SnapFault

T0 = 1511334120
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
NS = "/raintank/apps/ns1/zones/*/qps"


def task_request(name: str = "raintank-apps:42", **over: Any) -> dict[str, Any]:
    req = {
        "name": name, "version": 0, "deadline": "300s",
        "workflow": {"collect": {
            "metrics": {NS: {"version": 1}},
            "config": {"/raintank/apps/ns1": {"ns1_key": "abc123", "zone": "example.com"}},
            "publish": [{"plugin_name": "rt-hostedtsdb", "plugin_version": 0,
                         "config": {"interval": 60, "orgId": 1}, "target": ""}]}},
        "schedule": {"type": "simple", "interval": "60s"},
        "start": True, "max-failures": 100}
    req.update(over)
    return req


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(T0 + 0.75)
    return c


@pytest_twisted.async_yield_fixture
async def snap(clock):
    s = SnapEmulator(clock=clock).start()
    yield s
    await s.stop()


async def call(snap: SnapEmulator, method: str, path: str, body: Any = None,
               raw: bytes | None = None) -> tuple[int, Any, bytes, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    response = await treq.request(method, snap.url + path, data=data, persistent=False)
    content = await response.content()
    try:
        doc = json.loads(content)
    except ValueError:
        doc = None
    return response.code, response.headers, content, doc


async def create(snap: SnapEmulator, **over: Any) -> dict[str, Any]:
    code, _, _, doc = await call(snap, "POST", "/v1/tasks", task_request(**over))
    assert code == 201, doc
    return doc["body"]


def assert_error(code: int, doc: Any, status: int, message: str) -> None:
    assert code == status
    assert doc["meta"] == {"code": status, "message": message, "type": "error", "version": 1}
    assert doc["body"] == {"message": message, "fields": {}}


# --- transport conventions ------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_envelope_is_pretty_printed_with_meta_in_go_order(snap):
    code, headers, content, doc = await call(snap, "GET", "/v1/plugins////config")
    assert code == 200
    assert content == (b'{\n  "meta": {\n    "code": 200,\n    "message": "Plugin config item retrieved",\n'
                       b'    "type": "config_plugin_item_returned",\n    "version": 1\n  },\n  "body": {}\n}')
    assert headers.getRawHeaders("content-type") == ["text/plain; charset=utf-8"]


def test_render_json_keeps_ampersand_and_prints_integral_floats_as_ints():
    assert render_json({"href": "a?ns=x&ver=1", "n": 60.0, "f": 1.5}) == \
        b'{\n  "href": "a?ns=x&ver=1",\n  "n": 60,\n  "f": 1.5\n}'


@pytest_twisted.ensureDeferred
async def test_unknown_path_is_plain_404_and_wrong_method_plain_405(snap):
    code, _, content, doc = await call(snap, "GET", "/v1/nothing")
    assert (code, content, doc) == (404, b"404 page not found\n", None)
    code, _, content, _ = await call(snap, "GET", "/v1/plugins//config")  # too few segments
    assert code == 404
    code, headers, content, doc = await call(snap, "POST", "/v1/tasks/abc")
    assert (code, content, doc) == (405, b"Method Not Allowed\n", None)
    assert headers.getRawHeaders("allow") == ["GET, DELETE"]
    assert ("POST", "/v1/tasks/abc") in snap.requests


# --- global plugin config -------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_global_config_put_merges_and_returns_the_whole_node(snap):
    code, _, _, doc = await call(snap, "PUT", "/v1/plugins////config", {"raintank_agent_name": "a1"})
    assert code == 200
    assert doc["meta"]["type"] == "config_plugin_item_created"
    assert doc["meta"]["message"] == "Plugin config item(s) set"
    code, _, _, doc = await call(snap, "PUT", "/v1/plugins////config", {"raintank_tsdb_url": "http://t/"})
    assert doc["body"] == {"raintank_agent_name": "a1", "raintank_tsdb_url": "http://t/"}
    assert snap.global_config == doc["body"]
    # keys set globally show up in a typed view
    code, _, _, doc = await call(snap, "GET", "/v1/plugins/publisher/rt-hostedtsdb/1/config")
    assert code == 200 and doc["body"]["raintank_agent_name"] == "a1"
    code, _, _, doc = await call(snap, "DELETE", "/v1/plugins////config", ["raintank_agent_name", "x"])
    assert doc["meta"]["type"] == "config_plugin_item_deleted"
    assert doc["body"] == {"raintank_tsdb_url": "http://t/"}


@pytest_twisted.ensureDeferred
async def test_global_config_errors(snap):
    code, _, _, doc = await call(snap, "PUT", "/v1/plugins////config", {"k": None})
    assert_error(code, doc, 400, "Error Unmarshalling JSON ConfigDataNode. Key: k Type: <nil> is unsupported.")
    code, _, _, doc = await call(snap, "PUT", "/v1/plugins////config", raw=b"{nope")
    assert code == 400 and doc["meta"]["type"] == "error"
    code, _, _, doc = await call(snap, "GET", "/v1/plugins/bogus///config")
    assert_error(code, doc, 400, "invalid plugin type name given bogus")
    code, _, _, doc = await call(snap, "GET", "/v1/plugins/collector/x/one/config")
    assert_error(code, doc, 400, 'strconv.Atoi: parsing "one": invalid syntax')
    assert snap.global_config == {}


# --- tasks ----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_create_answers_201_with_the_full_task(snap):
    code, _, _, doc = await call(snap, "POST", "/v1/tasks", task_request())
    assert code == 201
    body = doc["body"]
    assert doc["meta"] == {"code": 201, "message": f"Scheduled task created ({body['id']})",
                           "type": "scheduled_task_created", "version": 1}
    assert UUID4.match(body["id"])
    assert list(body) == ["id", "name", "deadline", "workflow", "schedule", "creation_timestamp",
                          "last_run_timestamp", "task_state", "href"]
    assert body["name"] == "raintank-apps:42"
    assert body["deadline"] == "5m0s"
    assert body["schedule"] == {"type": "simple", "interval": "1m0s"}
    assert body["workflow"] == task_request()["workflow"]
    assert body["creation_timestamp"] == T0 and body["last_run_timestamp"] == T0
    assert body["task_state"] == "Running"
    assert body["href"] == f"http://127.0.0.1:{snap.port}/v1/tasks/{body['id']}"
    assert snap.tasks[body["id"]].max_failures == 100


@pytest_twisted.ensureDeferred
async def test_create_without_start_is_stopped_and_defaults_apply(snap):
    req = task_request(start=False)
    del req["deadline"], req["max-failures"]
    code, _, _, doc = await call(snap, "POST", "/v1/tasks", req)
    body = doc["body"]
    assert (body["task_state"], body["last_run_timestamp"], body["deadline"]) == ("Stopped", -1, "5s")
    assert snap.tasks[body["id"]].max_failures == 10


@pytest.mark.parametrize("change, message", [
    ({"bogus": 1}, "Unrecognized key 'bogus' in task creation request"),
    ({"schedule": {}, "workflow": None},
     "Task must include a schedule, and the schedule must not be empty -- "
     "Task must include a workflow, and the workflow must not be empty"),
    ({"schedule": {"type": "weekly", "interval": "1s"}}, "unknown schedule type weekly"),
    ({"schedule": {"type": "simple", "interval": "0s"}}, "Interval must be greater than 0"),
    ({"schedule": {"type": "simple", "interval": "60"}}, "time: missing unit in duration 60"),
    ({"deadline": "soon"}, "time: invalid duration soon"),
    ({"workflow": {"collect": {"metrics": {}}}}, "Collection node has not metrics defined to collect"),
    ({"workflow": {"collect": {"metrics": {"/a": {}}, "x": 1}}},
     "Unrecognized key 'x' in collect workflow of task."),
    ({"workflow": {"collect": {"metrics": {"/a": {}}}, "y": 1}}, "Unrecognized key 'y' in workflow of task."),
    ({"workflow": {"collect": {"metrics": {"/a": {}}, "publish": [{"plugin_name": "p", "z": 1}]}}},
     "Unrecognized key 'z' in publish workflow of task."),
])
@pytest_twisted.ensureDeferred
async def test_create_validation_errors_are_500(snap, change, message):
    code, _, _, doc = await call(snap, "POST", "/v1/tasks", {**task_request(), **change})
    assert_error(code, doc, 500, message)
    assert snap.tasks == {}


@pytest_twisted.ensureDeferred
async def test_strict_create_checks_catalog_plugins_and_required_config(snap):
    snap.strict = True
    code, _, _, doc = await call(snap, "POST", "/v1/tasks", task_request())
    assert_error(code, doc, 500, f"Metric not found: {NS} (version: 1)")
    snap.catalog = [metric(NS, 1, policy=[{"name": "ns1_key", "type": "string", "required": True}])]
    code, _, _, doc = await call(snap, "POST", "/v1/tasks", task_request())
    assert_error(code, doc, 500, "required key missing (raintank_tsdb_url)")
    snap.global_config.update(raintank_tsdb_url="http://t/", raintank_api_key="k")
    bad = task_request()
    bad["workflow"]["collect"]["publish"][0]["plugin_name"] = "mock-file"
    code, _, _, doc = await call(snap, "POST", "/v1/tasks", bad)
    assert_error(code, doc, 500, "Plugin not found: type(publisher) name(mock-file) version(-1)")
    del bad["workflow"]["collect"]["config"]
    code, _, _, doc = await call(snap, "POST", "/v1/tasks", bad)
    assert_error(code, doc, 500, "required key missing (ns1_key)")
    assert (await create(snap))["task_state"] == "Running"


@pytest_twisted.ensureDeferred
async def test_list_is_summary_sorted_by_creation_with_zero_counters_omitted(snap, clock):
    code, _, _, doc = await call(snap, "GET", "/v1/tasks")
    assert doc["meta"]["type"] == "scheduled_task_list_returned"
    assert doc["meta"]["message"] == "Scheduled tasks retrieved"
    assert doc["body"] == {"ScheduledTasks": []}
    a = await create(snap)
    clock.advance(5)
    b = await create(snap)  # names are not unique
    snap.fail_task(b["id"], "publish failed: 401 Unauthorized", times=1)
    snap.tick()
    code, _, _, doc = await call(snap, "GET", "/v1/tasks")
    first, second = doc["body"]["ScheduledTasks"]
    assert (first["id"], second["id"]) == (a["id"], b["id"])
    assert first["name"] == second["name"] == "raintank-apps:42"
    assert "workflow" not in first and "schedule" not in first
    assert list(second) == ["id", "name", "deadline", "creation_timestamp", "last_run_timestamp",
                            "hit_count", "failed_count", "last_failure_message", "task_state", "href"]
    assert second["failed_count"] == 1 and second["hit_count"] == 1
    assert second["last_failure_message"] == "publish failed: 401 Unauthorized"
    assert first["hit_count"] == 1 and "failed_count" not in first


@pytest_twisted.ensureDeferred
async def test_get_one_and_not_found(snap):
    t = await create(snap)
    code, _, _, doc = await call(snap, "GET", f"/v1/tasks/{t['id']}")
    assert doc["meta"]["type"] == "scheduled_task_returned"
    assert doc["meta"]["message"] == f"Scheduled task ({t['id']}) returned"
    assert doc["body"]["workflow"] == t["workflow"]
    code, _, _, doc = await call(snap, "GET", "/v1/tasks/nope")
    assert_error(code, doc, 404, "Task not found: ID(nope)")


@pytest_twisted.ensureDeferred
async def test_stop_goes_through_stopping_then_remove(snap, clock):
    snap.stop_delay = 2.0
    t = await create(snap)
    path = f"/v1/tasks/{t['id']}"
    code, _, _, doc = await call(snap, "DELETE", path)
    assert_error(code, doc, 500, "Task must be stopped")
    code, _, _, doc = await call(snap, "PUT", path + "/stop")
    assert code == 200 and doc["body"] == {"id": t["id"]}
    assert doc["meta"]["type"] == "scheduled_task_stopped"
    assert (await call(snap, "GET", path))[3]["body"]["task_state"] == "Stopping"
    code, _, _, doc = await call(snap, "PUT", path + "/stop")
    assert_error(code, doc, 500, "error 0: Task is already stopped. ")
    code, _, _, doc = await call(snap, "DELETE", path)
    assert_error(code, doc, 500, "Task must be stopped")
    clock.advance(2)
    body = (await call(snap, "GET", path))[3]["body"]
    assert (body["task_state"], body["last_run_timestamp"]) == ("Stopped", -1)
    code, _, _, doc = await call(snap, "DELETE", path)
    assert code == 200 and doc["meta"]["type"] == "scheduled_task_removed"
    assert doc["meta"]["message"] == f"Scheduled task ({t['id']}) removed"
    code, _, _, doc = await call(snap, "DELETE", path)
    assert_error(code, doc, 404, f"Task not found: ID({t['id']})")
    code, _, _, doc = await call(snap, "PUT", path + "/stop")
    assert_error(code, doc, 404, f"error 0: Task not found: ID({t['id']}) ")


@pytest_twisted.ensureDeferred
async def test_disabled_after_max_failures_then_enable(snap):
    t = await create(snap, **{"max-failures": 3})
    path = f"/v1/tasks/{t['id']}"
    snap.fail_task(t["id"], "boom")
    snap.tick(2)
    snap.heal_task(t["id"])
    snap.tick()  # a successful run resets the consecutive count
    snap.fail_task(t["id"], "boom again")
    snap.tick(2)
    assert snap.tasks[t["id"]].state == "Running"
    snap.tick()
    body = (await call(snap, "GET", path))[3]["body"]
    assert (body["task_state"], body["failed_count"], body["hit_count"]) == ("Disabled", 5, 6)
    assert body["last_failure_message"] == "boom again"
    assert snap.tick() == 0  # a disabled task does not run
    code, _, _, doc = await call(snap, "PUT", path + "/start")
    assert_error(code, doc, 409, "error 0: Task is disabled. Cannot be started. ")
    code, _, _, doc = await call(snap, "PUT", path + "/stop")
    assert_error(code, doc, 500, "error 0: Task is disabled. Only running tasks can be stopped. ")
    code, _, _, doc = await call(snap, "PUT", path + "/enable")
    assert code == 200
    assert doc["meta"]["type"] == "scheduled_task_enabled"
    assert doc["meta"]["message"] == f"Disabled task ({t['id']}) enabled"
    assert doc["body"]["task_state"] == "Stopped" and doc["body"]["href"] == ""
    code, _, _, doc = await call(snap, "PUT", path + "/enable")
    assert_error(code, doc, 500, "Task must be disabled")
    code, _, _, doc = await call(snap, "PUT", path + "/start")
    assert code == 200 and doc["meta"]["type"] == "scheduled_task_started"


@pytest_twisted.ensureDeferred
async def test_force_disabled_and_negative_max_failures(snap):
    t = await create(snap)
    snap.force_disabled(t["id"], "tsdb down")
    assert snap.tasks[t["id"]].state == "Disabled"
    assert snap.tasks[t["id"]].failed_count == 100
    forever = await create(snap, **{"max-failures": -1})
    snap.fail_task(forever["id"])
    snap.tick(50)
    assert snap.tasks[forever["id"]].state == "Running"


@pytest_twisted.ensureDeferred
async def test_run_due_follows_the_schedule_and_counts_misses(snap, clock):
    t = await create(snap, schedule={"type": "simple", "interval": "10s"})
    assert snap.run_due() == 0
    clock.advance(35)
    assert snap.run_due() == 1
    task = snap.tasks[t["id"]]
    assert (task.hit_count, task.miss_count, task.last_run_timestamp) == (1, 2, int(clock.seconds()))
    clock.advance(5)
    assert snap.run_due() == 1


# --- catalog --------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_catalog_is_a_sorted_array_with_href(snap):
    code, _, _, doc = await call(snap, "GET", "/v1/metrics")
    assert (doc["meta"]["type"], doc["meta"]["message"], doc["body"]) == ("metrics_returned", "Metrics returned", [])
    snap.catalog = [metric("/b/c", 2), metric(NS, 1, policy=[{"name": "zone", "type": "string", "required": False}]),
                    metric("/a/z", 0)]
    code, _, content, doc = await call(snap, "GET", "/v1/metrics")
    assert [m["namespace"] for m in doc["body"]] == ["/a/z", "/b/c", NS]
    assert doc["body"][0] == {"namespace": "/a/z", "dynamic": False,
                              "href": f"http://127.0.0.1:{snap.port}/v1/metrics?ns=%2Fa%2Fz&ver=0"}
    assert doc["body"][2]["dynamic"] is True and doc["body"][2]["policy"][0]["name"] == "zone"
    assert b"%2A%2Fqps&ver=1" in content  # '&' not escaped as \u0026
    code, _, _, doc = await call(snap, "GET", "/v1/metrics?ns=/b/*")
    assert [m["namespace"] for m in doc["body"]] == ["/b/c"]
    code, _, _, doc = await call(snap, "GET", "/v1/metrics?ns=/nope")
    assert_error(code, doc, 404, "Metric not found: /nope (version: 0)")
    code, _, _, doc = await call(snap, "GET", "/v1/metrics/b/c?ver=2")
    assert doc["meta"]["type"] == "metric_returned" and doc["body"]["Metric"]["version"] == 2


# --- failure knobs --------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_error_mode_half_create_and_dropped_response(snap):
    snap.error_mode = True
    code, _, _, doc = await call(snap, "GET", "/v1/tasks")
    assert code == 500 and doc["meta"]["type"] == "error"
    snap.error_mode = lambda method, path: method == "POST"
    assert (await call(snap, "GET", "/v1/tasks"))[0] == 200
    assert (await call(snap, "POST", "/v1/tasks", task_request()))[0] == 500
    assert snap.tasks == {}
    snap.error_mode = False
    snap.half_create = 1
    code, _, _, doc = await call(snap, "POST", "/v1/tasks", task_request())
    assert code == 500 and doc["meta"]["type"] == "error"
    [left] = snap.tasks.values()
    assert (left.name, left.state) == ("raintank-apps:42", "Stopped")
    snap.drop_create_response = 1
    with pytest.raises(Exception):
        await call(snap, "POST", "/v1/tasks", task_request(name="raintank-apps:43"))
    assert sorted((t.name, t.state) for t in snap.tasks.values()) == [
        ("raintank-apps:42", "Stopped"), ("raintank-apps:43", "Running")]


@pytest_twisted.ensureDeferred
async def test_down_refuses_then_up_again_on_the_same_port_and_wipe(snap):
    await create(snap)
    snap.global_config["raintank_agent_name"] = "a"
    url = snap.url
    await snap.set_down(True)
    assert snap.down
    with pytest.raises(Exception):
        await call(snap, "GET", "/v1/tasks")
    await snap.set_down(False)
    assert snap.url == url
    assert len((await call(snap, "GET", "/v1/tasks"))[3]["body"]["ScheduledTasks"]) == 1
    snap.wipe()
    assert (await call(snap, "GET", "/v1/tasks"))[3]["body"]["ScheduledTasks"] == []
    assert (await call(snap, "GET", "/v1/plugins////config"))[3]["body"] == {}


# --- Go durations ---------------------------------------------------------------------

@pytest.mark.parametrize("text, echoed", [
    ("10s", "10s"), ("60s", "1m0s"), ("300s", "5m0s"), ("3600s", "1h0m0s"), ("90s", "1m30s"),
    ("1.5s", "1.5s"), ("500ms", "500ms"), ("1h30m", "1h30m0s"), ("0", "0s"), ("1m", "1m0s"),
])
def test_go_duration_round_trip(text, echoed):
    assert format_duration(parse_duration(text)) == echoed


def test_bad_durations():
    for text, msg in (("", "time: invalid duration "), ("x", "time: invalid duration x"),
                      ("5", "time: missing unit in duration 5")):
        with pytest.raises(SnapFault) as info:
            parse_duration(text)
        assert info.value.message == msg
