"""The chaos figures beyond SIGKILL (issue 11, item 8), for bench/chaos.py.

SIGSTOP of one server is timed here (as the SIGKILL is in bench/chaos.py). The other
scenarios are the very runs their tests make (tests/chaos/scenarios.py: the test asserts
the outcome, this reports it as figures): a database stall, a database crash and
restart, a RabbitMQ outage while two servers publish, a lone sqlite server's restart.
"""
from __future__ import annotations

import math
import signal
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from tests.chaos import broker, scenarios
from tests.chaos.cluster import FAST, Cluster, delete_exchange, new_exchange, start_and_choose_victim
from tests.waiting import value_of

SCENARIOS = ("freeze", "db-stall", "db-restart", "broker", "lone")
POLL, LIMIT = 0.2, 90.0
DEAD_AFTER = float(FAST["server-dead-after"].rstrip("s"))
RELOCATE = float(FAST["relocate-delay"].rstrip("s"))


async def run(name: str, reactor: Any, workdir: Path, dbs: Any, agents: int, builtin: int) -> Any:
    """`agents` and `builtin` size the freeze's cluster; the others are their tests' runs."""
    if name == "freeze":
        return await freeze_run(reactor, workdir, dbs, agents, builtin)
    if name == "db-stall":
        return await scenarios.database_stall(workdir)
    if name == "db-restart":
        return await scenarios.database_restart(workdir)
    if name == "broker":
        return await broker.broker_restart(workdir, dbs)
    return await scenarios.lone_restart(workdir)


def summary(got: Any) -> Any:
    if isinstance(got, scenarios.Run):
        return {"problems": got.problems, "converged_after": got.converged_after, "fivexx": got.fivexx[:5],
                "tracebacks": got.tracebacks,
                **{k: v for k, v in got.facts.items() if k not in ("answers", "status")}}
    return got


async def _mark(reactor: Any, marks: dict[str, float | None], key: str, since: float, fetch: Any, check: Any) -> None:
    """When `check(fetch())` first held, polled every POLL s (None: not within LIMIT s)."""
    try:
        await value_of(fetch, check, LIMIT, interval=POLL, what=key)
        marks[key] = reactor.seconds() - since
    except AssertionError:
        marks[key] = None


async def builtin_facts(cluster: Cluster, on_victim: list[str]) -> dict[str, Any]:
    """The builtin agents' side of a run (tests/chaos/builtin_agents.py `end_facts`), and
    which of them the victim held."""
    return {**await cluster.builtin.end_facts(), "builtin_on_victim": on_victim}


def builtin_text(r: dict[str, Any]) -> str:
    if not r.get("builtin"):
        return "no builtin agents"
    victim = (f" ({', '.join(r['builtin_on_victim']) or 'none'} on the victim)" if "builtin_on_victim" in r else "")
    return (f"{r['builtin']} builtin agents{victim}, the largest "
            f"gap in their points {r['largest_gap']} s (bound 2 s), their reconnections "
            f"{sum(r['builtin_reconnections'].values())}" + (f", **{'; '.join(r['builtin_problems'])}**"
                                                               if r['builtin_problems'] else ""))


