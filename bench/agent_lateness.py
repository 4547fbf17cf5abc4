"""The agent-side benchmark of issue 7: does a 1,000-task built-in agent keep its schedule?

    python -m bench.agent_lateness            1,000 tcp tasks every 10 s, a 60 s window (`make bench-agent`),
                                              writes bench/agent-results.md
    python -m bench.agent_lateness --smoke    20 tasks every 1 s, a 5 s window, no results file
    python -m bench.agent_lateness --tasks N --interval S --window W [--out FILE] [--workdir DIR]

What runs (all on 127.0.0.1, every process started here is stopped here, by its pid):

* a real `twistd taskserver` (sqlite, fresh database with one pre-registered agent, the
  admin key) on the *load* core: it is idle once the tasks exist;
* a real `twistd taskagent` (executor = builtin, publisher = tsdbgw, stats to statsd)
  pinned alone to the other core;
* in this coordinator (pinned to the load core, asyncio): the collector's target (a TCP
  listener that accepts and closes), a minimal tsdb-gw sink (answers 200 to
  `POST /metrics`, decodes each body to count metrics and distinct series) and a UDP
  statsd listener collecting the agent's `builtin.lateness` / `builtin.duration` timings
  and `builtin.runs` / `builtin.skipped` / `builtin.failures` counts.

N tasks (taskType tcp, routed byIds to the agent) are created *before* the agent starts,
paced evenly over one interval: a task's phase is `created % interval` in whole seconds,
so this spreads them as tasks created over time would be (N/S tasks share each second's
slot and fire in the same reactor turn). Once every task has published (N distinct
`connect_time` series at the sink), the window starts: lateness percentiles from the
statsd timings that arrive in it, runs per second against N/S, skipped and failed runs,
the agent's CPU (utime+stime from /proc over the window) and its RSS at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import dbsetup, report
from bench.dbsetup import agent_name
from bench.httpc import Http, dechunk
from bench.procs import ROOT, TWISTD, Cores, ServerProc, cpu_seconds, free_port, rss_bytes, taskd_server
from bench.run import raise_nofile

KEY = "BENCHKEY"
OUT = ROOT / "bench" / "out"
RESULTS = ROOT / "bench" / "agent-results.md"
NAMESPACE = "/raintank/apps/tcp"
STATSD_FLUSH = 0.25  # taskd.stats.StatsClient's flush interval: how late a statsd line may arrive

START = time.monotonic()


def log(msg: str) -> None:
    sys.stderr.write(f"[bench-agent {time.monotonic() - START:6.1f}s] {msg}\n")
    sys.stderr.flush()


@dataclass(frozen=True)
class Sizes:
    tasks: int = 1000
    interval: int = 10     # seconds
    window: float = 60.0   # seconds measured
    warmup_timeout: float = 60.0  # beyond one interval: until every task has published once
    collector: str = "tcp"        # or "http" (bench/vs_blackbox.py): a GET of the local HTTP target


FULL = Sizes()
SMOKE = Sizes(tasks=20, interval=1, window=5.0, warmup_timeout=30.0)


# -- what the coordinator serves --------------------------------------------------------------

class Target(asyncio.Protocol):
    """The tcp collector's target: accept, close."""

    accepted = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Target.accepted += 1
        transport.close()


class HttpTarget(asyncio.Protocol):
    """The http collector's target (and blackbox_exporter's): every request answered 200
    "ok", then the connection closed (neither prober keeps connections)."""

    served = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            HttpTarget.served += 1
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
                                 b"Connection: close\r\n\r\nok")
            self.transport.close()


