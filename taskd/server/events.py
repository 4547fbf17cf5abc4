"""Domain events (agent.*, task.*) published by the services after each committed change.

Section 6 of the reference: each server reacts to `task.*` by pushing to the agents it
holds and to `agent.offline` by relocating. This module is the in-process bus; the
RabbitMQ transport (taskd.server.amqp) plugs in behind the same `publish`: events are
delivered to this server's handlers at once (a broker outage must not stop this server
pushing to its own agents) and sent to the exchange for the other servers; what comes
back from the exchange with this server's own `source` is therefore skipped.
"""
from __future__ import annotations

import socket
from dataclasses import asdict, dataclass, field
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
        self.transport: Any = None  # has publish(dict); set when an exchange is configured

    def subscribe(self, handler: Handler) -> Callable[[], None]:
        self._handlers.append(handler)
        return lambda: self._handlers.remove(handler)

    def publish(self, type_: str, payload: Any) -> None:
        """Deliver to this server's subscribers, and to the other servers if connected."""
        assert type_ in EVENT_TYPES, type_
        event = Event(type_, payload, source=self.instance_id)
        self.log.debug("event {type}", type=type_)
        self._deliver(event)
        if self.transport is not None:
            self.transport.publish(asdict(event))

    def receive(self, message: dict) -> None:
        """An event from the exchange (the transport has decoded the JSON)."""
        if not isinstance(message, dict) or message.get("type") not in EVENT_TYPES:
            self.log.warn("ignoring an event of unknown type {type!r} from {source}",
                          type=message.get("type") if isinstance(message, dict) else None,
                          source=message.get("source") if isinstance(message, dict) else None)
            return
        if message.get("source") == self.instance_id:
            return  # delivered locally when published
        event = Event(
            message["type"], message.get("payload"), source=str(message.get("source")),
            timestamp=str(message.get("timestamp", "")), attempts=int(message.get("attempts") or 0),
        )
        self.log.debug("event {type} from {source}", type=event.type, source=event.source)
        self._deliver(event)

    def _deliver(self, event: Event) -> None:
        """One failing handler never stops the others."""
        for handler in list(self._handlers):
            try:
                handler(event)
            except Exception:
                self.log.failure("event handler failed for {type}", type=event.type)