async def freeze_run(reactor: Any, workdir: Path, dbs: Any, agents: int, builtin: int) -> dict[str, Any]:
    """SIGSTOP the server holding the most `any` tasks until both survivors have reaped it,
    shown its agents offline and moved its `any` tasks; then SIGCONT and time its return."""
    exchange = new_exchange()
    cluster = Cluster(workdir, dbs.create("chaosbench"), exchange, n_agents=agents, n_builtin=builtin)
    marks: dict[str, float | None] = {}
    try:
        victim, mine, _ = await start_and_choose_victim(cluster)
        on_victim = sorted(set(cluster.builtin.names) & cluster.sessions().get(victim.name, set()))
        survivors = [s for s in cluster.servers if s is not victim]
        by_id = {v: k for k, v in cluster.agent_ids.items()}
        moving = [tid for tid, ids in (await cluster.assignments()).items() if by_id[ids[0]] in mine]
        old = {n: cluster.fleet.clients[n] for n in mine}

        async def listed() -> list[list[str]]:
            return [[x["name"] for x in await cluster.ok("GET", "/api/v1/servers", base=s.base)] for s in survivors]

        async def views() -> list[dict[str, bool]]:
            return [await cluster.online(s.base) for s in survivors]

        async def moved() -> bool:
            for s, online in zip(survivors, await views()):
                for ids in await cluster.task_agents(moving, s.base):
                    if len(ids) != 1 or by_id.get(ids[0]) in mine or not online.get(by_id.get(ids[0])):
                        return False
            return True

        stopped = reactor.seconds()
        victim.proc.send_signal(signal.SIGSTOP)
        try:
            await _mark(reactor, marks, "reaped", stopped, listed, lambda got: all(victim.name not in x for x in got))
            await _mark(reactor, marks, "offline", stopped, views,
                        lambda got: all(not v.get(n) for v in got for n in mine))
            await _mark(reactor, marks, "reassigned", stopped, moved, bool)
        finally:
            victim.proc.send_signal(signal.SIGCONT)
        woken = reactor.seconds()
        marks["frozen"] = woken - stopped
        await _mark(reactor, marks, "reregistered", woken, listed,
                    lambda got: all(victim.name in x for x in got) and "was declared dead" in victim.log())
        await _mark(reactor, marks, "reconnected", woken, lambda: all(
            cluster.fleet.clients[n] is not c and cluster.fleet.holds_socket(n) for n, c in old.items()), bool)
        await _mark(reactor, marks, "converged", woken, cluster.problems, lambda found: not found)
        return {"victim": victim.name, "agents": len(mine), "moving": len(moving), "marks": marks,
                **await builtin_facts(cluster, on_victim), "fivexx": cluster.fivexx(), "tracebacks": cluster.tracebacks()}
    finally:
        await cluster.stop()
        delete_exchange(exchange)


# -- the report ----------------------------------------------------------------------------

def _s(value: float | None) -> str:
    return "not reached" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f} s"


def _met(value: float | None, target: float) -> str:
    return "yes" if value is not None and value <= target else "**no**"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *["| " + " | ".join(r) + " |" for r in rows]]


def _per_run(runs: list[Any], label: str, cells: Any, target: str = "—", met: Any = None) -> list[str]:
    values = [cells(r) for r in runs]
    return [label, target, *values] + ([met(runs)] if met else [])


def freeze_section(runs: list[dict[str, Any]]) -> list[str]:
    down, up = DEAD_AFTER + 5, 10.0
    rows = [
        ["SIGSTOP → it is gone from both survivors' `GET /api/v1/servers` (reaped)", f"≤ {down:g} s",
         *[_s(r["marks"]["reaped"]) for r in runs], _met(max_or_none(runs, "reaped"), down)],
        ["SIGSTOP → all its agents offline in both survivors' API", f"≤ {down:g} s",
         *[_s(r["marks"]["offline"]) for r in runs], _met(max_or_none(runs, "offline"), down)],
        ["SIGSTOP → all its `any` tasks on an agent online in both survivors' API", f"≤ {down + RELOCATE:g} s",
         *[_s(r["marks"]["reassigned"]) for r in runs], _met(max_or_none(runs, "reassigned"), down + RELOCATE)],
        ["(SIGCONT sent, seconds after SIGSTOP)", "—", *[_s(r["marks"]["frozen"]) for r in runs], "—"],
        ["SIGCONT → it noticed it was declared dead and registered again", "—",
         *[_s(r["marks"]["reregistered"]) for r in runs], "—"],
        ["SIGCONT → all its agents reconnected through nginx (new sockets)", f"≤ {up:g} s",
         *[_s(r["marks"]["reconnected"]) for r in runs], _met(max_or_none(runs, "reconnected"), up)],
        ["SIGCONT → whole end state right", "—", *[_s(r["marks"]["converged"]) for r in runs], "—"],
    ]
    return [
        "## SIGSTOP of one server past `server-dead-after`, then SIGCONT",
        "",
        "tests/chaos/test_server_freeze.py's scenario, timed: the server holding the most `any` tasks is",
        "SIGSTOPped until both survivors have reaped it, shown its agents offline and moved its `any` tasks",
        f"(its agents' sockets to nginx stay open meanwhile), then SIGCONTed. Polled every {POLL:g} s, one",
        "condition after the other (so each figure is an upper bound). The targets are the SIGKILL ones.",
        "",
        *_table(["figure", "target", *[f"run {i + 1}" for i in range(len(runs))], "met"], rows),
        "",
        "Per run: " + "; ".join(f"victim {r['victim']} held {r['agents']} agents and {r['moving']} `any` task(s), "
                                f"5xx answers: {len(r['fivexx'])}, tracebacks: {r['tracebacks'] or 'none'}, "
                                + builtin_text(r) for r in runs) + ".",
        "",
    ]


