"""The state behind the Snap emulator (`tests/fakes/snap.py`): tasks and their state
machine, the global plugin config, the metric catalog, and simulated scheduled runs.

No HTTP here. Every operation either returns the envelope's ``body`` or raises
:class:`SnapFault` with the HTTP status and the message snapd would give; the rules and
texts follow docs/snap-api.md (snap ca32c9a, §5, §6, §8 and §9 there). Times come
from an injectable clock (``IReactorTime``).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

RUNNING, STOPPED, STOPPING, DISABLED, ENDED = "Running", "Stopped", "Stopping", "Disabled", "Ended"
DEFAULT_MAX_FAILURES = 10
CREATE_KEYS = ("version", "name", "deadline", "schedule", "workflow", "start", "max-failures")
PLUGIN_TYPES = {"collector": "collector", "processor": "processor", "publisher": "publisher",
                "0": "collector", "1": "processor", "2": "publisher"}

_UNITS = {"ns": 1, "us": 10**3, "µs": 10**3, "μs": 10**3, "ms": 10**6, "s": 10**9,
          "m": 60 * 10**9, "h": 3600 * 10**9}
_PART = re.compile(r"(\d*\.?\d*)(ns|us|µs|μs|ms|s|m|h)")


class SnapFault(Exception):
    """An error answer: HTTP ``status`` and the text that becomes ``body.message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def parse_duration(text: Any) -> int:
    """Go's ``time.ParseDuration`` → nanoseconds (Go 1.7 error texts, as snap was built)."""
    if not isinstance(text, str):
        raise SnapFault(500, f"json: cannot unmarshal {type(text).__name__} into Go value of type string")
    s, sign = text, 1
    if s and s[0] in "+-":
        sign, s = (-1 if s[0] == "-" else 1), s[1:]
    if s == "0":
        return 0
    if not s:
        raise SnapFault(500, f"time: invalid duration {text}")
    total, pos = 0, 0
    while pos < len(s):
        m = _PART.match(s, pos)
        if not m or m.group(1) in ("", "."):
            if re.fullmatch(r"[\d.]+", s[pos:]):
                raise SnapFault(500, f"time: missing unit in duration {text}")
            raise SnapFault(500, f"time: invalid duration {text}")
        whole, _, frac = m.group(1).partition(".")
        unit = _UNITS[m.group(2)]
        total += int(whole or 0) * unit + (int(frac) * unit // 10 ** len(frac) if frac else 0)
        pos = m.end()
    return sign * total


def format_duration(ns: int) -> str:
    """Go's ``time.Duration.String()``: 300s → ``5m0s``, 1.5s → ``1.5s``, 500ms → ``500ms``."""
    if ns == 0:
        return "0s"
    sign, u = ("-" if ns < 0 else ""), abs(ns)

    def frac(v: int, digits: int) -> str:
        whole, rest = divmod(v, 10**digits)
        tail = str(rest).rjust(digits, "0").rstrip("0")
        return f"{whole}.{tail}" if tail else str(whole)

    if u < 10**9:
        if u < 10**3:
            return f"{sign}{u}ns"
        return sign + (frac(u, 3) + "µs" if u < 10**6 else frac(u, 6) + "ms")
    secs, rest = divmod(u, 10**9)
    out = frac(secs % 60 * 10**9 + rest, 9) + "s"
    mins = secs // 60
    if mins:
        out = f"{mins % 60}m" + out
        if mins // 60:
            out = f"{mins // 60}h" + out
    return sign + out


def go_value(v: Any) -> Any:
    """What Go's re-encoding does to a decoded JSON number: 60.0 is printed as 60."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e21:
        return int(v)
    if isinstance(v, dict):
        return {k: go_value(x) for k, x in v.items()}
    if isinstance(v, list):
        return [go_value(x) for x in v]
    return v


@dataclass
class SnapTask:
    id: str
    name: str
    deadline_ns: int
    schedule: dict[str, Any]
    interval_ns: int
    workflow: dict[str, Any]
    creation_timestamp: int
    max_failures: int
    clock: Any = field(repr=False)
    last_run_timestamp: int = -1
    hit_count: int = 0
    miss_count: int = 0
    failed_count: int = 0
    last_failure_message: str = ""
    consecutive_failures: int = 0
    next_fire: float | None = None
    stopping_until: float | None = None
    _state: str = STOPPED

    @property
    def state(self) -> str:
        """``Stopping`` turns ``Stopped`` once the clock passes ``stopping_until``."""
        if self._state == STOPPING and self.clock.seconds() >= (self.stopping_until or 0):
            self._state, self.last_run_timestamp, self.stopping_until = STOPPED, -1, None
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        self._state = value

    def view(self, host: str, full: bool, href: bool = True) -> dict[str, Any]:
        state = self.state  # settle Stopping first: it resets last_run_timestamp
        out: dict[str, Any] = {"id": self.id, "name": self.name,
                               "deadline": format_duration(self.deadline_ns)}
        if full:
            out["workflow"] = go_value(self.workflow)
            out["schedule"] = {"type": self.schedule["type"],
                               "interval": format_duration(self.interval_ns),
                               **{k: v for k, v in self.schedule.items() if k != "type"}}
        out["creation_timestamp"] = self.creation_timestamp
        out["last_run_timestamp"] = self.last_run_timestamp
        for key in ("hit_count", "miss_count", "failed_count", "last_failure_message"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        out["task_state"] = state
        out["href"] = f"http://{host}/v1/tasks/{self.id}" if href else ""
        return out


class SnapState:
    """One emulated snapd's memory. Public attributes are test knobs and introspection."""

    def __init__(self, clock: Any = None, *, strict: bool = False,
                 catalog: list[dict[str, Any]] | None = None) -> None:
        self.clock = clock
        self.tasks: dict[str, SnapTask] = {}
        self.global_config: dict[str, Any] = {}
        self.plugin_config: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.catalog: list[dict[str, Any]] = list(catalog or [])
        #: strict: metrics must be in ``catalog``, publishers in ``publishers``, and the
        #: publishers' required config keys present (as a real snapd with plugins loaded).
        self.strict = strict
        self.publishers: dict[str, list[str]] = {
            "rt-hostedtsdb": ["raintank_tsdb_url", "raintank_api_key"]}
        self.stop_delay = 0.0  # seconds a stopped task stays Stopping (on ``clock``)
        self._failing: dict[str, list[Any]] = {}  # task id -> [message, runs left | None]

    # -- test hooks ---------------------------------------------------------------------

    def fail_task(self, task_id: str, message: str = "emulated collection failure",
                  times: int | None = None) -> None:
        """Make the next ``times`` runs of the task fail (``None``: every run until healed)."""
        self._failing[task_id] = [message, times]

    def heal_task(self, task_id: str) -> None:
        self._failing.pop(task_id, None)

    def force_disabled(self, task_id: str, message: str = "emulated collection failure") -> None:
        """Fail runs until the task auto-disables (``max-failures`` consecutive failures)."""
        t = self.tasks[task_id]
        if t.state != RUNNING or t.max_failures < 0:
            raise ValueError("only a running task with max-failures >= 0 can be disabled")
        self.fail_task(task_id, message)
        while t.state == RUNNING:
            self._fire(t, self.clock.seconds())
        self.heal_task(task_id)

    def tick(self, times: int = 1) -> int:
        """Fire every running task once per ``times``, whatever its schedule; the number of runs."""
        runs = 0
        for _ in range(times):
            for t in list(self.tasks.values()):
                if t.state == RUNNING:
                    self._fire(t, self.clock.seconds())
                    runs += 1
        return runs

    def run_due(self, now: float | None = None) -> int:
        """Fire every running task whose interval has elapsed by ``now`` (default: the clock);
        several elapsed intervals give one run and count the others as missed."""
        now = self.clock.seconds() if now is None else now
        runs = 0
        for t in list(self.tasks.values()):
            if t.state != RUNNING or t.next_fire is None or t.next_fire > now:
                continue
            interval = t.interval_ns / 1e9
            due = int((now - t.next_fire) // interval) + 1
            t.miss_count += due - 1
            t.next_fire += due * interval
            self._fire(t, now)
            runs += 1
        return runs

    def wipe(self) -> None:
        """What a snapd restart does: every REST-created task and the global config are gone."""
        self.tasks.clear()
        self.global_config.clear()
        self.plugin_config.clear()
        self._failing.clear()

    def _fire(self, t: SnapTask, now: float) -> None:
        t.hit_count += 1
        t.last_run_timestamp = int(now)
        plan = self._failing.get(t.id)
        if plan is None:
            t.consecutive_failures = 0
            return
        t.failed_count += 1
        t.last_failure_message = plan[0]
        t.consecutive_failures += 1
        if plan[1] is not None:
            plan[1] -= 1
            if plan[1] <= 0:
                del self._failing[t.id]
        if 0 < t.max_failures <= t.consecutive_failures:
            t.state, t.next_fire = DISABLED, None

    # -- tasks --------------------------------------------------------------------------

    def _task(self, task_id: str, multi: bool = False) -> SnapTask:
        t = self.tasks.get(task_id)
        if t is None:
            msg = f"Task not found: ID({task_id})"
            raise SnapFault(404, f"error 0: {msg} " if multi else msg)
        return t

    def create(self, raw: bytes, host: str, start_ok: bool = True) -> dict[str, Any]:
        """POST /v1/tasks. ``start_ok=False`` makes the start step fail after the task was
        stored (the reference's half-succeeded create: 500, task left ``Stopped``)."""
        try:
            req = json.loads(raw or b"null")
        except ValueError as e:
            raise SnapFault(500, f"invalid character in task creation request: {e}") from None
        if not isinstance(req, dict):
            raise SnapFault(500, "json: cannot unmarshal non-object into Go value of type "
                                 "map[string]json.RawMessage")
        for k in req:
            if k not in CREATE_KEYS:
                raise SnapFault(500, f"Unrecognized key '{k}' in task creation request")
        errors: list[str] = []
        schedule, workflow = req.get("schedule"), req.get("workflow")
        if not isinstance(schedule, dict) or not schedule:
            errors.append("Task must include a schedule, and the schedule must not be empty")
        if not isinstance(workflow, dict) or not workflow:
            errors.append("Task must include a workflow, and the workflow must not be empty")
        if errors:
            raise SnapFault(500, " -- ".join(errors))
        sched, interval = self._schedule(schedule)
        deadline = parse_duration(req["deadline"]) if "deadline" in req else 5 * 10**9
        wf = self._workflow(workflow)
        if self.strict:
            self._check_deps(wf)
        max_failures = req.get("max-failures") or DEFAULT_MAX_FAILURES
        if not isinstance(max_failures, int) or isinstance(max_failures, bool):
            raise SnapFault(500, "json: cannot unmarshal value into Go value of type int "
                                 "(while parsing 'max-failures')")
        tid = str(uuid.uuid4())
        name = req.get("name") or f"Task-{tid}"
        t = SnapTask(tid, str(name), deadline, sched, interval, wf, int(self.clock.seconds()),
                     max_failures, self.clock)
        self.tasks[tid] = t
        if req.get("start"):
            if not start_ok:
                raise SnapFault(500, "emulated: starting the new task failed (task stored, Stopped)")
            self._start(t)
        return t.view(host, full=True)

    def _schedule(self, s: dict[str, Any]) -> tuple[dict[str, Any], int]:
        kind = s.get("type")
        if kind not in ("simple", "windowed", "cron"):
            raise SnapFault(500, f"unknown schedule type {kind}")
        if kind == "cron":
            raise SnapFault(500, "the emulator implements simple and windowed schedules only")
        ns = parse_duration(s.get("interval", ""))
        if ns <= 0:
            raise SnapFault(500, "Interval must be greater than 0")
        return {k: v for k, v in s.items() if k in ("type", "start_timestamp", "stop_timestamp")}, ns

    def _workflow(self, w: dict[str, Any]) -> dict[str, Any]:
        for k in w:
            if k != "collect":
                raise SnapFault(500, f"Unrecognized key '{k}' in workflow of task.")
        c = w.get("collect") or {}
        for k in c:
            if k not in ("metrics", "config", "tags", "process", "publish"):
                raise SnapFault(500, f"Unrecognized key '{k}' in collect workflow of task.")
        metrics = c.get("metrics") or {}
        if not metrics:
            raise SnapFault(500, "Collection node has not metrics defined to collect")
        out: dict[str, Any] = {"metrics": {}}
        for ns, info in sorted(metrics.items()):
            for k in info or {}:
                if k != "version":
                    raise SnapFault(500, f"Unrecognized key '{k}' in metrics in collect workflow of task")
            out["metrics"][ns] = {"version": (info or {}).get("version", 0)}
        for ns, cmap in (c.get("config") or {}).items():
            _scalars(cmap, ns)
        for key in ("config", "tags"):  # Go maps: re-encoded with sorted keys
            if c.get(key):
                out[key] = {ns: dict(sorted(m.items())) for ns, m in sorted(c[key].items())}
        for key in ("process", "publish"):
            if c.get(key):
                out[key] = [self._node(n, key) for n in c[key]]
        return {"collect": out}

    def _node(self, n: dict[str, Any], kind: str) -> dict[str, Any]:
        allowed = ("plugin_name", "plugin_version", "config", "target") + (
            ("process", "publish") if kind == "process" else ())
        for k in n:
            if k not in allowed:
                raise SnapFault(500, f"Unrecognized key '{k}' in {kind} workflow of task.")
        _scalars(n.get("config") or {}, "")
        out = {"plugin_name": n.get("plugin_name", ""), "plugin_version": n.get("plugin_version", 0)}
        for k in ("process", "publish"):
            if n.get(k):
                out[k] = [self._node(x, k) for x in n[k]]
        if n.get("config"):
            out["config"] = dict(sorted(n["config"].items()))
        out["target"] = n.get("target", "")
        return out

    def _check_deps(self, wf: dict[str, Any]) -> None:
        c = wf["collect"]
        for ns, info in c["metrics"].items():
            found = [m for m in self.catalog if ns_matches(ns, m["namespace"])
                     and info["version"] in (0, m.get("version", 0))]
            if not found:
                raise SnapFault(500, f"Metric not found: {ns} (version: {info['version']})")
            cfg = dict(self.global_config)
            for prefix, cmap in (c.get("config") or {}).items():
                if ns.startswith(prefix):
                    cfg.update(cmap)
            for rule in found[0].get("policy") or []:
                if rule.get("required") and "default" not in rule and rule["name"] not in cfg:
                    raise SnapFault(500, f"required key missing ({rule['name']})")
        for node in c.get("publish") or []:
            name = node["plugin_name"].lower()
            if name not in self.publishers:
                version = node["plugin_version"] if node["plugin_version"] > 0 else -1
                raise SnapFault(500, f"Plugin not found: type(publisher) name({name}) version({version})")
            cfg = {**self.global_config, **(node.get("config") or {})}
            for key in self.publishers[name]:
                if key not in cfg:
                    raise SnapFault(500, f"required key missing ({key})")

    def list_tasks(self, host: str) -> dict[str, Any]:
        ordered = sorted(self.tasks.values(), key=lambda t: t.creation_timestamp)
        return {"ScheduledTasks": [t.view(host, full=False) for t in ordered]}

    def get_task(self, task_id: str, host: str) -> dict[str, Any]:
        return self._task(task_id).view(host, full=True)

    def _start(self, t: SnapTask) -> None:
        now = self.clock.seconds()
        t.state, t.last_run_timestamp = RUNNING, int(now)
        t.next_fire, t.consecutive_failures = now + t.interval_ns / 1e9, 0

    def start_task(self, task_id: str) -> dict[str, Any]:
        t = self._task(task_id, multi=True)
        state = t.state
        if state == DISABLED:
            raise SnapFault(409, "error 0: Task is disabled. Cannot be started. ")
        if state == RUNNING:
            raise SnapFault(500, "error 0: Task is already running. ")
        if state == STOPPED:
            self._start(t)
        return {"id": task_id}  # Stopping / Ended: 200, nothing changes (ca32c9a)

    def stop_task(self, task_id: str) -> dict[str, Any]:
        t = self._task(task_id, multi=True)
        state = t.state
        if state in (STOPPED, STOPPING):
            raise SnapFault(500, "error 0: Task is already stopped. ")
        if state == DISABLED:
            raise SnapFault(500, "error 0: Task is disabled. Only running tasks can be stopped. ")
        if state == RUNNING:
            t.state, t.next_fire = STOPPING, None
            t.stopping_until = self.clock.seconds() + self.stop_delay
        return {"id": task_id}

    def remove_task(self, task_id: str) -> dict[str, Any]:
        if self._task(task_id).state not in (STOPPED, DISABLED):
            raise SnapFault(500, "Task must be stopped")
        del self.tasks[task_id]
        self._failing.pop(task_id, None)
        return {"id": task_id}

    def enable_task(self, task_id: str, host: str) -> dict[str, Any]:
        t = self._task(task_id)
        if t.state != DISABLED:
            raise SnapFault(500, "Task must be disabled")
        t.state, t.consecutive_failures = STOPPED, 0
        return t.view(host, full=True, href=False)

    # -- global / plugin config ---------------------------------------------------------

    def _config_key(self, ptype: str, name: str, version: str) -> tuple[str, str, str]:
        if version:
            try:
                int(version)
            except ValueError:
                raise SnapFault(400, f'strconv.Atoi: parsing "{version}": invalid syntax') from None
        if not ptype:
            return ("", "", "")
        if ptype not in PLUGIN_TYPES:
            raise SnapFault(400, f"invalid plugin type name given {ptype}")
        return (PLUGIN_TYPES[ptype], name, version)

    def get_config(self, ptype: str, name: str, version: str) -> dict[str, Any]:
        key = self._config_key(ptype, name, version)
        merged = dict(self.global_config)  # a typed view merges global, type, plugin keys
        for k in ((key[0], "", ""), (key[0], key[1], ""), key) if key[0] else ():
            merged.update(self.plugin_config.get(k, {}))
        return merged

    def change_config(self, ptype: str, name: str, version: str, raw: bytes,
                      delete: bool = False) -> dict[str, Any]:
        """PUT merges a JSON object of scalars; DELETE drops a JSON array of keys."""
        key = self._config_key(ptype, name, version)
        want, gotype = (list, "[]string") if delete else (dict, "map[string]interface {}")
        try:
            value = json.loads(raw or b"null")
        except ValueError as e:
            raise SnapFault(400, f"invalid character in config JSON: {e}") from None
        if not isinstance(value, want):
            raise SnapFault(400, f"json: cannot unmarshal value into Go value of type {gotype}")
        node = self.global_config if key == ("", "", "") else self.plugin_config.setdefault(key, {})
        if delete:
            for k in value:
                node.pop(k, None)
            return dict(node)
        for k, v in value.items():
            if v is None or isinstance(v, (list, dict)):
                gotype = {type(None): "<nil>", list: "[]interface {}"}.get(type(v), "map[string]interface {}")
                raise SnapFault(400, f"Error Unmarshalling JSON ConfigDataNode. Key: {k} "
                                     f"Type: {gotype} is unsupported.")
        node.update(value)
        return dict(node)


def _scalars(cmap: Any, ns: str) -> None:
    if not isinstance(cmap, dict):
        raise SnapFault(500, f"json: cannot unmarshal into config of {ns} (while parsing 'config')")
    for k, v in cmap.items():
        if v is None or isinstance(v, (list, dict)):
            raise SnapFault(500, f"Cannot convert config value to config data node: {ns}=>{v!r}")


def ns_matches(requested: str, known: str) -> bool:
    """Exact namespace, or a trailing ``*`` element meaning "everything below"."""
    return requested == known or (requested.endswith("/*") and known.startswith(requested[:-1]))
