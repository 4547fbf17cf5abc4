"""An emulator of the NS1 API's ``GET /v1/stats/qps/<zone>`` endpoint, for the ns1 collector's tests.

This is a stand-in, not NS1: tests never reach the internet. It serves only what the
collector asks - one zone's queries per second - on a real loopback port:

* the key in ``X-NSONE-KEY`` must be one of ``keys`` (else 401 ``{"message":
  "Unauthorized"}``); a key mapped to a set of zones may only read those (else 403);
* the path's zone is unquoted twice (the client quotes it twice, as the original did);
  an unknown zone is 404 ``{"message": "zone not found"}``;
* a known zone answers 200 ``{"qps": <zones[zone]>}``.

Knobs (plain attributes, change them at any time): ``status`` forces every answer to
that status with ``{"message": status_message}``; ``hang`` accepts requests and never
answers. Every request is recorded in ``requests`` as (method, raw path, key or None).

    ns1 = Ns1Emulator(keys={"k": None}, zones={"example.com": 12.5}).start()
    ... ns1.url ...
    await ns1.stop()
"""
from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

from twisted.internet import reactor as default_reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

PREFIX = "/v1/stats/qps/"


class _QpsResource(Resource):
    isLeaf = True

    def __init__(self, ns1: Ns1Emulator) -> None:
        super().__init__()
        self.ns1 = ns1

    def render(self, request: Request) -> bytes | int:
        ns1 = self.ns1
        path = request.path.decode("ascii", "replace")
        raw_key = request.getHeader(b"x-nsone-key")
        key = raw_key.decode("utf-8", "replace") if raw_key is not None else None
        ns1.requests.append((request.method.decode("ascii", "replace"), path, key))
        request.setHeader(b"content-type", b"application/json")
        if ns1.hang:
            ns1.hanging.append(request)
            return NOT_DONE_YET
        if ns1.status is not None:
            return _answer(request, ns1.status, {"message": ns1.status_message})
        if request.method != b"GET":
            return _answer(request, 405, {"message": "method not allowed"})
        if not path.startswith(PREFIX) or "/" in path[len(PREFIX):] or len(path) == len(PREFIX):
            return _answer(request, 404, {"message": "Not Found"})
        if key is None or key not in ns1.keys:
            return _answer(request, 401, {"message": "Unauthorized"})
        zone = unquote(unquote(path[len(PREFIX):]))
        allowed = ns1.keys[key]
        if allowed is not None and zone not in allowed:
            return _answer(request, 403, {"message": "insufficient permissions"})
        if zone not in ns1.zones:
            return _answer(request, 404, {"message": "zone not found"})
        return _answer(request, 200, {"qps": ns1.zones[zone]})


def _answer(request: Request, code: int, body: Any) -> bytes:
    request.setResponseCode(code)
    return json.dumps(body).encode()


class Ns1Emulator:
    """The NS1 qps endpoint on 127.0.0.1 (port 0 = any free port); ``url`` is its base."""

    def __init__(self, *, keys: dict[str, set[str] | None], zones: dict[str, float],
                 reactor: Any = default_reactor) -> None:
        self.keys = keys
        self.zones = zones
        self.reactor = reactor
        self.status: int | None = None
        self.status_message = "internal error"
        self.hang = False
        self.hanging: list[Request] = []
        self.requests: list[tuple[str, str, str | None]] = []
        self._port: Any = None

    def start(self, port: int = 0) -> Ns1Emulator:
        site = Site(_QpsResource(self))
        site.noisy = False
        self._port = self.reactor.listenTCP(port, site, interface="127.0.0.1")
        return self

    @property
    def port(self) -> int:
        return self._port.getHost().port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def stop(self) -> None:
        for request in self.hanging:
            if request.channel is not None:
                request.channel.transport.abortConnection()
        self.hanging.clear()
        await self._port.stopListening()