def max_or_none(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r["marks"].get(key) for r in runs]
    return None if None in values else max(values)


def _answer_rows(run: scenarios.Run) -> list[list[str]]:
    """Per call and route: answers, how many 503, median and max seconds, within the bound."""
    groups: dict[tuple[str, str], list[tuple[float, int, bool]]] = defaultdict(list)
    for where, what, took, code, documented in run.facts["answers"]:
        call = what.split("?")[0]
        call = "GET /api/v1/tasks/<id>" if call.startswith("GET /api/v1/tasks/") else call
        groups[(call, "through nginx" if where == run.facts["nginx"] else "to a server")].append((took, code, documented))
    bound = run.facts["bound"]
    rows = []
    for (call, route), got in sorted(groups.items()):
        times = [t for t, _, _ in got]
        rows.append([f"`{call}` {route}", str(len(got)), str(sum(1 for _, _, d in got if d)),
                     f"{statistics.median(times):.2f} s", f"{max(times):.2f} s",
                     "yes" if max(times) <= bound else f"**no** ({sum(1 for t in times if t > bound)})"])
    status = run.facts.get("status") or []
    if status:
        times = [t for _, t, _, _ in status]
        rows.append(["`GET /` to a server", str(len(status)), f"0 (all {sorted({c for _, _, c, _ in status})})",
                     f"{statistics.median(times):.2f} s", f"{max(times):.2f} s",
                     "yes" if max(times) <= bound else "**no**"])
    return rows


def _common(run: scenarios.Run) -> list[str]:
    return [
        f"- converged (`Cluster.problems()` empty) {_s(run.converged_after)} after the database was back"
        + ("" if not run.problems else f"; **not converged**: {'; '.join(run.problems[:3])}"),
        f"- 5xx answers other than the documented 503: {len(run.fivexx)}; servers with a traceback in their log:"
        f" {', '.join(run.tracebacks) or 'none'}",
        f"- outage warnings per server: {run.facts['outage_warnings']}, recovery warnings: {run.facts['recovery_warnings']}"
        " (target: one each)",
        f"- writes answered 503 but stored: {len(run.facts['half_written'])}; answered 200 but missing:"
        f" {len(run.facts['lost_writes'])} (target: 0, 0)",
        f"- the measuring process's own timer ticks came up to {run.facts['probe_late']:.2f} s late (part of any"
        " answer time above is that)",
    ]


def stall_section(runs: list[scenarios.Run]) -> list[str]:
    lines = ["## SIGSTOP of mariadbd for 10 s", ""]
    for i, r in enumerate(runs):
        f = r.facts
        lines += [
            f"Run {i + 1}: tests/chaos/test_database_stall.py's run. Three servers on a private mariadbd "
            f"(`db-timeout = {scenarios.DB_TIMEOUT:g}s`, {f['agents']} agents), frozen for {f['stall']:.1f} s; "
            f"API calls every {scenarios.PROBE_EVERY:g} s to each server and through nginx, each timed from "
            f"its request to its answer. Calls made during the stall (target: every one answers within "
            f"db-timeout + 1 s = {f['bound']:g} s, with the 503 envelope and Retry-After):",
            "",
            *_table(["call", "answers", "503", "median", "max", f"all ≤ {f['bound']:g} s"], _answer_rows(r)),
            "",
            f"- answers during the stall that were not the documented 503: {len(f['not_503'])}"
            " (a call answered after SIGCONT may be a 200)",
            f"- agents that kept their socket: {f['sockets_kept']}/{f['agents']}; that got heartbeats during the"
            f" stall: {f['heartbeats_during']}/{f['agents']}",
            "- API answering again after SIGCONT: " + ", ".join(f"{k} {v:.2f} s" for k, v in f["recovered"].items()),
            f"- servers declared dead by another: {f['declared_dead']} (target: none)",
            f"- {builtin_text(f)}",
            *_common(r),
            "",
        ]
    return lines


