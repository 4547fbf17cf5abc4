"""The agent's task frame is a wire message of its own, and deployed agents see the same
bytes as before it was split from the REST rendering; catalog records validate there."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from taskd.db.tasks import Route, Task
from taskd.server.render import task_json
from taskd.wire import framing
from taskd.wire.framing import FrameError
from taskd.wire.messages import CatalogRecord, TaskMessage, parse_catalog, parse_catalog_records, task_payload


def _task(**kw) -> Task:
    fields = dict(id=7, org_id=3, name="ping \u00e9", task_type="ping", config={"/x": {"hostname": "a"}},
                  interval=60, route=Route("byTags", {"tags": ["eu", "us"]}), metrics={"/x/*": 0},
                  enabled=True, created=datetime(2026, 1, 2, 3, 4, 5, 6),
                  updated=datetime(2026, 1, 2, 4, 5, 6, tzinfo=timezone.utc))
    fields.update(kw)
    return Task(**fields)


@pytest.mark.parametrize("event", [framing.TASK_ADD, framing.TASK_UPDATE, framing.TASK_REMOVE])
def test_task_frame_bytes_are_unchanged(event: str) -> None:
    task = _task()
    assert framing.encode_json(event, task_payload(task)) == framing.encode_json(event, task_json(task))


def test_task_list_frame_bytes_are_unchanged() -> None:
    tasks = [_task(), _task(id=8, route=Route("any", {}), metrics={}, enabled=False)]
    assert (framing.encode_json(framing.TASK_LIST, [task_payload(t) for t in tasks])
            == framing.encode_json(framing.TASK_LIST, [task_json(t) for t in tasks]))


def test_task_message_fields() -> None:
    message = TaskMessage.of(_task())
    assert (message.id, message.route_type, message.route_config) == (7, "byTags", {"tags": ["eu", "us"]})
    assert message.to_json()["created"] == "2026-01-02T03:04:05.000006Z"


def test_catalog_records_parse() -> None:
    value = [{"namespace": "/a/b", "version": 2, "policy": {"x": 1}, "extra": True}, {"namespace": "/c"}]
    assert parse_catalog_records(value) == [CatalogRecord("/a/b", 2, {"x": 1}), CatalogRecord("/c", 0, None)]
    assert parse_catalog(value) == [("/a/b", 2, {"x": 1}), ("/c", 0, None)]
    assert parse_catalog(None) == []


@pytest.mark.parametrize("value, reason", [
    ({"namespace": "/a"}, "JSON array"),
    ([{"version": 1}], "record 0 has no namespace"),
    ([{"namespace": "/a"}, {"namespace": "/b", "version": True}], "record 1 has a bad version"),
    ([{"namespace": "/a", "version": 2**31}], "bad version"),
])
def test_bad_catalogs_name_the_record(value, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        parse_catalog(value)
