"""The one results table, the machine description, and bench/results.md."""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

ANALYSIS = Path(__file__).resolve().parent / "analysis.md"


@dataclass(frozen=True)
class Row:
    key: str
    scenario: str
    metric: str
    unit: str
    kind: str            # max | ratio_max | ratio_min | info
    target: float | None
    target_text: str
    base_label: str = ""
    step: str = ""       # the `--only` step that measures it (bench/run.py: Bench.run)
    base_step: str = ""  # ... and the one that measures its baseline, if another


def rows(s: Any, db: str) -> list[Row]:
    n = lambda v: f"{v:,}"  # noqa: E731
    return [
        Row("push_p50", f"1. push latency, {n(s.push_agents)} agents", "POST byIds → taskAdd, p50", "ms", "max", 15,
            "≤ 15 ms", step="taskd"),
        Row("push_p99", f"1. push latency, {n(s.push_agents)} agents", "POST byIds → taskAdd, p99", "ms", "max", 50,
            "≤ 50 ms", step="taskd"),
        Row("fan_small", f"2. fan-out, {n(s.fan_small)} agents", "POST byTags → last taskAdd", "ms", "ratio_max", 2.0,
            "≤ 2× bare", "bare Autobahn broadcast", step="taskd", base_step="ws"),
        Row("fan_large", f"2. fan-out, {n(s.fan_large)} agents", "POST byTags → last taskAdd", "ms", "ratio_max", 2.0,
            "≤ 2× bare", "bare Autobahn broadcast", step="taskd", base_step="ws"),
        Row("cap_rss", f"3. capacity, {n(s.capacity)} agents", "server RSS per agent beyond idle", "KB", "max", 30,
            "≤ 30 KB", "bare Autobahn idle client", step="capacity"),
        Row("cap_cpu", f"3. capacity, {n(s.capacity)} agents", "server CPU while idle (2 s heartbeats, 60 s taskList)",
            "% core", "max", 30, "≤ 30 %", step="capacity"),
        Row("cap_hb", f"3. capacity, {n(s.capacity)} agents", "worst heartbeat gap seen by an agent", "s", "max", 4.0,
            "≤ 4 s (2× 2 s)", step="capacity"),
        Row("storm", f"4. reconnect storm, {n(s.fan_large)} agents", "restart → all online with correct taskList", "s",
            "max", 10, "≤ 10 s", "bare Autobahn: all upgraded", step="taskd", base_step="ws"),
        Row("api_get", "5. API GET /api/v1/agents/<id>", "throughput", "req/s", "ratio_min", 0.5, "≥ 50 % of bare",
            "bare Klein GET", step="api", base_step="klein"),
        Row("api_get_p99", "5. API GET /api/v1/agents/<id>", "latency p99", "ms", "info", None, "reported",
            "bare Klein GET", step="api", base_step="klein"),
        Row("api_post", f"5. API POST /api/v1/tasks ({db}, 1 routed agent)", "throughput", "req/s", "ratio_min", 0.25,
            "≥ 25 % of bare", "bare Klein POST echo", step="api", base_step="klein"),
        Row("api_post_p99", f"5. API POST /api/v1/tasks ({db}, 1 routed agent)", "latency p99", "ms", "info", None,
            "reported", "bare Klein POST echo", step="api", base_step="klein"),
    ]


def fmt(v: Any, unit: str) -> str:
    if v is None:
        return "not done"
    if unit == "req/s":
        return f"{v:,.0f}"
    if unit == "s":
        return f"{v:.2f}"
    if unit == "ms" and v >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}"


def spread(values: list[Any], unit: str) -> str:
    if not values:
        return "—"
    good = [v for v in values if v is not None]
    if len(values) == 1:
        return fmt(values[0], unit)
    if not good:
        return "not done in time" if len(values) > 1 else "not done"
    cell = " / ".join(fmt(v, unit) for v in (min(good), statistics.median(good), max(good)))
    fails = len(values) - len(good)
    return cell + (f" ({fails} not done)" if fails else "")


