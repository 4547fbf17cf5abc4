"""The benchmark coordinator: scenarios of issue 6 against a real `twistd taskserver`,
each compared with the bare Klein / Autobahn ceiling measured in the same repetition.

    python -m bench                 full run (what `make bench` runs), writes bench/results.md
    python -m bench --mysql         the same against MariaDB (a database it creates and drops)
    python -m bench --smoke         toy sizes, a few seconds, no targets enforced
    python -m bench --profile DIR   also record py-spy profiles of the server per scenario
    python -m bench --taskd-path D  measure the taskd package in D (a patched copy) instead
    python -m bench --render JSON   re-write bench/results.md from saved numbers

Every loop is bounded (a fixed number of samples or a fixed duration, each wait with a
deadline), everything is on 127.0.0.1, and every process started here is stopped here.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import dbsetup, procs, report
from bench.dbsetup import agent_name
from bench.httpc import Http
from bench.procs import PYTHON, ROOT, ClientPool, Cores, ServerProc, baseline_server, listen_drops, taskd_server

KEY = "BENCHKEY"
HEARTBEAT_INTERVAL = 2.0  # taskd's default; the server runs with defaults
OUT = ROOT / "bench" / "out"


@dataclass(frozen=True)
class Sizes:
    reps: int = 3
    push_agents: int = 1000       # 1. agents connected during the push-latency samples
    push_samples: int = 200       # sequential POSTs per repetition
    fan_small: int = 1000         # 2. fan-out sizes
    fan_large: int = 5000         # (also the reconnect storm's size: 4.)
    fan_shots: int = 3            # fan-out POSTs per size per repetition (median taken)
    capacity: int = 10000         # 3.
    cap_windows: int = 3          # consecutive idle windows (the capacity "repetitions")
    cap_window: float = 60.0      # one window spans a whole task-list interval
    api_duration: float = 3.0     # 5. seconds measured per API load
    api_warmup: float = 0.5
    api_conc: int = 8             # connections in flight, taskd and baseline alike
    clients: int = 4              # load-client processes
    connect_conc: int = 64        # handshakes in flight per load-client process (set-up phases)
    storm_timeout: float = 30.0   # 3× the target: a miss costs this much of the run
    pause: float = 1.0            # quiet time after connecting, before measuring
    budget: float = 570.0         # seconds: capacity windows shrink (with a note) to end the run by then

    @property
    def agents(self) -> int:
        return max(self.push_agents, self.fan_large, self.capacity)


FULL = Sizes()
SMOKE = Sizes(reps=1, push_agents=20, push_samples=10, fan_small=10, fan_large=20, fan_shots=1, capacity=20,
              cap_windows=1, cap_window=2.5, api_duration=0.5, api_warmup=0.2, api_conc=4, clients=2,
              storm_timeout=15.0, pause=0.3)


def log(msg: str) -> None:
    elapsed = time.monotonic() - START
    sys.stderr.write(f"[bench {elapsed:6.1f}s] {msg}\n")
    sys.stderr.flush()


START = time.monotonic()


def task_body(name: str, route: dict) -> dict:
    return {"name": name, "metrics": {"/bench/*": 0},
            "config": {"/bench": {"param1": "value1", "param2": "value2"}},
            "interval": 60, "route": route, "enabled": True}


def by_ids(*ids: int) -> dict:
    return {"type": "byIds", "config": {"ids": list(ids)}}


def by_tags(*tags: str) -> dict:
    return {"type": "byTags", "config": {"tags": list(tags)}}


@dataclass
class Results:
    """values[key] = per-repetition values; base[key] = the baseline's per repetition."""

    values: dict[str, dict[int, Any]] = field(default_factory=dict)
    base: dict[str, dict[int, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    context: dict[str, list[Any]] = field(default_factory=dict)
    rep: int = 1  # the repetition (or capacity window) values are recorded for

    def add(self, key: str, value: Any) -> None:
        self.values.setdefault(key, {})[self.rep] = value

    def add_base(self, key: str, value: Any) -> None:
        self.base.setdefault(key, {})[self.rep] = value

    def add_context(self, key: str, value: Any) -> None:
        self.context.setdefault(key, []).append(value)

    def note(self, text: str) -> None:
        log("note: " + text)
        self.notes.append(text)


class Profiler:
    """py-spy attached to the server for one scenario (only with --profile)."""

    def __init__(self, outdir: Path | None) -> None:
        self.outdir = outdir
        self.exe = shutil.which("py-spy") or str(Path(PYTHON).with_name("py-spy"))
        if outdir is not None:
            if not os.path.exists(self.exe):
                raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
            outdir.mkdir(parents=True, exist_ok=True)
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, name: str, pid: int) -> None:
        if self.outdir is None:
            return
        out = self.outdir / f"{name}.txt"
        self.proc = await asyncio.create_subprocess_exec(
            self.exe, "record", "--pid", str(pid), "--format", "raw", "--rate", "250", "--nonblocking", "--threads",
            "--output", str(out), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True)
        await asyncio.sleep(0.5)  # attached before the scenario starts

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.proc = None


class Bench:
    def __init__(self, sizes: Sizes, db_kind: str, workdir: Path, smoke: bool, profile_dir: Path | None) -> None:
        self.s = sizes
        self.db_kind = db_kind
        self.workdir = workdir
        self.smoke = smoke
        self.cores = Cores()
        self.r = Results()
        self.pool: ClientPool | None = None
        self.servers: list[ServerProc] = []
        self.dbs: list[dbsetup.BenchDB] = []
        self.profiler = Profiler(profile_dir)
        self.rep_db: dbsetup.BenchDB | None = None
        self.only: set[str] | None = None

    # -- helpers ---------------------------------------------------------------------------

    async def server(self, proc: ServerProc) -> ServerProc:
        self.servers.append(proc)
        await proc.start()
        return proc

    async def stop(self, proc: ServerProc) -> float:
        took = await proc.stop()
        if proc in self.servers:
            self.servers.remove(proc)
        return took

    async def connect(self, port: int, indexes: range, path: str, wait: str, timeout: float = 300.0) -> float:
        """Connect agents `indexes`, each from its owning client; returns seconds taken."""
        t0 = time.monotonic()
        split = self.pool.split(indexes)
        replies = await asyncio.gather(*(
            c.call("connect", deadline=timeout + 30, port=port, path=path, key=KEY, wait=wait,
                   names=[agent_name(i) for i in idx], concurrency=self.s.connect_conc, timeout=timeout)
            for c, idx in split.items() if idx))
        failed = sum(r["failed"] for r in replies)
        if failed:
            errors: dict[str, int] = {}
            for r in replies:
                for k, v in r["errors"].items():
                    errors[k] = errors.get(k, 0) + v
            raise RuntimeError(f"{failed} of {len(indexes)} agents failed to connect: {errors}")
        return time.monotonic() - t0

    async def wait_open(self, want: int, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            n = sum(r["open"] for r in await self.pool.all("count"))
            if n == want or time.monotonic() > deadline:
                return n
            await asyncio.sleep(0.1)

    async def timed_delivery(self, tag: str, expected: dict, trigger) -> tuple[float | None, int, int, Any]:
        """Arm an expectation of taskAdd `tag` in each client (count per client), run
        `trigger` (a coroutine returning its result) at t0, and wait for every client.
        Returns (seconds from t0 to the last delivery or None, delivered, wanted, result)."""
        futures = []
        for client, count in expected.items():
            if count:
                futures.append(client.expect_future(tag))
        await asyncio.gather(*(c.call("expect", tag=tag, name=tag, count=n, timeout=60.0)
                               for c, n in expected.items() if n))
        t0 = time.monotonic()
        result = await trigger()
        done = await asyncio.wait_for(asyncio.gather(*futures), 90)
        delivered = sum(d["count"] for d in done)
        wanted = sum(d["wanted"] for d in done)
        if delivered < wanted or any(d["last"] is None for d in done):
            return None, delivered, wanted, result
        return max(d["last"] for d in done) - t0, delivered, wanted, result

    async def http_load(self, port: int, method: str, path: str, body: str = "", key: str | None = None) -> dict:
        args = [PYTHON, "-m", "bench.httpc", "--port", str(port), "--method", method, "--path", path,
                "--conc", str(self.s.api_conc), "--duration", str(self.s.api_duration),
                "--warmup", str(self.s.api_warmup)]
        if key:
            args += ["--header", f"Authorization: Bearer {key}"]
        if body:
            args += ["--body", body]
        proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, cwd=str(ROOT))
        out, _ = await asyncio.wait_for(proc.communicate(), self.s.api_duration + self.s.api_warmup + 60)
        result = json.loads(out)
        bad = {k: v for k, v in result["statuses"].items() if not k.startswith("2")}
        if bad or result["errors"]:
            self.r.note(f"{method} {path}: non-2xx answers {bad}, errors {result['errors']}")
        return result

    # -- baselines ---------------------------------------------------------------------------

    async def baseline_klein(self, rep: int) -> None:
        srv = await self.server(baseline_server(self.workdir, self.cores, "klein", f"bare-klein-r{rep}"))
        try:
            get = await self.http_load(srv.port, "GET", "/agent")
            body = json.dumps(task_body("echo-{n}", by_ids(1)))
            post = await self.http_load(srv.port, "POST", "/echo", body=body)
            self.r.add_base("api_get", get["rate"])
            self.r.add_base("api_get_p99", get["p99_ms"])
            self.r.add_base("api_post", post["rate"])
            self.r.add_base("api_post_p99", post["p99_ms"])
            log(f"bare Klein: GET {get['rate']:.0f} req/s (p99 {get['p99_ms']:.1f} ms), "
                f"POST echo {post['rate']:.0f} req/s (p99 {post['p99_ms']:.1f} ms)")
        finally:
            await self.stop(srv)

    async def baseline_ws(self, rep: int) -> None:
        s = self.s
        srv = await self.server(baseline_server(self.workdir, self.cores, "ws", f"bare-ws-r{rep}"))
        try:
            await asyncio.sleep(self.s.pause / 2)
            rss0 = srv.rss()
            http = Http(srv.port)
            for n, key in ((s.fan_small, "fan_small"), (s.fan_large, "fan_large")):
                have = 0 if n == s.fan_small else s.fan_small
                took = await self.connect(srv.port, range(have, n), "/ws", "open")
                if n == s.fan_large:
                    self.r.add_context("bare_connect_rate", (n - have) / took)
                times = []
                for shot in range(s.fan_shots):
                    tag = f"bare-{key}-r{rep}-{shot}"
                    expected = {c: len(idx) for c, idx in self.pool.split(range(n)).items()}
                    t, got, wanted, _ = await self.timed_delivery(
                        tag, expected, lambda: http.request("GET", f"/broadcast?name={tag}"))
                    if t is None:
                        raise RuntimeError(f"bare broadcast reached {got} of {wanted} clients")
                    times.append(t)
                    await asyncio.sleep(s.pause / 5)
                self.r.add_base(key, statistics.median(times) * 1000)
                # context: the same broadcast with a prepared frame (not the baseline)
                tag = f"bare-{key}-r{rep}-prepared"
                expected = {c: len(idx) for c, idx in self.pool.split(range(n)).items()}
                t, _, _, _ = await self.timed_delivery(
                    tag, expected, lambda: http.request("GET", f"/broadcast?name={tag}&prepared=1"))
                self.r.add_context(f"bare_prepared_{key}", t * 1000 if t is not None else None)
                log(f"bare Autobahn broadcast to {n}: {', '.join(f'{t * 1000:.1f}' for t in times)} ms "
                    f"(prepared frame: {t * 1000 if t else float('nan'):.1f} ms)")
            http.close()
            rss1 = srv.rss()
            self.r.add_base("cap_rss", (rss1 - rss0) / s.fan_large / 1024)
            # The bare ceiling of a reconnect storm: restart, then every client at once.
            await self.stop(srv)
            await self.wait_open(0, timeout=15)
            srv2 = await self.server(ServerProc(f"bare-ws-r{rep}-restarted", srv.cmd, self.workdir, self.cores,
                                                srv.port))
            srv = srv2
            lists = self.pool.split(range(s.fan_large))
            drops0 = listen_drops()
            replies = await asyncio.gather(*(
                c.call("storm", deadline=s.storm_timeout + 30, port=srv.port, path="/ws", key=KEY, wait="open",
                       lists={agent_name(i): None for i in idx}, timeout=s.storm_timeout)
                for c, idx in lists.items() if idx))
            ok = sum(r["ok"] for r in replies)
            t = max(r["last_ok"] or 0 for r in replies) - min(r["t0"] for r in replies)
            if ok < s.fan_large:
                self.r.note(f"bare Autobahn storm: only {ok} of {s.fan_large} reconnected")
            self.r.add_base("storm", t)
            if drops0 is not None:
                self.r.add_context("bare_storm_listen_drops", listen_drops() - drops0)
            log(f"bare Autobahn: {(rss1 - rss0) / s.fan_large / 1024:.1f} KB per idle client; "
                f"{s.fan_large} upgrades at once in {t:.2f} s")
        finally:
            await self.pool.all("drop")
            await self.stop(srv)

    # -- taskd -------------------------------------------------------------------------------

    async def taskd_rep(self, rep: int) -> None:
        s = self.s
        db = self.rep_db = dbsetup.create(self.db_kind, str(self.workdir), s.agents, s.fan_small, s.fan_large)
        self.dbs.append(db)
        srv = await self.server(taskd_server(self.workdir, self.cores, db, KEY, f"taskd-r{rep}"))
        http = Http(srv.port, KEY)
        created: list[tuple[int, str, Any]] = []  # (task id, kind, agent index or tag)
        try:
            # 1. push latency ------------------------------------------------------------
            took = await self.connect(srv.port, range(s.push_agents), "/api/v1/socket/{name}/1", "taskList")
            log(f"taskd: {s.push_agents} agents connected in {took:.1f} s")
            self.r.add_context("taskd_connect_rate_1k", s.push_agents / took)
            await asyncio.sleep(s.pause)
            await self.profiler.start(f"push-r{rep}", srv.pid)
            lat, http_ms = [], []
            for k in range(s.push_samples):
                i = (k * 7919) % s.push_agents
                tag = f"push-r{rep}-{k}"
                client = self.pool.owner(i)
                agent_id = db.ids[agent_name(i)]

                async def post(tag=tag, agent_id=agent_id):
                    t = time.monotonic()
                    status, body = await http.request("POST", "/api/v1/tasks", task_body(tag, by_ids(agent_id)))
                    if status != 200:
                        raise RuntimeError(f"POST /api/v1/tasks: {status} {body}")
                    return body["body"]["id"], time.monotonic() - t

                t, got, _, (task_id, http_t) = await self.timed_delivery(tag, {client: 1}, post)
                if t is None:
                    raise RuntimeError(f"taskAdd {tag} never reached agent {i}")
                lat.append(t * 1000)
                http_ms.append(http_t * 1000)
                created.append((task_id, "ids", i))
            await self.profiler.stop()
            lat.sort()
            p50 = lat[len(lat) // 2]
            p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
            self.r.add("push_p50", p50)
            self.r.add("push_p99", p99)
            self.r.add_context("push_http_p50", sorted(http_ms)[len(http_ms) // 2])
            log(f"taskd push latency ({s.push_samples} POSTs, {s.push_agents} agents): p50 {p50:.1f} ms, "
                f"p99 {p99:.1f} ms, max {lat[-1]:.1f} ms (HTTP answer p50 {sorted(http_ms)[len(http_ms) // 2]:.1f} ms)")

            # 2. fan-out -------------------------------------------------------------------
            for n, key, tag_name in ((s.fan_small, "fan_small", "k1"), (s.fan_large, "fan_large", "k5")):
                have = max(s.push_agents, s.fan_small) if n == s.fan_large else s.push_agents
                if n > have:
                    took = await self.connect(srv.port, range(have, n), "/api/v1/socket/{name}/1", "taskList")
                    log(f"taskd: {n - have} more agents connected in {took:.1f} s ({(n - have) / took:.0f}/s)")
                    self.r.add_context("taskd_connect_rate", (n - have) / took)
                    await asyncio.sleep(s.pause)
                await self.profiler.start(f"fanout{n}-r{rep}", srv.pid)
                times = []
                for shot in range(s.fan_shots):
                    tag = f"fan{n}-r{rep}-{shot}"
                    expected = {c: len(idx) for c, idx in self.pool.split(range(n)).items()}

                    async def post(tag=tag, tag_name=tag_name):
                        status, body = await http.request("POST", "/api/v1/tasks", task_body(tag, by_tags(tag_name)),
                                                          timeout=60)
                        if status != 200:
                            raise RuntimeError(f"POST /api/v1/tasks: {status} {body}")
                        return body["body"]["id"]

                    t, got, wanted, task_id = await self.timed_delivery(tag, expected, post)
                    created.append((task_id, "tag", tag_name))
                    if t is None:
                        raise RuntimeError(f"fan-out {tag} reached {got} of {wanted} agents")
                    times.append(t)
                    await asyncio.sleep(s.pause / 2)
                await self.profiler.stop()
                self.r.add(key, statistics.median(times) * 1000)
                log(f"taskd fan-out to {n}: {', '.join(f'{t * 1000:.1f}' for t in times)} ms")

            # 4. reconnect storm -------------------------------------------------------------
            n = s.fan_large
            limit = {"k1": s.fan_small, "k5": s.fan_large}
            expect: dict[str, list[int]] = {agent_name(i): [] for i in range(n)}
            for task_id, kind, target in created:
                if kind == "ids":
                    expect[agent_name(target)].append(task_id)
                else:
                    for i in range(limit[target]):
                        expect[agent_name(i)].append(task_id)
            http.close()
            down = await self.stop(srv)
            closed = await self.wait_open(0, timeout=15)
            self.r.add_context("taskd_shutdown_s", down)
            log(f"taskd: server with {n} agents stopped in {down:.1f} s ({closed} sockets still open)")
            srv = await self.server(ServerProc(f"taskd-r{rep}-restarted", srv.cmd, self.workdir, self.cores, srv.port,
                                               env=srv.env))
            await self.profiler.start(f"storm-r{rep}", srv.pid)
            split = self.pool.split(range(n))
            drops0 = listen_drops()
            replies = await asyncio.gather(*(
                c.call("storm", deadline=s.storm_timeout + 30, port=srv.port, path="/api/v1/socket/{name}/1",
                       key=KEY, wait="taskList", lists={agent_name(i): sorted(expect[agent_name(i)]) for i in idx},
                       timeout=s.storm_timeout)
                for c, idx in split.items() if idx))
            await self.profiler.stop()
            ok = sum(r["ok"] for r in replies)
            bad = sum(r["bad"] for r in replies)
            missing = sum(r["missing"] for r in replies)
            t0 = min(r["t0"] for r in replies)
            last = max((r["last_ok"] or t0) for r in replies)
            if drops0 is not None:
                self.r.add_context("storm_listen_drops", listen_drops() - drops0)
            done_at = sorted(t - t0 for r in replies for t in r["done_at"])
            self.r.add_context("storm_ready_at_10s", sum(1 for t in done_at if t <= 10.0))
            if done_at:
                self.r.add_context("storm_half_s", done_at[len(done_at) // 2] if len(done_at) * 2 >= n else None)
            online, sessions = db.online_counts()
            retries = sum(r.get("retries", 0) for r in replies)
            self.r.add_context("storm_retries", retries)
            log(f"taskd storm: ready after 2/5/10/20 s: "
                f"{', '.join(str(sum(1 for t in done_at if t <= x)) for x in (2, 5, 10, 20))} of {n}; "
                f"{self.r.context.get('storm_listen_drops', ['?'])[-1]} SYNs dropped by a full accept queue; "
                f"{retries} reconnects after a failed attempt")
            if ok == n:
                self.r.add("storm", last - t0)
                log(f"taskd storm: {n} agents online with their correct taskList in {last - t0:.2f} s "
                    f"(DB: {online} online, {sessions} sessions)")
            else:
                examples = [e for r in replies for e in r["bad_examples"]][:2]
                self.r.add("storm", None)
                errors: dict[str, int] = {}
                for r in replies:
                    for k, v in r["errors"].items():
                        errors[k] = errors.get(k, 0) + v
                refused = sum(r["refused"] for r in replies)
                self.r.note(f"rep {rep}: reconnect storm: only {ok} of {n} agents had their correct taskList within "
                            f"{s.storm_timeout:.0f} s ({bad} a wrong one, {missing} none yet; {online} marked online in "
                            f"the database; connect errors {errors or 'none'}, {refused} upgrades refused)"
                            + (f"; e.g. {examples}" if examples else ""))
            self.r.add_context("storm_ok", ok)
        finally:
            http.close()
            await self.stop(srv)
            await self.pool.all("drop")

    async def taskd_api(self, rep: int) -> None:
        """5. API, on a fresh server process with one routed agent connected."""
        db = self.rep_db
        if db is None:  # the scenarios before failed to set one up
            db = dbsetup.create(self.db_kind, str(self.workdir), self.s.agents, self.s.fan_small, self.s.fan_large)
            self.dbs.append(db)
        srv = await self.server(taskd_server(self.workdir, self.cores, db, KEY, f"taskd-api-r{rep}"))
        try:
            await self.connect(srv.port, range(1), "/api/v1/socket/{name}/1", "taskList")
            agent_id = db.ids[agent_name(0)]
            await self.profiler.start(f"api-get-r{rep}", srv.pid)
            get = await self.http_load(srv.port, "GET", f"/api/v1/agents/{agent_id}", key=KEY)
            await self.profiler.stop()
            await self.profiler.start(f"api-post-r{rep}", srv.pid)
            post = await self.http_load(srv.port, "POST", "/api/v1/tasks", key=KEY,
                                        body=json.dumps(task_body("api-{n}", by_ids(agent_id))))
            await self.profiler.stop()
            self.r.add("api_get", get["rate"])
            self.r.add("api_get_p99", get["p99_ms"])
            self.r.add("api_post", post["rate"])
            self.r.add("api_post_p99", post["p99_ms"])
            log(f"taskd API: GET /agents/<id> {get['rate']:.0f} req/s (p99 {get['p99_ms']:.1f} ms), "
                f"POST /tasks {post['rate']:.0f} req/s (p99 {post['p99_ms']:.1f} ms)")
        finally:
            await self.stop(srv)
            await self.pool.all("drop")

    # -- 3. capacity ---------------------------------------------------------------------------

    async def capacity(self) -> None:
        s = self.s
        db = dbsetup.create(self.db_kind, str(self.workdir), s.agents, s.fan_small, s.fan_large)
        self.dbs.append(db)
        srv = await self.server(taskd_server(self.workdir, self.cores, db, KEY, "taskd-capacity"))
        http = Http(srv.port, KEY)
        try:
            # Two tasks every agent runs, so each periodic taskList carries real tasks.
            for k in range(2):
                status, body = await http.request("POST", "/api/v1/tasks", task_body(f"cap-{k}", by_tags("all")))
                assert status == 200, body
            http.close()
            await asyncio.sleep(2 * s.pause)
            rss_idle = srv.rss()
            c0, t0 = srv.cpu(), time.monotonic()
            await asyncio.sleep(2 * s.pause)
            self.r.add_context("cpu_no_agents", (srv.cpu() - c0) / (time.monotonic() - t0) * 100)
            took = await self.connect(srv.port, range(s.capacity), "/api/v1/socket/{name}/1", "taskList",
                                      timeout=600)
            log(f"taskd: {s.capacity} agents connected in {took:.1f} s ({s.capacity / took:.0f}/s)")
            self.r.add_context("taskd_connect_rate_cap", s.capacity / took)
            # settle: until the server's CPU over a pause is below half a core (bounded)
            for _ in range(20):
                c0 = srv.cpu()
                await asyncio.sleep(s.pause)
                if srv.cpu() - c0 < 0.5 * s.pause:
                    break
            window = s.cap_window
            left = s.budget - (time.monotonic() - START) - 15
            if left < s.cap_windows * window:
                window = max(min(20.0, window), left / s.cap_windows)
                self.r.note(f"capacity idle windows shortened from {s.cap_window:.0f} s to {window:.0f} s to end "
                            f"the run within its time budget; a window shorter than the 60 s taskList interval "
                            f"may miss or catch a taskList round")
            await self.profiler.start("capacity-idle", srv.pid)
            for w in range(s.cap_windows):
                self.r.rep = w + 1
                await self.pool.all("hb_reset", late_after=2 * HEARTBEAT_INTERVAL)
                c0, t0 = srv.cpu(), time.monotonic()
                await asyncio.sleep(window)
                c1, t1 = srv.cpu(), time.monotonic()
                hb = await self.pool.all("hb_report")
                rss = srv.rss()
                cpu = (c1 - c0) / (t1 - t0) * 100
                open_ = sum(h["open"] for h in hb)
                late = sum(h["late"] for h in hb)
                max_gap = max(h["max_gap"] or 0 for h in hb)
                beats = sum(h["beats"] for h in hb)
                per_agent = (rss - rss_idle) / s.capacity / 1024
                self.r.add("cap_rss", per_agent)
                self.r.add("cap_cpu", cpu)
                self.r.add("cap_hb", max_gap)
                self.r.add_context("cap_late", late)
                self.r.add_context("cap_beats", beats)
                if open_ != s.capacity:
                    self.r.note(f"capacity window {w + 1}: only {open_} of {s.capacity} connections open")
                log(f"taskd capacity window {w + 1}/{s.cap_windows} ({t1 - t0:.0f} s, {open_} agents): CPU {cpu:.1f} %, "
                    f"RSS {rss / 2**20:.0f} MiB (idle {rss_idle / 2**20:.0f} MiB, {per_agent:.1f} KB/agent), "
                    f"{beats} heartbeats, worst gap {max_gap:.2f} s, {late} later than "
                    f"{2 * HEARTBEAT_INTERVAL:.0f} s")
            await self.profiler.stop()
        finally:
            http.close()
            await self.stop(srv)
            await self.pool.all("drop")

    # -- the whole run ---------------------------------------------------------------------------

    async def run(self) -> Results:
        self.cores.pin_self_to_load()
        self.pool = await ClientPool(self.s.clients).start()
        try:
            for rep in range(1, self.s.reps + 1):
                log(f"repetition {rep}/{self.s.reps}")
                self.r.rep = rep
                self.rep_db = None
                for name, step in (("klein", self.baseline_klein), ("ws", self.baseline_ws),
                                   ("taskd", self.taskd_rep), ("api", self.taskd_api)):
                    if self.only is None or name in self.only:
                        await self.guard(step, rep)
            if self.only is None or "capacity" in self.only:
                await self.guard(lambda _: self.capacity(), 0)
        finally:
            await self.pool.quit()
            for srv in list(self.servers):
                srv.kill()
            for db in self.dbs:
                try:
                    db.drop()
                except Exception as exc:
                    self.r.note(f"could not drop {db.label}: {exc}")
        return self.r

    async def guard(self, step, rep: int) -> None:
        try:
            await step(rep)
        except Exception as exc:
            await self.profiler.stop()
            name = getattr(step, "__name__", "capacity")
            self.r.note(f"{name} (rep {rep}) failed: {type(exc).__name__}: {str(exc)[:300]}")
            traceback.print_exc(file=sys.stderr)
            for srv in list(self.servers):
                await self.stop(srv)
            try:
                await self.pool.all("drop", deadline=30)
            except Exception:
                pass


def raise_nofile(needed: int) -> tuple[int, int, int, str | None]:
    """Raise the soft open-file limit to the hard one; children inherit it. Returns
    (soft before, hard, soft now, note if `needed` does not fit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        target = soft
    note = None
    if target < needed:
        note = f"open-file limit {target} (hard {hard}) is below the {needed} descriptors the server needs"
    return soft, hard, target, note


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes, a few seconds, targets not enforced")
    ap.add_argument("--mysql", action="store_true", help="run taskd on MariaDB at 127.0.0.1:3306 (root)")
    ap.add_argument("--out", help="results file (default: bench/results.md, or none with --smoke or --only)")
    ap.add_argument("--workdir", help="where server logs and databases go (default: bench/out/<timestamp>)")
    ap.add_argument("--profile", metavar="DIR", help="record a py-spy profile of the server per scenario")
    ap.add_argument("--reps", type=int, help="repetitions (default 3)")
    ap.add_argument("--cap-window", type=float, help="seconds per capacity idle window (default 60)")
    ap.add_argument("--taskd-path", metavar="DIR", help="run the server with the taskd package in DIR "
                    "(a patched copy, to measure a fix before it lands)")
    ap.add_argument("--only", help="comma-separated steps to run (klein,ws,taskd,api,capacity); for development")
    ap.add_argument("--strict", action="store_true", help="exit 3 when a target is missed")
    ap.add_argument("--render", metavar="JSON", help="only re-write the results file from a run's saved "
                    "numbers (e.g. bench/results.json) with the current bench/analysis.md")
    a = ap.parse_args(argv)
    global START
    START = time.monotonic()
    if a.render:
        return render(Path(a.render), Path(a.out or ROOT / "bench" / "results.md"))
    if a.taskd_path:
        procs.TASKD_PATH = str(Path(a.taskd_path).resolve())

    sizes = SMOKE if a.smoke else FULL
    if a.reps:
        sizes = replace(sizes, reps=a.reps)
    if a.cap_window:
        sizes = replace(sizes, cap_window=a.cap_window)
    soft, hard, now_soft, fd_note = raise_nofile(sizes.capacity + 500)
    notes = []
    if fd_note:
        fit = max(100, now_soft - 500)
        sizes = replace(sizes, capacity=min(sizes.capacity, fit), fan_large=min(sizes.fan_large, fit))
        notes.append(f"{fd_note}: capacity scaled down to {sizes.capacity} agents "
                     f"(raise the hard limit, e.g. `ulimit -Hn 20000` as root, for the full size)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = Path(a.workdir) if a.workdir else OUT / (("smoke-" if a.smoke else "run-") + stamp)
    workdir.mkdir(parents=True, exist_ok=True)
    machine = report.machine(soft, hard, now_soft)
    log(f"{'smoke' if a.smoke else 'full'} run on {'MariaDB' if a.mysql else 'sqlite'}; logs in {workdir}")
    bench = Bench(sizes, "mysql" if a.mysql else "sqlite", workdir, a.smoke, Path(a.profile) if a.profile else None)
    if a.only:
        bench.only = set(a.only.split(","))
    if a.taskd_path:
        notes.append(f"the server ran the taskd package in {a.taskd_path}, not the installed one")
    log(bench.cores.describe())
    results = asyncio.run(bench.run())
    results.notes[:0] = notes
    machine["load_end"] = report.loadavg()
    machine["duration"] = time.monotonic() - START
    table, verdicts = report.table(results, sizes, smoke=a.smoke, db="MariaDB" if a.mysql else "sqlite",
                                   steps=bench.only)
    print(table)
    for n in results.notes:
        print(f"note: {n}")
    print(f"run time: {machine['duration']:.1f} s")  # the smoke mode's cost, watched here, not in a test
    saved = {"results": results.__dict__, "sizes": sizes.__dict__, "machine": machine,
             "cores": bench.cores.describe(), "argv": list(argv if argv is not None else sys.argv[1:]),
             "mysql": a.mysql, "smoke": a.smoke, "workdir": str(workdir)}
    (workdir / "results.json").write_text(json.dumps(saved, indent=1))
    # A partial run (--only) never replaces the committed results unless --out asks for it.
    out = a.out or (None if a.smoke or a.only else str(ROOT / "bench" / "results.md"))
    if out:
        Path(out).with_suffix(".json").write_text(json.dumps(saved, indent=1))
        Path(out).write_text(report.markdown(table, results, sizes, machine, saved["cores"], saved["argv"],
                                             mysql=a.mysql, workdir=workdir))
        log(f"wrote {out} (and its numbers to {Path(out).with_suffix('.json').name})")
    failed = any(v == "failed" for v in verdicts.values())
    if failed:
        return 1
    if a.strict and any(v == "MISSED" for v in verdicts.values()):
        return 3
    return 0


def render(saved_path: Path, out: Path) -> int:
    """Re-write a results file from saved numbers (after editing bench/analysis.md)."""
    saved = json.loads(saved_path.read_text())
    r = saved["results"]
    results = Results(values={k: {int(rep): v for rep, v in d.items()} for k, d in r["values"].items()},
                      base={k: {int(rep): v for rep, v in d.items()} for k, d in r["base"].items()},
                      notes=r["notes"], context=r["context"])
    sizes = Sizes(**saved["sizes"])
    db = "MariaDB" if saved["mysql"] else "sqlite"
    only = next((v.split("=", 1)[1] if v.startswith("--only=") else n for v, n in
                 zip(saved["argv"], saved["argv"][1:] + [""]) if v.startswith("--only")), None)
    table, _ = report.table(results, sizes, smoke=saved["smoke"], db=db,
                            steps=set(only.split(",")) if only else None)
    out.write_text(report.markdown(table, results, sizes, saved["machine"], saved["cores"], saved["argv"],
                                   mysql=saved["mysql"], workdir=Path(saved["workdir"])))
    print(table)
    log(f"re-wrote {out} from {saved_path}")
    return 0
