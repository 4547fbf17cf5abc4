"""Hostile and broken requests over real HTTP: each gets the JSON error envelope with
the right status, never a traceback, and the server keeps serving afterwards.

Some requests cannot be sent with treq (chunked bodies of our choosing, raw bytes in
the query string), so `raw_http` speaks HTTP/1.1 over a plain TCP connection.
"""
from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
import sqlalchemy as sa
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from taskd.db import models
from tests.integration.harness import ADMIN_KEY, Reply, assert_error, start_server, stop_server

MAX_BODY = 1024
JSON_HEADERS = {"Content-Type": "application/json"}


# -- helpers --------------------------------------------------------------------------

def assert_clean_error(reply: Reply, status: int, *words: str) -> str:
    """The JSON error envelope, HTTP status == meta.code, no traceback; returns the message."""
    assert b"Traceback" not in reply.raw and b'File "' not in reply.raw, reply.raw
    assert reply.status == status, (reply.status, reply.raw)
    content_type = reply.headers.getRawHeaders(b"content-type") or [b""]
    assert content_type[0].startswith(b"application/json"), content_type
    envelope = json.loads(reply.raw)
    assert set(envelope) == {"meta", "body"}
    assert envelope["body"] is None
    assert envelope["meta"]["code"] == status
    assert envelope["meta"]["type"] == "error"
    message = envelope["meta"]["message"]
    assert isinstance(message, str) and message.strip()
    for word in words:
        assert word in message, (word, message)
    return message


async def assert_still_serving(api) -> None:
    agent = await api.ok("POST", "/api/v1/agents", json_body={"name": "after-the-storm"})
    assert await api.ok("GET", f"/api/v1/agents/{agent['id']}") == agent


async def post_raw(api, path: str, body: bytes, content_type: str = "application/json") -> Reply:
    return await api.request("POST", path, data=body, headers={"Content-Type": content_type})


class _Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(self.data)


class _RawHeaders:
    """Just enough of twisted's Headers for assert_clean_error."""

    def __init__(self, headers: dict[bytes, bytes]) -> None:
        self._h = headers

    def getRawHeaders(self, name: bytes) -> list[bytes] | None:
        value = self._h.get(name.lower())
        return None if value is None else [value]


def _parse_response(raw: bytes) -> Reply:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        decoded = b""
        while True:
            size_line, _, body = body.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            decoded, body = decoded + body[:size], body[size + 2:]
        body = decoded
    return Reply(int(status_line.split()[1]), _RawHeaders(headers), body)


async def raw_http(api, request_line: bytes, headers: list[bytes], body: bytes = b"") -> Reply:
    """Send one request verbatim (with Connection: close) and parse the answer."""
    proto = _Collect()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", api.port), proto)
    head = b"\r\n".join([request_line, b"Host: 127.0.0.1", b"Connection: close", *headers])
    proto.transport.write(head + b"\r\n\r\n" + body)
    proto.done.addTimeout(30, reactor)
    return _parse_response(await proto.done)


def chunked(body: bytes, size: int) -> bytes:
    out = b""
    for i in range(0, len(body), size):
        piece = body[i:i + size]
        out += b"%x\r\n%s\r\n" % (len(piece), piece)
    return out + b"0\r\n\r\n"


def agent_json_of_size(name: str, size: int) -> bytes:
    """A valid agent body padded with JSON whitespace to exactly `size` bytes."""
    body = json.dumps({"name": name}).encode()
    return body[:-1] + b" " * (size - len(body)) + b"}"


def count(api, table: sa.Table) -> int:
    with api.server.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()


@pytest_twisted.async_yield_fixture
async def small_api(db_config):
    """A server whose max-body-size is 1024 bytes."""
    running = await start_server(*db_config, max_body_size=MAX_BODY)
    yield running
    await stop_server(running)


# -- malformed bodies ------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/api/v1/tasks", "/api/v1/agents"])
@pytest_twisted.ensureDeferred
async def test_malformed_json_names_the_position(api, path):
    reply = await post_raw(api, path, b'{"name": "x",\n  "interval": }')
    assert_clean_error(reply, 400, "malformed JSON", "line 2 column")
    await assert_still_serving(api)


