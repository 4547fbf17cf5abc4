"""Domain events (agent.*, task.*) published by the services after each committed change.

Section 6 of the reference: each server reacts to `task.*` by pushing to the agents it
holds and to `agent.offline` by relocating. This module is the in-process bus; the
RabbitMQ transport (taskd.server.amqp) plugs in behind the same `publish`: events are
delivered to this server's handlers at once (a broker outage must not stop this server
pushing to its own agents) and sent to the exchange for the other servers; what comes
back from the exchange with this server's own `source` is therefore skipped.

Every event carries an `id` (unique per event, kept through resends). The broker
delivers at least once — a publish resent after a lost confirm, a message redelivered
after a lost ack — so the bus remembers the last `SEEN_IDS` ids it delivered and drops a
repeat: a handler sees each event once. Events without an id (from an older server) are
delivered as before; the handlers re-read the database, so a repeat is harmless anyway.
"""
from __future__ import annotations

import socket
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from twisted.logger import Logger

from taskd.timeutil import rfc3339, utcnow

EVENT_TYPES = (
    "agent.created", "agent.updated", "agent.deleted", "agent.online", "agent.offline",
    "agent.connected", "agent.tokenReset",
    "task.created", "task.updated", "task.deleted",
    "task.runRequest", "task.runResult",  # ad-hoc runs (taskd.server.adhoc)
)


@dataclass(frozen=True)
class Event:
    type: str
    payload: Any
    source: str = field(default_factory=socket.gethostname)
    timestamp: str = field(default_factory=lambda: rfc3339(utcnow()))
    attempts: int = 0
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


SEEN_IDS = 50_000
"""Event ids remembered for dropping repeats: minutes of traffic at hundreds of events/s."""

Handler = Callable[[Event], Any]


class EventBus:
    log = Logger()

    def __init__(self, instance_id: str | None = None) -> None:
        self._handlers: list[Handler] = []
        self.instance_id = instance_id or socket.gethostname()
        self.transport: Any = None  # has publish(dict); set when an exchange is configured
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.repeats = 0  # events dropped as already delivered

    def subscribe(self, handler: Handler) -> Callable[[], None]:
        self._handlers.append(handler)
        return lambda: self._handlers.remove(handler)

    def publish(self, type_: str, payload: Any) -> None:
        """Deliver to this server's subscribers, and to the other servers if connected."""
        assert type_ in EVENT_TYPES, type_
        event = Event(type_, payload, source=self.instance_id)
        self.log.debug("event {type}", type=type_)
        self._remember(event.id)
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
        event_id = message.get("id")
        if isinstance(event_id, str) and event_id:
            if event_id in self._seen:
                self.repeats += 1
                self.log.debug("event {type} {id} from {source} seen before; dropped",
                               type=message["type"], id=event_id, source=message.get("source"))
                return
            self._remember(event_id)
        else:
            event_id = ""
        event = Event(
            message["type"], message.get("payload"), source=str(message.get("source")),
            timestamp=str(message.get("timestamp", "")), attempts=int(message.get("attempts") or 0),
            id=event_id,
        )
        self.log.debug("event {type} from {source}", type=event.type, source=event.source)
        self._deliver(event)

    def _remember(self, event_id: str) -> None:
        self._seen[event_id] = None
        if len(self._seen) > SEEN_IDS:
            self._seen.popitem(last=False)

    def _deliver(self, event: Event) -> None:
        """One failing handler never stops the others."""
        for handler in list(self._handlers):
            try:
                handler(event)
            except Exception:
                self.log.failure("event handler failed for {type}", type=event.type)
