"""An in-process read-through cache of agents, by id and by (org, name).

`GET /api/v1/agents/<id>` and every websocket upgrade read one agent; without a cache
each is a transaction on the database thread (bench/analysis.md: the DB read was the
cost of the GET). An agent row only changes together with an `agent.*` event
(created, updated, deleted, online, offline: the online flag and `onlineChange` are
written in the same transaction that records or drops a session, and the event is
published right after the commit), and every server receives every event, its own
in-process and the others' over RabbitMQ. So an entry is dropped on each event that
names its agent and is otherwise kept, up to `max_age` seconds as a safety net.

Two rules keep it from serving something the database has moved past:
* a read that was in flight while any `agent.*` event arrived is returned to its caller
  but not stored (it may have read the row before that change committed);
* while the event transport (RabbitMQ) is disconnected, events from other servers can
  be missed, so the cache is bypassed, and emptied once a new connection is up.
What another server changed is therefore seen here once its event arrives (usually a
few milliseconds after its commit), not at the commit itself.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.internet.defer import Deferred, maybeDeferred

from taskd.db.agents import Agent
from taskd.server.events import Event, EventBus

MAX_SIZE = 100_000
MAX_AGE = 60.0


class AgentCache:
    def __init__(self, events: EventBus, clock: Any, *, max_size: int = MAX_SIZE, max_age: float = MAX_AGE) -> None:
        self.events = events
        self.clock = clock
        self.max_size = max_size
        self.max_age = max_age
        self._by_id: dict[int, tuple[Agent, float]] = {}   # id -> (agent, stored at)
        self._by_name: dict[tuple[int, str], int] = {}       # (org id, name) -> id
        self._generation = 0      # bumped by every agent.* event
        self._connection: Any = None  # the transport's connection count the entries belong to
        self.hits = self.misses = 0
        events.subscribe(self._on_event)

    # -- reading -----------------------------------------------------------------------

    def get(self, agent_id: int) -> Agent | None:
        entry = self._by_id.get(agent_id) if self._usable() else None
        if entry is not None and self.clock.seconds() - entry[1] <= self.max_age:
            self.hits += 1
            return entry[0]
        if entry is not None:
            self._drop(agent_id)
        self.misses += 1
        return None

    def get_by_name(self, org_id: int, name: str) -> Agent | None:
        agent_id = self._by_name.get((org_id, name)) if self._usable() else None
        return self.get(agent_id) if agent_id is not None else None

    def token(self) -> int:
        """Take before reading the database; hand to `put` with what was read. Notes a
        reconnect of the event transport first, so a read started after it counts."""
        self._usable()
        return self._generation

    def put(self, agent: Agent | None, token: int) -> None:
        """Store what a read that started at `token` returned, unless an agent event
        arrived meanwhile (the read may predate that change). `_usable` goes first: a
        reconnect of the event transport since the read began (events may have been
        missed) empties the cache and moves the generation on, so the read is not kept."""
        if agent is None or not self._usable() or token != self._generation:
            return
        if agent.id not in self._by_id and len(self._by_id) >= self.max_size:
            self._drop(next(iter(self._by_id)))  # the oldest entry
        self._drop(agent.id)
        self._by_id[agent.id] = (agent, self.clock.seconds())
        self._by_name[(agent.org_id, agent.name)] = agent.id

    def __len__(self) -> int:
        return len(self._by_id)

    # -- invalidation ------------------------------------------------------------------

    def clear(self) -> None:
        self._by_id.clear()
        self._by_name.clear()
        self._generation += 1

    def _drop(self, agent_id: int) -> None:
        entry = self._by_id.pop(agent_id, None)
        if entry is not None:
            key = (entry[0].org_id, entry[0].name)
            if self._by_name.get(key) == agent_id:
                del self._by_name[key]

    def _on_event(self, event: Event) -> None:
        if not event.type.startswith("agent."):
            return
        self._generation += 1
        ids = list(_agent_ids(event.payload))
        if not ids:
            self.clear()
        for agent_id in ids:
            self._drop(agent_id)

    def _usable(self) -> bool:
        transport = self.events.transport
        if transport is None:  # one server: every event is delivered in-process
            return True
        if not getattr(transport, "connected", False):
            return False
        connection = getattr(transport, "connections", None)
        if connection != self._connection:  # (re)connected: events may have been missed
            self.clear()
            self._connection = connection
        return True


def _agent_ids(payload: Any) -> Iterable[int]:
    """The agent ids an event names: `id`, or `old.id` and `new.id` (agent.updated)."""
    if not isinstance(payload, dict):
        return
    for part in (payload, payload.get("old"), payload.get("new")):
        if isinstance(part, dict) and isinstance(part.get("id"), int) and not isinstance(part.get("id"), bool):
            yield part["id"]


class ShortLived:
    """Numbers by key, each served for at most `ttl` seconds after it was read (bounded):
    for values that may lag a little, such as an agent's failingTasks count. `generation`
    (optional) names the state the values were read from, e.g. how many status batches
    this server has written: a value read under an older generation is read again."""

    def __init__(self, clock: Any, *, ttl: float, max_size: int = MAX_SIZE,
                 generation: Callable[[], Any] = lambda: None) -> None:
        self.clock = clock
        self.ttl = ttl
        self.max_size = max_size
        self.generation = generation
        self._values: dict[Any, tuple[Any, float, Any]] = {}

    def token(self) -> tuple[float, Any]:
        """Take before reading; hand to `store` with what was read."""
        return self.clock.seconds(), self.generation()

    def lookup(self, keys: Iterable[Any]) -> tuple[dict, list]:
        """(fresh values by key, keys to read)."""
        now, generation = self.token()
        found, missing = {}, []
        for key in keys:
            entry = self._values.get(key)
            if entry is not None and now - entry[1] <= self.ttl and entry[2] == generation:
                found[key] = entry[0]
            else:
                missing.append(key)
        return found, missing

    def store(self, values: dict, token: tuple[float, Any]) -> None:
        read_at, generation = token
        if len(self._values) + len(values) > self.max_size:
            self._values.clear()  # everything in it expires within ttl anyway
        for key, value in values.items():
            self._values[key] = (value, read_at, generation)


class BatchLoader:
    """Coalesces single-key reads into one read of many keys: keys asked for in the same
    reactor turn, or while the previous read is running, are read together (at most
    `max_batch` per read). `load(keys)` returns a Deferred of {key: value}; a key it
    leaves out gets None. Used for the agent lookup of each websocket upgrade, which in
    a reconnect storm arrive by the thousand. `load(keys, waited=s)` is told how long the
    oldest of its keys has waited already (behind the read before), so that a caller's
    db-timeout counts from its own arrival, not from its read's start: during a stall a
    lookup is answered within one db-timeout, not two."""

    def __init__(self, clock: Any, load: Callable[[list], Any], *, max_batch: int = 500) -> None:
        self.clock = clock
        self.load = load
        self.max_batch = max_batch
        self._waiting: dict[Any, list] = {}
        self._since: dict[Any, float] = {}  # key -> when its first waiter arrived
        self._call: Any = None
        self._busy = False
        self.reads = 0

    def get(self, key: Any) -> Any:
        d: Deferred = Deferred()
        self._waiting.setdefault(key, []).append(d)
        self._since.setdefault(key, self.clock.seconds())
        self._schedule()
        return d

    def _schedule(self) -> None:
        if self._waiting and self._call is None and not self._busy:
            self._call = self.clock.callLater(0, self._run)

    def _run(self) -> None:
        self._call = None
        keys = list(self._waiting)[:self.max_batch]
        batch = {key: self._waiting.pop(key) for key in keys}
        waited = self.clock.seconds() - min(self._since.pop(key) for key in keys)
        self._busy = True
        self.reads += 1

        def loaded(values: dict) -> None:
            for key, waiters in batch.items():
                for d in waiters:
                    d.callback(values.get(key))

        def failed(failure: Any) -> None:
            for waiters in batch.values():
                for d in waiters:
                    d.errback(failure)

        def done(_: Any) -> None:
            self._busy = False
            self._schedule()

        maybeDeferred(self.load, keys, waited=waited).addCallbacks(loaded, failed).addBoth(done)
