"""The built-in collectors' config validation, catalogs, series names and discovery.

A task's config is checked before it is scheduled: each kind of mistake must be a
ConfigError that names the key (and never echoes the value: it may be a secret).
"""
from __future__ import annotations

from importlib.metadata import EntryPoint
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from taskd.agent.builtin import collector as collector_module
from taskd.agent.builtin.collector import ConfigError, TaskInfo, load_collectors
from taskd.agent.builtin.collectors.common import series, slug
from taskd.agent.builtin.collectors.dns import DnsCollector
from taskd.agent.builtin.collectors.http import HttpCollector
from taskd.agent.builtin.collectors.ping import PingCollector
from taskd.agent.builtin.collectors.ns1 import Ns1Collector, qps_url
from taskd.agent.builtin.collectors.tcp import TcpCollector
from taskd.agent.settings import AgentSettings

GROUP = collector_module.ENTRY_POINT_GROUP
TASK = TaskInfo(id=7, name="My Site", org_id=1, interval=60)
CLASSES = {"http": HttpCollector, "tcp": TcpCollector, "dns": DnsCollector, "ns1": Ns1Collector,
           "ping": PingCollector}
GOOD = {
    "http": {"url": "http://example.com/"},
    "tcp": {"host": "example.com", "port": 443},
    "dns": {"name": "example.com", "server": "192.0.2.53"},
    "ns1": {"ns1_key": "k", "zone": "example.com"},
    "ping": {"host": "192.0.2.9"},
}


def make(name: str) -> Any:
    return CLASSES[name](reactor=MemoryReactorClock(), settings=AgentSettings())


def parse(name: str, config: Any, task: TaskInfo = TASK) -> Any:
    return make(name).parse_config(config, task)


def config_error(name: str, config: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(name, config)
    return str(caught.value)


# -- discovery ------------------------------------------------------------------------

def test_the_installed_entry_points_give_every_builtin_collector():
    found = load_collectors(reactor=MemoryReactorClock(), settings=AgentSettings())
    assert {name: type(c) for name, c in found.items()} == CLASSES
    for name, c in found.items():
        assert c.name == name and c.namespace == f"/raintank/apps/{name}"


def test_a_broken_entry_point_is_logged_and_skipped(monkeypatch):
    fakes = [EntryPoint("tcp", "taskd.agent.builtin.collectors.tcp:TcpCollector", GROUP),
             EntryPoint("broken", "no_such_module_for_taskd_tests:Collector", GROUP)]
    monkeypatch.setattr(collector_module, "entry_points", lambda *, group: fakes if group == GROUP else [])
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        found = load_collectors(reactor=MemoryReactorClock(), settings=AgentSettings())
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert list(found) == ["tcp"] and isinstance(found["tcp"], TcpCollector)
    errors = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.error]
    assert any("broken" in line and "no_such_module_for_taskd_tests" in line for line in errors)


# -- catalogs -------------------------------------------------------------------------

@pytest.mark.parametrize("name, metrics", [
    ("http", ["status_code", "total_time", "ttfb", "body_size", "tls_expiry_days", "tls_chain_expiry_days",
              "tls_version", "redirects", "success"]),
    ("tcp", ["connect_time", "success", "tls_expiry_days"]),
    ("dns", ["answers", "query_time", "success"]),
])
def test_catalog_has_one_record_per_metric_with_the_config_as_policy(name, metrics):
    records = CLASSES[name].catalog
    assert [r["namespace"] for r in records] == [f"/raintank/apps/{name}/*/{m}" for m in metrics]
    assert all(r["version"] == 1 for r in records)
    rows = {row["name"]: row for row in records[0]["policy"]}
    assert rows["timeout"] == {"name": "timeout", "type": "float", "required": False}
    required = {n for n, row in rows.items() if row["required"]}
    assert required == {"http": {"url"}, "tcp": {"host", "port"}, "dns": {"name", "server"}}[name]


def test_ns1_catalog_is_the_originals():
    assert Ns1Collector.catalog == ({"namespace": "/raintank/apps/ns1/zones/*/qps", "version": 1, "policy": [
        {"name": "ns1_key", "type": "string", "required": True},
        {"name": "zone", "type": "string", "required": True}]},)