class Statsd(asyncio.DatagramProtocol):
    """Collects the agent's statsd lines (standard flavour: ``<prefix>.<name>:<value>|<kind>``),
    stamped with their arrival time (CLOCK_MONOTONIC)."""

    TIMINGS = ("builtin.lateness", "builtin.duration")
    COUNTS = ("builtin.runs", "builtin.skipped", "builtin.failures", "builtin.config_errors")

    def __init__(self) -> None:
        self.timings: dict[str, list[tuple[float, float]]] = {k: [] for k in self.TIMINGS}
        self.counts: dict[str, list[tuple[float, int]]] = {k: [] for k in self.COUNTS}
        self.gauges: dict[str, float] = {}
        self.datagrams = 0
        self.bad_lines = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        try:  # room for bursts while the coordinator is busy elsewhere
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        except OSError:
            pass

    def datagram_received(self, data: bytes, addr: Any) -> None:
        now = time.monotonic()
        self.datagrams += 1
        for line in data.decode("utf-8", "replace").split("\n"):
            if not line:
                continue
            try:
                name, rest = line.split(":", 1)
                value_text, kind = rest.split("|")[:2]
                value = float(value_text)
            except ValueError:
                self.bad_lines += 1
                continue
            for short in self.TIMINGS if kind == "ms" else self.COUNTS if kind == "c" else ():
                if name.endswith("." + short):
                    (self.timings if kind == "ms" else self.counts)[short].append((now, value))
                    break
            else:
                if kind == "g":
                    self.gauges[name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1]] = value

    def count(self, name: str, t0: float = 0.0, t1: float = float("inf")) -> int:
        return int(sum(v for t, v in self.counts[name] if t0 <= t < t1))

    def values(self, name: str, t0: float, t1: float) -> list[float]:
        return [v for t, v in self.timings[name] if t0 <= t < t1]


class TsdbSink(asyncio.Protocol):
    """A minimal tsdb-gw: `POST /metrics` → 200 "ok" (keep-alive). Each body is decoded
    (snappy framing, 9-byte envelope, msgpack MetricDataArray) to count its metrics and
    remember the series names; a body that does not decode is counted, still answered 200."""

    bodies: list[tuple[float, int, int]] = []  # (arrival, bytes, metrics)
    series: set[str] = set()
    bad: list[str] = []
    other = 0  # requests that were not POST /metrics

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    @classmethod
    def reset(cls) -> None:
        cls.bodies, cls.series, cls.bad, cls.other = [], set(), [], 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1")
            lines = head.split("\r\n")
            method, path = (lines[0].split(" ") + ["", ""])[:2]
            headers = {}
            for h in lines[1:]:
                k, _, v = h.partition(":")
                headers[k.strip().lower()] = v.strip()
            start = end + 4
            if "chunked" in headers.get("transfer-encoding", "").lower():
                parsed = dechunk(self.buf, start)
                if parsed is None:
                    return
                body, used = parsed
            else:
                length = int(headers.get("content-length", "0") or 0)
                if len(self.buf) < start + length:
                    return
                body, used = bytes(self.buf[start:start + length]), start + length
            del self.buf[:used]
            if method == "POST" and path.split("?")[0].rstrip("/").endswith("/metrics"):
                self._record(body, headers.get("content-type", ""))
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")
            else:
                TsdbSink.other += 1
                self.transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    def _record(self, body: bytes, content_type: str) -> None:
        now = time.monotonic()
        try:
            import cramjam
            import msgpack

            raw = bytes(cramjam.snappy.decompress(body)) if "snappy" in content_type else body
            records = msgpack.unpackb(raw[9:], raw=False, strict_map_key=False)
            names = [r.get("Name", r.get("name")) for r in records]
        except Exception as exc:  # noqa: BLE001 - reported, never fatal
            TsdbSink.bad.append(f"{type(exc).__name__}: {exc}"[:200])
            TsdbSink.bodies.append((now, len(body), 0))
            return
        TsdbSink.bodies.append((now, len(body), len(names)))
        TsdbSink.series.update(n for n in names if isinstance(n, str))


# -- the agent process -------------------------------------------------------------------------

class AgentProc(ServerProc):
    """`twistd taskagent` on the server core; no HTTP port, so `start` only checks it lives."""

    async def start(self, timeout: float = 60.0, ready_path: str = "/") -> "AgentProc":
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKAGENT_")}
        with open(self.logfile, "ab") as logf:
            self.proc = subprocess.Popen(
                self.cores.server_cmd(self.cmd), stdout=logf, stderr=subprocess.STDOUT, cwd=str(ROOT),
                env={**env, "PYTHONUNBUFFERED": "1"}, preexec_fn=self.cores.server_preexec(),
                start_new_session=True,
            )
        await asyncio.sleep(0.2)
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited {self.proc.returncode}; log:\n{self.tail()}")
        return self