@pytest.mark.parametrize("body", [b"[]", b'[{"name": "x"}]', b'"example-task-1"', b"42", b"null", b"true"])
@pytest.mark.parametrize("path", ["/api/v1/tasks", "/api/v1/agents"])
@pytest_twisted.ensureDeferred
async def test_json_that_is_not_an_object_is_400(api, path, body):
    reply = await post_raw(api, path, body)
    assert_clean_error(reply, 400, "JSON object")
    await assert_still_serving(api)


@pytest.mark.parametrize("body", [b"NaN", b'{"name": "x", "interval": Infinity}', b"{" * 100000])
@pytest_twisted.ensureDeferred
async def test_json_extensions_and_deep_nesting_are_400(api, body):
    reply = await post_raw(api, "/api/v1/tasks", body)
    assert_clean_error(reply, 400, "malformed JSON")
    await assert_still_serving(api)


WRONG_TYPES = [
    ("POST", "/api/v1/agents", {"name": 5}, "name"),
    ("POST", "/api/v1/agents", {"name": ["a"]}, "name"),
    ("POST", "/api/v1/agents", {"name": "a", "enabled": "yes"}, "enabled"),
    ("POST", "/api/v1/agents", {"name": "a", "public": 1}, "public"),
    ("POST", "/api/v1/agents", {"name": "a", "tags": "eu"}, "tags"),
    ("POST", "/api/v1/agents", {"name": "a", "tags": [{"t": 1}]}, "tags[0]"),
    ("POST", "/api/v1/agents", {"name": "a b"}, "name"),
    ("PUT", "/api/v1/agents", {"id": "abc", "name": "a"}, "id"),
    ("PUT", "/api/v1/agents", {"id": -1, "name": "a"}, "id"),
    ("PUT", "/api/v1/tasks", {"id": [1], "name": "t", "interval": 1, "route": {"type": "any"}}, "id"),
    ("POST", "/api/v1/tasks", {"name": {"a": 1}, "interval": 1, "route": {"type": "any"}}, "name"),
    ("POST", "/api/v1/tasks", {"name": "t", "interval": 2**63, "route": {"type": "any"}}, "interval"),
    ("POST", "/api/v1/tasks", {"name": "t", "interval": 1, "route": {"type": ["any"]}}, "route.type"),
    ("POST", "/api/v1/tasks", {"name": "t", "interval": 1, "route": {"type": "any"}, "taskType": 3}, "taskType"),
]


@pytest.mark.parametrize("method,path,body,field", WRONG_TYPES,
                         ids=[f"{m} {p} {f}" for m, p, _, f in WRONG_TYPES])
@pytest_twisted.ensureDeferred
async def test_wrong_types_are_400_naming_the_field(api, method, path, body, field):
    reply = await api.request(method, path, json_body=body)
    assert_clean_error(reply, 400, field)
    await assert_still_serving(api)


@pytest.mark.parametrize("path", ["/api/v1/tasks", "/api/v1/agents"])
@pytest_twisted.ensureDeferred
async def test_invalid_utf8_json_body_is_400(api, path):
    reply = await post_raw(api, path, b'{"name": "caf\xe9", "interval": 300, "route": {"type": "any"}}')
    assert_clean_error(reply, 400, "UTF-8")
    await assert_still_serving(api)


@pytest_twisted.ensureDeferred
async def test_invalid_utf8_form_body_is_400(api):
    reply = await post_raw(api, "/api/v1/agents", b"name=caf%E9", "application/x-www-form-urlencoded")
    assert_clean_error(reply, 400, "UTF-8")
    await assert_still_serving(api)


@pytest_twisted.ensureDeferred
async def test_malformed_multipart_body_is_400(api):
    body = b'--XyZ\r\nContent-Disposition: form-data; name="name"\r\n\r\nagent9\r\n'  # no closing delimiter
    reply = await post_raw(api, "/api/v1/agents", body, "multipart/form-data; boundary=XyZ")
    assert_clean_error(reply, 400, "multipart")
    await assert_still_serving(api)


# -- body size -------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_body_over_the_limit_with_content_length_is_413(small_api):
    reply = await post_raw(small_api, "/api/v1/agents", agent_json_of_size("too-big", MAX_BODY + 1))
    assert_clean_error(reply, 413, str(MAX_BODY))
    assert count(small_api, models.agent) == 0
    await assert_still_serving(small_api)