# -- series names ---------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("My Site", "my-site"), ("api.example.com", "api_example_com"), ("  Hello, World! ", "hello-world"),
    ("a__b--c", "a__b--c"), ("Ünïcode ok", "n-code-ok"),
])
def test_slug(text, expected):
    assert slug(text) == expected


def test_series_name_uses_the_task_slug_or_its_id():
    assert series("http", TASK, "ttfb") == "raintank.apps.http.my-site.ttfb"
    assert series("tcp", TaskInfo(id=9, name="!!!", org_id=1, interval=10), "success") == \
        "raintank.apps.tcp.task-9.success"


def test_ns1_url_quotes_the_zone_twice():
    assert qps_url("https://api.nsone.net/", "example.com") == "https://api.nsone.net/v1/stats/qps/example.com"
    assert qps_url("http://h:1", "a b/c") == "http://h:1/v1/stats/qps/a%2520b%252Fc"


# -- good configs ---------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CLASSES))
def test_minimal_config_gets_the_defaults(name):
    assert parse(name, GOOD[name]).timeout == 10.0
    assert parse(name, GOOD[name], TaskInfo(id=1, name="t", org_id=1, interval=4)).timeout == 3.2


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_a_timeout_is_kept_below_the_interval_so_a_hanging_run_ends_before_the_next_slot(name):
    task = TaskInfo(id=1, name="t", org_id=1, interval=10)
    assert parse(name, {**GOOD[name], "timeout": 30}, task).timeout == 8.0
    assert parse(name, {**GOOD[name], "timeout": 10}, task).timeout == 8.0
    assert parse(name, {**GOOD[name], "timeout": 7.5}, task).timeout == 7.5
    assert parse(name, {**GOOD[name], "timeout": 30}).timeout == 30.0  # interval 60: 48 s allowed


def test_http_full_config():
    cfg = parse("http", {"url": "https://example.com:8443/x?y=1", "method": "head", "timeout": 2,
                         "headers": {"Authorization": "Bearer t"}, "insecure": True})
    assert (cfg.url, cfg.method, cfg.timeout, dict(cfg.headers), cfg.insecure) == \
        ("https://example.com:8443/x?y=1", "HEAD", 2.0, {"Authorization": "Bearer t"}, True)
    defaults = parse("http", {"url": "http://example.com/", "method": None})
    assert (defaults.method, dict(defaults.headers), defaults.insecure) == ("GET", {}, False)


def test_http_idn_host_becomes_punycode():
    assert parse("http", {"url": "http://bücher.example/ä"}).url == "http://xn--bcher-kva.example/%C3%A4"


def test_tcp_accepts_an_integral_float_port():
    cfg = parse("tcp", {"host": "[::1]", "port": 22.0})
    assert (cfg.host, cfg.port) == ("::1", 22) and isinstance(cfg.port, int)


@pytest.mark.parametrize("server, expected", [
    ("192.0.2.53", ("192.0.2.53", 53)), ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("ns1.example.com", ("ns1.example.com", 53)), ("[::1]:5300", ("::1", 5300)), ("::1", ("::1", 53)),
    ("[2001:db8::1]", ("2001:db8::1", 53)),
])
def test_dns_server_forms(server, expected):
    assert parse("dns", {"name": "example.com", "server": server}).server == expected


def test_dns_full_config():
    cfg = parse("dns", {"name": "example.com.", "type": "mx", "server": "192.0.2.53", "protocol": "TCP",
                        "timeout": 0.5})
    assert (cfg.type, cfg.protocol, cfg.timeout) == ("MX", "tcp", 0.5)
    assert (cfg.query.name.name, cfg.query.type) == (b"example.com", 15)


def test_dns_ptr_of_an_address_asks_for_the_reverse_name():
    cfg = parse("dns", {"name": "192.0.2.1", "type": "PTR", "server": "192.0.2.53"})
    assert cfg.query.name.name == b"1.2.0.192.in-addr.arpa"


# -- bad configs ----------------------------------------------------------------------

