"""Domain dataclasses as the JSON the original's clients know (camelCase, RFC 3339).

Agents never show `orgId` (as in the original); tasks do. A task status's `lastRun` is
null before the first run rather than the zero time, which would read as a real run.
"""
from __future__ import annotations

from typing import Any

from taskd.db.agents import Agent
from taskd.db.catalog import Metric
from taskd.db.servers import ServerInstance
from taskd.db.taskstatus import TaskStatusRow
from taskd.db.tasks import Task
from taskd.timeutil import rfc3339


def agent_json(a: Agent, org_id: int | None = None) -> dict[str, Any]:
    """`org_id`: the org looking, which sees its own tags on the agent (None: the owner)."""
    return {
        "id": a.id,
        "name": a.name,
        "enabled": a.enabled,
        "enabledChange": rfc3339(a.enabled_change),
        "public": a.public,
        "tags": list(a.tags_for(org_id)),
        "online": a.online,
        "onlineChange": rfc3339(a.online_change),
        "created": rfc3339(a.created),
        "updated": rfc3339(a.updated),
    }


def task_json(t: Task) -> dict[str, Any]:
    return {
        "id": t.id,
        "name": t.name,
        "taskType": t.task_type,
        "orgId": t.org_id,
        "config": t.config,
        "interval": t.interval,
        "route": {"type": t.route.type, "config": t.route.config},
        "metrics": t.metrics,
        "enabled": t.enabled,
        "created": rfc3339(t.created),
        "updated": rfc3339(t.updated),
    }


def metric_json(m: Metric) -> dict[str, Any]:
    return {
        "namespace": m.namespace,
        "version": m.version,
        "policy": m.policy,
        "public": m.public,
        "created": rfc3339(m.created),
    }


def status_json(s: TaskStatusRow) -> dict[str, Any]:
    return {
        "agentId": s.agent_id,
        "agentName": s.agent_name,
        "executor": s.executor,
        "outcome": s.outcome,
        "error": s.error,
        "lastRun": rfc3339(s.last_run) if s.last_run is not None else None,
        "duration": s.duration,
        "metrics": s.metrics,
        "runs": s.runs,
        "failures": s.failures,
        "skipped": s.skipped,
        "updated": rfc3339(s.updated),
    }


def server_json(s: ServerInstance) -> dict[str, Any]:
    """A live task-server instance; `agents` counts the agent sessions it holds."""
    return {
        "id": s.id,
        "name": s.name,
        "hostname": s.hostname,
        "addr": s.addr,
        "version": s.version,
        "started": rfc3339(s.started),
        "lastSeen": rfc3339(s.last_seen),
        "agents": s.agents,
    }
