"""The agent benchmark's smoke mode, so `make bench-agent` cannot rot between full runs.

`python -m bench.agent_lateness --smoke` runs the issue-7 agent benchmark at toy size: a
real `twistd taskserver` and a real `twistd taskagent` (builtin executor, tsdbgw
publisher, statsd on), 20 tcp tasks every second against a local listener, a 5 s window.
This checks it completes and prints the table with a number in every row, that runs
were seen, and that no slot was skipped and no run failed. Rates, lateness and how long it
took are figures the bench prints, not bounds here (the machine may be busy).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

NUMBER_ROWS = [
    "lateness p50 [ms]", "lateness p99 [ms]", "lateness max [ms]", "runs per second", "skipped slots",
    "failed runs", "agent CPU [% of one core]", "agent RSS [MiB]", "metrics received per second",
]


def test_bench_agent_smoke(tmp_path):
    results = ROOT / "bench" / "agent-results.md"
    before = results.stat().st_mtime_ns if results.exists() else None
    proc = subprocess.run(
        [sys.executable, "-m", "bench.agent_lateness", "--smoke", "--workdir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert table[0] == "| metric | value | note |", proc.stdout
    cells = {}
    for line in table[2:]:
        parts = [p.strip() for p in line.strip("|").split("|")]
        cells[parts[0]] = parts[1]
    values = {}
    for row in NUMBER_ROWS:
        assert row in cells, f"no {row!r} row in:\n{proc.stdout}"
        assert re.fullmatch(r"\d+(\.\d+)?", cells[row]), f"{row}: {cells[row]!r} is not a number\n{proc.stdout}"
        values[row] = float(cells[row])
    assert cells["tasks"].startswith("20 tcp tasks, every 1 s"), proc.stdout
    assert values["skipped slots"] == 0, proc.stdout
    assert values["failed runs"] == 0, proc.stdout
    assert values["runs per second"] > 0, proc.stdout  # runs seen (the rate is the bench's figure)
    assert values["metrics received per second"] > 0, proc.stdout
    assert 0 <= values["lateness p50 [ms]"] <= values["lateness p99 [ms]"] <= values["lateness max [ms]"], proc.stdout
    assert values["agent RSS [MiB]"] > 10, proc.stdout
    assert "keeps its schedule" in cells, proc.stdout
    assert (tmp_path / "agent-results.json").exists()
    after = results.stat().st_mtime_ns if results.exists() else None
    assert after == before, "--smoke must not write bench/agent-results.md"
    assert re.search(r"^run time: \d+\.\d s$", proc.stdout, re.M), proc.stdout