BAD = [
    # every collector: not an object, unknown keys, timeout
    ("http", "http://example.com", ["/raintank/apps/http", "expected an object"]),
    ("http", {"url": "http://x/", "urll": "y", "verbose": 1}, ["unknown keys", "urll, verbose", "known: url"]),
    ("tcp", {"host": "h", "port": 1, "hostname": "h"}, ["unknown key in", "hostname"]),
    ("dns", {**GOOD["dns"], "timeout": 0}, ["timeout", "greater than 0"]),
    ("tcp", {**GOOD["tcp"], "timeout": -1}, ["timeout", "greater than 0"]),
    ("ns1", {**GOOD["ns1"], "timeout": "5"}, ["timeout", "expected a number", "got string"]),
    ("http", {**GOOD["http"], "timeout": True}, ["timeout", "expected a number", "got bool"]),
    # http
    ("http", {}, ["url", "required"]),
    ("http", {"url": 5}, ["url", "expected a string", "got integer"]),
    ("http", {"url": "ftp://example.com/"}, ["url", "http:// or https://"]),
    ("http", {"url": "http:///path"}, ["url", "no host"]),
    ("http", {"url": "http://example.com:99999/"}, ["url", "port"]),
    ("http", {"url": "http://u:p@example.com/"}, ["url", "credentials"]),
    ("http", {**GOOD["http"], "method": "TRACE"}, ["method", "GET, HEAD, POST"]),
    ("http", {**GOOD["http"], "headers": "X-A: b"}, ["headers", "expected an object", "got string"]),
    ("http", {**GOOD["http"], "headers": {"X-A": 1}}, ["headers", "non-string values"]),
    ("http", {**GOOD["http"], "headers": {"Bad Name": "x"}}, ["headers", "not a valid header name"]),
    ("http", {**GOOD["http"], "headers": {"X-A": "a\r\nX-Injected: 1"}}, ["headers", "X-A", "line break"]),
    ("http", {**GOOD["http"], "insecure": "yes"}, ["insecure", "expected a boolean", "got string"]),
    # tcp
    ("tcp", {"port": 80}, ["host", "required"]),
    ("tcp", {"host": "example.com"}, ["port", "required"]),
    ("tcp", {"host": "example.com", "port": 0}, ["port", "1-65535"]),
    ("tcp", {"host": "example.com", "port": 65536}, ["port", "1-65535"]),
    ("tcp", {"host": "example.com", "port": "80"}, ["port", "expected an integer", "got string"]),
    ("tcp", {"host": "example.com", "port": 80.5}, ["port", "expected an integer", "got number"]),
    ("tcp", {"host": " ", "port": 80}, ["host", "host name or IP"]),
    ("tcp", {"host": ["a"], "port": 80}, ["host", "expected a string", "got array"]),
    # dns
    ("dns", {"server": "192.0.2.53"}, ["name", "required"]),
    ("dns", {"name": "example.com"}, ["server", "required"]),
    ("dns", {"name": "a..b", "server": "192.0.2.53"}, ["name", "domain name"]),
    ("dns", {**GOOD["dns"], "type": "ANY"}, ["type", "A, AAAA"]),
    ("dns", {**GOOD["dns"], "protocol": "quic"}, ["protocol", "udp or tcp"]),
    ("dns", {**GOOD["dns"], "server": "192.0.2.53:0"}, ["server", "1-65535"]),
    ("dns", {**GOOD["dns"], "server": "192.0.2.53:dns"}, ["server", "1-65535"]),
    ("dns", {**GOOD["dns"], "server": "[::1"}, ["server", "host or host:port"]),
    # ns1
    ("ns1", {"zone": "example.com"}, ["ns1_key", "required"]),
    ("ns1", {"ns1_key": "k"}, ["zone", "required"]),
    ("ns1", {"ns1_key": "  ", "zone": "example.com"}, ["ns1_key", "empty"]),
    ("ns1", {"ns1_key": "k", "zone": "!!!"}, ["zone", "zone name"]),
]


@pytest.mark.parametrize("name, config, fragments", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_config_names_the_key(name, config, fragments):
    message = config_error(name, config)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize("config", [
    {"ns1_key": ["s3cret-value"], "zone": "example.com"},
    {"ns1_key": "s3cret-value\r\n", "zone": "example.com"},
    {"ns1_key": "s3cret-value", "zone": 12},
])
def test_config_errors_never_echo_a_secret(config):
    message = config_error("ns1", config)
    assert "s3cret-value" not in message and ("ns1_key" in message or "zone" in message)


def test_ns1_config_repr_hides_the_key():
    cfg = parse("ns1", {"ns1_key": "s3cret-value", "zone": "example.com"})
    assert cfg.ns1_key == "s3cret-value" and "s3cret-value" not in repr(cfg)