def agent_proc(workdir: Path, cores: Cores, *, server_port: int, name: str, sink_port: int,
               statsd_port: int) -> AgentProc:
    config = workdir / "taskagent.ini"
    keys = {
        "server-url": f"ws://127.0.0.1:{server_port}/api/v1", "api-key": KEY, "name": name,
        "executor": "builtin", "blocked-nets": "none", "publisher": "tsdbgw", "tsdb-url": f"http://127.0.0.1:{sink_port}/",
        "stats-enabled": "true", "statsd-addr": f"127.0.0.1:{statsd_port}",
        # everything else (log-level 2, status-interval 10s, tsdb-flush-interval 1s, snappy,
        # batch size 5000, statsd flavour standard) at its default
    }
    config.write_text("".join(f"{k} = {v}\n" for k, v in keys.items()))
    cmd = [TWISTD, "--nodaemon", "--pidfile=", "taskagent", "--config", str(config)]
    return AgentProc("taskagent", cmd, workdir, cores, 0)


def runqueue_wait(pid: int) -> float | None:
    """Seconds the process's main (reactor) thread spent runnable but not running
    (/proc/<pid>/task/<pid>/schedstat, second field): how much other processes, or the
    process's own threads, on its core held the reactor back."""
    try:
        with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def thread_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None


def log_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (as bench/run.py does)."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))]


# -- the run -------------------------------------------------------------------------------------

@dataclass
class Outcome:
    values: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        log("note: " + text)
        self.notes.append(text)


