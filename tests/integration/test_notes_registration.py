"""The operators' notes' agent registration, byte for byte over a raw TCP connection.

The notes register an agent three ways (curl, a raw HTTP block, a Go client), each
sending headers that disagree with its multipart body (see tests/notes_requests.py).
No HTTP client library sits in between here: the exact bytes go to the server's
socket and the response is parsed from the bytes that come back.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from tests.integration.harness import ORG2_KEY
from tests.notes_requests import ALL, CURL, NotesRequest

ZERO = "0001-01-01T00:00:00Z"
RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")
AGENT_KEYS = {"id", "name", "enabled", "enabledChange", "public", "tags",
              "online", "onlineChange", "created", "updated", "failingTasks", "staleTasks"}
TIMEOUT = 10.0  # seconds; a hung server fails the test instead of hanging the run


# -- helpers ---------------------------------------------------------------------------

@dataclass
class RawResponse:
    status: int
    headers: dict[str, list[str]] = field(default_factory=dict)
    body: bytes = b""

    @property
    def json(self):
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[-1] if values else None


def _dechunk(data: bytes) -> bytes | None:
    """The decoded body of a complete chunked message, or None if more is to come."""
    out, pos = b"", 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(data[pos:eol].split(b";")[0], 16)
        start, end = eol + 2, eol + 2 + size
        if size == 0:  # last chunk: complete once the (empty) trailer section has ended
            return out if b"\r\n\r\n" in data[eol:] else None
        if len(data) < end + 2:
            return None
        out += data[start:end]
        pos = end + 2


def parse_response(data: bytes, closed: bool) -> RawResponse | None:
    """A complete HTTP/1.1 response from `data`, or None if it is not complete yet."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    version, status, _ = lines[0].split(" ", 2)
    assert version.startswith("HTTP/1."), lines[0]
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers.setdefault(key.strip().lower(), []).append(value.strip())
    if "content-length" in headers:
        length = int(headers["content-length"][-1])
        return RawResponse(int(status), headers, rest[:length]) if len(rest) >= length else None
    if "chunked" in ",".join(headers.get("transfer-encoding", [])).lower():
        body = _dechunk(rest)
        return None if body is None else RawResponse(int(status), headers, body)
    return RawResponse(int(status), headers, rest) if closed else None


class _OneExchange(Protocol):
    """Writes one request, collects one response, then hangs up."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.done: Deferred[RawResponse] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        response = parse_response(self.received, closed=False)
        if response is not None and not self.done.called:
            self.done.callback(response)
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if not self.done.called:
            response = parse_response(self.received, closed=True)
            if response is None:
                self.done.errback(AssertionError(f"connection closed mid-response: {self.received!r}"))
            else:
                self.done.callback(response)


async def send_raw(api, request: bytes) -> RawResponse:
    protocol = _OneExchange(request)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", api.port), protocol)
    protocol.done.addTimeout(TIMEOUT, reactor)
    return await protocol.done


def build(notes: NotesRequest, api, name: str) -> bytes:
    return notes.build(name, f"127.0.0.1:{api.port}")


def assert_registered(response: RawResponse, name: str) -> dict:
    """The notes' documented answer (with tags [] rather than the original's null, and
    taskd's read-only failingTasks)."""
    assert response.status == 200, (response.status, response.body)
    assert response.header("content-type").startswith("application/json")
    envelope = response.json
    assert envelope["meta"] == {"code": 200, "message": "success", "type": "agent"}
    agent = envelope["body"]
    assert set(agent) == AGENT_KEYS
    assert isinstance(agent["id"], int) and agent["id"] > 0
    assert agent["name"] == name
    assert agent["enabled"] is False and agent["public"] is False and agent["online"] is False
    assert agent["tags"] == [] and agent["failingTasks"] == 0
    assert agent["enabledChange"] == ZERO and agent["onlineChange"] == ZERO
    assert RFC3339_UTC.match(agent["created"]) and RFC3339_UTC.match(agent["updated"])
    return agent


def notes_name(notes: NotesRequest) -> str:
    return f"notes-{notes.label}"


# -- tests -----------------------------------------------------------------------------

@pytest.mark.parametrize("notes", ALL, ids=lambda n: n.label)
@pytest_twisted.ensureDeferred
async def test_notes_request_registers_the_agent(api, notes):
    name = notes_name(notes)
    agent = assert_registered(await send_raw(api, build(notes, api, name)), name)
    assert await api.ok("GET", f"/api/v1/agents/{agent['id']}") == agent
    assert [a["id"] for a in await api.ok("GET", "/api/v1/agents", params={"name": name})] == [agent["id"]]


@pytest.mark.parametrize("notes", ALL, ids=lambda n: n.label)
@pytest_twisted.ensureDeferred
async def test_notes_request_sent_twice_conflicts(api, notes):
    name = notes_name(notes)
    assert_registered(await send_raw(api, build(notes, api, name)), name)
    again = await send_raw(api, build(notes, api, name))
    assert again.status == 409
    assert again.json["meta"]["code"] == 409 and again.json["meta"]["type"] == "error"
    assert again.json["body"] is None
    assert len(await api.ok("GET", "/api/v1/agents")) == 1


@pytest_twisted.ensureDeferred
async def test_all_notes_requests_register_distinct_agents_in_org_1(api):
    ids = []
    for notes in ALL:
        ids.append(assert_registered(await send_raw(api, build(notes, api, notes_name(notes))), notes_name(notes))["id"])
    assert len(set(ids)) == len(ALL)
    listed = await api.ok("GET", "/api/v1/agents", params={"name": "notes-*"})
    assert sorted(a["id"] for a in listed) == sorted(ids)
    # "Bearer EASY" is the admin key, i.e. org 1: another org does not see the (private) agents.
    assert await api.ok("GET", "/api/v1/agents", key=ORG2_KEY) == []


@pytest_twisted.ensureDeferred
async def test_notes_authentication_header_is_401_explaining_authorization(api):
    request = build(CURL, api, "misspelt")
    assert b"Authorization: Bearer EASY\r\n" in request
    request = request.replace(b"Authorization: Bearer EASY\r\n", b"Authentication: Bearer EASY\r\n")
    response = await send_raw(api, request)
    assert response.status == 401
    envelope = response.json
    assert envelope["meta"]["code"] == 401 and envelope["meta"]["type"] == "error"
    assert envelope["body"] is None
    assert "Authorization" in envelope["meta"]["message"]
    assert response.header("www-authenticate") is not None
    assert await api.ok("GET", "/api/v1/agents") == []
