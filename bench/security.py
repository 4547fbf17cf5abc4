"""Security figures (issue 12): what a hostile tenant can make one real task-server do,
measured on a real `twistd taskserver`. Writes bench/security.md.

1. Auth flood: 5,000 requests with random keys at once against a slow key check (each
   answer takes `--auth-delay` s), while a client with a valid, cached key keeps calling:
   the most checks in flight at the endpoint (target: <= auth-max-concurrent), the
   server's RSS growth, and the valid key's answers (target: all 200).
2. Catalog routing: `any` task creates with `--agents` public online agents advertising
   `--records` metrics each (the hostile catalog of the issue: 200 x 5,000): p50/p99 of
   POST /api/v1/tasks.
3. schemathesis against the server's own OpenAPI document: requests sent, failures
   (target 0), with the checks tests/integration/test_openapi_fuzz.py uses.

The key check is an emulator of grafana.com's `POST /api/api-keys/check` (asyncio, in
this process): grafana.com cannot be reached here. Everything else is real.

Usage: python -m bench.security [--quick] (or `make bench-security`).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import parse_qs

import sqlalchemy as sa

from bench.httpc import Http
from bench.procs import TWISTD, Cores, ServerProc, free_port
from taskd.db import migrate, models as m
from taskd.db.engine import create_engine
from taskd.timeutil import utcnow

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "security.md"
ST = str(Path(sys.executable).with_name("st"))
ADMIN_KEY = "bench-admin-key"
VALID_KEY = "bench-valid-org-2-key"
MYSQL = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}


class SlowKeyCheck:
    """An emulator of grafana.com's key check (not grafana.com): answers after `delay` s,
    200 for VALID_KEY, 401 for anything else; counts the checks in flight."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.in_flight = 0
        self.peak = 0
        self.requests = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> "SlowKeyCheck":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=4096)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
                body = await reader.readexactly(length)
                self.requests += 1
                self.in_flight += 1
                self.peak = max(self.peak, self.in_flight)
                await asyncio.sleep(self.delay)
                self.in_flight -= 1
                token = parse_qs(body.decode()).get("token", [""])[0]
                if token == VALID_KEY:
                    status, payload = "200 OK", {"orgId": 2, "orgName": "bench", "role": "Editor"}
                else:
                    status, payload = "401 Unauthorized", {"message": "invalid API key"}
                data = json.dumps(payload).encode()
                writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, AttributeError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def server_ini(workdir: Path, port: int, auth_port: int, db_type: str, dsn: str) -> Path:
    ini = workdir / f"server-{port}.ini"
    ini.write_text(f"addr = tcp:{port}:interface=127.0.0.1\nlog-level = 2\ndb-type = {db_type}\n"
                   f"db-connect-str = {dsn}\nadmin-key = {ADMIN_KEY}\n"
                   f"auth-endpoint = http://127.0.0.1:{auth_port}\nexchange =\n")
    return ini


async def start_server(workdir: Path, cores: Cores, auth_port: int, db_type: str = "sqlite3",
                       dsn: str | None = None) -> ServerProc:
    port = free_port()
    dsn = dsn or str(workdir / f"taskd-{port}.db")
    ini = server_ini(workdir, port, auth_port, db_type, dsn)
    proc = ServerProc(f"taskd-{port}", [TWISTD, "--nodaemon", "--pidfile=", "taskserver", "--config", str(ini)],
                      workdir, cores, port)
    return await proc.start()


# -- 1. auth flood -----------------------------------------------------------------------