async def measure(s: Sizes, workdir: Path, cores: Cores) -> Outcome:
    out = Outcome()
    v = out.values
    cores.pin_self_to_load()
    loop = asyncio.get_running_loop()
    TsdbSink.reset()
    Target.accepted = 0
    HttpTarget.served = 0
    target = await loop.create_server(HttpTarget if s.collector == "http" else Target, "127.0.0.1", 0, backlog=4096)
    target_port = target.sockets[0].getsockname()[1]
    sink = await loop.create_server(TsdbSink, "127.0.0.1", 0, backlog=1024)
    sink_port = sink.sockets[0].getsockname()[1]
    statsd_port = free_port()
    transport, stats = await loop.create_datagram_endpoint(Statsd, local_addr=("127.0.0.1", statsd_port))
    # The task-server shares the load core: it only serves the set-up and the agent's
    # status events (every status-interval) once the tasks exist.
    load_cores = copy.copy(cores)
    load_cores.server = cores.load
    db = dbsetup.create("sqlite", str(workdir), 1, 0, 0)
    server: ServerProc | None = None
    agent: AgentProc | None = None
    http: Http | None = None
    try:
        server = taskd_server(workdir, load_cores, db, KEY, "taskserver")
        await server.start()
        http = Http(server.port, KEY)
        name = agent_name(0)
        agent_id = db.ids[name]
        # tasks, paced evenly over one interval (their phase is created % interval) ----------------
        t0 = time.monotonic()
        for i in range(s.tasks):
            due = t0 + i * s.interval / s.tasks
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())
            body = {"name": f"agentlat-{i:05d}", "taskType": s.collector, "interval": s.interval, "enabled": True,
                    "metrics": {f"/raintank/apps/{s.collector}/*": 0},
                    "config": ({"/raintank/apps/http": {"url": f"http://127.0.0.1:{target_port}/", "timeout": 2}}
                               if s.collector == "http" else {NAMESPACE: {"host": "127.0.0.1", "port": target_port}}),
                    "route": {"type": "byIds", "config": {"ids": [agent_id]}}}
            status, answer = await http.request("POST", "/api/v1/tasks", body)
            if status != 200:
                raise RuntimeError(f"POST /api/v1/tasks: {status} {answer}")
        log(f"{s.tasks} tasks created in {time.monotonic() - t0:.1f} s (paced over {s.interval} s)")
        # the agent, alone on its core ------------------------------------------------------------
        agent = agent_proc(workdir, cores, server_port=server.port, name=name, sink_port=sink_port,
                           statsd_port=statsd_port)
        t_start = time.monotonic()
        await agent.start()
        series_prefix = f"raintank.apps.{s.collector}."
        series_suffix = ".success" if s.collector == "http" else ".connect_time"  # http: published by every run
        deadline = t_start + s.interval + s.warmup_timeout
        while True:
            done = sum(1 for n in TsdbSink.series if n.startswith(series_prefix) and n.endswith(series_suffix))
            if done >= s.tasks:
                break
            if agent.proc.poll() is not None:
                raise RuntimeError(f"the agent exited {agent.proc.returncode}; log:\n{agent.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {done} of {s.tasks} tasks published within {deadline - t_start:.0f} s of the agent's "
                    f"start (statsd: {stats.count('builtin.runs')} runs, {stats.count('builtin.failures')} failures, "
                    f"gauges {stats.gauges}); agent log:\n{agent.tail()}")
            await asyncio.sleep(0.1)
        warm = time.monotonic() - t_start
        v["warmup_s"] = warm
        v["cpu_startup_s"] = agent.cpu()
        log(f"every task ran and published {warm:.1f} s after the agent started "
            f"(agent CPU so far {v['cpu_startup_s']:.2f} s, gauge builtin.tasks = {stats.gauges.get('builtin.tasks')})")
        # settle past the statsd flush of the runs seen so far, then the window -------------------------
        await asyncio.sleep(2 * STATSD_FLUSH)
        skipped_before = stats.count("builtin.skipped")
        me = os.getpid()
        l0, q0 = log_lines(agent.logfile), runqueue_wait(agent.pid)
        c0, s0, m0, w0 = agent.cpu(), server.cpu(), cpu_seconds(me), time.monotonic()
        await asyncio.sleep(s.window)
        c1, s1, m1, w1 = agent.cpu(), server.cpu(), cpu_seconds(me), time.monotonic()
        l1, q1 = log_lines(agent.logfile), runqueue_wait(agent.pid)
        v["rss_mib"] = rss_bytes(agent.pid) / 2**20
        v["threads"] = thread_count(agent.pid)
        if agent.proc.poll() is not None:
            raise RuntimeError(f"the agent exited {agent.proc.returncode} during the window; log:\n{agent.tail()}")
        span = w1 - w0
        # lines for the window's runs arrive up to one statsd flush later: shift the window by it
        a0, a1 = w0 + STATSD_FLUSH / 2, w1 + STATSD_FLUSH / 2
        await asyncio.sleep(2 * STATSD_FLUSH)
        lat = stats.values("builtin.lateness", a0, a1)
        dur = stats.values("builtin.duration", a0, a1)
        runs = stats.count("builtin.runs", a0, a1)
        bodies = [b for b in TsdbSink.bodies if a0 <= b[0] < a1]
        v.update({
            "window_s": span,
            "lateness_n": len(lat),
            "lateness_p50": pct(lat, 0.50), "lateness_p99": pct(lat, 0.99), "lateness_max": max(lat) if lat else None,
            "duration_p50": pct(dur, 0.50), "duration_p99": pct(dur, 0.99),
            "runs": runs, "runs_per_s": runs / span, "expected_per_s": s.tasks / s.interval,
            "skipped": stats.count("builtin.skipped", a0, a1),
            "skipped_total": stats.count("builtin.skipped"),
            "skipped_before_window": skipped_before,
            "failures": stats.count("builtin.failures", a0, a1),
            "config_errors": stats.count("builtin.config_errors"),
            "cpu_pct": (c1 - c0) / span * 100,
            "server_cpu_pct": (s1 - s0) / span * 100,
            "coordinator_cpu_pct": (m1 - m0) / span * 100,
            "log_lines_per_s": (l1 - l0) / span,
            "runqueue_ms_per_s": (q1 - q0) / span * 1000 if q0 is not None and q1 is not None else None,
            "posts": len(bodies), "metrics_per_s": sum(b[2] for b in bodies) / span,
            "post_bytes": sum(b[1] for b in bodies),
            "statsd_datagrams": stats.datagrams, "bad_statsd_lines": stats.bad_lines,
            "bad_bodies": len(TsdbSink.bad), "accepted": Target.accepted + HttpTarget.served,
            "agent_cpu_s": c1 - c0,
            "published_gauge": stats.gauges.get("metrics.published"),
            "dropped_gauge": stats.gauges.get("metrics.dropped"),
        })
        if TsdbSink.bad:
            out.note(f"{len(TsdbSink.bad)} tsdb-gw bodies did not decode, e.g. {TsdbSink.bad[0]}")
        if v["failures"]:
            out.note(f"{v['failures']} runs failed in the window (see {agent.logfile})")
        if v["config_errors"]:
            out.note(f"{v['config_errors']} tasks were refused by the agent (config errors)")
        if v["skipped_before_window"]:
            out.note(f"{v['skipped_before_window']} slots were skipped before the window (start-up)")
        if v["dropped_gauge"]:
            out.note(f"the publisher reports {v['dropped_gauge']:.0f} metrics dropped (queue full)")
        wait, busy = v["runqueue_ms_per_s"], v["cpu_pct"] * 10  # both in ms per s
        if wait is not None and wait > max(5.0, 0.1 * busy):
            out.note(f"the agent's reactor thread waited {wait:.0f} ms per s on the run queue (its own work: "
                     f"{busy:.0f} ms per s): something else ran on its core, so the lateness is partly the "
                     f"machine's (load average {report.loadavg()})")
        expected_lat = s.tasks * span / s.interval
        if len(lat) < 0.95 * expected_lat:
            out.note(f"only {len(lat)} lateness samples for about {expected_lat:.0f} fires: statsd lines lost?")
        log(f"window {span:.1f} s: lateness p50 {v['lateness_p50']} ms, p99 {v['lateness_p99']} ms, "
            f"max {v['lateness_max']} ms ({len(lat)} fires); {runs} runs ({v['runs_per_s']:.1f}/s, expected "
            f"{v['expected_per_s']:.1f}/s); skipped {v['skipped']}; failures {v['failures']}; agent CPU "
            f"{v['cpu_pct']:.1f} %, RSS {v['rss_mib']:.0f} MiB, run-queue wait {num(v['runqueue_ms_per_s'])} ms/s; "
            f"server CPU {v['server_cpu_pct']:.1f} %, "
            f"coordinator CPU {v['coordinator_cpu_pct']:.1f} %")
    finally:
        if http is not None:
            http.close()
        if agent is not None:
            took = await agent.stop()
            v["agent_stop_s"] = took
            # twistd re-raises the SIGTERM it shut down on, so -15 is a clean exit
            if agent.proc is not None and agent.proc.returncode not in (0, -signal.SIGTERM, None):
                out.note(f"the agent exited {agent.proc.returncode} on SIGTERM")
        if server is not None:
            await server.stop()
        transport.close()
        target.close()
        sink.close()
        db.drop()
    return out


