"""What goes over Snap's REST API v1 for the task-agent: the names, the exact task body
the Go agent posted, and reading Snap's answers (Go durations, RFC 3339 times, its
catalog records). Pure functions, so the driver and client hold only behaviour.
See docs/snap.md and docs/snap-api.md.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Mapping

from taskd.timeutil import parse_go_duration

PREFIX = "raintank-apps:"
PUBLISHER = "rt-hostedtsdb"
DEADLINE = "300s"
MAX_FAILURES = 100
CONFIG_PATH = "/v1/plugins////config"  # the global node: type = name = version = ""
AGENT_NAME_KEY, TSDB_URL_KEY, API_KEY_KEY = "raintank_agent_name", "raintank_tsdb_url", "raintank_api_key"
RUNNING, STOPPED, STOPPING, DISABLED = "Running", "Stopped", "Stopping", "Disabled"


class SnapError(Exception):
    """Snap answered, but not with the expected success envelope (``status`` 0: gave up)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message

    def __str__(self) -> str:
        return f"HTTP {self.status}: {self.message}" if self.status else self.message


class SnapUnreachable(Exception):
    """No HTTP answer from Snap: refused, reset, or no answer in time."""


def parse_rfc3339(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def updated_after_creation(updated: Any, creation_timestamp: Any) -> bool:
    """The timestamp rule for a Snap task whose content cannot be compared.

    ``creation_timestamp`` C is whole seconds, so the task was created somewhere in
    [C, C+1). Only an ``updated`` strictly later than C + 1 is certainly later than the
    creation; anything else (same second, unparsable, missing) is not, and the task is
    kept rather than re-created on every cycle.
    """
    dt = parse_rfc3339(updated)
    if dt is None or isinstance(creation_timestamp, bool) or not isinstance(creation_timestamp, int):
        return False
    return dt.timestamp() > creation_timestamp + 1


def snap_task_request(task_id: int, task: Mapping[str, Any]) -> dict[str, Any]:
    """The ``POST /v1/tasks`` body for a server task, as the Go agent built it.

    ValueError if the task cannot be expressed (no positive interval, no metrics...)."""
    interval = task.get("interval")
    if isinstance(interval, bool) or not isinstance(interval, int) or interval <= 0:
        raise ValueError(f"interval {interval!r} is not a positive whole number of seconds")
    metrics = task.get("metrics")
    if not isinstance(metrics, Mapping) or not metrics:
        raise ValueError("it has no metrics")
    collect: dict[str, Any] = {"metrics": {}}
    for ns, version in metrics.items():
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"metric {ns} has version {version!r}, not an integer")
        collect["metrics"][str(ns)] = {"version": version}
    config = task.get("config") or {}
    if not isinstance(config, Mapping) or not all(isinstance(v, Mapping) for v in config.values()):
        raise ValueError("its config is not an object of objects")
    for ns, kv in config.items():  # Snap's config values are scalars (the built-in collectors take more)
        for k, v in kv.items():
            if isinstance(v, (Mapping, list)):
                raise ValueError(f"config[{ns!r}][{k!r}] is a {'list' if isinstance(v, list) else 'JSON object'};"
                                 " Snap plugins take only strings, numbers and booleans")
    items = {str(ns): {str(k): v for k, v in kv.items()} for ns, kv in config.items() if kv}
    if items:
        collect["config"] = items
    org_id = task.get("orgId")
    if isinstance(org_id, bool) or not isinstance(org_id, int):
        raise ValueError(f"orgId {org_id!r} is not an integer")
    collect["publish"] = [{"plugin_name": PUBLISHER, "plugin_version": 0,
                           "config": {"interval": interval, "orgId": org_id}, "target": ""}]
    return {"name": f"{PREFIX}{task_id}", "version": 0, "deadline": DEADLINE,
            "workflow": {"collect": collect},
            "schedule": {"type": "simple", "interval": f"{interval}s"},
            "start": True, "max-failures": MAX_FAILURES}


def catalog_record(entry: Any) -> dict[str, Any] | None:
    """A Snap ``/v1/metrics`` entry → the record the server stores (None if unusable)."""
    if not isinstance(entry, Mapping) or not isinstance(entry.get("namespace"), str) \
            or not entry["namespace"]:
        return None
    version = entry.get("version", 0)  # Snap omits a 0 version
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        return None
    record = {"namespace": entry["namespace"], "version": version,
              "policy": entry.get("policy") or []}
    for key in ("dynamic", "dynamic_elements", "description", "unit"):
        if key in entry:
            record[key] = entry[key]
    return record


def _norm(v: Any) -> Any:
    """Numbers as Snap echoes them (60.0 → 60) so requests and echoes compare equal."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, Mapping):
        return {str(k): _norm(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_norm(x) for x in v]
    return v


def essence(schedule: Any, deadline: Any, workflow: Any) -> str | None:
    """What makes two Snap tasks run the same collection (None: cannot tell)."""
    try:
        collect = workflow["collect"]
        if schedule.get("type") not in ("simple", "windowed") or \
                schedule.get("start_timestamp") or schedule.get("stop_timestamp"):
            return "other schedule"  # snap 2.x reports simple schedules as windowed
        interval = parse_go_duration(schedule["interval"])
        deadline_ns = parse_go_duration(deadline or "5s")
        metrics = {ns: (info or {}).get("version", 0) for ns, info in collect["metrics"].items()}
        config = {ns: kv for ns, kv in (collect.get("config") or {}).items() if kv}
        publish = [[str(p.get("plugin_name", "")).lower(), p.get("plugin_version", 0),
                    p.get("config") or {}, p.get("target", "")] for p in collect.get("publish") or []]
        other = bool(collect.get("process") or collect.get("tags"))
    except (KeyError, TypeError, AttributeError, ValueError):
        return None
    return json.dumps(_norm([interval, deadline_ns, metrics, config, publish, other]), sort_keys=True)


def request_essence(request: Mapping[str, Any]) -> str | None:
    return essence(request["schedule"], request["deadline"], request["workflow"])