async def auth_flood(workdir: Path, cores: Cores, n_keys: int, delay: float, conns: int) -> dict:
    check = await SlowKeyCheck(delay).start()
    server = await start_server(workdir, cores, check.port)
    try:
        valid = Http(server.port, VALID_KEY)
        status, _ = await valid.request("GET", "/api/v1/agents")
        assert status == 200, status
        rss0 = server.rss()
        valid_statuses: list[int] = []
        flood_statuses: dict[int, int] = {}
        done = asyncio.Event()

        async def keep_calling() -> None:
            while not done.is_set():
                t0 = time.monotonic()
                st, _ = await valid.request("GET", "/api/v1/agents", timeout=60)
                valid_statuses.append(st)
                await asyncio.sleep(max(0.0, 0.05 - (time.monotonic() - t0)))

        keys = iter(f"random-{uuid.uuid4().hex}" for _ in range(n_keys))

        async def flood_worker() -> None:
            http = Http(server.port)
            for key in keys:
                http.key = key
                try:
                    st, _ = await http.request("GET", "/api/v1/agents", timeout=120)
                except (ConnectionError, asyncio.TimeoutError):
                    st = 0
                flood_statuses[st] = flood_statuses.get(st, 0) + 1
            http.close()

        caller = asyncio.ensure_future(keep_calling())
        t0 = time.monotonic()
        await asyncio.gather(*(flood_worker() for _ in range(conns)))
        elapsed = time.monotonic() - t0
        peak_rss = server.rss()
        done.set()
        await caller
        valid.close()
        return {"keys": n_keys, "conns": conns, "delay": delay, "elapsed": elapsed, "peak_in_flight": check.peak,
                "checks_sent": check.requests, "rss_growth_mb": (peak_rss - rss0) / 2**20,
                "valid_calls": len(valid_statuses), "valid_non_200": sum(s != 200 for s in valid_statuses),
                "flood_statuses": dict(sorted(flood_statuses.items()))}
    finally:
        await server.stop()
        check.close()


# -- 2. catalog routing ------------------------------------------------------------------

def seed_catalogs(dsn_engine: sa.Engine, agents: int, records: int) -> None:
    """`agents` public agents of org 2, online, each advertising `records` metrics, none
    of which a task asks for but one (the worst case: scan them all to find no match)."""
    now = utcnow()
    with dsn_engine.begin() as conn:
        conn.execute(sa.insert(m.agent), [
            {"org_id": 2, "name": f"hostile-{i:04d}", "enabled": True, "enabled_change": now, "public": True,
             "online": True, "online_change": now, "created": now, "updated": now} for i in range(agents)])
        ids = [r[0] for r in conn.execute(sa.select(m.agent.c.id).where(m.agent.c.org_id == 2))]
        for agent_id in ids:
            conn.execute(sa.insert(m.agent_metric), [
                {"agent_id": agent_id, "namespace": f"/hostile/{agent_id}/{j:05d}/*", "version": 1, "created": now}
                for j in range(records - 1)] + [
                {"agent_id": agent_id, "namespace": "/raintank/apps/http/*/status_code", "version": 1, "created": now}])


async def catalog_routing(workdir: Path, cores: Cores, agents: int, records: int, creates: int) -> dict:
    import pymysql
    name = f"taskd_bench_sec_{uuid.uuid4().hex[:8]}"
    conn = pymysql.connect(**MYSQL)
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    conn.close()
    dsn = f"root:@tcp(127.0.0.1:3306)/{name}?charset=utf8"
    engine = create_engine("mysql", dsn, pool_size=1)
    check = await SlowKeyCheck(0.0).start()
    try:
        migrate.upgrade(engine)
        t0 = time.monotonic()
        seed_catalogs(engine, agents, records)
        seeded = time.monotonic() - t0
        server = await start_server(workdir, cores, check.port, "mysql", dsn)
        try:
            admin = Http(server.port, ADMIN_KEY)
            times = []
            for i in range(creates):
                body = {"name": f"any-{i}", "interval": 60, "enabled": True, "route": {"type": "any"},
                        "metrics": {"/raintank/apps/http/*": 0}}
                t1 = time.monotonic()
                st, _ = await admin.request("POST", "/api/v1/tasks", body, timeout=300)
                times.append(time.monotonic() - t1)
                assert st == 200, st
            admin.close()
        finally:
            await server.stop()
        times.sort()
        return {"agents": agents, "records": records, "creates": creates, "seed_s": seeded,
                "p50_ms": 1000 * statistics.median(times),
                "p99_ms": 1000 * times[min(len(times) - 1, int(len(times) * 0.99))]}
    finally:
        engine.dispose()
        check.close()
        conn = pymysql.connect(**MYSQL)
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


# -- 3. schemathesis ---------------------------------------------------------------------

