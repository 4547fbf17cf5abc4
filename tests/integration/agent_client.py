"""A light agent for tests: an Autobahn websocket client speaking taskd's framing.

It is not the agent daemon; it records every frame it receives so tests can wait for
specific events (`await client.next("taskAdd")`) with a deadline instead of sleeping.

Absence ("no taskAdd reaches this agent") is proved by a round trip, not a pause:
`roundtrip` sends a websocket ping and awaits its pong; the server answers it after writing
every frame it had written to this connection before, so once the pong is back those
frames are in `frames`. `nothing_pending` is that proof, for a caller that has already
awaited evidence the server finished the action (say, the frame another agent got from
the same fan-out: the server tells all its local agents of one change in one turn).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
import itertools
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from taskd.wire import framing
from tests.waiting import until


@dataclass
class Received:
    event: str
    payload: Any


@dataclass
class AgentClient:
    url: str
    key: str
    frames: list[Received] = field(default_factory=list)
    opened: Deferred = field(default_factory=Deferred)
    closed: Deferred = field(default_factory=Deferred)
    close_code: int | None = None
    headers: dict = field(default_factory=dict)
    close_reason: str | None = None
    refused: int | None = None  # HTTP status when the upgrade was refused
    protocol: Any = None
    _cursor: dict[str, int] = field(default_factory=dict)
    _pongs: dict[bytes, Deferred] = field(default_factory=dict)
    _pings: Any = field(default_factory=itertools.count)

    def send(self, event: str, value: Any) -> None:
        self.protocol.sendMessage(framing.encode_json(event, value), isBinary=True)

    def send_raw(self, data: bytes, binary: bool = True) -> None:
        self.protocol.sendMessage(data, isBinary=binary)

    def events(self, name: str) -> list[Any]:
        return [f.payload for f in self.frames if f.event == name]

    async def next(self, name: str, timeout: float = 10.0, predicate: Any = None) -> Any:
        """The next not-yet-consumed `name` frame (matching `predicate`), waiting up to
        `timeout` seconds."""
        def found() -> list[Any]:
            """[payload] of the next match (consumed), [] if none yet."""
            for i in range(self._cursor.get(name, 0), len(self.frames)):
                f = self.frames[i]
                if f.event == name and (predicate is None or predicate(f.payload)):
                    self._cursor[name] = i + 1
                    return [f.payload]
            if self.closed.called:
                raise AssertionError(f"connection closed ({self.close_code} {self.close_reason}) waiting for {name}")
            return []

        def received() -> str:
            return f"{name}; received {[(f.event, f.payload) for f in self.frames if f.event != 'heartbeat']}"

        [payload] = await until(found, timeout, what=received)
        return payload

    async def roundtrip(self, timeout: float = 10.0) -> None:
        """Ping the server and await its pong: every frame it wrote before has arrived
        (on a closed connection every frame has arrived already)."""
        if self.closed.called:
            return
        payload = f"roundtrip-{next(self._pings)}".encode()
        pong = self._pongs[payload] = Deferred()
        self.protocol.sendPing(payload)
        pong.addTimeout(timeout, reactor)
        try:
            await pong
        finally:
            self._pongs.pop(payload, None)

    def pong(self, payload: bytes) -> None:
        pong = self._pongs.pop(payload, None)
        if pong is not None and not pong.called:
            pong.callback(None)

    async def nothing_pending(self, name: str) -> None:
        """Assert no `name` frame beyond those consumed by `next`, once every frame the
        server has written so far has arrived (`roundtrip`). No window: the caller has
        awaited that the server finished what would have sent one."""
        await self.roundtrip()
        unconsumed = [f.payload for f in self.frames[self._cursor.get(name, 0):] if f.event == name]
        assert not unconsumed, f"unexpected {name}: {unconsumed}"

    async def nothing_more(self, name: str, within: float = 0.5) -> None:
        """Assert no further `name` frame arrives within `within` seconds (then a
        `roundtrip`, so a frame the server wrote just before the window closed counts too).
        For a change the caller cannot await the end of (a timer on the server, another
        server's event); otherwise `nothing_pending` proves it without a window."""
        seen = len(self.events(name))
        await deferLater(reactor, within, lambda: None)
        await self.roundtrip()
        assert len(self.events(name)) == seen, f"unexpected {name}: {self.events(name)[seen:]}"

    def disconnect(self) -> Deferred:
        if not self.closed.called:
            self.protocol.sendClose(1000, "test done")
        return self.closed


def connect_agent(base_url: str, name: str, key: str, version: int = 1, features: str = "") -> AgentClient:
    """Open /api/v1/socket/<name>/<version>; await `.opened` (or `.closed` if refused).
    `features`: the X-Taskd-Agent-Features it lists (none, as the original agent)."""
    url = f"{base_url.replace('http', 'ws', 1)}/api/v1/socket/{name}/{version}"
    client = AgentClient(url, key)

    class Proto(WebSocketClientProtocol):
        def onConnect(self, response: Any) -> None:
            client.protocol = self
            client.headers = dict(response.headers)  # the upgrade answer's (lowercase names)

        def onOpen(self) -> None:
            client.protocol = self
            client.opened.callback(client)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            frame = framing.decode(payload)
            try:
                value = json.loads(frame.payload) if frame.event != framing.HEARTBEAT else frame.payload.decode()
            except ValueError:
                value = frame.payload
            client.frames.append(Received(frame.event, value))

        def onPong(self, payload: bytes) -> None:
            client.pong(payload)

        def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
            client.close_code, client.close_reason = code, reason
            if not client.opened.called:
                client.opened.errback(ConnectionError(f"refused: {reason}"))
            if not client.closed.called:
                client.closed.callback(client)

    headers = {"Authorization": f"Bearer {key}", **({framing.FEATURES_HEADER: features} if features else {})}
    factory = WebSocketClientFactory(url, headers=headers)
    factory.protocol = Proto

    def connection_failed(_connector: Any, reason: Any) -> None:
        """No TCP connection (nothing listening): as a refused upgrade, `opened` fails
        and `closed` fires, so a caller that reconnects on `closed` tries again."""
        client.close_reason = f"connection failed: {reason.getErrorMessage()}"
        if not client.opened.called:
            client.opened.errback(ConnectionError(client.close_reason))
        if not client.closed.called:
            client.closed.callback(client)

    factory.clientConnectionFailed = connection_failed
    connectWS(factory)
    return client
