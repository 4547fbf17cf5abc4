"""A few real `twistd taskagent` processes with the built-in executor among the chaos
cluster's light agents (issue 11, item 7: "a few real `twistd taskagent` with the
built-in executor", and at the end of each scenario "builtin agents' checks never
stopped (no gap in their points longer than two intervals)").

The light agents (tests.integration.agent_client) only show what the server sends; these
show that a fault of a server or of the cluster does not stop an agent's checks: the
executor runs whether or not a server is reachable (taskd/agent/assembly.py). Each
agent connects through the cluster's nginx like the light ones, runs a byIds `http` and
a `tcp` check every INTERVAL s against `Target` (a page this test process serves on
loopback; the tcp check connects to its port), and publishes to a tsdb-gw emulator of its own (tests/fakes/tsdbgw.py), so
every point received is known to be that agent's.

The gap is read from the points' own timestamps (each run is stamped with its slot), not
from when they arrived: the publisher's batching (`tsdb-flush-interval`) and the test
process's own load then cannot make a gap, and a run that never happened always does.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.fakes.tsdbgw import TsdbGwEmulator
from tests.integration.daemons import AgentProcess
from tests.waiting import until

INTERVAL = 1  # seconds between a check's runs
CHECKS = ("http", "tcp")
# A point is published at most this long after its slot's stamp when no run is missed:
# the run falls somewhere in its second (the executor spreads tasks within the second
# they were created in), then waits up to tsdb-flush-interval (0.1 s) to be sent.
DELIVERY = 1.5
GW_KEY = "chaos-gw"


class Target(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"checked by the chaos suite's builtin agents\n"


class BuiltinAgents:
    """`names`: the agents (registered by the caller before `start`); `server_url`: the
    ws:// API base they connect to (nginx's)."""

    def __init__(self, workdir: Path, names: list[str], server_url: str, api_key: str) -> None:
        self.workdir, self.names, self.server_url, self.api_key = workdir, names, server_url, api_key
        self.gateways: dict[str, TsdbGwEmulator] = {}
        self.procs: dict[str, AgentProcess] = {}
        self.site: Any = None
        self.series: dict[str, dict[str, str]] = {}  # agent -> check -> the series of its `success` points

    def _agent(self, name: str, gateway: str) -> AgentProcess:
        return AgentProcess(self.workdir, name, **{
            "log-level": "2", "server-url": self.server_url, "api-key": self.api_key, "name": name,
            "executor": "builtin", "publisher": "tsdbgw", "tsdb-url": gateway + "/", "tsdb-key": GW_KEY,
            "tsdb-flush-interval": "0.1s",
            # the cluster's heartbeat-interval (a frozen server is noticed in 3 s), and a
            # reconnection soon after a server dies, as the light agents do
            "heartbeat-interval": "1s", "reconnect-max-backoff": "2s",
            # Target is on loopback, which a public agent blocks by default
            # (tests/integration/test_blocked_nets.py tests that)
            "blocked-nets": "none"})

    def alive(self, name: str) -> bool:
        proc = self.procs[name].proc if name in self.procs else None
        return proc is not None and proc.poll() is None

    def holds(self, name: str, sessions: dict[str, set[str]], live: set[str]) -> bool:
        """Whether the agent holds a socket: a live server has its session (the server's
        own record of the sockets it holds, tests/chaos/cluster.py `sessions()`) and the
        agent's process lives. Its own view of the socket is in another process; this is
        what can be read without racing it."""
        return self.alive(name) and any(name in sessions.get(server, ()) for server in live)

    async def start(self, ok: Callable[..., Awaitable[Any]], create_task: Callable[[dict], Awaitable[dict]],
                    agent_ids: dict[str, int]) -> None:
        """Start the target, the emulators and the agents; once each agent has sent its
        catalog (so routing knows what it runs), create its checks and wait for a first
        point of each. `ok` and `create_task` are the cluster's API calls."""
        if not self.names:
            return
        self.site = reactor.listenTCP(0, Site(Target()), interface="127.0.0.1")
        port = self.site.getHost().port
        for name in self.names:
            self.gateways[name] = TsdbGwEmulator(admin_key=GW_KEY).start()
            self.procs[name] = self._agent(name, self.gateways[name].url).start()
        for name in self.names:
            await until(lambda: self._catalog(ok, name, agent_ids[name]), 60, interval=0.2,
                        what=lambda: f"{name} sending its catalog:\n{self.procs[name].log()[-3000:]}")
            route = {"type": "byIds", "config": {"ids": [agent_ids[name]]}}
            configs = {"http": {"url": f"http://127.0.0.1:{port}/", "timeout": 1},
                       "tcp": {"host": "127.0.0.1", "port": port, "timeout": 1}}
            for check in CHECKS:
                task = f"{name}-{check}"
                await create_task({"name": task, "taskType": check, "interval": INTERVAL, "enabled": True,
                                   "metrics": {f"/raintank/apps/{check}/*": 0}, "route": route,
                                   "config": {f"/raintank/apps/{check}": configs[check]}})
                self.series.setdefault(name, {})[check] = f"raintank.apps.{check}.{task}.success"
        await until(lambda: all(self.stamps(n, c) for n in self.names for c in CHECKS), 30, interval=0.2,
                    what=lambda: f"a first point of every builtin check: {self.largest_gaps()}")

    async def _catalog(self, ok: Callable[..., Awaitable[Any]], name: str, agent_id: int) -> bool:
        if not self.alive(name):
            raise AssertionError(f"{name} exited:\n{self.procs[name].log()}")
        return bool(await ok("GET", f"/api/v1/agents/{agent_id}/metrics"))

    def stamps(self, name: str, check: str) -> list[int]:
        """The slots (Unix seconds) of the check's points its emulator received, in order."""
        series, gw = self.series.get(name, {}).get(check), self.gateways.get(name)
        return sorted({m["Time"] for m in gw.metrics if m["Name"] == series}) if gw else []

    def largest_gaps(self, tail: bool = True) -> dict[tuple[str, str], float | None]:
        """(agent, check) -> the largest gap in s between consecutive points; with `tail`,
        counting the one from the last point to now less DELIVERY (a check that stopped is a
        gap still growing). None before a first point."""
        now = time.time()
        gaps: dict[tuple[str, str], float | None] = {}
        for name in self.names:
            for check in CHECKS:
                got = self.stamps(name, check)
                steps = [b - a for a, b in zip(got, got[1:])] + ([now - DELIVERY - got[-1]] if got and tail else [])
                gaps[name, check] = max(steps, default=0.0) if got else None
        return gaps

    def gap_problems(self) -> list[str]:
        """Each check whose points have (or, stopped, are growing) a gap of more than two
        intervals; the issue's bound: one run may be missed (a skipped late run), not two."""
        return [f"builtin {name} {check}: " + ("no point" if gap is None else
                                              f"a gap of {gap:.1f} s in its points (> {2 * INTERVAL} s)")
                for (name, check), gap in self.largest_gaps().items() if gap is None or gap > 2 * INTERVAL]

    async def still_running(self, intervals: int = 3) -> list[str]:
        """Wait until every check has a point stamped `intervals` intervals after now, then
        return `gap_problems()`: the end state is often reached within seconds of the fault,
        before a check that a reconnection disturbed has had the time to show a gap. A gap
        seen meanwhile ends the wait at once."""
        since = time.time() + intervals * INTERVAL

        def ran_on() -> bool:
            if any(g is not None and g > 2 * INTERVAL for g in self.largest_gaps(tail=False).values()):
                raise AssertionError(f"a builtin check missed two runs: {self.gap_problems()}")
            return all(max(self.stamps(n, c), default=0) >= since for n in self.names for c in CHECKS)

        await until(ran_on, intervals * INTERVAL + 10, interval=0.2,
                    what=lambda: f"every builtin check running on: {self.gap_problems()}\n{self.logs()}")
        return self.gap_problems()

    async def end_facts(self) -> dict[str, Any]:
        """The agents' side of a scenario, once their checks have run on a few intervals
        past its end (`still_running`): how many there were, the largest gap between
        consecutive points of any of their checks (s; the bound is two intervals), their
        reconnections, and what `still_running` found wrong (empty: they ran on)."""
        try:
            problems = await self.still_running()
        except AssertionError as exc:
            problems = [str(exc).splitlines()[0]]
        gaps = [g for g in self.largest_gaps(tail=False).values() if g is not None]
        return {"builtin": len(self.names), "largest_gap": max(gaps, default=None),
                "builtin_reconnections": self.reconnections(), "builtin_problems": problems}

    def reconnections(self) -> dict[str, int]:
        """Sockets each agent lost (its log's warnings), whatever the reason."""
        return {name: proc.log().count("; reconnecting") for name, proc in self.procs.items()}

    def tracebacks(self) -> list[str]:
        return [name for name, proc in self.procs.items() if "Traceback" in proc.log()]

    def logs(self) -> str:
        return "\n".join(f"==== {name}\n{proc.log()[-3000:]}" for name, proc in self.procs.items())

    async def stop(self) -> None:
        for proc in self.procs.values():
            await proc.stop()
        for gw in self.gateways.values():
            await gw.stop()
        if self.site is not None:
            await self.site.stopListening()
