"""Chaos figures (issue 11, item 8): how long the cluster takes to repair a fault, measured
on the same real cluster the chaos suite runs (tests/chaos/cluster.py: three `twistd
taskserver` on one MariaDB database and the local RabbitMQ, nginx in front, light agents
through it). The suite asserts the end state; this script times the way there, since a
test must not assert a duration. Writes bench/chaos.md.

Scenario covered so far: SIGKILL of one server. From the SIGKILL:
- offline: every agent of the victim that stays away shows `online: false` in every
  survivor's API (the survivors reaped the victim's rows);
- re-assigned: every `any` task that was on those agents is on exactly one online agent
  holding a socket, in every survivor's API;
- reconnected: every agent of the victim that comes back holds a socket again through
  nginx (the client's own time of its reopened socket).

Usage: python -m bench.chaos [--runs N] [--agents N] (or `make chaos`).
"""
from __future__ import annotations

import argparse
import platform
import signal
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred

from tests.chaos.cluster import FAST, Cluster, delete_exchange, start_and_choose_victim, new_exchange
from tests.conftest import MySQLDatabases

OUT = Path(__file__).resolve().parent / "chaos.md"
POLL = 0.2
LIMIT = 90.0
DEAD_AFTER = float(FAST["server-dead-after"].rstrip("s"))
RELOCATE = float(FAST["relocate-delay"].rstrip("s"))
TARGETS = {"offline": DEAD_AFTER + 5, "reassigned": DEAD_AFTER + 5 + RELOCATE, "reconnected": 10.0}
LABELS = {
    "offline": "SIGKILL → all its agents that stay away offline in the survivors' API",
    "reassigned": "SIGKILL → all its `any` tasks re-assigned to an online agent",
    "reconnected": "SIGKILL → all its agents that come back reconnected through nginx",
    "converged": "SIGKILL → whole end state right (every check of the chaos test)",
}


async def sigkill_run(reactor: Any, workdir: Path, dbs: MySQLDatabases, agents: int) -> dict[str, Any]:
    exchange = new_exchange()
    cluster = Cluster(workdir, dbs.create("chaosbench"), exchange, n_agents=agents)
    try:
        victim, mine, away = await start_and_choose_victim(cluster)
        by_id = {v: k for k, v in cluster.agent_ids.items()}
        before = await cluster.assignments()
        moving = [tid for tid, ids in before.items() if by_id[ids[0]] in away]
        back = mine - away
        cluster.fleet.away |= away
        t0 = reactor.seconds()
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()  # gone (not a zombie) before the survivors are polled
        marks: dict[str, float] = {}
        while len(marks) < 4 and reactor.seconds() - t0 < LIMIT:
            now = reactor.seconds() - t0
            survivors = cluster.live()
            if "offline" not in marks:
                views = [await cluster.online(s.base) for s in survivors]
                if all(not view.get(name) for view in views for name in away):
                    marks["offline"] = now
            if "reassigned" not in marks:
                ok = True
                for s in survivors:
                    view = await cluster.online(s.base)
                    for tid in moving:
                        ids = (await cluster.ok("GET", f"/api/v1/tasks/{tid}", base=s.base))["agents"]
                        name = by_id.get(ids[0]) if len(ids) == 1 else None
                        ok = ok and name is not None and view.get(name) and cluster.fleet.holds_socket(name)
                if ok:
                    marks["reassigned"] = now
            if "reconnected" not in marks and all(cluster.fleet.holds_socket(n) and cluster.fleet.reopened.get(n, 0) > t0
                                                  for n in back):
                marks["reconnected"] = max(cluster.fleet.reopened[n] for n in back) - t0
            if "converged" not in marks and "offline" in marks and not await cluster.problems():
                marks["converged"] = now
            await task.deferLater(reactor, POLL, lambda: None)
        return {"victim": victim.name, "agents": agents, "victim_agents": len(mine), "away": len(away),
                "moving": len(moving), "marks": marks, "fivexx": cluster.fivexx()}
    finally:
        await cluster.stop()
        delete_exchange(exchange)
        tracebacks = cluster.tracebacks()
        if tracebacks:
            print(f"traceback in the logs of {tracebacks}:\n{cluster.logs()}", file=sys.stderr)


