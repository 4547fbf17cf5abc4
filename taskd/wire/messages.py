"""Typed payloads of the agent websocket, shared by server and agent.

Why apart from the REST rendering (taskd/server/render.py): what a deployed agent is sent
is a protocol contract, while the REST JSON may grow for API clients. Today both happen to
carry the same task fields in the same order, so `TaskMessage.to_json()` encodes to the
very bytes the server sent before this module existed (tests/unit/test_wire_messages.py
holds that). Catalog records are validated here, once, for whoever reads them.

Imports nothing of taskd's but the framing and the time format, so db/, server/ and agent/ may all use it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping

from taskd.timeutil import rfc3339
from taskd.wire.framing import FrameError

MAX_VERSION = 2**31 - 1  # the catalog version columns are 32-bit signed integers
MAX_NAMESPACE = 255      # the namespace columns' width
#: A namespace an agent may advertise: "/"-separated, printable ASCII without spaces or
#: the glob characters ?[]\ (a `*` element is Snap's dynamic element). Agents' strings
#: are only ever compared (taskd.routing), never compiled as patterns.
NAMESPACE_RE = re.compile(r"^/[!-~]{0,254}$")
_GLOB = re.compile(r"[?\[\]\\]")


@dataclass(frozen=True)
class TaskMessage:
    """A task as an agent receives it in taskList/taskAdd/taskUpdate/taskRemove."""

    id: int
    name: str
    task_type: str
    org_id: int
    config: Mapping[str, Any]
    interval: int
    route_type: str
    route_config: Mapping[str, Any]
    metrics: Mapping[str, int]
    enabled: bool
    created: datetime | None
    updated: datetime | None

    @classmethod
    def of(cls, task: Any) -> "TaskMessage":
        """From a stored task (any object with the db Task's attributes)."""
        return cls(task.id, task.name, task.task_type, task.org_id, task.config, task.interval,
                   task.route.type, task.route.config, task.metrics, task.enabled, task.created, task.updated)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "taskType": self.task_type,
            "orgId": self.org_id,
            "config": self.config,
            "interval": self.interval,
            "route": {"type": self.route_type, "config": self.route_config},
            "metrics": self.metrics,
            "enabled": self.enabled,
            "created": rfc3339(self.created),
            "updated": rfc3339(self.updated),
        }


def task_payload(task: Any) -> dict[str, Any]:
    """The JSON an agent is sent for a stored task."""
    return TaskMessage.of(task).to_json()


@dataclass(frozen=True)
class CatalogRecord:
    """One metric an agent advertises in its catalog."""

    namespace: str
    version: int
    policy: Any = None


def parse_catalog(value: Any, max_records: int | None = None) -> list[tuple[str, int, Any]]:
    """A catalog payload (Snap metric records) -> (namespace, version, policy); tolerant
    of extra fields; FrameError naming the first bad record, or saying the catalog has
    more than `max_records` records (the whole catalog is refused then, not cut)."""
    return [(r.namespace, r.version, r.policy) for r in parse_catalog_records(value, max_records)]


def parse_catalog_records(value: Any, max_records: int | None = None) -> list[CatalogRecord]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise FrameError("catalog payload must be a JSON array of metric records")
    if max_records is not None and len(value) > max_records:
        raise FrameError(f"catalog has {len(value)} records, more than the {max_records} this server "
                         "accepts (max-catalog-records)")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("namespace"), str) or not item["namespace"]:
            raise FrameError(f"catalog record {i} has no namespace")
        namespace = item["namespace"]
        if len(namespace) > MAX_NAMESPACE or not NAMESPACE_RE.match(namespace) or _GLOB.search(namespace):
            raise FrameError(f"catalog record {i} has a bad namespace {namespace[:64]!r}: it must start with"
                             f" '/', be at most {MAX_NAMESPACE} characters of printable ASCII without spaces"
                             " or ?[]\\")
        version = item.get("version", 0)
        if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= MAX_VERSION:
            raise FrameError(f"catalog record {i} has a bad version {version!r}")
        out.append(CatalogRecord(namespace, version, item.get("policy")))
    return out


# -- ad-hoc runs (runTask / runResult) ------------------------------------------------

MAX_RUN_METRICS = 1000
RUN_OUTCOMES = ("ok", "error", "unsupported")


@dataclass(frozen=True)
class RunResult:
    """An agent's answer to one runTask: what a single run measured."""

    request_id: str
    task_id: int
    outcome: str
    error: str
    duration: float | None
    metrics: tuple[tuple[str, float, str], ...]  # (series name, value, unit)

    def to_json(self) -> dict[str, Any]:
        return {"requestId": self.request_id, "taskId": self.task_id, "outcome": self.outcome, "error": self.error,
                "duration": self.duration,
                "metrics": [{"name": n, "value": v, "unit": u} for n, v, u in self.metrics]}


def run_request(request_id: str, task: dict[str, Any]) -> dict[str, Any]:
    """The runTask payload: the task as agents are sent it, and the id to answer with."""
    return {"requestId": request_id, "task": task}


def parse_run_result(value: Any) -> RunResult:
    """A runResult payload; FrameError naming what is wrong."""
    if not isinstance(value, dict):
        raise FrameError("runResult payload must be a JSON object")
    request_id, task_id, outcome = value.get("requestId"), value.get("taskId"), value.get("outcome")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= 64:
        raise FrameError("runResult requestId must be the runTask's")
    if isinstance(task_id, bool) or not isinstance(task_id, int):
        raise FrameError("runResult taskId must be an integer")
    if outcome not in RUN_OUTCOMES:
        raise FrameError(f"runResult outcome must be one of {', '.join(RUN_OUTCOMES)}")
    error = value.get("error") or ""
    duration = value.get("duration")
    if not isinstance(error, str) or (duration is not None and (
            isinstance(duration, bool) or not isinstance(duration, (int, float)) or not math.isfinite(duration)
            or duration < 0)):
        raise FrameError("runResult error must be a string and duration a finite number >= 0 or null")
    raw = value.get("metrics") or []
    if not isinstance(raw, list) or len(raw) > MAX_RUN_METRICS:
        raise FrameError(f"runResult metrics must be a list of at most {MAX_RUN_METRICS}")
    metrics = []
    for m in raw:
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or isinstance(m.get("value"), bool) \
                or not isinstance(m.get("value"), (int, float)) or not math.isfinite(m["value"]) \
                or not isinstance(m.get("unit", ""), str):
            raise FrameError("runResult metrics entries must be {name, value (a finite number), unit}")
        metrics.append((m["name"][:255], float(m["value"]), m.get("unit", "")[:32]))
    return RunResult(request_id, task_id, outcome, error[:1000], duration, tuple(metrics))