def restart_section(runs: list[scenarios.Run]) -> list[str]:
    lines = ["## MariaDB crash and restart", ""]
    for i, r in enumerate(runs):
        f = r.facts
        lines += [
            f"Run {i + 1}: tests/chaos/test_database_restart.py's run: SIGKILL of the private mariadbd; once every "
            f"server had answered a 503 ({f['down']:.1f} s) it was started again on the same port and data "
            f"directory (ready {f['mariadbd_start']:.1f} s later). Calls made while it was down or starting:",
            "",
            *_table(["call", "answers", "503", "median", "max", f"all ≤ {f['bound']:g} s"], _answer_rows(r)),
            "",
            f"- answers before the restart that were not the documented 503: {len(f['not_503'])}",
            "- API answering again after mariadbd was ready: " + ", ".join(
                f"{k} {v:.2f} s" for k, v in f["recovered"].items()),
            f"- servers restarted: {f['restarted'] or 'none'}; registered afterwards: {', '.join(f['servers'])}",
            f"- {builtin_text(f)}",
            *_common(r),
            "",
        ]
    return lines


def broker_section(runs: list[scenarios.Run]) -> list[str]:
    rows = [
        _per_run(runs, "task events made (creates and updates, through S1's and S2's API)", lambda r: str(r.facts["events"])),
        _per_run(runs, "their rate [events/s]", lambda r: f"{r.facts['rate']:.0f}", "50"),
        _per_run(runs, "broker away (node stop → node started again)", lambda r: _s(r.facts["outage"])),
        _per_run(runs, "of which the node's start-up", lambda r: _s(r.facts["node_start"])),
        _per_run(runs, "events buffered by S1 / S2 when the node was started again", lambda r: "{S1:.0f} / {S2:.0f}".format(
            **r.facts["buffered_at_restore"])),
        _per_run(runs, "back → every server connected", lambda r: _s(r.facts["connected"])),
        _per_run(runs, "back → every server connected, nothing left to send", lambda r: _s(r.facts["reconnect"])),
        _per_run(runs, "back → every routed agent runs every task as stored", lambda r: _s(r.facts["delivered"])),
        _per_run(runs, "events lost between servers (published − received, all pairs)",
                 lambda r: str(sum(r.facts["lost"].values())), "0",
                 lambda rs: "yes" if all(sum(r.facts["lost"].values()) == 0 for r in rs) else "**no**"),
        _per_run(runs, "(task, agent) pairs not delivered or stale at the end",
                 lambda r: str(len(r.facts["undelivered"])), "0",
                 lambda rs: "yes" if all(not r.facts["undelivered"] for r in rs) else "**no**"),
        _per_run(runs, "duplicate pushes to an agent", lambda r: str(len(r.facts["duplicates"])), "0",
                 lambda rs: "yes" if all(not r.facts["duplicates"] for r in rs) else "**no**"),
        _per_run(runs, "events dropped from a full buffer", lambda r: str(int(sum(r.facts["dropped"].values()))), "0",
                 lambda rs: "yes" if all(not sum(r.facts["dropped"].values()) for r in rs) else "**no**"),
        _per_run(runs, "unconfirmed at the cut, resent (per server)", lambda r: str(r.facts["unconfirmed"])),
        _per_run(runs, "repeats dropped by event id (per server)", lambda r: str(r.facts["repeats"])),
        _per_run(runs, "events to send at each connect (per server)", lambda r: str(r.facts.get("to_send"))),
        _per_run(runs, "agents that lost their socket", lambda r: str(len(r.facts["reconnected_agents"])), "0",
                 lambda rs: "yes" if all(not r.facts["reconnected_agents"] for r in rs) else "**no**"),
    ]
    for row in rows:
        while len(row) < 3 + len(runs):
            row.append("—")
    return [
        "## RabbitMQ restart while two servers publish",
        "",
        "tests/chaos/test_broker_restart.py's run (tests/chaos/broker.py). The servers use a private RabbitMQ",
        "node the scenario starts (tests/integration/private_rabbit.py; the shared one is never touched); at",
        f"event {broker.CUT_AT} the node is stopped (`rabbitmqctl stop`) and started again on the same port and",
        "data dir, its durable queues recovered from disk, and the stream runs until every server is",
        f"connected again plus {broker.AFTER} events. Each task is",
        "routed byIds to two agents of each server, and `task-list-interval = 600s`, so only events can bring",
        "an agent a change made on another server. 'Lost' counts each server's task events published against",
        "those each other server received (debug logs, repeats already dropped by event id).",
        "",
        *_table(["figure", "target", *[f"run {i + 1}" for i in range(len(runs))], "met"], rows),
        "",
        "Per run: " + "; ".join(f"converged {_s(r.converged_after)} after every server reconnected, problems: "
                                f"{len(r.problems)}, 5xx: {len(r.fivexx)}, tracebacks: {r.tracebacks or 'none'}, "
                                + builtin_text(r.facts)
                                for r in runs) + ".",
        "",
    ]


