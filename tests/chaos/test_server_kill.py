"""SIGKILL one of three task-servers behind nginx: no clean shutdown, its session rows
stay behind. The survivors must reap it (its agents that do not come back go offline),
its agents that do come back reconnect through nginx to a survivor, and every `any` task
it held ends on exactly one online agent. Among the 300 light agents, three real builtin
agents run checks every second throughout, without missing two runs in a row (the
victim is one that holds one of them when the `any` tasks allow). No 5xx on the way, no
traceback in any log. (How fast: bench/chaos.py; a test asserts the outcome, never a
duration.)"""
from __future__ import annotations

import signal

import pytest_twisted

from tests.chaos.cluster import (BUILTIN_AGENTS, CLUSTER_AGENTS, Cluster, delete_exchange, new_exchange,
                                 start_and_choose_victim)
from tests.waiting import value_of


@pytest_twisted.ensureDeferred
async def test_sigkill_of_one_server_converges(tmp_path, mysql_dbs):
    exchange = new_exchange()
    cluster = Cluster(tmp_path, mysql_dbs.create("chaos"), exchange, n_agents=CLUSTER_AGENTS, n_builtin=BUILTIN_AGENTS)
    try:
        victim, mine, away = await start_and_choose_victim(cluster)
        assert away and mine - away, (mine, away)  # some stay away, some come back
        cluster.fleet.away |= away
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()

        problems = await value_of(cluster.problems, lambda found: not found, 60, interval=0.5,
                                  what=lambda: f"the cluster converging after SIGKILL of {victim.name}\n{cluster.logs()}")
        assert problems == []
        assert await cluster.builtin.still_running() == []  # their checks ran on through the fault and after
        for name in away:
            assert not cluster.fleet.holds_socket(name)
        for name in mine - away:
            assert cluster.fleet.holds_socket(name) and name in cluster.fleet.reopened
        held = await value_of(cluster.sessions, lambda h: victim.name not in h, 10, what="the victim's rows reaped")
        assert sum(len(v - set(cluster.builtin.names)) for v in held.values()) == len(cluster.fleet.names) - len(away)
        servers = await cluster.ok("GET", "/api/v1/servers")
        assert sorted(s["name"] for s in servers) == sorted(s.name for s in cluster.live())
        assert cluster.fivexx() == []
    finally:
        await cluster.stop()
        delete_exchange(exchange)
    assert cluster.tracebacks() == [], cluster.logs()
