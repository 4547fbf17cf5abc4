"""An emulator of grafana.com's ``POST /api/api-keys/check``.

This is a stand-in, not grafana.com: tests cannot reach grafana.com (no network,
no real keys), yet taskd's auth must be exercised over a real HTTP socket.  It
answers like grafana.com does for the fields taskd reads, and can be switched into
failure modes to test what taskd does when the endpoint misbehaves.

Usage, inside a running reactor (pytest-twisted)::

    endpoint = start_auth_endpoint({"key-a": org(2, "acme")})
    ... Authenticator(endpoint=endpoint.url, ...) ...
    yield endpoint.stop()
"""
from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from tests.fakes.loopback import TrackingFactory

__all__ = ["CheckKeyResource", "FakeAuthEndpoint", "org", "start_auth_endpoint", "MODES"]

#: normal: answer from ``keys``; error500: always 500; garbage: 200 with a non-JSON
#: body; hang: never answer (for request timeouts); status: answer ``status_code`` (a
#: 429 rate limit, a 408, a 404...) with a JSON message; stall-body: send the headers
#: and half a body, then nothing; huge-body: a 200 whose body is ``huge_size`` bytes.
MODES = ("normal", "error500", "garbage", "hang", "status", "stall-body", "huge-body")


def org(org_id: int, name: str, role: str = "Admin", slug: str | None = None) -> dict[str, Any]:
    """The answer grafana.com gives for a key of that org."""
    return {"orgId": org_id, "orgName": name, "orgSlug": slug or name.lower(), "role": role}


class CheckKeyResource(Resource):
    isLeaf = True

    def __init__(self, endpoint: FakeAuthEndpoint) -> None:
        super().__init__()
        self._endpoint = endpoint

    def render_POST(self, request: Request) -> bytes | int:
        if request.path != b"/api/api-keys/check":
            request.setResponseCode(404)
            return b'{"message":"Not found"}'
        ep = self._endpoint
        ep.requests += 1
        token = (request.args or {}).get(b"token", [b""])[0].decode("utf-8", "replace")
        ep.tokens.append(token)
        if ep.mode == "hang":
            return NOT_DONE_YET
        if ep.mode == "status":
            request.setResponseCode(ep.status_code)
            request.setHeader(b"content-type", b"application/json")
            return b'{"message":"as configured"}'
        if ep.mode == "stall-body":
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", b"200")
            request.write(b'{"orgId": 2, "orgName": "sl')
            return NOT_DONE_YET
        if ep.mode == "huge-body":
            request.setHeader(b"content-type", b"application/json")
            return b'{"orgId": 2, "pad": "' + b"x" * ep.huge_size + b'"}'

        if ep.mode == "error500":
            request.setResponseCode(500)
            return b'{"message":"Internal Server Error"}'
        if ep.mode == "garbage":
            request.setHeader(b"content-type", b"text/html")
            return b"<html>Bad Gateway, but with a 200</html>"
        request.setHeader(b"content-type", b"application/json")
        answer = ep.keys.get(token)
        if answer is None:
            request.setResponseCode(401)
            return b'{"message":"invalid API key"}'
        # grafana.com returns more fields than taskd reads; keep one to prove they are ignored.
        return json.dumps({"id": 1, "name": "key", **answer}).encode()


class FakeAuthEndpoint:
    """A running emulator: change ``keys`` and ``mode`` at any time."""

    def __init__(self, keys: dict[str, dict[str, Any]] | None = None) -> None:
        self.keys: dict[str, dict[str, Any]] = dict(keys or {})
        self.mode = "normal"
        self.status_code = 429
        self.huge_size = 200 * 1024
        self.requests = 0
        self.tokens: list[str] = []  # every token received, in order
        self.url = ""
        self._port: Any = None
        self._factory = TrackingFactory(Site(CheckKeyResource(self)))

    def start(self, reactor: Any = None) -> FakeAuthEndpoint:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self._port = reactor.listenTCP(0, self._factory, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self._port.getHost().port}"
        return self

    def stop(self) -> Deferred[None]:
        """Stop listening and close every connection (later checks are refused)."""
        if self._port is None:
            return succeed(None)
        port, self._port = self._port, None
        return Deferred.fromCoroutine(self._stop(port))

    async def _stop(self, port: Any) -> None:
        await maybeDeferred(port.stopListening)
        await self._factory.close_all()


def start_auth_endpoint(keys: dict[str, dict[str, Any]] | None = None,
                        reactor: Any = None) -> FakeAuthEndpoint:
    """Listen on 127.0.0.1, an OS-chosen port; call from inside the running reactor."""
    return FakeAuthEndpoint(keys).start(reactor)
