"""Domain events (agent.*, task.*) published by the services after each committed change.

Section 6 of the reference: each server reacts to `task.*` by pushing to the agents it
holds and to `agent.offline` by relocating. This module is the in-process bus; the
RabbitMQ transport for several servers plugs in behind the same `publish`.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.logger import Logger

from taskd.timeutil import rfc3339, utcnow

EVENT_TYPES = (
    "agent.created", "agent.updated", "agent.deleted", "agent.online", "agent.offline",
    "task.created", "task.updated", "task.deleted",
)


@dataclass(frozen=True)
class Event:
    type: str
    payload: Any
    source: str = field(default_factory=socket.gethostname)
    timestamp: str = field(default_factory=lambda: rfc3339(utcnow()))
    attempts: int = 0


Handler = Callable[[Event], Any]


class EventBus:
    log = Logger()

    def __init__(self, instance_id: str | None = None) -> None:
        self._handlers: list[Handler] = []
        self.instance_id = instance_id or socket.gethostname()

    def subscribe(self, handler: Handler) -> Callable[[], None]:
        self._handlers.append(handler)
        return lambda: self._handlers.remove(handler)

    def publish(self, type_: str, payload: Any) -> None:
        """Deliver to every subscriber; one failing handler never stops the others."""
        assert type_ in EVENT_TYPES, type_
        event = Event(type_, payload, source=self.instance_id)
        self.log.debug("event {type}", type=type_)
        for handler in list(self._handlers):
            try:
                handler(event)
            except Exception:
                self.log.failure("event handler failed for {type}", type=type_)
