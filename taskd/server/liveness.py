"""This server's heartbeat in the shared database, and reaping the servers gone silent.

Several servers share one database; one killed with SIGKILL, frozen, or cut off from
the database cannot remove its own session rows, so its agents would stay online and
their `any` tasks would never move. As Zabbix HA nodes do with `lastaccess` (and Nomad
with its heartbeat TTL), every server refreshes its instance row every
`server-heartbeat-interval`; each beat also looks for rows silent longer than
`server-dead-after` and reaps them (taskd.db.servers: one reaper wins), publishing
`agent.offline` for every agent that lost its last session, which relocates its tasks.

A server that finds its own row gone was itself declared dead (it was frozen, or the
database was out of reach for longer than that): the rows of the sockets it holds have
been removed, so it closes them (the agents reconnect and are recorded afresh) and
registers again under a new instance id.

A server judges others only once it has itself been beating for `server-dead-after`
(since its start, or since a gap in its own beats that long: a database outage, or its
own freeze): when the database comes back after an outage every row is old, and the
first server back must give the others as long to beat again before reaping them.

Identity: the session rows carry the server's `instance-id` (default HOSTNAME:PORT).
At start-up a server takes over every earlier run under that name at once, whatever
hostname that run had; runs under another name (the host was renamed and no
`instance-id` is set) are reaped like any silent server, `server-dead-after` after their
last beat. The clocks of the servers sharing a database must agree (NTP) to well
within `server-dead-after`: each compares its own time with the others' `last_seen`.
"""
from __future__ import annotations

import socket
import uuid
from datetime import datetime, timedelta
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

import taskd
from taskd.db.availability import is_unavailable
from taskd.db.connector import Database
from taskd.db.servers import ServerInstance
from taskd.db.sessions import OnlineChange
from taskd.server.events import EventBus
from taskd.server.agentsession import online_payload
from taskd.server.sessions import SessionManager
from taskd.stats import NULL_STATS
from taskd.timers import RepeatingTimer
from taskd.timeutil import utcnow

REAPED_REASON = "server lost its registration in the database; reconnect"


