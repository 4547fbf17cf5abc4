"""Self-metrics end to end: real daemons send real UDP datagrams to a socket this test reads.

The server (in-process harness) and the agent service (`taskd.agent.assembly.Agent`, with
the Snap emulator) run with stats enabled and `statsd-addr` pointing at a UDP socket bound
on 127.0.0.1 port 0; every assertion is about lines found in the datagrams received.
Waiting is always a deadline (`until`), never a plain sleep.
"""
from __future__ import annotations

import dataclasses
import re
import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol

from taskd.agent.assembly import Agent
from taskd.agent.settings import AgentSettings
from tests.fakes.snap import SnapEmulator, metric
from tests.integration.agent_client import connect_agent
from tests.integration.harness import ADMIN_KEY, start_server, stop_server
from tests.notes_requests import NOTES_TASK
from tests.waiting import until

SRV = "test.srv"
HOST = socket.gethostname()  # the datadog flavour's host tag
HOST_RX = re.escape(HOST)
AGT = "test.agt"


class StatsdSocket(DatagramProtocol):
    """A statsd stand-in: remembers every line of every datagram it receives."""

    def __init__(self) -> None:
        self.datagrams: list[bytes] = []
        self.port: Any = None

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.datagrams.append(data)

    @property
    def lines(self) -> list[str]:
        return [line for d in self.datagrams for line in d.decode("utf-8").split("\n")]

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port.getHost().port}"

    def has(self, line: str) -> bool:
        return line in self.lines

    def matching(self, pattern: str) -> list[re.Match]:
        rx = re.compile(pattern)
        return [m for m in map(rx.fullmatch, self.lines) if m]

    async def wait(self, line: str, timeout: float = 10.0) -> None:
        await until(lambda: self.has(line), timeout, what=f"statsd line {line!r} (got {self.lines[-20:]})")


def refused_agent(base: str, name: str, key: str):
    """Connect with a key the server refuses; the client's `opened` fails (consumed)."""
    client = connect_agent(base, name, key)
    client.opened.addErrback(lambda _: None)
    return client


@pytest.fixture
def statsd():
    sock = StatsdSocket()
    sock.port = reactor.listenUDP(0, sock, interface="127.0.0.1")
    yield sock
    sock.port.stopListening()


@pytest.fixture
def fast_gauges(monkeypatch):
    monkeypatch.setattr("taskd.server.assembly.GAUGE_INTERVAL", 0.2)
    monkeypatch.setattr("taskd.agent.assembly.GAUGE_INTERVAL", 0.2)


@pytest_twisted.ensureDeferred
async def test_server_metrics_datadog(db_config, statsd, fast_gauges):
    api = await start_server(*db_config, stats_enabled=True, statsd_addr=statsd.addr, statsd_type="datadog",
                             stats_prefix="test.$hostname.srv")  # the host goes to a tag: names are {SRV}.…
    try:
        await statsd.wait(f"{SRV}.running:1|g|#host:{HOST}")
        await statsd.wait(f"{SRV}.tasks.active:0|g|#host:{HOST}")

        # An agent connects (auto-created): accepted, created, and the gauge moves.
        client = connect_agent(api.base, "agent1", ADMIN_KEY)
        await client.opened
        await client.next("taskList")
        await statsd.wait(f"{SRV}.agents.connections_accepted:1|c|#host:{HOST}")
        await statsd.wait(f"{SRV}.agents.autocreate_success:1|c|#host:{HOST}")
        await statsd.wait(f"{SRV}.agents.connected:1|g|#host:{HOST}")

        # A task through the API: counted, and timed until the frame reached the agent.
        before = len(statsd.matching(rf"{SRV}\.dispatch\.latency:.*"))
        task = await api.ok("POST", "/api/v1/tasks", json_body=NOTES_TASK)
        await client.next("taskAdd")
        await statsd.wait(f"{SRV}.api.tasks_create:1|c|#host:{HOST}")
        await until(lambda: statsd.matching(rf"{SRV}\.dispatch\.latency:([0-9.]+)\|ms\|#host:{HOST_RX},event:taskAdd,source:local"),
                    what="a dispatch latency timing")
        latency = float(statsd.matching(rf"{SRV}\.dispatch\.latency:([0-9.]+)\|ms\|#host:{HOST_RX},event:taskAdd.*")[0][1])
        assert 0 <= latency < 5000
        assert len(statsd.matching(rf"{SRV}\.dispatch\.latency:.*")) == before + 1  # one agent told, one timing
        await statsd.wait(f"{SRV}.tasks.active:1|g|#host:{HOST}")

        await api.ok("PUT", "/api/v1/tasks", json_body={**task, "enabled": False})
        await client.next("taskRemove")
        await statsd.wait(f"{SRV}.api.tasks_update:1|c|#host:{HOST}")
        await until(lambda: statsd.matching(rf"{SRV}\.dispatch\.latency:[0-9.]+\|ms\|#host:{HOST_RX},event:taskRemove,source:local"),
                    what="a taskRemove timing")
        await statsd.wait(f"{SRV}.tasks.disabled:1|g|#host:{HOST}")
        await api.ok("DELETE", f"/api/v1/tasks/{task['id']}")
        await statsd.wait(f"{SRV}.api.tasks_delete:1|c|#host:{HOST}")

        # A refused upgrade (wrong key) is a failed connection, tagged with the status.
        refused = refused_agent(api.base, "agent2", "not-a-valid-key")
        await refused.closed
        await statsd.wait(f"{SRV}.agents.connections_failed:1|c|#host:{HOST},status:401")

        await client.disconnect()
        await statsd.wait(f"{SRV}.agents.connected:0|g|#host:{HOST}")
    finally:
        await stop_server(api)
    await statsd.wait(f"{SRV}.running:0|g|#host:{HOST}")
    assert all(len(d) <= 1432 for d in statsd.datagrams)