def report(runs: list[dict[str, Any]], agents: int) -> str:
    lines = [
        "# Chaos figures",
        "",
        f"Written by `make chaos` (`python -m bench.chaos`) on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC,",
        f"{platform.node()}, Python {platform.python_version()}, {len(runs)} run(s). Three `twistd taskserver` on one",
        f"MariaDB database and the local RabbitMQ, the real nginx in front as one upstream, {agents} light",
        "agents through it (tests/chaos/cluster.py, the same cluster as tests/chaos/). Settings: "
        + ", ".join(f"`{k} = {v}`" for k, v in FAST.items()) + ".",
        "Timed from the SIGKILL, polling the survivors' APIs every "
        f"{POLL:g} s (so a figure may be up to {POLL:g} s late);",
        "'reconnected' is the agents' own clock of their reopened sockets.",
        "",
        "## SIGKILL of one server",
        "",
        "| figure | target | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " | max | met |",
        "|---|---|" + "---|" * len(runs) + "---|---|",
    ]
    for key, label in LABELS.items():
        values = [r["marks"].get(key) for r in runs]
        target = TARGETS.get(key)
        worst = None if None in values else max(values)
        cells = " | ".join("—" if v is None else f"{v:.1f} s" for v in values)
        met = "—" if target is None else ("yes" if worst is not None and worst <= target else "**no**")
        lines.append(f"| {label} | {'—' if target is None else f'≤ {target:g} s'} | {cells} | "
                     f"{'not reached' if worst is None else f'{worst:.1f} s'} | {met} |")
    lines += [
        "",
        "Per run: " + "; ".join(f"victim {r['victim']} held {r['victim_agents']} agents, {r['away']} stayed away, "
                                f"{r['moving']} `any` task(s) had to move, 5xx answers: {len(r['fivexx'])}"
                                for r in runs) + ".",
        "",
        "Noticed: in every run all the `any` tasks were on one agent before the kill (`moving` equals the",
        "number of `any` tasks): the assignment gives each unassigned `any` task the same agent rather",
        "than spreading them, so one lost agent moves them all at once.",
        "",
        f"Targets (issue 11): offline ≤ `server-dead-after` + 5 s; re-assigned ≤ that + `relocate-delay`;",
        "reconnected ≤ 10 s. The reap itself cannot come sooner than `server-dead-after` after the",
        f"victim's last beat (here {DEAD_AFTER:g} s, at most one `server-heartbeat-interval` before the kill); the",
        "survivors' next beat finds it, then relocation waits `relocate-delay` plus up to 2.1 s of jitter for",
        "agents that were on another server.",
        "",
        "## Not covered yet",
        "",
        "SIGSTOP of one server for longer than `server-dead-after`, then SIGCONT, has a test",
        "(tests/chaos/test_server_freeze.py) but no figure here yet. These scenarios of issue 11 item 7/8",
        "have no test and no figure yet: SIGSTOP of mariadbd for 10 s (API answers within",
        "`db-timeout` + 1 s); a MariaDB restart; a RabbitMQ restart (events lost, duplicate pushes); SIGKILL",
        "and restart of a lone sqlite server while one of its agents stays away (duplicate Snap tasks);",
        "real `twistd taskagent` processes with the builtin executor (gaps in their points); `byIds`",
        "tasks and the check that every agent's last `taskList` equals the database's routing;",
        "`make bench --mysql` against bare Klein.",
        "",
    ]
    return "\n".join(lines)


async def main(reactor: Any, argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--agents", type=int, default=150)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    dbs = MySQLDatabases()
    runs = []
    try:
        for i in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="taskd-chaos-") as workdir:
                run = await sigkill_run(reactor, Path(workdir), dbs, args.agents)
            print(f"run {i + 1}: {run}", file=sys.stderr)
            runs.append(run)
    finally:
        dbs.drop_all()
    args.out.write_text(report(runs, args.agents))
    print(f"wrote {args.out}")
    medians = {k: statistics.median(r["marks"][k] for r in runs) for k in LABELS if all(k in r["marks"] for r in runs)}
    print(medians)


if __name__ == "__main__":
    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, sys.argv[1:])))
