"""SIGSTOP one of three task-servers for longer than server-dead-after, then SIGCONT: the
frozen one cannot beat, so the survivors reap it (its agents go offline in their API,
though their sockets to nginx stay open) and move its `any` tasks. Woken, it must notice
that it was declared dead, close the sockets it holds (the agents reconnect through
nginx) and register again; the cluster then converges as after a crash. Its agents never
stay away here: every agent ends online. Among the 300 light agents, three real builtin
agents run checks every second throughout, without missing two runs in a row (one on
the frozen server, when the `any` tasks allow, loses its heartbeats and reconnects
elsewhere). No 5xx, no traceback."""
from __future__ import annotations

import signal

import pytest_twisted

from tests.chaos.cluster import (BUILTIN_AGENTS, CLUSTER_AGENTS, Cluster, delete_exchange, new_exchange,
                                 start_and_choose_victim)
from tests.waiting import value_of


@pytest_twisted.ensureDeferred
async def test_sigstop_past_dead_after_then_sigcont_converges(tmp_path, mysql_dbs):
    exchange = new_exchange()
    cluster = Cluster(tmp_path, mysql_dbs.create("chaos"), exchange, n_agents=CLUSTER_AGENTS, n_builtin=BUILTIN_AGENTS)
    try:
        victim, mine, _ = await start_and_choose_victim(cluster)
        survivors = [s for s in cluster.servers if s is not victim]
        sockets_before = {name: cluster.fleet.clients[name] for name in mine}
        victim.proc.send_signal(signal.SIGSTOP)
        try:
            # Asked directly (nginx may pick the frozen upstream): both survivors reaped it
            # and show its agents offline, while those agents still hold their sockets.
            for server in survivors:
                await value_of(lambda: cluster.ok("GET", "/api/v1/servers", base=server.base),
                               lambda listed: victim.name not in [s["name"] for s in listed], 30, interval=0.2,
                               what=f"{server.name} reaping the frozen {victim.name}")
                await value_of(lambda: cluster.online(server.base),
                               lambda online: not any(online[name] for name in mine), 30, interval=0.2,
                               what=f"{server.name} showing {victim.name}'s agents offline")
            assert all(cluster.fleet.holds_socket(name) for name in mine)
        finally:
            victim.proc.send_signal(signal.SIGCONT)

        problems = await value_of(cluster.problems, lambda found: not found, 60, interval=0.5,
                                  what=lambda: f"the cluster converging after {victim.name} woke\n{cluster.logs()}")
        assert problems == []
        assert await cluster.builtin.still_running() == []  # their checks ran on through the fault and after
        assert "was declared dead by another server" in victim.log()
        # it closed every socket it held: each of its agents is on a new one
        assert all(cluster.fleet.clients[name] is not old for name, old in sockets_before.items())
        assert all(cluster.fleet.holds_socket(name) for name in cluster.fleet.names)
        listed = await value_of(lambda: cluster.ok("GET", "/api/v1/servers"), lambda got: len(got) == 3, 10,
                                what="all three servers registered")
        assert sorted(s["name"] for s in listed) == sorted(s.name for s in cluster.servers)
        assert cluster.fivexx() == []
    finally:
        await cluster.stop()
        delete_exchange(exchange)
    assert cluster.tracebacks() == [], cluster.logs()