def table(results: Any, sizes: Any, *, smoke: bool, db: str,
          steps: set[str] | None = None) -> tuple[str, dict[str, str]]:
    """The results table and each row's verdict. `steps`: those a partial run (`--only`)
    made; a row whose step (or whose baseline's step) was not among them is "not run",
    while a step that ran and measured nothing has still failed."""
    reps = "1 run" if sizes.reps == 1 else f"min / median / max of {sizes.reps} reps"
    head = (f"| scenario | metric | taskd ({reps}) | bare baseline (same reps) | ratio (median) | target | result |\n"
            "|---|---|---|---|---|---|---|\n")
    lines = []
    verdicts: dict[str, str] = {}
    for row in rows(sizes, db):
        vals_by_rep = results.values.get(row.key, {})
        base_by_rep = results.base.get(row.key, {})
        vals = [vals_by_rep[k] for k in sorted(vals_by_rep)]
        base = [base_by_rep[k] for k in sorted(base_by_rep)]
        good = [v for v in vals if v is not None]
        ratio_txt = "—"
        med = statistics.median(good) if good else None
        if row.base_label and base_by_rep:
            ratios = [vals_by_rep[k] / base_by_rep[k] for k in vals_by_rep
                      if k in base_by_rep and vals_by_rep[k] is not None and base_by_rep[k]]
            if ratios:
                ratio = statistics.median(ratios)
                ratio_txt = f"{ratio:.2f}×"
            else:
                ratio = None
        else:
            ratio = None
        skipped = steps is not None and (row.step not in steps or (row.base_step and row.base_step not in steps))
        if not vals:
            verdict = "not run" if steps is not None and row.step not in steps else "failed"
        elif row.kind == "info":
            verdict = "reported"
        elif row.kind == "max":
            verdict = "met" if med is not None and med <= row.target and len(good) == len(vals) else "MISSED"
        elif ratio is None:
            verdict = "not run" if skipped else "failed"
        elif row.kind == "ratio_max":
            verdict = "met" if ratio <= row.target and len(good) == len(vals) else "MISSED"
        else:
            verdict = "met" if ratio >= row.target and len(good) == len(vals) else "MISSED"
        verdicts[row.key] = verdict
        shown = {"MISSED": "**MISSED**", "failed": "**failed**"}.get(verdict, verdict)
        if smoke and verdict in ("met", "MISSED"):
            shown = "not enforced (smoke)"
        base_cell = f"{spread(base, row.unit)} ({row.base_label})" if row.base_label else "—"
        lines.append(f"| {row.scenario} | {row.metric} [{row.unit}] | {spread(vals, row.unit)} | {base_cell} | "
                     f"{ratio_txt} | {row.target_text} | {shown} |")
    return head + "\n".join(lines), verdicts


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def machine(soft: int, hard: int, raised: int) -> dict[str, Any]:
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except OSError:
        pass

    def ver(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "cpu": model,
        "memory": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": {p: ver(p) for p in ("Twisted", "autobahn", "klein", "SQLAlchemy", "PyMySQL")},
        "nofile": f"soft {soft}, hard {hard}; raised to {raised} for the run",
        "load_start": loadavg(),
    }


METHOD = """\
* **Processes.** One real `twistd taskserver` (defaults: log-level 2, 2 s heartbeat, 60 s
  taskList, db-pool-size 10; the admin key as every agent's key) is pinned to one core;
  the coordinator, {clients} load-client processes (`bench/loadclient.py`: a minimal
  RFC 6455 client on asyncio that speaks taskd's framing, answers pings and timestamps
  every frame) and the HTTP load generator (`bench/httpc.py`, {conc} keep-alive
  connections, closed loop) share the other core. Agents are pre-registered rows
  (`bench/dbsetup.py`: org 1, public, tags `all`/`k1`/`k5`), so connecting never
  auto-creates. Times are `CLOCK_MONOTONIC`, comparable across processes.
* **Baselines, same repetition.** `bench/baselines.py`: a bare Klein app (GET of an
  agent-sized envelope; POST that parses and echoes the task JSON) and a bare Autobahn
  server behind `twisted.web` like taskd's socket, broadcasting one 500-byte binary frame
  (taskd framing) to every client with `sendMessage` when `GET /broadcast` arrives. Both
  run without access logging or a database: the framework's own ceiling.
* **1. Push latency.** {push_agents} agents connected; {push_samples} sequential `POST /api/v1/tasks`
  routed `byIds` to one agent (spread over all of them); time from writing the request
  to that agent receiving `taskAdd` (the HTTP answer included).
* **2. Fan-out.** A `byTags` task whose tag matches exactly the connected agents
  ({fan_small}, then {fan_large}); time from writing the POST to the last agent's `taskAdd`
  (median of {fan_shots} tasks per repetition), against the bare broadcast to the same N
  clients timed the same way (from the trigger request to the last frame).
* **3. Capacity.** A fresh server with two `byTags all` tasks; RSS measured idle, then
  {capacity} agents connected; after the server settles, {cap_windows} consecutive idle windows of
  {cap_window:.0f} s (each covers one full 60 s taskList round): server CPU (utime+stime from
  /proc) over the window, RSS at its end minus the idle RSS per agent, and the largest
  gap between two heartbeats on any connection as the agent sees it (a heartbeat still
  missing at the window's end counts with its current gap). The capacity rows' min /
  median / max are over these windows (10,000 agents are connected once per run).
* **4. Reconnect storm.** With the {fan_large} agents of scenario 2 connected, SIGTERM the
  server, start it again (same database and port), and as soon as it answers HTTP every
  client opens all its connections at once (an attempt that fails retries after the real
  agent's backoff, ~1 s, 2 s, 4 s … × 0.5–1.0); time until every agent has received a
  `taskList` equal to the tasks the coordinator routed to it ({storm_timeout:.0f} s at most).
  Bare ceiling: the same restart-and-reconnect against the bare Autobahn server, until
  every socket is open.
* **5. API.** A fresh server with one agent connected; {conc} connections for {api_duration:.0f} s
  (after {api_warmup} s warm-up) of `GET /api/v1/agents/<id>`, then of `POST /api/v1/tasks`
  (unique names, routed `byIds` to the connected agent, so each also pushes a
  `taskAdd`); against the bare Klein GET and POST echo at the same concurrency.
* **Verdicts** use the median; a ratio is computed per repetition (taskd / baseline of
  that repetition) and its median compared with the target.
"""


