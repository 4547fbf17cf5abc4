"""Talking to the local Snap daemon's REST API v1: one request and its envelope, the
api key kept out of every message, and the stop/delete state machine of a Snap task.

Apart from the driver (:mod:`taskd.agent.snap.driver`), which holds the loops and the
reconcile rule and calls only :meth:`SnapClient.call` and
:meth:`SnapClient.stop_and_delete`. See docs/snap.md and docs/snap-api.md.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Coroutine

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from taskd.agent.httpclient import quiet_http_client
from taskd.agent.snap.wire import DISABLED, RUNNING, STOPPING, SnapError, SnapUnreachable


class SnapClient:
    """Requests to Snap at ``url``; ``http`` a treq-like client (default: a persistent,
    quiet connection pool). ``is_running`` tells a request cut short by the owner's
    stop (a CancelledError) from one Snap did not answer (SnapUnreachable)."""

    def __init__(self, *, url: str, api_key: str, clock: IReactorTime, request_timeout: float,
                 stop_timeout: float, stop_poll: float, is_running: Callable[[], bool],
                 http: Any = None) -> None:
        self.url = url.rstrip("/")  # as the Go agent: <url>/v1/...
        self._api_key = api_key
        self.clock, self.is_running = clock, is_running
        self.request_timeout, self.stop_timeout, self.stop_poll = request_timeout, stop_timeout, stop_poll
        self._pool: Any = None
        if http is None:
            from twisted.internet import reactor
            http, self._pool = quiet_http_client(reactor)
        self._http = http

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.closeCachedConnections()

    async def _sleep(self, seconds: float) -> None:
        await deferLater(self.clock, seconds, lambda: None)

    def redact(self, text: str) -> str:
        return text.replace(self._api_key, "<api-key>") if self._api_key else text

    async def call(self, method: str, path: str, expect_type: str, expect_code: int = 200,
                    body: Any = None) -> Any:
        """One request; the envelope's body on success, else SnapError / SnapUnreachable."""
        kwargs: dict[str, Any] = {"timeout": self.request_timeout}
        if method != "GET":
            kwargs["headers"] = {b"Content-Type": [b"application/json"]}
        if body is not None:
            kwargs["data"] = json.dumps(body).encode("utf-8")
        try:
            response = await self._http.request(method, self.url + path, **kwargs)
            raw = await response.content()
        except Exception as e:
            if not self.is_running():
                raise CancelledError() from None
            reasons = getattr(e, "reasons", None)
            cause = reasons[0].value if reasons else e
            if isinstance(cause, CancelledError) or isinstance(e, CancelledError):
                raise SnapUnreachable(f"no answer within {self.request_timeout:g} s") from None
            raise SnapUnreachable(self.redact(f"{type(cause).__name__}: {cause}")[:300]) from None
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        meta = doc.get("meta") if isinstance(doc, dict) else None
        if not isinstance(meta, dict):  # plain-text 404/405/401, proxies, garbage
            text = raw.decode("utf-8", "replace").strip()[:200]
            raise SnapError(response.code, self.redact(text or "empty body"))
        if meta.get("type") == expect_type and response.code == expect_code:
            return doc.get("body")
        reply = doc.get("body")
        message = reply.get("message") if isinstance(reply, dict) else None
        if meta.get("type") != "error" or not isinstance(message, str):
            message = f"unexpected answer (meta.type {meta.get('type')!r})"
        raise SnapError(response.code, self.redact(message))

    async def stop_and_delete(self, sid: str) -> None:
        """Enable if Disabled, stop if Running, wait out Stopping, delete. 404 = done."""
        deadline = self.clock.seconds() + self.stop_timeout
        path = f"/v1/tasks/{sid}"
        for _ in range(100):
            try:
                task = await self.call("GET", path, "scheduled_task_returned")
                state = task.get("task_state") if isinstance(task, dict) else None
                if state == DISABLED:
                    await self._tolerate(self.call("PUT", path + "/enable", "scheduled_task_enabled"))
                elif state == RUNNING:
                    await self._tolerate(self.call("PUT", path + "/stop", "scheduled_task_stopped"))
                elif state == STOPPING:
                    if self.clock.seconds() >= deadline:
                        raise SnapError(0, f"still Stopping after {self.stop_timeout:g} s")
                    await self._sleep(self.stop_poll)
                else:
                    await self.call("DELETE", path, "scheduled_task_removed")
                    return
            except SnapError as e:
                if e.status == 404:
                    return
                if e.status != 500 or self.clock.seconds() >= deadline:
                    raise  # a 500 is a race with Stopping ("Task must be stopped"): re-read
                await self._sleep(self.stop_poll)
        raise SnapError(0, "gave up: the task never reached a removable state")

    async def _tolerate(self, call: Coroutine[Any, Any, Any]) -> None:
        """A stop/enable that raced with another state change (500) is re-checked."""
        try:
            await call
        except SnapError as e:
            if e.status != 500:
                raise
