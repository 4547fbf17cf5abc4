"""`blocked-nets` with the real daemons, and each built-in collector against real
sockets: a public agent (org 1's, auto-created public) may not reach loopback, its LAN
or the cloud metadata address with another org's task; the run fails naming the rule,
and the target is never connected to. Made private, the agent is told so on its next
connection (the server closes the one that knew the old flag) and the same task runs.
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from taskd.agent.builtin.collector import CollectError, TaskInfo
from taskd.agent.builtin.collectors.dns import DnsCollector
from taskd.agent.builtin.collectors.http import HttpCollector
from taskd.agent.builtin.collectors.tcp import TcpCollector
from taskd.agent.builtin.netpolicy import NetPolicy
from tests.fakes.tsdbgw import TsdbGwEmulator
from tests.integration.test_builtin_e2e import INTERVAL, Stack, _status, api, http_task, wait_for

TASK = TaskInfo(id=7, name="probe", org_id=2, interval=10)


class Counting(Factory):
    """A listener that counts the connections it was given."""

    def __init__(self) -> None:
        self.connections = 0

    def buildProtocol(self, addr):
        self.connections += 1
        return Protocol()


@pytest.fixture
def listener():
    factory = Counting()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield factory, port.getHost().port
    port.stopListening()


def public_policy() -> NetPolicy:
    policy = NetPolicy("auto")
    policy.server_said({"x-taskd-agent-public": "true"})
    return policy


def collector(cls, policy: NetPolicy):
    found = cls(reactor=reactor, settings=SimpleNamespace(ns1_api_url=""))
    found.netpolicy = policy
    return found


@pytest.mark.parametrize("cls, config", [
    pytest.param(HttpCollector, lambda port: {"url": f"http://127.0.0.1:{port}/"}, id="http-ip"),
    pytest.param(HttpCollector, lambda port: {"url": f"http://localhost:{port}/"}, id="http-name"),
    pytest.param(TcpCollector, lambda port: {"host": "127.0.0.1", "port": port}, id="tcp-ip"),
    pytest.param(TcpCollector, lambda port: {"host": "localhost", "port": port}, id="tcp-name"),
    pytest.param(DnsCollector, lambda port: {"name": "example.com", "server": f"127.0.0.1:{port}",
                                             "protocol": "tcp"}, id="dns"),
])
@pytest_twisted.ensureDeferred
async def test_a_public_agent_never_connects_to_loopback(listener, cls, config):
    factory, port = listener
    blocking = collector(cls, public_policy())
    with pytest.raises(CollectError) as err:
        await blocking.collect(blocking.parse_config(config(port), TASK), TASK)
    assert re.search(r"(127\.0\.0\.1|::1),? (is )?blocked by blocked-nets \((127\.0\.0\.0/8|::1/128), loopback\)$",
                     str(err.value)), str(err.value)
    assert factory.connections == 0
    if cls is not DnsCollector:  # the same collector on a private agent connects
        private = NetPolicy("auto")
        private.server_said({"x-taskd-agent-public": "false"})
        allowed = collector(cls, private)
        try:
            await allowed.collect(allowed.parse_config({**config(port), "timeout": 0.5}, TASK), TASK)
        except CollectError as exc:  # the listener never answers HTTP: a timeout, after connecting
            assert cls is HttpCollector and "timeout" in str(exc), exc
        assert factory.connections == 1


@pytest_twisted.ensureDeferred
async def test_an_explicit_list_applies_to_a_private_agent_too(listener):
    factory, port = listener
    policy = NetPolicy("192.0.2.0/24, 127.0.0.1/32")
    policy.server_said({"x-taskd-agent-public": "false"})
    tcp = collector(TcpCollector, policy)
    with pytest.raises(CollectError, match=r"127\.0\.0\.1 is blocked by blocked-nets \(127\.0\.0\.1/32, blocked-nets\)"):
        await tcp.collect(tcp.parse_config({"host": "127.0.0.1", "port": port}, TASK), TASK)
    assert factory.connections == 0


@pytest_twisted.ensureDeferred
async def test_a_public_agent_fails_a_loopback_check_naming_the_rule_until_made_private(tmp_path):
    gw = TsdbGwEmulator(admin_key="gw-admin").start()
    stack = Stack(tmp_path, **{"publisher": "tsdbgw", "tsdb-url": gw.url + "/", "tsdb-key": "gw-admin",
                               "tsdb-flush-interval": "0.1s", "blocked-nets": "auto"})
    try:
        agent_id = await stack.start()
        agent = await api(stack.server, "GET", f"/api/v1/agents/{agent_id}")
        assert agent["public"] is True  # org 1 publishes: auto-created public
        task = await api(stack.server, "POST", "/api/v1/tasks", http_task("web check", stack.url, agent_id))
        body = await wait_for(lambda: _status(stack, task["id"], "error"), 3 * INTERVAL, "status error")
        error = body["status"][0]["error"]
        assert f"GET {stack.url}: 127.0.0.1 is blocked by blocked-nets (127.0.0.0/8, loopback)" == error, error
        assert not [m for m in gw.metrics if m["Name"] == "raintank.apps.http.web-check.status_code"]

        await api(stack.server, "PUT", "/api/v1/agents", {"id": agent_id, "public": False})
        body = await wait_for(lambda: _status(stack, task["id"], "ok"), 20, "status ok once private")
        assert body["status"][0]["error"] == ""
    finally:
        await stack.close()
        await gw.stop()