@pytest_twisted.ensureDeferred
async def test_body_of_exactly_the_limit_is_accepted(small_api):
    agent = await small_api.ok("POST", "/api/v1/agents", data=agent_json_of_size("just-fits", MAX_BODY),
                               headers=JSON_HEADERS)
    assert agent["name"] == "just-fits"


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_the_limit_is_413(small_api):
    body = agent_json_of_size("too-big", 5 * MAX_BODY)
    reply = await raw_http(small_api, b"POST /api/v1/agents HTTP/1.1", [
        b"Authorization: Bearer " + ADMIN_KEY.encode(), b"Content-Type: application/json",
        b"Transfer-Encoding: chunked"], chunked(body, 300))
    assert_clean_error(reply, 413, str(MAX_BODY))
    assert count(small_api, models.agent) == 0
    await assert_still_serving(small_api)


@pytest_twisted.ensureDeferred
async def test_chunked_body_under_the_limit_is_accepted(small_api):
    body = agent_json_of_size("chunky", MAX_BODY)
    reply = await raw_http(small_api, b"POST /api/v1/agents HTTP/1.1", [
        b"Authorization: Bearer " + ADMIN_KEY.encode(), b"Content-Type: application/json",
        b"Transfer-Encoding: chunked"], chunked(body, 100))
    assert reply.status == 200, reply.raw
    assert json.loads(reply.raw)["body"]["name"] == "chunky"


@pytest_twisted.ensureDeferred
async def test_oversized_body_is_413_even_without_a_key(small_api):
    reply = await small_api.request("POST", "/api/v1/tasks", key=None, data=b"x" * (MAX_BODY * 4),
                                    headers=JSON_HEADERS)
    assert_clean_error(reply, 413)
    await assert_still_serving(small_api)


# -- routes and methods ----------------------------------------------------------------

@pytest.mark.parametrize("path", ["/api/v1/nope", "/api/v2/tasks", "/favicon.ico", "/api/v1/tasks/1/agents"])
@pytest_twisted.ensureDeferred
async def test_unknown_route_is_404(api, path):
    reply = await api.request("GET", path)
    assert_clean_error(reply, 404, path)
    await assert_still_serving(api)


@pytest.mark.parametrize("method,path,allowed", [
    ("PATCH", "/api/v1/agents", {"GET", "POST", "PUT"}),
    ("DELETE", "/api/v1/tasks", {"GET", "POST", "PUT"}),
    ("DELETE", "/api/v1/agents", {"GET", "POST", "PUT"}),
    ("POST", "/api/v1/tasks/1", {"GET", "DELETE"}),
    ("PUT", "/api/v1/metrics", {"GET"}),
])
@pytest_twisted.ensureDeferred
async def test_wrong_method_is_405_with_allow(api, method, path, allowed):
    reply = await api.request(method, path)
    assert_clean_error(reply, 405, method)
    allow = reply.headers.getRawHeaders(b"allow")
    assert allow, "405 without an Allow header"
    assert allowed <= {m.strip() for m in allow[0].decode().split(",")}
    assert method not in allow[0].decode()
    await assert_still_serving(api)


@pytest.mark.parametrize("path", ["/api/v1/tasks/abc", "/api/v1/tasks/0", "/api/v1/tasks/-1",
                                  "/api/v1/tasks/99999999999999999999", "/api/v1/agents/1.5"])
@pytest_twisted.ensureDeferred
async def test_bad_ids_in_the_path_are_400(api, path):
    reply = await api.request("GET", path)
    assert_clean_error(reply, 400, "positive integer")
    await assert_still_serving(api)


# -- query strings ---------------------------------------------------------------------

@pytest.mark.parametrize("query", ["name=%FF", "name=%C3%28", "%FF=1", "tag=%ED%A0%80"])
@pytest_twisted.ensureDeferred
async def test_percent_encoded_non_utf8_query_is_400(api, query):
    reply = await api.request("GET", "/api/v1/agents?" + query)
    assert_clean_error(reply, 400, "UTF-8")
    await assert_still_serving(api)


