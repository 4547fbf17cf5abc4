"""The benchmark's smoke mode, so `make bench` cannot rot between full runs.

`python -m bench --smoke` runs every scenario of issue 6 at toy size (20 agents, a real
`twistd taskserver` on sqlite, the bare Klein/Autobahn baselines, load-client processes)
without enforcing targets. This checks it completes and prints the one table with a row
for every scenario and a number in every taskd cell. How long it took is a figure the bench
prints ("run time"), not a bound here: a busy machine must not fail a behaviour test.
"""
from __future__ import annotations

import os
import subprocess
import sys
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

ROWS = [
    "1. push latency", "2. fan-out, 10 agents", "2. fan-out, 20 agents", "server RSS per agent",
    "server CPU while idle", "worst heartbeat gap", "4. reconnect storm", "5. API GET /api/v1/agents/<id>",
    "5. API POST /api/v1/tasks",
]


def test_bench_smoke_runs_every_scenario(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--workdir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| scenario | metric | taskd"), proc.stdout
    body = table[2:]
    for row in ROWS:
        matching = [line for line in body if row in line]
        assert matching, f"no {row!r} row in:\n{proc.stdout}"
        for line in matching:
            taskd_cell = line.split("|")[3].strip()
            assert taskd_cell != "—" and "not done" not in taskd_cell and "failed" not in line, f"{row}: {line}"
    assert len(body) == 12, proc.stdout
    assert "note:" not in proc.stdout, proc.stdout  # no scenario failed or was cut short
    assert re.search(r"^run time: \d+\.\d s$", proc.stdout, re.M), proc.stdout