class Liveness(Service):
    """Registers this run, beats, reaps; `instance` is this run's row once registered."""

    log = Logger()
    name = "liveness"

    def __init__(self, *, db: Database, events: EventBus, sessions: SessionManager, name: str, addr: str,
                 clock: Any, interval: float = 5.0, dead_after: float = 30.0,
                 now: Callable[[], datetime] = utcnow, hostname: str | None = None,
                 stats: Any = NULL_STATS) -> None:
        self.store = db.servers
        self.stats = stats
        self.events = events
        self.sessions = sessions
        self.server_name = name
        self.addr = addr
        self.hostname = hostname or socket.gethostname()
        self.clock = clock
        self.interval = interval
        self.dead_after = dead_after
        self.now = now
        self.instance: ServerInstance | None = None  # registered row (None until then)
        self.registrations = 0  # how many times this process registered (more than 1: it was reaped)
        self.reaped = 0  # instances of other servers this one reaped
        self._startup_changes: list[OnlineChange] = []
        self._failing = False  # the database refused the last beat (one warning per outage)
        self._last_ok: datetime | None = None  # the last beat that reached the database
        self._healthy_since: datetime | None = None  # beating without a gap longer than dead_after since
        self._in_flight: Deferred | None = None  # the beat being run
        self._timer = RepeatingTimer(clock, interval, self.beat, what="server liveness heartbeat", now=True,
                                     log=self.log)

    # -- lifecycle ---------------------------------------------------------------------

    def take_over_sync(self) -> None:
        """At start-up, before any agent can connect (blocking; the reactor is not running
        yet): remove every earlier run of this server name and the sessions it left."""
        previous, self._startup_changes = self.store.take_over_now(self.server_name)
        for old in previous:
            age = (self.now() - old.last_seen).total_seconds()
            if age < self.dead_after:
                self.log.warn("taking over from server {name} (instance {id} on {host}), last seen {age:.1f}s"
                              " ago: if that one still runs, instance-id must differ between servers",
                              name=old.name, id=old.id, host=old.hostname, age=age)
        if previous or self._startup_changes:
            self.log.info("cleared {n} earlier run(s) of server {name}; {k} agent(s) offline", n=len(previous),
                          name=self.server_name, k=len(self._startup_changes))

    def startService(self) -> None:
        super().startService()
        self._publish_offline(self._startup_changes)
        self._startup_changes = []
        self._timer.startService()  # the first beat (registration) runs now

    @inlineCallbacks
    def stopService(self):
        """Runs after the sessions stopped (they clear this server's rows): the row goes
        last, so this server counts as alive while it still holds sockets."""
        super().stopService()
        self._timer.stopService()
        if self._in_flight is not None:  # a registration landing now must not outlive the process
            yield self._in_flight
        if self.instance is not None:
            instance, self.instance = self.instance, None
            try:
                yield self.store.unregister(instance.id)
            except Exception as exc:
                self.log.warn("could not remove this server's instance row {id}: {err}", id=instance.id,
                              err=_first_line(exc))

    # -- the beat ----------------------------------------------------------------------

    def beat(self) -> Deferred:
        """Register or refresh this run's row, then reap the silent ones. Never fails
        (the timer would stop): the next beat tries again. An outage (DatabaseUnavailable)
        was already reported once by the pool, so it is a debug line here; any other
        error is one warning until a beat succeeds."""
        d = self._in_flight = self._beat()

        def done(_: Any) -> None:
            if self._in_flight is d:
                self._in_flight = None

        d.addBoth(done)
        return d

    @inlineCallbacks
    def _beat(self):
        try:
            if self.instance is None:
                yield self._register()
            else:
                alive = yield self.store.beat(self.instance.id)
                if not self.running:  # stopping: its row is being removed, not lost
                    return
                if not alive:
                    yield self._was_reaped()
            self._beat_reached_the_database()
            if self.running:
                yield self.reap_silent()
        except Exception as exc:
            if is_unavailable(exc):  # the pool warned once for the whole outage
                self.log.debug("server liveness: beat missed, database unavailable ({err})", err=_first_line(exc))
            elif not self._failing:
                self._failing = True
                self.log.warn("server liveness: database unavailable ({err}); retrying every {t:g}s",
                              err=_first_line(exc), t=self.interval)
            return
        if self._failing:
            self._failing = False
            self.log.warn("server liveness: database available again")

    def _beat_reached_the_database(self) -> None:
        """Only a server that has itself been beating for `dead_after` may judge others
        silent: after an outage of the database (or a freeze of this process) every row
        is old, and the first server back must not reap the others before they have
        had as long to beat again."""
        now = self.now()
        if self._last_ok is None or (now - self._last_ok).total_seconds() > self.dead_after:
            self._healthy_since = now
        self._last_ok = now

    def _register(self) -> Deferred:
        now = self.now()
        instance = ServerInstance(id=str(uuid.uuid4()), name=self.server_name, hostname=self.hostname,
                                  addr=self.addr, version=taskd.__version__, started=now, last_seen=now)

        def registered(_: Any) -> None:
            self.instance = instance
            self.registrations += 1
            self.log.info("registered as server instance {id} ({name}); beating every {t:g}s, others are"
                          " dead after {dead:g}s of silence", id=instance.id, name=instance.name,
                          t=self.interval, dead=self.dead_after)

        return self.store.register(instance).addCallback(registered)

    @inlineCallbacks
    def _was_reaped(self):
        old = self.instance
        self.instance = None  # the next beat registers again should this attempt fail
        closed = self.sessions.drop_all(REAPED_REASON)
        self.stats.incr("servers.declared_dead_self")
        yield self._register()
        self.log.warn("this server's instance {id} was declared dead by another server (no heartbeat"
                      " reached the database for server-dead-after = {dead:g}s); closed its {n} agent"
                      " connection(s) so they reconnect, registered again as {new}",
                      id=old.id if old else "?", dead=self.dead_after, n=closed, new=self.instance.id)

    @inlineCallbacks
    def reap_silent(self):
        """Reap every other instance silent longer than `dead_after`; returns how many
        this server reaped (others may win some)."""
        if self.instance is None or self._healthy_since is None:
            return 0
        now = self.now()
        if (now - self._healthy_since).total_seconds() < self.dead_after:
            return 0  # not beating for long enough to tell a dead server from a shared outage
        cutoff = now - timedelta(seconds=self.dead_after)
        won = 0
        for silent in (yield self.store.silent(cutoff, exclude=self.instance.id)):
            reaped = yield self.store.reap(silent, cutoff)
            if reaped is None:
                continue  # another server won, or it beat again just now
            won += 1
            self.reaped += 1
            self.stats.incr("servers.reaped")
            self.log.warn("server {name} (instance {id} on {host}) silent since {seen}: declared dead;"
                          " {n} agent(s) left without a session are offline", name=silent.name, id=silent.id,
                          host=silent.hostname, seen=silent.last_seen.isoformat(), n=len(reaped.changes))
            self._publish_offline(reaped.changes)
        return won

    def live(self) -> "Deferred[list[ServerInstance]]":
        """The instances seen within `dead_after`, with the agents each holds (the API)."""
        return self.store.live(self.now() - timedelta(seconds=self.dead_after))

    def _publish_offline(self, changes: list[OnlineChange]) -> None:
        for change in changes:
            self.events.publish("agent.offline", online_payload(change))


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc) or type(exc).__name__
    return text.splitlines()[0][:200]
