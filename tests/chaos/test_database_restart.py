"""The cluster's database crashes and comes back (issue 11, items 4 and 7): SIGKILL of a
private mariadbd (tests/chaos/mariadb.py), then mariadbd started again on the same port
and data directory, while API calls go to every server and through nginx.

While it is down every server answers the 503 envelope with Retry-After, each call within
db-timeout + 1 s, never a 500 or a traceback (what issue 11 measured before: a `critical`
line and a 500). Once it is back the same server processes (none restarted) answer again,
nothing answered 503 was written, the three servers are still registered, the cluster
converges (`Cluster.problems()`), and each server logged one warning for each end of
the outage. The three real builtin agents ran their checks throughout, on the same socket."""
from __future__ import annotations

import pytest_twisted

from tests.chaos.cluster import BUILTIN_AGENTS
from tests.chaos.scenarios import DB_TIMEOUT, database_restart


@pytest_twisted.ensureDeferred
async def test_a_mariadb_crash_and_restart_is_503_meanwhile_and_recovers_without_a_server_restart(tmp_path):
    run = await database_restart(tmp_path)
    facts = run.facts
    assert facts["answers"], "no API call was made while mariadbd was down"
    assert facts["late"] == [], f"answers slower than db-timeout + 1 s = {DB_TIMEOUT + 1} s"
    assert facts["not_503"] == [], "answers while mariadbd was down other than the documented 503"
    assert facts["restarted"] == []
    assert facts["servers"] == ["S1", "S2", "S3"]
    assert facts["half_written"] == [] and facts["lost_writes"] == []
    assert run.problems == [], run.logs
    assert facts["builtin"] == BUILTIN_AGENTS and facts["builtin_problems"] == [], run.logs  # checks ran on
    assert set(facts["builtin_reconnections"].values()) == {0}, run.logs  # nor lost their socket
    assert set(facts["outage_warnings"].values()) == {1}, facts["outage_warnings"]
    assert set(facts["recovery_warnings"].values()) == {1}, facts["recovery_warnings"]
    assert run.fivexx == []
    assert run.tracebacks == [], run.logs