@pytest_twisted.ensureDeferred
async def test_server_metrics_standard_have_no_tags_and_the_default_prefix(sqlite_only, statsd):
    api = await start_server(*sqlite_only, stats_enabled=True, statsd_addr=statsd.addr)
    try:
        refused = refused_agent(api.base, "agent2", "not-a-valid-key")
        await refused.closed
        await until(lambda: statsd.matching(r"raintank_apps\.[A-Za-z0-9_-]+\.task_server\.agents\.connections_failed:1\|c"),
                    what="connections_failed in the standard flavour")
        await until(lambda: statsd.matching(r"raintank_apps\.[A-Za-z0-9_-]+\.task_server\.running:1\|g"),
                    what="running gauge")
        assert not any("|#" in line for line in statsd.lines)
    finally:
        await stop_server(api)


@pytest_twisted.ensureDeferred
async def test_server_keeps_working_when_statsd_is_not_listening(sqlite_only, statsd):
    """Nothing listens on the port: sends fail (ICMP refused) and are only counted."""
    statsd_addr = statsd.addr
    await statsd.port.stopListening()
    api = await start_server(*sqlite_only, stats_enabled=True, statsd_addr=statsd_addr)
    try:
        for _ in range(3):
            await api.ok("POST", "/api/v1/tasks", json_body=NOTES_TASK | {"name": f"t{_}"})
        stats = api.server.stats
        await until(lambda: stats.errors > 0, what="a counted send error")
        assert (await api.ok("GET", "/api/v1/tasks")) != []
    finally:
        await stop_server(api)
    statsd.port = reactor.listenUDP(0, statsd, interface="127.0.0.1")  # for the fixture's teardown


@pytest_twisted.ensureDeferred
async def test_agent_metrics(sqlite_only, statsd, fast_gauges):
    api = await start_server(*sqlite_only)
    snap = SnapEmulator(catalog=[metric("/example-task/foo", 1)]).start()
    settings = dataclasses.replace(
        AgentSettings(), server_url=f"ws://127.0.0.1:{api.port}/api/v1", api_key=ADMIN_KEY, name="agent1",
        snap_url=snap.url, tsdb_url="http://tsdb-gw.invalid/", reconnect_max_backoff=1.0,
        stats_enabled=True, statsd_addr=statsd.addr, stats_prefix=AGT)
    agent = Agent(settings, reactor, snap_intervals={"supervise_interval": 0.2, "sweep_interval": 1.0,
                                                     "catalog_interval": 2.0})
    agent.service.startService()
    try:
        await statsd.wait(f"{AGT}.running:1|g")
        await statsd.wait(f"{AGT}.snap.reachable:1|g")
        await statsd.wait(f"{AGT}.server.connected:1|g")
        await statsd.wait(f"{AGT}.tasks.active:0|g")

        task = await api.ok("POST", "/api/v1/tasks", json_body=NOTES_TASK)
        await statsd.wait(f"{AGT}.tasks.added:1|c")
        await statsd.wait(f"{AGT}.tasks.active:1|g")
        await statsd.wait(f"{AGT}.snap.tasks_created:1|c")

        await api.ok("PUT", "/api/v1/tasks", json_body={**task, "interval": 120})
        await statsd.wait(f"{AGT}.tasks.updated:1|c")
        await statsd.wait(f"{AGT}.snap.tasks_removed:1|c")  # re-created for the new interval
        await api.ok("DELETE", f"/api/v1/tasks/{task['id']}")
        await statsd.wait(f"{AGT}.tasks.removed:1|c")

        await snap.set_down(True)
        await statsd.wait(f"{AGT}.snap.reachable:0|g")
        await stop_server(api)
        api = None
        await statsd.wait(f"{AGT}.server.connected:0|g")
    finally:
        await agent.service.stopService()
        if api is not None:
            await stop_server(api)
        await snap.stop()
    await statsd.wait(f"{AGT}.running:0|g")