@pytest_twisted.ensureDeferred
async def test_raw_non_ascii_bytes_in_the_request_line_are_400(api):
    # Not HTTP at all (RFC 9112: the request-target is ASCII), so twisted.web's
    # parser refuses it with a bare "400 Bad Request" before taskd sees a request:
    # no envelope here, but no traceback and no harm either.
    reply = await raw_http(api, b"GET /api/v1/tasks?name=\xff\xfe HTTP/1.1",
                           [b"Authorization: Bearer " + ADMIN_KEY.encode()])
    assert reply.status == 400
    assert b"Traceback" not in reply.raw and b'File "' not in reply.raw
    await assert_still_serving(api)


@pytest.mark.parametrize("path", ["/api/v1/agents/%FF", "/api/v1/%C3%28"])
@pytest_twisted.ensureDeferred
async def test_non_utf8_path_is_400_envelope(api, path):
    reply = await api.request("GET", path)
    assert_clean_error(reply, 400, "UTF-8")
    await assert_still_serving(api)


@pytest.mark.parametrize("query", ["name=%zz", "name=%", "name=%2", "name=a%00b", "name=&name=", "name"])
@pytest_twisted.ensureDeferred
async def test_percent_garbage_in_a_filter_matches_nothing(api, query):
    await api.ok("POST", "/api/v1/agents", json_body={"name": "zz"})
    reply = await api.request("GET", "/api/v1/agents?" + query)
    assert reply.status == 200, reply.raw
    got = [a["name"] for a in reply.body]
    # An empty filter value means "no filter"; anything else matches no agent.
    assert got == (["zz"] if query in ("name=&name=", "name") else [])


@pytest_twisted.ensureDeferred
async def test_unknown_query_parameter_is_400(api):
    reply = await api.request("GET", "/api/v1/tasks", params={"nmae": "x"})
    assert_clean_error(reply, 400, "'nmae'")


# -- SQL meta-characters -----------------------------------------------------------------

HOSTILE = [
    "' OR 1=1 --",
    "' OR '1'='1",
    "name; DROP TABLE agent",
    "1); DROP TABLE task; --",
    "%",
    "_",
    "\\",
    "\\%",
    '"',
    "`",
    "`name`",
    "*' OR 1=1 --",
    "*%*",
    "*_*",
    "*\\*",
    "' UNION SELECT id, name FROM agent --",
]

# (endpoint, parameter, how the API must answer a hostile value)
FILTERS = [
    ("/api/v1/agents", "name", 200),
    ("/api/v1/agents", "metric", 200),
    ("/api/v1/agents", "tag", 200),
    ("/api/v1/agents", "enabled", 400),
    ("/api/v1/agents", "public", 400),
    ("/api/v1/agents", "orderBy", 400),
    ("/api/v1/agents", "limit", 400),
    ("/api/v1/agents", "page", 400),
    ("/api/v1/tasks", "name", 200),
    ("/api/v1/tasks", "metric", 200),
    ("/api/v1/tasks", "enabled", 400),
    ("/api/v1/tasks", "orderBy", 400),
    ("/api/v1/tasks", "limit", 400),
    ("/api/v1/tasks", "page", 400),
    ("/api/v1/metrics", "namespace", 200),
    ("/api/v1/metrics", "version", 400),
    ("/api/v1/metrics", "orderBy", 400),
    ("/api/v1/metrics", "limit", 400),
    ("/api/v1/metrics", "page", 400),
]


async def seed(api) -> dict[str, list]:
    """Two agents with tags and a catalog, two tasks; returns the unfiltered lists."""
    a1 = await api.ok("POST", "/api/v1/agents", json_body={"name": "alpha", "tags": ["eu"], "public": True})
    await api.ok("POST", "/api/v1/agents", json_body={"name": "beta", "tags": ["us"]})
    await api.server.agents.catalog.replace_agent_catalog(a1["id"], [("/os/cpu", 1, None), ("/os/mem", 2, None)])
    for name in ("cpu-check", "mem-check"):
        await api.ok("POST", "/api/v1/tasks", json_body={
            "name": name, "interval": 60, "route": {"type": "any"}, "metrics": {f"/os/{name[:3]}": 0}})
    return {path: await api.ok("GET", path) for path in ("/api/v1/agents", "/api/v1/tasks", "/api/v1/metrics")}


