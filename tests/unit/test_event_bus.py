"""The in-process event bus: local delivery, skipping its own echoes, dropping repeats."""
from __future__ import annotations

from dataclasses import asdict

from taskd.server.events import SEEN_IDS, Event, EventBus


class Wire:
    """Stands in for the AMQP transport: keeps what the bus sends to the exchange."""

    def __init__(self) -> None:
        self.sent: list[dict] = []

    def publish(self, event: dict) -> None:
        self.sent.append(event)


def bus_with_log(instance: str) -> tuple[EventBus, list[Event]]:
    bus, got = EventBus(instance), []
    bus.subscribe(got.append)
    return bus, got


def test_published_event_has_an_id_kept_on_the_wire():
    bus, got = bus_with_log("a")
    bus.transport = wire = Wire()
    bus.publish("task.created", {"id": 1})
    bus.publish("task.created", {"id": 2})
    assert [e.payload for e in got] == [{"id": 1}, {"id": 2}]
    ids = [m["id"] for m in wire.sent]
    assert len(set(ids)) == 2 and all(len(i) == 32 for i in ids)
    assert ids == [e.id for e in got]


def test_a_repeated_event_reaches_the_handlers_once():
    a = EventBus("a")
    a.transport = wire = Wire()
    b, got = bus_with_log("b")
    a.publish("task.updated", {"id": 7})
    for _ in range(3):  # resent after a lost confirm, redelivered after a lost ack
        b.receive(dict(wire.sent[0]))
    assert [(e.type, e.payload, e.source, e.id) for e in got] == [
        ("task.updated", {"id": 7}, "a", wire.sent[0]["id"])]
    assert b.repeats == 2


def test_events_without_an_id_are_all_delivered():
    b, got = bus_with_log("b")
    old = {k: v for k, v in asdict(Event("task.deleted", {"id": 3}, source="old")).items() if k != "id"}
    b.receive(old)
    b.receive(dict(old))
    assert len(got) == 2 and b.repeats == 0


def test_own_echo_is_skipped():
    a, got = bus_with_log("a")
    a.transport = wire = Wire()
    a.publish("agent.online", {"id": 1})
    a.receive(wire.sent[0])
    assert len(got) == 1


def test_memory_of_ids_is_bounded():
    b, got = bus_with_log("b")
    first = asdict(Event("task.created", {"id": 0}, source="a"))
    b.receive(first)
    for n in range(SEEN_IDS):
        b.receive(asdict(Event("task.created", {"id": n + 1}, source="a")))
    assert len(b._seen) == SEEN_IDS
    b.receive(first)  # forgotten by now: delivered again (the handlers re-read the database)
    assert len(got) == SEEN_IDS + 2
