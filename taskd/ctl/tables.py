"""How taskctl shows answers: aligned text tables by default, the API's JSON with --json.

The columns are what an operator scans for; everything else is one `get` (or `--json`)
away. Times are shown as the API gives them (RFC 3339, UTC).
"""
from __future__ import annotations

import json
from typing import Any, Callable, Sequence

Column = tuple[str, Callable[[dict], Any]]


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def _list(value: Any) -> str:
    return ",".join(str(v) for v in value) if value else "-"


def _route(task: dict) -> str:
    route = task.get("route") or {}
    kind, config = route.get("type", ""), route.get("config") or {}
    if kind == "byIds":
        return f"byIds {_list(config.get('ids'))}"
    if kind == "byTags":
        return f"byTags {_list(config.get('tags'))}"
    return kind


AGENT_COLUMNS: Sequence[Column] = (
    ("ID", lambda a: a["id"]), ("NAME", lambda a: a["name"]), ("ENABLED", lambda a: _yes(a["enabled"])),
    ("PUBLIC", lambda a: _yes(a["public"])), ("ONLINE", lambda a: _yes(a["online"])),
    ("FAILING", lambda a: a.get("failingTasks", 0)), ("TAGS", lambda a: _list(a.get("tags"))),
)
TASK_COLUMNS: Sequence[Column] = (
    ("ID", lambda t: t["id"]), ("NAME", lambda t: t["name"]), ("TYPE", lambda t: t.get("taskType") or "-"),
    ("INTERVAL", lambda t: f"{t['interval']}s"), ("ENABLED", lambda t: _yes(t["enabled"])), ("ROUTE", _route),
)
STATUS_COLUMNS: Sequence[Column] = (
    ("AGENT", lambda s: f"{s['agentName']} ({s['agentId']})"), ("OUTCOME", lambda s: s["outcome"]),
    ("RUNS", lambda s: s["runs"]), ("FAILURES", lambda s: s["failures"]), ("SKIPPED", lambda s: s["skipped"]),
    ("LAST RUN", lambda s: s.get("lastRun") or "-"), ("ERROR", lambda s: s.get("error") or "-"),
)
METRIC_COLUMNS: Sequence[Column] = (
    ("NAMESPACE", lambda m: m["namespace"]), ("VERSION", lambda m: m["version"]),
    ("PUBLIC", lambda m: _yes(m.get("public"))),
)
SERVER_COLUMNS: Sequence[Column] = (
    ("NAME", lambda s: s["name"]), ("ADDR", lambda s: s["addr"]), ("VERSION", lambda s: s["version"]),
    ("AGENTS", lambda s: s["agents"]), ("LAST SEEN", lambda s: s["lastSeen"]),
)


def table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """Left-aligned columns two spaces apart; a header even when there are no rows."""
    cells = [[title for title, _ in columns]] + [[str(get(row)) for _, get in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells) + "\n"


def fields(obj: dict) -> str:
    """One object as `key: value` lines (nested values as compact JSON)."""
    width = max((len(k) for k in obj), default=0)
    out = []
    for key, value in obj.items():
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        out.append(f"{key.ljust(width)}  {text}")
    return "\n".join(out) + "\n"


def as_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=False) + "\n"