@pytest.mark.parametrize("path,param,status", FILTERS, ids=[f"{p.rsplit('/', 1)[1]}-{q}" for p, q, _ in FILTERS])
@pytest_twisted.ensureDeferred
async def test_sql_meta_characters_in_filters_are_harmless(api, path, param, status):
    before = await seed(api)
    assert len(before["/api/v1/agents"]) == 2 and len(before["/api/v1/metrics"]) == 2
    for value in HOSTILE:
        reply = await api.request("GET", path, params={param: value})
        if status == 200:
            assert reply.status == 200, (value, reply.raw)
            assert reply.body == [], (value, reply.body)
        else:
            assert_clean_error(reply, 400, param)
    tables = set(sa.inspect(api.server.engine).get_table_names())
    assert set(models.metadata.tables) <= tables
    for seeded_path, rows in before.items():
        assert await api.ok("GET", seeded_path) == rows, seeded_path
    assert count(api, models.agent) == 2 and count(api, models.task) == 2


@pytest_twisted.ensureDeferred
async def test_sql_meta_characters_are_stored_and_matched_literally(api):
    names = ["50%", "50x", "a\\b", "axb", "it's", 'say "hi"', "back`tick", "x; DROP TABLE task"]
    for name in names:
        await api.ok("POST", "/api/v1/tasks", json_body={"name": name, "interval": 60, "route": {"type": "any"}})

    async def matching(pattern: str) -> list[str]:
        return sorted(t["name"] for t in await api.ok("GET", "/api/v1/tasks", params={"name": pattern}))

    for name in names:
        assert await matching(name) == [name]
    assert await matching("50*") == ["50%", "50x"]
    assert await matching("*%") == ["50%"]
    assert await matching("a\\*") == ["a\\b"]
    assert await matching("*'*") == ["it's"]
    assert await matching('*"*') == ['say "hi"']
    assert await matching("*`*") == ["back`tick"]
    assert await matching("*;*") == ["x; DROP TABLE task"]
    assert count(api, models.task) == len(names)


@pytest_twisted.ensureDeferred
async def test_percent_and_underscore_in_a_name_filter_match_literally(api):
    for name in ("a_b", "axb", "a_bc"):
        await api.ok("POST", "/api/v1/agents", json_body={"name": name})

    async def matching(pattern: str) -> list[str]:
        return sorted(a["name"] for a in await api.ok("GET", "/api/v1/agents", params={"name": pattern}))

    assert await matching("a_b") == ["a_b"]
    assert await matching("a_*") == ["a_b", "a_bc"]
    assert await matching("a*b") == ["a_b", "axb"]
    assert await matching("a%b") == []
    assert await matching("a%") == []
    assert await matching("*_*") == ["a_b", "a_bc"]


@pytest_twisted.ensureDeferred
async def test_wildcards_in_the_metrics_namespace_filter_are_literal_except_star(api):
    agent = await api.ok("POST", "/api/v1/agents", json_body={"name": "a1"})
    await api.server.agents.catalog.replace_agent_catalog(
        agent["id"], [("/os/cpu_0", 1, None), ("/os/cpuX0", 1, None), ("/os/100%", 1, None)])

    async def matching(pattern: str) -> list[str]:
        return sorted(m["namespace"] for m in await api.ok("GET", "/api/v1/metrics", params={"namespace": pattern}))

    assert await matching("/os/cpu_0") == ["/os/cpu_0"]
    assert await matching("/os/cpu_*") == ["/os/cpu_0"]
    assert await matching("/os/*%") == ["/os/100%"]
    assert await matching("/os/*") == ["/os/100%", "/os/cpuX0", "/os/cpu_0"]


@pytest_twisted.ensureDeferred
async def test_a_non_finite_number_is_a_400_naming_the_field_and_nothing_is_stored(api):
    body = (b'{"name": "inf", "interval": 60, "route": {"type": "any"},'
            b' "config": {"/raintank/apps/x": {"threshold": 1e400}}}')
    reply = await api.request("POST", "/api/v1/tasks", data=body, headers={"Content-Type": "application/json"})
    assert_error(reply, 400, "config./raintank/apps/x.threshold: not a finite number")
    assert await api.ok("GET", "/api/v1/tasks") == []