async def fuzz(workdir: Path, cores: Cores, max_examples: int) -> dict:
    from tests.integration.test_openapi_fuzz import CHECKS, CONFIG
    check = await SlowKeyCheck(0.0).start()
    server = await start_server(workdir, cores, check.port)
    try:
        report = workdir / "st.xml"
        done = await asyncio.to_thread(subprocess.run, [
            ST, "--no-color", "--config-file", str(CONFIG), "run",
            f"http://127.0.0.1:{server.port}/api/v1/openapi.json", "-H", f"Authorization: Bearer {VALID_KEY}",
            "--checks", CHECKS, "--max-examples", str(max_examples), "--seed", "20261202",
            "--report", "junit", "--report-junit-path", str(report)],
            capture_output=True, text=True, timeout=1800, cwd=str(workdir))
    finally:
        await server.stop()
        check.close()
    generated = re.search(r"(\d+) generated", done.stdout)
    failures = re.search(r"(\d+) found (\d+) unique failures", done.stdout)
    return {"max_examples": max_examples, "cases": int(generated.group(1)) if generated else None,
            "failures": int(failures.group(2)) if failures else 0, "exit": done.returncode,
            "summary": done.stdout[-1500:]}


# -- report -----------------------------------------------------------------------------

def report(results: dict, args: argparse.Namespace, cores: Cores) -> str:
    a, c, f = results["auth"], results["catalog"], results["fuzz"]
    cap = 20
    lines = [
        "# Security figures (issue 12)", "",
        f"Written by `python -m bench.security{' --quick' if args.quick else ''}` on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, Python {platform.python_version()}; "
        f"{cores.describe()}. The key check is an emulator of grafana.com's (in the bench process).", "",
        "| figure | measured | target | |", "|---|---|---|---|",
        f"| auth flood: checks in flight at the endpoint, at most | {a['peak_in_flight']} | ≤ {cap} (auth-max-concurrent) "
        f"| {'met' if a['peak_in_flight'] <= cap else '**MISSED**'} |",
        f"| auth flood: valid cached key's answers that were not 200 | {a['valid_non_200']} of {a['valid_calls']} | 0 "
        f"| {'met' if a['valid_non_200'] == 0 else '**MISSED**'} |",
        f"| auth flood: server RSS growth | {a['rss_growth_mb']:.1f} MiB | reported | |",
        f"| auth flood: checks sent for {a['keys']:,} random keys | {a['checks_sent']:,} | reported | |",
        f"| `any` create, {c['agents']} public agents × {c['records']:,} metrics: p50 | {c['p50_ms']:.1f} ms | reported | |",
        f"| `any` create, same: p99 | {c['p99_ms']:.1f} ms | reported | |",
        f"| schemathesis: cases sent | {f['cases']} | every operation | |",
        f"| schemathesis: failures | {f['failures']} | 0 | {'met' if f['failures'] == 0 and f['exit'] == 0 else '**MISSED**'} |",
        "", "## Auth flood", "",
        f"{a['keys']:,} requests with random keys over {a['conns']} connections at once; the emulated check answers "
        f"each after {a['delay']} s. Answers to the random keys by status: {a['flood_statuses']} (503: the queue "
        f"was full, retry; 401: checked, invalid). Took {a['elapsed']:.1f} s. Meanwhile one client with a valid key "
        f"(cached before the flood) called `GET /api/v1/agents` every 50 ms: {a['valid_calls']} calls.",
        "", "## Catalog routing", "",
        f"{c['agents']} public agents of another org, online, each with {c['records']:,} catalog records (seeded in "
        f"{c['seed_s']:.0f} s straight into MariaDB); {c['creates']} `any` tasks created one after the other by the "
        "admin org, each asking for `/raintank/apps/http/*` (every agent has one matching record, last). "
        "Agents' namespaces are compared element by element, never compiled as patterns.",
        "", "## schemathesis", "", "```", f["summary"].strip(), "```", "",
    ]
    return "\n".join(lines)


async def amain(args: argparse.Namespace) -> None:
    cores = Cores()
    cores.pin_self_to_load()
    workdir = Path(tempfile.mkdtemp(prefix="taskd-secbench-"))
    results = {
        "auth": await auth_flood(workdir, cores, 1000 if args.quick else 5000, args.auth_delay, 500),
        "catalog": await catalog_routing(workdir, cores, 20 if args.quick else args.agents,
                                         500 if args.quick else args.records, 20 if args.quick else 100),
        "fuzz": await fuzz(workdir, cores, 10 if args.quick else 100),
    }
    text = report(results, args, cores)
    print(text)
    if not args.quick:
        OUT.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, print only (a smoke run)")
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--auth-delay", type=float, default=0.5, help="seconds each emulated key check takes")
    asyncio.run(amain(parser.parse_args()))


if __name__ == "__main__":
    main()
