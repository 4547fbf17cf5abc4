"""A real task-server in the test's reactor, on 127.0.0.1 port 0, and an HTTP client.

Everything is real (sockets, HTTP, SQL) except grafana.com's key check, which is the
emulator in tests/fakes/auth_endpoint.py.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import treq
from twisted.internet import reactor
from twisted.web.client import HTTPConnectionPool

from taskd.server.assembly import Server, build_server
from taskd.server.settings import ServerSettings
from tests.conftest import wipe as wipe_tables
from tests.waiting import until
from tests.fakes.auth_endpoint import FakeAuthEndpoint, org, start_auth_endpoint

ADMIN_KEY = "EASY"
ORG2_KEY = "key-org-2"
ORG3_KEY = "key-org-3"
ORG4_KEY = "key-org-4"  # an org not in public-agent-orgs
VIEWER_KEY = "key-org-2-viewer"
EDITOR_KEY = "key-org-2-editor"


@dataclass
class Reply:
    status: int
    headers: Any
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)

    @property
    def body(self) -> Any:
        return self.json["body"]

    @property
    def meta(self) -> dict:
        return self.json["meta"]


def assert_error(reply: Reply, status: int, *words: str) -> str:
    """The reply is the error envelope with that status; its message contains `words`."""
    assert reply.status == status, (reply.status, reply.raw)
    assert reply.meta["code"] == status and reply.meta["type"] == "error"
    assert reply.body is None
    message = reply.meta["message"]
    for word in words:
        assert word in message, (word, message)
    return message


class RunningServer:
    def __init__(self, server: Server, auth: FakeAuthEndpoint) -> None:
        self.server = server
        self.auth = auth
        self.port = server.listener.port.getHost().port
        self.base = f"http://127.0.0.1:{self.port}"
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    async def request(self, method: str, path: str, *, key: str | None = ADMIN_KEY,
                      json_body: Any = None, data: Any = None, headers: dict | None = None,
                      params: Any = None, timeout: float | None = None) -> Reply:
        hdrs = dict(headers or {})
        if key is not None:
            hdrs.setdefault("Authorization", f"Bearer {key}")
        kwargs: dict[str, Any] = {"headers": hdrs, "pool": self.pool, "params": params}
        if timeout is not None:  # the call itself is the behaviour under test (e.g. a stalled database)
            kwargs["timeout"] = timeout
        if json_body is not None:
            kwargs["json"] = json_body
        if data is not None:
            kwargs["data"] = data
        resp = await treq.request(method, self.base + path, **kwargs)
        raw = await resp.content()
        return Reply(resp.code, resp.headers, raw)

    async def ok(self, method: str, path: str, **kw: Any) -> Any:
        """Request that must succeed; returns the envelope's body."""
        reply = await self.request(method, path, **kw)
        assert reply.status == 200, (reply.status, reply.raw)
        assert reply.meta["code"] == 200
        return reply.body


async def start_server(db_type: str, connect_str: str, *, wipe: bool = True,
                       **overrides: Any) -> RunningServer:
    """A server on a fresh database; ``wipe=False`` keeps its data (a restart)."""
    auth = start_auth_endpoint({
        ORG2_KEY: org(2, "acme", "Admin"),
        ORG3_KEY: org(3, "globex", "Admin"),
        ORG4_KEY: org(4, "initech", "Admin"),
        VIEWER_KEY: org(2, "acme", "Viewer"),
        EDITOR_KEY: org(2, "acme", "Editor"),
    })
    settings = dataclasses.replace(
        ServerSettings(),
        **{
            "addr": "tcp:0:interface=127.0.0.1",
            "db_type": db_type,
            "db_connect_str": connect_str,
            "admin_key": ADMIN_KEY,
            "auth_endpoint": auth.url,
            # Orgs 1-3 are ones the operator lets publish agents (org 1 alone by
            # default); org 4 is not (tests/integration/test_agent_publishing.py).
            "public_agent_orgs": (1, 2, 3),
            **overrides,
        },
    )
    server = build_server(settings, reactor)
    if wipe:
        wipe_tables(server.engine)
    server.service.startService()
    await server.listener.listening
    # Its liveness row is written as it starts: let that write land before the test
    # writes to the database behind the server's back (sqlite refuses a transaction that
    # read before another connection's commit and then writes).
    await until(lambda: server.liveness.instance is not None, what="the server registering in the database")
    return RunningServer(server, auth)


async def stop_server(running: RunningServer) -> None:
    await running.server.service.stopService()
    await running.auth.stop()
