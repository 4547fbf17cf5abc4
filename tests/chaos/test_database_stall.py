"""SIGSTOP of the cluster's database for 10 s, then SIGCONT (issue 11, items 4 and 7).

Three servers share a private mariadbd (tests/chaos/mariadb.py; the machine's MariaDB is
never frozen) with `db-timeout = 2s`. While it is frozen, API calls to every server and
through nginx (reads and writes, one every 0.5 s per target) must each answer within
db-timeout + 1 s — the bound docs/operations.md promises — with the 503 envelope
"database unavailable" and a Retry-After; `GET /` keeps answering and says the database
is unavailable; every agent keeps its socket and its heartbeats. After SIGCONT the API
answers again without a restart, nothing answered 503 was written, the cluster converges
(tests/chaos/cluster.py `problems()`), each server logged one warning for the start of the
outage and one for its end, no server was reaped, no traceback, no other 5xx; and the three
real builtin agents among the light ones ran their checks throughout (no gap of two
intervals in their points) without losing their socket."""
from __future__ import annotations

from collections import Counter

import pytest_twisted

from tests.chaos.cluster import BUILTIN_AGENTS
from tests.chaos.scenarios import DB_TIMEOUT, PROBE_EVERY, STALL, database_stall


@pytest_twisted.ensureDeferred
async def test_a_10s_database_stall_answers_503_in_time_keeps_agents_and_converges(tmp_path):
    run = await database_stall(tmp_path)
    facts = run.facts
    assert facts["stall"] >= STALL
    per_target = Counter(where for where, *_ in facts["answers"])
    assert len(per_target) == 4 and min(per_target.values()) >= STALL / PROBE_EVERY / 2, per_target  # all along
    assert facts["late"] == [], f"answers slower than db-timeout + 1 s = {DB_TIMEOUT + 1} s"
    assert facts["not_503"] == [], "answers during the stall other than the documented 503"
    status = facts["status"]
    assert status and all(code == 200 for _, _, code, _ in status), status
    assert {base for base, _, _, state in status if state == "unavailable"} == {base for base, *_ in status}
    assert facts["sockets_kept"] == facts["agents"]
    assert facts["heartbeats_during"] == facts["agents"]
    assert facts["half_written"] == [] and facts["lost_writes"] == []
    assert run.problems == [], run.logs
    assert facts["builtin"] == BUILTIN_AGENTS and facts["builtin_problems"] == [], run.logs  # checks ran on
    assert set(facts["builtin_reconnections"].values()) == {0}, run.logs  # nor lost their socket
    assert set(facts["outage_warnings"].values()) == {1}, facts["outage_warnings"]
    assert set(facts["recovery_warnings"].values()) == {1}, facts["recovery_warnings"]
    assert set(facts["declared_dead"].values()) == {0}, run.logs
    assert run.fivexx == []
    assert run.tracebacks == [], run.logs
