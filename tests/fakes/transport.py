"""One fake for what the server writes to: an agent's websocket (`SessionTransport`: frames
and closes, recorded for the test to read) and the event exchange (`AmqpTransport`'s
`publish`, `connected`, `connections`, which a test flips to simulate a reconnect).

One class, so a change of either real interface breaks one place, and
tests/unit/test_fakes_match.py compares these signatures with the real ones."""
from __future__ import annotations

from typing import Any

from taskd.wire import framing


class FakeTransport:
    """Records what a session sends (`frames` as (event, JSON), `closes` as (code, reason))
    and what the event bus publishes (`published`)."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, Any]] = []
        self.closes: list[tuple[int, str]] = []
        self.paused = False  # reading paused by the session manager (back-pressure)
        self.pauses = 0
        self.published: list[dict] = []
        self.connected = True
        self.connections = 1

    # -- SessionTransport (taskd.server.sessions) ------------------------------------------

    def send_frame(self, data: bytes) -> None:
        frame = framing.decode(data)
        self.frames.append((frame.event, frame.json()))

    def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False

    # -- the event exchange (taskd.server.amqp.AmqpTransport) ------------------------------

    def publish(self, event: dict) -> None:
        self.published.append(event)

    # -- for the tests ---------------------------------------------------------------------

    def take(self) -> list[tuple[str, Any]]:
        """The frames sent since the last take."""
        frames, self.frames = self.frames, []
        return frames
