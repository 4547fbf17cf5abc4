"""SIGKILL of a lone task-server on sqlite, and a start again (same port, file and
instance-id), while the agent holding its `any` tasks stays away (issue 11, items 1, 2
and 7: what the issue measured was that the restarted server published `agent.offline`
for the agents that did not come back before its dispatcher ran, so nothing moved).

The agents that come back (straight to the server: no nginx) are online and hold their
socket; the one that stayed away is offline and every `any` task it held moves to an
online agent; each returning agent runs exactly its routing (`Cluster.problems()`), and
no task was pushed to it twice (for a Snap agent: no duplicate Snap task). No 5xx, no
traceback in the log of either run. Three real builtin agents (straight to the server
too) keep running their checks while it is down (issue 11, item 6) and reconnect."""
from __future__ import annotations

import pytest_twisted

from tests.chaos.cluster import BUILTIN_AGENTS
from tests.chaos.scenarios import lone_restart


@pytest_twisted.ensureDeferred
async def test_a_lone_sqlite_server_killed_and_restarted_moves_the_absent_agents_tasks(tmp_path):
    run = await lone_restart(tmp_path)
    facts = run.facts
    assert facts["moving"] > 0  # the agent that stays away held `any` tasks
    assert run.problems == [], run.logs
    # the builtin agents ran their tasks on while no server answered, and came back to it
    assert facts["builtin_problems"] == [], run.logs
    assert all(n >= 1 for n in facts["builtin_reconnections"].values()), facts["builtin_reconnections"]  # lost it
    assert facts["builtin_back"] == [f"builtin{i}" for i in range(BUILTIN_AGENTS)], run.logs  # and hold one again
    assert facts["away_online"] is False
    assert facts["away"] not in facts["moved_to"] and facts["moved_to"]
    assert len(facts["reconnected"]) == facts["agents_back"]  # each on a new socket, online
    assert facts["duplicates"] == [] and facts["duplicates_before"] == []
    assert run.fivexx == []
    assert run.tracebacks == [], run.logs