# -- output ---------------------------------------------------------------------------------------

def verdict(v: dict[str, Any], s: Sizes) -> tuple[bool, str]:
    """Keeps its schedule: no skipped slot, no failed run, every task once per interval
    (runs/s within 5 % of N/S), and no fire later than a tenth of the interval."""
    why = []
    if v.get("skipped"):
        why.append(f"{v['skipped']} slots skipped")
    if v.get("failures"):
        why.append(f"{v['failures']} runs failed")
    rate, want = v.get("runs_per_s"), s.tasks / s.interval
    if rate is None or abs(rate - want) > 0.05 * want:
        why.append(f"runs/s {rate if rate is None else round(rate, 1)} is not within 5 % of {want:g}")
    worst = v.get("lateness_max")
    if worst is None or worst > s.interval * 100:
        why.append(f"a fire {worst} ms late (more than a tenth of the {s.interval} s interval)")
    return (not why), "; ".join(why)


def num(x: Any, f: str = "{:.1f}") -> str:
    return "—" if x is None else f.format(x)


def table(v: dict[str, Any], s: Sizes) -> str:
    ok, why = verdict(v, s)
    n = f"{s.tasks:,}"
    rows = [
        ("tasks", f"{n} tcp tasks, every {s.interval} s", f"window {num(v.get('window_s'), '{:.0f}')} s"),
        ("lateness p50 [ms]", num(v.get("lateness_p50"), "{:.2f}"),
         f"{v.get('lateness_n', 0):,} fires (statsd builtin.lateness)"),
        ("lateness p99 [ms]", num(v.get("lateness_p99"), "{:.2f}"), ""),
        ("lateness max [ms]", num(v.get("lateness_max"), "{:.2f}"), ""),
        ("runs per second", num(v.get("runs_per_s")), f"expected {s.tasks / s.interval:g} (N / interval)"),
        ("skipped slots", num(v.get("skipped"), "{:d}"), "builtin.skipped in the window"),
        ("failed runs", num(v.get("failures"), "{:d}"), "builtin.failures in the window"),
        ("agent CPU [% of one core]", num(v.get("cpu_pct")), "utime+stime over the window, pinned alone"),
        ("agent RSS [MiB]", num(v.get("rss_mib")), "at the window's end"),
        ("reactor run-queue wait [ms per s]", num(v.get("runqueue_ms_per_s")),
         "agent's main thread runnable but not running (schedstat): other processes or its own threads "
         "on its core"),
        ("collector duration p50 / p99 [ms]",
         f"{num(v.get('duration_p50'), '{:.2f}')} / {num(v.get('duration_p99'), '{:.2f}')}",
         "connect to the local listener"),
        ("metrics received per second", num(v.get("metrics_per_s")),
         f"expected {2 * s.tasks / s.interval:g}; {v.get('posts', 0):,} POSTs to the tsdb-gw sink"),
        ("keeps its schedule", "yes" if ok else "**NO**", why or "no skip, no failure, every task once per interval"),
    ]
    head = "| metric | value | note |\n|---|---|---|\n"
    return head + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)


