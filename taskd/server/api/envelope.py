"""The response envelope every answer uses: `{"meta": {code, message, type}, "body": …}`.

Unlike the original, the HTTP status always equals `meta.code` and errors are never a
bare string: clients can rely on one shape.
"""
from __future__ import annotations

import json
from typing import Any

from twisted.web.iweb import IRequest

JSON_CT = b"application/json; charset=utf-8"


def envelope(code: int, message: str, type_: str, body: Any) -> bytes:
    return json.dumps(
        {"meta": {"code": code, "message": message, "type": type_}, "body": body},
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode("utf-8")


def respond(request: IRequest, code: int, message: str, type_: str, body: Any = None) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", JSON_CT)
    request.setHeader(b"cache-control", b"no-store")
    return envelope(code, message, type_, body)


def error(request: IRequest, code: int, message: str) -> bytes:
    return respond(request, code, message, "error", None)
