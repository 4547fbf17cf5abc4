"""The agent's ServerConnection under load: a send on a socket being dropped answers False
(kept for the next connection), never autobahn's Disconnected out of a status flush's
timer; the heartbeat watchdog does not take its own lateness for the server's silence."""
from __future__ import annotations

from autobahn.twisted.websocket import WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.task import Clock

from taskd.agent.connection import ServerConnection


def test_send_on_a_protocol_already_closing_answers_false():
    conn = ServerConnection(url="ws://127.0.0.1:1/api/v1/socket/a/1", api_key="k", reactor=Clock(),
                            on_frame=lambda frame: None)
    protocol = WebSocketClientProtocol()
    protocol.state = WebSocketProtocol.STATE_CLOSING  # dropConnection called; connectionLost not yet
    conn.protocol, conn.connected = protocol, True
    assert conn.send("taskStatus", []) is False


class _Dropped(WebSocketClientProtocol):
    dropped: bool | None = None

    def dropConnection(self, abort: bool = False) -> None:
        self.dropped = abort


def watched(clock: Clock) -> tuple[ServerConnection, _Dropped]:
    conn = ServerConnection(url="ws://127.0.0.1:1/api/v1/socket/a/1", api_key="k", reactor=clock,
                            on_frame=lambda frame: None, heartbeat_interval=1.0)
    conn.protocol = _Dropped()
    conn._start_watchdog()
    return conn, conn.protocol


def test_a_silent_server_is_dropped_after_three_heartbeat_intervals():
    clock = Clock()
    _, protocol = watched(clock)
    for _ in range(3):
        clock.advance(1)
    assert protocol.dropped is None
    clock.advance(1)
    assert protocol.dropped is True


def test_a_watchdog_check_that_comes_late_does_not_drop_the_connection():
    clock = Clock()
    _, protocol = watched(clock)
    clock.advance(7)  # the reactor was busy for 7 s: one late check, heartbeats may be unread
    assert protocol.dropped is None
    clock.advance(1)  # on time again and still nothing seen: dropped
    assert protocol.dropped is True