METHOD = """\
* **Processes.** A real `twistd taskagent` (executor = builtin, publisher = tsdbgw, stats
  enabled; log-level 2, status-interval 10 s, tsdb-flush-interval 1 s, snappy and batch size
  at their defaults) pinned alone to one core. On the other core: a real `twistd
  taskserver` (sqlite, defaults; the agent pre-registered with `bench/dbsetup.py`; idle
  after set-up except for the agent's status events) and this coordinator (asyncio): the
  collector's target (a TCP listener that accepts and closes), a minimal tsdb-gw sink
  (200 to `POST /metrics`; each body decoded to count metrics and series) and a UDP
  statsd listener.
* **Tasks.** {tasks:,} tasks, taskType `tcp` (connect to the local listener), interval
  {interval} s, routed byIds to the agent, created through the API before the agent
  starts and paced evenly over one interval. A task's phase is `created % interval` in
  whole seconds, so {per_slot:g} tasks share each second's slot and fire in the same reactor
  turn: the lateness of the last of them includes the work of the ones before it.
* **Warm-up.** The window starts once the sink has seen a `connect_time` series of every
  task (each task ran and published at least once).
* **Window** of {window:.0f} s. Lateness: the scheduler's own measure (actual fire time minus
  the slot, sent as the statsd timing `builtin.lateness` for every fire), percentiles
  nearest-rank over the fires whose lines arrived in the window (shifted by half the
  agent's 0.25 s statsd flush). Runs, skipped and failed: the `builtin.runs`,
  `builtin.skipped`, `builtin.failures` counters. Agent CPU: utime+stime from
  `/proc/<pid>/stat` over the window, in % of one core; RSS from `/proc/<pid>/statm` at its
  end. Reactor run-queue wait: the second field of `/proc/<pid>/task/<pid>/schedstat` over
  the window (time the agent's reactor thread was runnable while something else ran on its
  core: another process, or the agent's own thread-pool threads, e.g. `getaddrinfo` calls);
  lateness measured while it is well above zero is partly the machine's. Stats
  themselves (about 5 statsd lines per run) are part of the measured CPU.
* **Keeps its schedule** when no slot was skipped, no run failed, runs/s is within 5 % of
  N / interval and no fire was later than a tenth of the interval.
"""