def machine_section(m: dict[str, Any], cores: str, packages: tuple[str, ...]) -> list[str]:
    """The "## Machine" lines both result files start with (m: the machine description)."""
    v = m["versions"]
    names = {"autobahn": "Autobahn", "klein": "Klein"}
    return [
        "## Machine",
        "",
        f"* nproc {m['nproc']} ({m['affinity']} usable); CPU: {m['cpu']}; memory {m['memory']}; {m['kernel']}",
        f"* Python {m['python']}, " + ", ".join(f"{names.get(p, p)} {v[p]}" for p in packages),
        f"* open files (`ulimit -n`): {m['nofile']}",
        f"* {cores}",
        f"* load average (1/5/15 min) at start {m['load_start']}, at end {m['load_end']} — other engineers' "
        "test runs may share this machine",
        "",
    ]


def markdown(tbl: str, results: Any, sizes: Any, m: dict[str, Any], cores: str, argv: list[str], *, mysql: bool,
             workdir: Path) -> str:
    ctx = results.context

    def cmed(key: str, f: str = "{:.0f}") -> str:
        vals = [x for x in ctx.get(key, []) if x is not None]
        return f.format(statistics.median(vals)) if vals else "?"

    out = [
        "# taskd benchmark results",
        "",
        f"Generated by `python -m bench{' ' if argv else ''}{' '.join(argv)}` (`make bench` runs `python -m bench`) on {m['date']}; the run took "
        f"{m['duration']:.0f} s. Database: {'MariaDB' if mysql else 'sqlite'}. Server logs of this run: "
        f"`{workdir.relative_to(workdir.parents[2]) if len(workdir.parents) > 2 else workdir}` (not committed).",
        "",
        *machine_section(m, cores, ("Twisted", "autobahn", "klein", "SQLAlchemy", "PyMySQL")),
        "## Results",
        "",
        tbl,
        "",
        "Context from the same run (medians): "
        f"taskd accepted {cmed('taskd_connect_rate')} agent connections/s while connecting "
        f"({cmed('taskd_connect_rate_cap')}/s for the capacity run) against "
        f"{cmed('bare_connect_rate')}/s on the bare Autobahn server; a taskd server holding "
        f"{sizes.fan_large:,} agents took {cmed('taskd_shutdown_s', '{:.1f}')} s to shut down; in the reconnect "
        f"storm {cmed('storm_ready_at_10s')} of {sizes.fan_large:,} agents had their taskList 10 s after the "
        f"restart (half of all after {cmed('storm_half_s', '{:.1f}')} s) and the kernel dropped "
        f"{cmed('storm_listen_drops')} SYNs on the full accept queue (bare: {cmed('bare_storm_listen_drops')}); "
        f"the push's "
        f"HTTP answer alone took {cmed('push_http_p50', '{:.1f}')} ms (p50); idle CPU with no agent "
        f"{cmed('cpu_no_agents', '{:.1f}')} %; heartbeats later than 4 s per capacity window: "
        f"{', '.join(str(x) for x in ctx.get('cap_late', [])) or '?'} "
        f"(of {', '.join(str(x) for x in ctx.get('cap_beats', [])) or '?'} received).",
        "",
    ]
    if results.notes:
        out += ["Notes from the run:", ""] + [f"* {n}" for n in results.notes] + [""]
    out += ["## Method", "", METHOD.format(**sizes.__dict__, conc=sizes.api_conc), ""]
    if ANALYSIS.exists():
        out += [ANALYSIS.read_text().rstrip(), ""]
    return "\n".join(out)
