"""taskd's http checks against blackbox_exporter's, side by side (issue 14 item 6).

    python -m bench.vs_blackbox           10,000 http tasks every 10 s (1,000 runs/s), a 60 s window,
                                          then blackbox_exporter probing the same target at the same
                                          rate; writes bench/agent-vs-blackbox.md (`make bench-agent`)
    python -m bench.vs_blackbox --tasks N --interval S --window W [--out FILE]

Part 1 is bench.agent_lateness with the http collector: a real `twistd taskagent`
(built-in executor) alone on one core, its target a local HTTP responder. Part 2 runs
Debian's `prometheus-blackbox-exporter` alone on that same core, and a bounded load loop
(here, on the other core) calls its `/probe?module=http_2xx&target=<the same target>` at
the same rate for the same window. Both probers open a new connection per check. The
figure compared is CPU seconds per check (utime+stime from /proc over the window).
Targets (issue 14): lateness p99 <= 1 s, 0 skipped, taskd's CPU per check <= 1.5x
blackbox_exporter's. Nothing here is asserted: the numbers are printed and written.
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.agent_lateness import OUT, HttpTarget, Sizes, log, measure, num, pct
from bench.procs import ROOT, Cores, cpu_seconds, free_port, rss_bytes
from bench.run import raise_nofile

RESULTS = ROOT / "bench" / "agent-vs-blackbox.md"
AGENT_RESULTS = ROOT / "bench" / "agent-results.md"
BEGIN, END = "<!-- vs-blackbox: begin -->", "<!-- vs-blackbox: end -->"
FULL = Sizes(tasks=10_000, interval=10, window=60.0, warmup_timeout=90.0, collector="http")
BLACKBOX = "prometheus-blackbox-exporter"
CONCURRENCY = 200  # probes in flight at most (the load loop's bound)


async def _probe(host: str, port: int, target: str, latencies: list[float], results: dict[str, int]) -> None:
    started = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET /probe?module=http_2xx&target={target} HTTP/1.1\r\nHost: {host}\r\n"
                     "Connection: close\r\n\r\n".encode())
        body = await reader.read()
        writer.close()
        ok = b"\nprobe_success 1" in body
        results["ok" if ok else "failed"] += 1
        latencies.append(time.monotonic() - started)
    except OSError:
        results["error"] += 1


async def blackbox(workdir: Path, cores: Cores, rate: float, window: float) -> dict[str, Any]:
    """blackbox_exporter probing a local HTTP target at `rate` per second for `window` s."""
    exe = shutil.which(BLACKBOX)
    if exe is None:
        raise RuntimeError(f"{BLACKBOX} is not installed (apt-get install {BLACKBOX})")
    cores.pin_self_to_load()
    loop = asyncio.get_running_loop()
    target = await loop.create_server(HttpTarget, "127.0.0.1", 0, backlog=4096)
    target_url = f"http://127.0.0.1:{target.sockets[0].getsockname()[1]}/"
    config = workdir / "blackbox.yml"
    config.write_text("modules:\n  http_2xx:\n    prober: http\n    timeout: 2s\n"
                      "    http:\n      preferred_ip_protocol: ip4\n")
    port = free_port()
    cmd = [exe, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}"]
    if cores.pinned and cores.taskset:
        cmd = [cores.taskset, "-c", str(cores.server), *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(workdir / "blackbox.log", "wb"))
    results = {"ok": 0, "failed": 0, "error": 0}
    latencies: list[float] = []
    try:
        for _ in range(100):  # until it listens
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one() -> None:
            async with gate:
                await _probe("127.0.0.1", port, target_url, latencies, results)

        # a second of warm-up, then the window; `sent` counts from the start of each
        t0 = phase = time.monotonic()
        pending: set[asyncio.Task] = set()
        sent = 0
        c0 = w0 = None
        while True:
            now = time.monotonic()
            if w0 is None and now - t0 >= 1.0:
                c0, w0, phase, sent = cpu_seconds(proc.pid), now, now, 0
                results.update(ok=0, failed=0, error=0)
                latencies.clear()
            if w0 is not None and now - w0 >= window:
                break
            for _ in range(max(0, min(int((now - phase) * rate) - sent, CONCURRENCY * 4))):
                task = asyncio.ensure_future(one())
                pending.add(task)
                task.add_done_callback(pending.discard)
                sent += 1
            await asyncio.sleep(0.005)
        c1, w1 = cpu_seconds(proc.pid), time.monotonic()
        rss = rss_bytes(proc.pid)
        await asyncio.gather(*pending, return_exceptions=True)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        target.close()
    span = w1 - w0
    done = results["ok"] + results["failed"]
    return {"window_s": span, "rate": rate, "sent": sent, "probes": done, "probes_per_s": done / span,
            "ok": results["ok"], "failed": results["failed"], "errors": results["error"],
            "cpu_s": c1 - c0, "cpu_pct": (c1 - c0) / span * 100,
            "cpu_ms_per_probe": (c1 - c0) / done * 1000 if done else None, "rss_mib": rss / 2**20,
            "latency_p50_ms": (pct(latencies, 0.5) or 0) * 1000, "latency_p99_ms": (pct(latencies, 0.99) or 0) * 1000}


def markdown(t: dict, b: dict, s: Sizes, machine: dict, notes: list[str]) -> str:
    taskd_ms = t["agent_cpu_s"] / t["runs"] * 1000 if t.get("runs") else None
    ratio = taskd_ms / b["cpu_ms_per_probe"] if taskd_ms and b.get("cpu_ms_per_probe") else None

    def met(ok: bool | None) -> str:
        return "" if ok is None else ("met" if ok else "**missed**")

    rows = [
        ("taskd: runs per s (expected)", f"{num(t['runs_per_s'])} ({num(t['expected_per_s'])})", "", ""),
        ("taskd: lateness p50 / p99 / max", f"{num(t['lateness_p50'])} / {num(t['lateness_p99'])} / "
                                           f"{num(t['lateness_max'])} ms", "p99 <= 1000 ms",
         met(t["lateness_p99"] is not None and t["lateness_p99"] <= 1000)),
        ("taskd: skipped runs in the window", str(t["skipped"]), "0", met(t["skipped"] == 0)),
        ("taskd: failed runs in the window", str(t["failures"]), "", ""),
        ("taskd: agent CPU", f"{num(t['cpu_pct'])} % of a core", "", ""),
        ("taskd: agent RSS (per task)", f"{num(t['rss_mib'], '{:.0f}')} MiB ({num(t['rss_mib'] * 1024 / s.tasks)} KiB)",
         "", ""),
        ("blackbox_exporter: probes per s (asked)", f"{num(b['probes_per_s'])} ({num(b['rate'])})", "", ""),
        ("blackbox_exporter: probe failures / errors", f"{b['failed']} / {b['errors']}", "", ""),
        ("blackbox_exporter: CPU", f"{num(b['cpu_pct'])} % of a core", "", ""),
        ("blackbox_exporter: RSS", f"{num(b['rss_mib'], '{:.0f}')} MiB", "", ""),
        ("CPU per check: taskd / blackbox_exporter", f"{num(taskd_ms, '{:.3f}')} / "
                                                     f"{num(b['cpu_ms_per_probe'], '{:.3f}')} ms", "", ""),
        ("ratio taskd / blackbox_exporter", num(ratio, "{:.2f}"), "<= 1.5", met(ratio is not None and ratio <= 1.5)),
    ]
    table = "| figure | measured | target | |\n|---|---|---|---|\n" + "".join(
        f"| {a} | {b_} | {c} | {d} |\n" for a, b_, c, d in rows)
    return (f"# taskd http checks vs blackbox_exporter (issue 14)\n\nWritten by `python -m bench.vs_blackbox` on "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine['cpu']} ({machine['nproc']} CPUs), Python {machine['python']}. Each prober alone on "
            f"one core; the load (coordinator, target, task-server, blackbox's load loop) on the other.\n\n{table}\n"
            f"* **taskd.** {s.tasks:,} `http` tasks every {s.interval} s against a local responder (200 \"ok\", "
            f"connection closed), a {t['window_s']:.0f} s window after every task ran once; figures as in "
            f"bench/agent-results.md.\n"
            f"* **blackbox_exporter** ({BLACKBOX}, Debian) with one `http_2xx` module (timeout 2 s, IPv4), probing "
            f"the same responder, asked {b['rate']:.0f} times a second by a load loop of at most {CONCURRENCY} "
            f"probes in flight over {b['window_s']:.0f} s; its probe answers p50 {b['latency_p50_ms']:.1f} ms, p99 "
            f"{b['latency_p99_ms']:.1f} ms.\n"
            f"* CPU per check is the prober's utime+stime over the window divided by the checks done in it.\n"
            + "".join(f"* note: {n}\n" for n in notes))


def collapse_markdown(why: str, b: dict, s: Sizes, machine: dict) -> str:
    """The figures when taskd's agent could not even run every task once."""
    return (f"# taskd http checks vs blackbox_exporter (issue 14)\n\nWritten by `python -m bench.vs_blackbox` on "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine['cpu']} ({machine['nproc']} CPUs), "
            f"Python {machine['python']}.\n\n"
            f"**taskd did not keep up with {s.tasks:,} http tasks every {s.interval} s "
            f"({s.tasks / s.interval:,.0f} checks/s) on one core**: {why}. Targets (lateness p99 <= 1 s, 0 skipped, "
            f"CPU per check <= 1.5x blackbox_exporter's) **missed** (a smaller `--tasks` shows the rate it holds).\n\n"
            f"| blackbox_exporter at the same rate | measured |\n|---|---|\n"
            f"| probes per s (asked) | {num(b['probes_per_s'])} ({num(b['rate'])}) |\n"
            f"| probe failures / errors | {b['failed']} / {b['errors']} |\n"
            f"| CPU | {num(b['cpu_pct'])} % of a core |\n"
            f"| CPU per probe | {num(b['cpu_ms_per_probe'], '{:.3f}')} ms |\n"
            f"| probe answer p50 / p99 | {b['latency_p50_ms']:.1f} / {b['latency_p99_ms']:.1f} ms |\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.vs_blackbox", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=FULL.tasks)
    ap.add_argument("--interval", type=int, default=FULL.interval)
    ap.add_argument("--window", type=float, default=FULL.window)
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    s = Sizes(tasks=a.tasks, interval=a.interval, window=a.window, warmup_timeout=FULL.warmup_timeout,
              collector="http")
    soft, hard, now_soft, _ = raise_nofile(s.tasks // s.interval * 4 + CONCURRENCY * 4 + 500)
    workdir = OUT / ("vs-blackbox-" + time.strftime("%Y%m%d-%H%M%S"))
    workdir.mkdir(parents=True, exist_ok=True)
    cores = Cores()
    log(f"part 1: taskd, {s.tasks} http tasks every {s.interval} s")
    collapsed = None
    try:
        outcome = asyncio.run(measure(s, workdir, cores))
    except RuntimeError as exc:  # the agent could not run every task once: the figure is that
        collapsed = str(exc).split("; agent log:")[0]
        log(f"taskd did not keep up: {collapsed}")
    log(f"part 2: blackbox_exporter at {s.tasks / s.interval:.0f} probes/s")
    bb = asyncio.run(blackbox(workdir, cores, s.tasks / s.interval, s.window))
    machine = report.machine(soft, hard, now_soft)
    text = (collapse_markdown(collapsed, bb, s, machine) if collapsed is not None
            else markdown(outcome.values, bb, s, machine, outcome.notes))
    print(text)
    Path(a.out).write_text(text)
    log(f"wrote {a.out}")
    if Path(a.out) == RESULTS and AGENT_RESULTS.exists():  # the agent figures point at the comparison
        agent = AGENT_RESULTS.read_text()
        section = (f"{BEGIN}\n## vs blackbox_exporter\n\nThe http checks at 1,000 runs/s beside"
                   f" blackbox_exporter's: [agent-vs-blackbox.md](agent-vs-blackbox.md) (same run of"
                   f" `make bench-agent`).\n{END}\n")
        if BEGIN in agent:
            agent = agent[:agent.index(BEGIN)] + section + agent[agent.index(END) + len(END) + 1:]
        else:
            agent = agent.rstrip("\n") + "\n\n" + section
        AGENT_RESULTS.write_text(agent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