def markdown(tbl: str, v: dict[str, Any], s: Sizes, m: dict[str, Any], cores: str, argv: list[str],
             notes: list[str], workdir: Path) -> str:
    workdir = workdir.resolve()
    rel = workdir.relative_to(ROOT) if workdir.is_relative_to(ROOT) else workdir
    out = [
        "# taskd agent benchmark: built-in tasks keep their schedule",
        "",
        f"Generated by `python -m bench.agent_lateness{' ' if argv else ''}{' '.join(argv)}` (`make bench-agent`) "
        f"on {m['date']}; the run took {m['duration']:.0f} s. Logs of this run: `{rel}` (not committed).",
        "",
        *report.machine_section(m, cores, ("Twisted", "autobahn")),
        "## Results",
        "",
        tbl,
        "",
        f"Context from the same run: the agent needed {num(v.get('warmup_s'))} s from its start until every "
        f"task had run and published (CPU {num(v.get('cpu_startup_s'), '{:.2f}')} s, taskList and scheduling "
        f"included) and {num(v.get('agent_stop_s'))} s to stop on SIGTERM; over the window the task-server "
        f"used {num(v.get('server_cpu_pct'))} % and the coordinator {num(v.get('coordinator_cpu_pct'))} % of "
        f"the other core; the sink received {v.get('posts', 0):,} POSTs ({v.get('post_bytes', 0) / 1024:.0f} KiB); "
        f"slots skipped before the window (start-up): {v.get('skipped_before_window', 0)}; the agent wrote "
        f"{num(v.get('log_lines_per_s'))} log lines per second during the window (log-level 2) and had "
        f"{v.get('threads', '?')} threads at its end.",
        "",
    ]
    if notes:
        out += ["Notes from the run:", ""] + [f"* {n}" for n in notes] + [""]
    out += ["## Method", "", METHOD.format(tasks=s.tasks, interval=s.interval, window=s.window,
                                           per_slot=s.tasks / s.interval), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.agent_lateness", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, help=f"tasks (default {FULL.tasks})")
    ap.add_argument("--interval", type=int, help=f"task interval in seconds (default {FULL.interval})")
    ap.add_argument("--window", type=float, help=f"seconds measured (default {FULL.window:.0f})")
    ap.add_argument("--smoke", action="store_true",
                    help=f"{SMOKE.tasks} tasks, interval {SMOKE.interval} s, window {SMOKE.window:.0f} s; "
                         "no results file")
    ap.add_argument("--out", help="results file (default: bench/agent-results.md, or none with --smoke)")
    ap.add_argument("--workdir", help="where logs and the database go (default: bench/out/agent-<timestamp>)")
    a = ap.parse_args(argv)
    global START
    START = time.monotonic()
    base = SMOKE if a.smoke else FULL
    s = Sizes(tasks=a.tasks or base.tasks, interval=a.interval or base.interval, window=a.window or base.window,
              warmup_timeout=base.warmup_timeout)
    if s.tasks < 1 or s.interval < 1 or s.window <= 0:
        ap.error("--tasks and --interval must be at least 1, --window positive")
    soft, hard, now_soft, fd_note = raise_nofile(s.tasks // s.interval * 4 + 500)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = Path(a.workdir) if a.workdir else OUT / (("agent-smoke-" if a.smoke else "agent-") + stamp)
    workdir.mkdir(parents=True, exist_ok=True)
    machine = report.machine(soft, hard, now_soft)
    cores = Cores()
    where = (f"agent on CPU {cores.server}; task-server, coordinator, listener, sinks on CPU {cores.load} "
             f"({'taskset' if cores.taskset else 'sched_setaffinity'})" if cores.pinned
             else "one CPU available: agent and everything else share it (no pinning)")
    log(f"{s.tasks} tasks every {s.interval} s, {s.window:.0f} s window; logs in {workdir}; {where}")
    outcome = asyncio.run(measure(s, workdir, cores))
    if fd_note:
        outcome.notes.insert(0, fd_note)
    if not cores.pinned:
        outcome.notes.insert(0, "one CPU: the agent was not alone on its core")
    machine["load_end"] = report.loadavg()
    machine["duration"] = time.monotonic() - START
    tbl = table(outcome.values, s)
    print(tbl)
    for n in outcome.notes:
        print(f"note: {n}")
    print(f"run time: {machine['duration']:.1f} s")  # the smoke mode's cost, watched here, not in a test
    args = list(argv if argv is not None else sys.argv[1:])
    saved = {"values": outcome.values, "notes": outcome.notes, "sizes": asdict(s), "machine": machine,
             "cores": where, "argv": args, "workdir": str(workdir)}
    (workdir / "agent-results.json").write_text(json.dumps(saved, indent=1))
    out = a.out or (None if a.smoke else str(RESULTS))
    if out:
        Path(out).write_text(markdown(tbl, outcome.values, s, machine, where, args, outcome.notes, workdir))
        log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
