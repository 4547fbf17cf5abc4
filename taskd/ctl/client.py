"""The HTTP side of taskctl: one call to the task-server's REST API, its envelope read.

A command-line tool makes one request and exits, so this is plain blocking `urllib`
(no reactor to keep free). Every answer is the API's envelope; an error envelope becomes
`ApiError` with the server's own message, which taskctl prints as it is.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Iterable

import taskd


class ApiError(Exception):
    """The server answered with an error envelope (or something that is not one)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Unreachable(Exception):
    """No answer at all: a wrong --url, the server down, a timeout."""


@dataclass
class Client:
    url: str  # the server's base URL, e.g. http://localhost:8082 (…/api/v1 accepted too)
    key: str
    timeout: float = 30.0

    @property
    def api(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/api/v1") else base + "/api/v1"

    def call(self, method: str, path: str, *, params: Iterable[tuple[str, Any]] = (), body: Any = None) -> Any:
        """The envelope's `body` of `method path`; ApiError or Unreachable otherwise."""
        if urllib.parse.urlsplit(self.url).scheme not in ("http", "https"):
            raise Unreachable(f"--url {self.url!r} is not an http:// or https:// URL")
        query = urllib.parse.urlencode([(k, _text(v)) for k, v in params if v is not None])
        url = f"{self.api}{path}" + (f"?{query}" if query else "")
        data = json.dumps(body).encode("utf-8") if body is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Bearer {self.key}", "Accept": "application/json",
            "User-Agent": f"taskctl/{taskd.__version__}",
            **({"Content-Type": "application/json"} if data is not None else {})})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(f"cannot reach the task-server at {self.url}: {reason}") from None
        try:
            envelope = json.loads(raw)
            meta = envelope["meta"]
        except (ValueError, KeyError, TypeError):
            raise ApiError(status, f"HTTP {status} from {url}, not the API's answer: {raw[:200]!r}") from None
        if status >= 400 or meta.get("type") == "error":
            raise ApiError(status, str(meta.get("message") or f"HTTP {status}"))
        return envelope.get("body")


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
