"""A real RabbitMQ restart while two servers publish (issue 11, items 5 and 7).

The servers use a private RabbitMQ node the scenario starts itself (tests/chaos/broker.py,
tests/integration/private_rabbit.py; the machine's shared broker is never touched), and
"RabbitMQ restarts" is that node stopped (the Erlang VM exits, every connection cut and
the port closed) and started again on the same port and data dir, so the servers'
durable queues come back from disk and the servers must reconnect by themselves.
Meanwhile S1 and S2 create and update tasks through their own APIs, 50 events/s, until
every server is connected again and 100 events more, each task routed byIds to two
agents held by each of the three servers, and the periodic taskList is off (600 s), so
only events can bring an agent a change made on another server.

Afterwards: every server is connected with nothing left to send and nothing dropped;
every task event reached every other server once (none lost: the servers' debug logs
count each server's task events published and received from each other one, repeats
dropped by id); every routed agent runs every task as stored (none lost, none stale),
and no agent was pushed the same task twice; no agent socket was lost on the way; the
API never failed (the broker is not needed to answer it); no traceback; the three real
builtin agents ran their checks throughout, on the same socket."""
from __future__ import annotations

import pytest_twisted

from tests.chaos.broker import AFTER, CUT_AT, broker_restart, creates
from tests.chaos.cluster import BUILTIN_AGENTS


@pytest_twisted.ensureDeferred
async def test_a_broker_restart_while_two_servers_publish_loses_no_event_and_pushes_none_twice(tmp_path, mysql_dbs):
    run = await broker_restart(tmp_path, mysql_dbs)
    facts = run.facts
    assert facts["failed_calls"] == []
    assert facts["buffered_at_restore"]["S1"] > 0 and facts["buffered_at_restore"]["S2"] > 0  # it mattered
    assert facts["events"] >= CUT_AT + AFTER
    assert set(facts["dropped"].values()) == {0}
    assert set(facts["lost"].values()) == {0}, facts
    assert facts["undelivered"] == [], run.logs
    assert facts["duplicates"] == []
    assert facts["reconnected_agents"] == []
    assert facts["tasks"] == creates(facts["events"])
    assert run.problems == [], run.logs
    assert facts["builtin"] == BUILTIN_AGENTS and facts["builtin_problems"] == [], run.logs  # checks ran on
    assert set(facts["builtin_reconnections"].values()) == {0}, run.logs  # nor lost their socket
    assert run.fivexx == []
    assert run.tracebacks == [], run.logs