def lone_section(runs: list[scenarios.Run]) -> list[str]:
    lines = ["## SIGKILL and restart of a lone sqlite server while one agent stays away", ""]
    for i, r in enumerate(runs):
        f = r.facts
        lines += [
            f"Run {i + 1}: tests/chaos/test_lone_server_restart.py's run: one server on sqlite, {f['agents_back'] + 1} "
            f"agents straight to it, `{f['away']}` (holding {f['moving']} `any` task(s)) stays away; the server is "
            f"SIGKILLed and started again {f['down']:.1f} s later.",
            "",
            f"- end state right {_s(r.converged_after)} after the restarted server answered"
            + ("" if not r.problems else f"; **not converged**: {'; '.join(r.problems[:3])}"),
            f"- the absent agent online in the API: {f['away_online']} (target: False); its `any` tasks now on "
            f"{', '.join(f['moved_to'])}",
            f"- agents back on a new socket: {len(f['reconnected'])}/{f['agents_back']}",
            f"- duplicate tasks pushed to the returning agents: {len(f['duplicates'])} (target 0; before the kill:"
            f" {len(f['duplicates_before'])})",
            f"- {builtin_text(f)} (each reconnects once: its server was killed; its checks must not stop meanwhile)",
            f"- 5xx answers: {len(r.fivexx)}; tracebacks in the log (both runs of the server): {r.tracebacks or 'none'}",
            "",
        ]
    return lines


NOT_COVERED = [
    "## Not covered yet",
    "",
    "- ~300 agents beyond SIGKILL and SIGSTOP: the broker scenario has 150, the database scenarios 60, the",
    "  lone server 12, to keep the suite within a few minutes on 2 cores.",
    "- POST /tasks on MariaDB against bare Klein is not a chaos figure: `make bench --mysql` measures it",
    "  (bench/results-mysql-api.md, bench/analysis.md).",
    "- Websocket upgrades during a database stall: the agent lookup (taskd.server.agentcache.BatchLoader)",
    "  now gets only what is left of `db-timeout` after waiting behind the read in flight (a unit test",
    "  shows it), but no agent reconnects during the stall here, so no figure measures it.",
    "",
]


def sections(others: dict[str, list[Any]]) -> list[str]:
    lines: list[str] = []
    for name, build, title in (
            ("freeze", freeze_section, "SIGSTOP of one server past `server-dead-after`, then SIGCONT"),
            ("db-stall", stall_section, "SIGSTOP of mariadbd for 10 s"),
            ("db-restart", restart_section, "MariaDB crash and restart"),
            ("broker", broker_section, "RabbitMQ restart while two servers publish"),
            ("lone", lone_section, "SIGKILL and restart of a lone sqlite server while one agent stays away")):
        lines += build(others[name]) if others.get(name) else [f"## {title}", "", "Not run this time.", ""]
    return lines + NOT_COVERED
