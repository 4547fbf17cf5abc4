"""This server's agent sessions: lifecycle, timers, and the frames agents send.

One `SessionManager` holds every websocket this process accepted: it records sessions
(in batches: a reconnect storm is thousands at once), closes them, and takes their
`catalog` and `taskStatus` frames. What each agent is told is not decided here: the
manager tells its listener (the dispatcher, given at construction) when agents
connected, when an agent's catalog changed and when taskLists are due; each session's
record of what it was told is `agentview.Told`. All sessions share one timer (not one
per agent): each tick sends every heartbeat and hands over the `taskList`s that are due,
which keeps 10,000 agents cheap. Timers run on an injectable clock for tests.
"""
from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, maybeDeferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskd.db.agents import Agent
from taskd.db.availability import RETRY_DELAY, DatabaseUnavailable, is_unavailable, log_failure
from taskd.db.connector import Database
from taskd.db.sessions import OnlineChange
from taskd.server.agentsession import (CLOSE_GOING_AWAY, CLOSE_NORMAL, AgentSession, SessionListener,
                                       SessionTransport, online_payload)
from taskd.server.agenttokens import CLOSE_TOKEN_RESET, TOKEN_RESET
from taskd.server.badframes import BadFrames
from taskd.server.events import EventBus
from taskd.wire.messages import parse_catalog
from taskd.stats import NULL_STATS
from taskd.timeutil import rfc3339, utcnow
from taskd.wire import framing
from taskd.wire.framing import Frame, FrameError

OPEN_BATCH = 500  # sessions recorded per transaction at most
#: Catalog/taskStatus frames of one agent waiting to be handled (behind a slow catalog
#: write, or before its session is recorded) before the server stops reading its socket;
#: reading resumes once half have been handled. An agent sends one catalog per connection
#: and a taskStatus every few seconds, so only a flood ever reaches this.
MAX_INBOUND = 16
SLICE = 1000  # sessions handled per reactor turn (heartbeats) or per read (taskLists) by the timer


class SessionManager(Service):
    log = Logger()
    name = "sessions"

    def __init__(self, *, db: Database, events: EventBus, listener: SessionListener,
                 instance_id: str, clock: Any, heartbeat_interval: float = 2.0,
                 shutdown_timeout: float = 5.0, stats: Any = NULL_STATS, status: Any = None,
                 sessions: dict[int, AgentSession] | None = None, max_catalog_records: int | None = None,
                 max_bad_frames: int = 100) -> None:
        """`sessions`: the dict of held sessions (agent id -> its session here), when
        the listener was built with it; a new one otherwise."""
        self.listener = listener
        self.status = status  # the StatusService taking taskStatus frames (None: ignored)
        self.adhoc: Any = None  # the AdhocRuns taking runResult frames (taskd.server.adhoc)
        self.stats = stats
        self.store = db.sessions
        self.catalog = db.catalog
        self.max_catalog_records = max_catalog_records
        self.bad_frames = BadFrames(clock, max_bad_frames)
        if status is not None:
            status.complain = self.bad_frames.complain
        self.events = events
        self.instance_id = instance_id
        self.clock = clock
        self.heartbeat_interval = heartbeat_interval
        self.shutdown_timeout = shutdown_timeout
        self.sessions: dict[int, AgentSession] = sessions if sessions is not None else {}
        self._opening: list[AgentSession] = []  # opened, waiting for the next batch
        self._open_call: Any = None
        self._open_busy = False
        self._batch: Deferred | None = None  # the batch being recorded and brought up
        self._recording: list[AgentSession] = []  # its sessions
        self._unsubscribe: Any = None  # of the agent.connected handler, while running
        self._stopped = False  # stopService ran: sessions recorded from now on are closed at once
        self._ticker: LoopingCall | None = None
        self._listing = False  # a round of due taskLists is being read and sent (see tick)
        self._generation = 0  # bumped by drop_all: batches recorded under an older one are dropped
        self._drop_reason = ""

    # -- lifecycle ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._unsubscribe = self.events.subscribe(self._on_event)
        self._ticker = LoopingCall(self.tick)
        self._ticker.clock = self.clock
        self._ticker.start(self.heartbeat_interval, now=False).addErrback(
            lambda f: self.log.failure("session timer stopped", f))

    def _on_event(self, event: Any) -> None:
        """Newest session wins across servers: an agent that connected to another server
        while it still has a session here (its socket here died unseen) is closed here."""
        if event.type == TOKEN_RESET:
            self._token_reset(event)
            return
        if event.type != "agent.connected" or event.source == self.instance_id:
            return
        payload = event.payload if isinstance(event.payload, dict) else {}
        session = self.sessions.get(payload.get("id"))  # type: ignore[arg-type]
        if session is None or session.closed or session.id == payload.get("session"):
            return
        server = str(payload.get("server") or event.source)
        self.log.info("agent {name} ({id}) connected to server {server}; closing its older connection here {old}",
                      name=session.agent.name, id=session.agent.id, server=server, old=session.id)
        session.transport.close(CLOSE_NORMAL, f"replaced by a newer connection on server {server}")

    def _token_reset(self, event: Any) -> None:
        """The agent's token was replaced (on any server): the connection the old one
        opened is closed; the agent must come back with the new token."""
        payload = event.payload if isinstance(event.payload, dict) else {}
        session = self.sessions.get(payload.get("id"))  # type: ignore[arg-type]
        if session is None or session.closed or not session.via_token:
            return
        if payload.get("tokenId") is not None and payload.get("tokenId") == session.token_id:
            return  # opened with the new token already (the event came after the agent)
        self.log.info("agent {name} ({id}): its token was replaced; closing the connection it opened",
                      name=session.agent.name, id=session.agent.id)
        session.transport.close(CLOSE_TOKEN_RESET, "agent token replaced; reconnect with the new token")

    @inlineCallbacks
    def stopService(self):
        """Close every socket with a normal close code, wait (bounded) for the agents to
        be marked offline, then drop whatever this server still has recorded."""
        super().stopService()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self._stopped = True
        if self._open_call is not None and self._open_call.active():
            self._open_call.cancel()
        self._open_call = None
        waiting_to_open, self._opening = self._opening, []
        for session in waiting_to_open:  # never recorded: nothing to forget
            session.closed = True
            session.transport.close(CLOSE_NORMAL, "server shutting down")
            session.gone.callback(None)
        if self._batch is not None:
            # Being recorded: once written its sessions are closed and forgotten (see
            # _opened); clearing this server's sessions before the write commits would
            # leave them recorded, and their agents online, until the next start.
            yield self._batch
        sessions = list(self.sessions.values())
        if sessions:
            self.log.info("closing {n} agent connection(s)", n=len(sessions))
        for session in sessions:
            session.transport.close(CLOSE_NORMAL, "server shutting down")
        if sessions:
            waiting = DeferredList([s.gone for s in sessions], consumeErrors=True)
            timer = self.clock.callLater(self.shutdown_timeout, lambda: None if waiting.called else waiting.cancel())
            try:
                yield waiting
            except Exception:
                self.log.warn("not every agent connection closed within {t}s", t=self.shutdown_timeout)
            if timer.active():
                timer.cancel()
        changes = yield self.store.clear_server(self.instance_id)
        for change in changes:
            self.events.publish("agent.offline", online_payload(change))

    def drop_all(self, reason: str) -> int:
        """Close every socket this server holds (the agents reconnect, here or to another
        server): its session rows may have been removed by another server that took it
        for dead (see taskd.server.liveness), so what it holds is no longer recorded.
        Sessions in a batch being recorded now are closed once it is written. Returns
        how many sockets were closed."""
        self._generation += 1
        held = list(self.sessions.values())
        for session in held:
            session.transport.close(CLOSE_GOING_AWAY, reason)
        self._drop_reason = reason
        return len(held)

    # -- sessions ----------------------------------------------------------------------

    def attach(self, agent: Agent, version: int, remote_ip: str, transport: SessionTransport, *,
               via_token: bool = False, token_id: str | None = None,
               features: frozenset[str] = frozenset()) -> AgentSession:
        """A websocket for `agent` just opened: record it, then tell the agent its tasks.

        Sessions that open close together are handled together (a reconnect storm after
        a restart is thousands at once): those that opened in the same reactor turn, or
        while the previous batch was being brought up, are recorded in one transaction,
        get their `any` tasks in one more, and their first taskLists from one read."""
        session = AgentSession(agent, version, remote_ip, transport, via_token=via_token, token_id=token_id,
                               features=features)
        self.stats.incr("agents.connections_accepted")
        self._opening.append(session)
        if self._open_call is None and not self._open_busy:
            self._open_call = self.clock.callLater(0, self._open_next)
        return session

    def _open_next(self) -> None:
        self._open_call = None
        batch, self._opening = self._opening[:OPEN_BATCH], self._opening[OPEN_BATCH:]
        if not batch:
            return
        self._open_busy = True
        self._recording = batch
        d = self.store.open_many([(s.agent.id, s.version, s.remote_ip) for s in batch], server=self.instance_id)
        d.addCallbacks(self._opened, self._open_failed, callbackArgs=(batch, self._generation), errbackArgs=(batch,))

        def next_batch(_: Any) -> None:
            self._open_busy = False
            self._batch = None
            self._recording = []
            if self._opening and self._open_call is None:
                self._open_call = self.clock.callLater(0, self._open_next)

        d.addBoth(next_batch)
        if self._open_busy:  # not over already
            self._batch = d

    @inlineCallbacks
    def _opened(self, results: list[tuple[str | None, OnlineChange | None]], batch: list[AgentSession],
                generation: int = 0):
        ready = []
        dropped = generation != self._generation  # drop_all ran while these were recorded
        for (session_id, change), session in zip(results, batch):
            if session_id is None:  # the agent was deleted before its session was recorded
                session.transport.close(CLOSE_NORMAL, "agent deleted")
                if not session.gone.called:
                    session.gone.callback(None)
                continue
            session.id = session_id
            if self._stopped and not session.closed:  # recorded while the server stops
                session.transport.close(CLOSE_NORMAL, "server shutting down")
            elif dropped and not session.closed:
                session.transport.close(CLOSE_GOING_AWAY, self._drop_reason)
            if session.closed or self._stopped or dropped:  # the socket closed while the row was being written
                self._forget(session)
                continue
            old = self.sessions.get(session.agent.id)
            self.sessions[session.agent.id] = session
            if old is not None:
                self.log.info("agent {name} reconnected; closing its previous connection {old}",
                              name=session.agent.name, old=old.id)
                old.transport.close(CLOSE_NORMAL, "replaced by a newer connection")
            self.log.info("agent {name} ({id}) connected from {ip}: session {sid}, protocol v{v}",
                          name=session.agent.name, id=session.agent.id, ip=session.remote_ip,
                          sid=session.id, v=session.version)
            if change is not None:
                self.events.publish("agent.online", online_payload(change))
            else:  # online already: it may hold a stale session elsewhere, which this one replaces
                self.events.publish("agent.connected", {
                    "id": session.agent.id, "name": session.agent.name, "orgId": session.agent.org_id,
                    "session": session.id, "server": self.instance_id})
            ready.append(session)
        self.stats.gauge("agents.connected", len(self.sessions))
        if ready:
            yield self._bring_up(ready)

    @inlineCallbacks
    def _bring_up(self, ready: list[AgentSession]):
        try:
            # The dispatcher first gives the agents any tasks waiting for one, so the
            # initial taskLists already hold them.
            yield self.listener.agents_connected(ready)
        except Exception:
            self._open_failed(Failure(), ready)
            return
        for session in ready:
            if not session.ready.called:
                session.ready.callback(session)

    def _open_failed(self, failure: Any, sessions: list[AgentSession]) -> None:
        if is_unavailable(failure) and not self._stopped:
            self._open_later(sessions)
            return
        names = ", ".join(s.agent.name for s in sessions[:5]) + (" …" if len(sessions) > 5 else "")
        self.log.failure("could not record or bring up the session(s) of {n} agent(s) ({names})", failure,
                         n=len(sessions), names=names)
        for session in sessions:
            session.transport.close(CLOSE_GOING_AWAY, "server error; reconnect later")
            if session.id is None and not session.gone.called:  # nothing recorded to forget
                session.gone.callback(None)

    def _open_later(self, sessions: list[AgentSession]) -> None:
        """The database is unavailable: the sockets stay open (they get heartbeats, see
        `tick`) and the sessions are recorded, or brought up, once it answers again."""
        unrecorded = []
        for session in sessions:
            if session.id is not None:
                continue
            if session.closed:  # detached while being recorded: nothing to forget now
                if not session.gone.called:
                    session.gone.callback(None)
            else:
                unrecorded.append(session)
        recorded = [s for s in sessions if s.id is not None]
        self.log.debug("database unavailable: recording {n} and bringing up {m} session(s) later",
                       n=len(unrecorded), m=len(recorded))
        if unrecorded:
            self._opening[:0] = unrecorded
            if self._open_call is None:
                self._open_call = self.clock.callLater(RETRY_DELAY, self._open_next)
        if recorded:
            def again() -> None:
                live = [s for s in recorded if not s.closed and self.sessions.get(s.agent.id) is s]
                if live and not self._stopped:
                    self._bring_up(live)

            self.clock.callLater(RETRY_DELAY, again)

    def detach(self, session: AgentSession, reason: str = "") -> Deferred:
        """The websocket closed (any reason)."""
        if session.closed:
            return session.gone
        session.closed = True
        self.log.info("agent {name} disconnected ({reason}): agent {id} from {ip}, session {sid}",
                      name=session.agent.name, reason=reason or "closed", id=session.agent.id,
                      ip=session.remote_ip, sid=session.id)
        if session.id is None:
            if session in self._opening:  # not recorded yet, and now it never will be
                self._opening.remove(session)
                session.gone.callback(None)
            # else: still being recorded; _opened will forget it
            return session.gone
        if self.sessions.get(session.agent.id) is session:
            del self.sessions[session.agent.id]
            self.stats.gauge("agents.connected", len(self.sessions))
        self._forget(session)
        return session.gone

    @inlineCallbacks
    def _forget(self, session: AgentSession):
        try:
            while True:
                try:
                    change = yield self.store.close(session.id, session.agent.id)
                    break
                except DatabaseUnavailable:
                    if self._stopped:  # stopService clears every session of this server
                        raise
                    yield deferLater(self.clock, RETRY_DELAY, lambda: None)
            if change is not None:
                self.events.publish("agent.offline", online_payload(change))
        except Exception:
            log_failure(self.log, Failure(), "could not remove session {sid} of agent {name}", sid=session.id,
                        name=session.agent.name)
        finally:
            if not session.gone.called:
                session.gone.callback(None)

    # -- incoming frames ---------------------------------------------------------------

    def frame_received(self, session: AgentSession, data: bytes) -> None:
        """A binary frame from the agent; raises FrameError for a malformed one (the
        caller closes the connection with a protocol error)."""
        frame = framing.decode(data)
        handler = getattr(self, f"handle_{frame.event}", None) if frame.event in framing.AGENT_EVENTS else None
        if handler is None:
            self.bad_frames.complain(session, f"sent unknown event {frame.event[:64]!r}; ignored")
            return
        handler(session, frame)

    def handle_catalog(self, session: AgentSession, frame: Frame) -> None:
        # Catalogs queue on `ready`; the errback keeps one failed catalog (e.g. a
        # database error) from leaving the queue failed, which would drop every later one.
        session.catalogs += 1
        seq = session.catalogs
        self._taken(session)
        session.ready.addCallback(lambda _: self._catalog(session, frame)).addErrback(
            self._catalog_failed, session, frame, seq).addBoth(self._handled, session)

    def handle_runResult(self, session: AgentSession, frame: Frame) -> None:
        complaint = self.adhoc.received(session, frame) if self.adhoc is not None else "sent an unasked runResult"
        if complaint:
            self.bad_frames.complain(session, complaint)

    def handle_taskStatus(self, session: AgentSession, frame: Frame) -> None:
        # Queued on `ready` too: only then does `view` hold what the agent was sent,
        # which is what its statuses are checked against.
        if self.status is not None:
            self._taken(session)
            session.ready.addCallback(lambda _: self._task_status(session, frame)).addErrback(
                self._status_failed, session).addBoth(self._handled, session)

    def _taken(self, session: AgentSession) -> None:
        """Back-pressure: past MAX_INBOUND frames waiting, stop reading the socket rather
        than queue without bound (one agent queued 500 catalogs, 35 MB, before)."""
        session.inbound += 1
        if session.inbound >= MAX_INBOUND and not session.paused and not session.closed:
            session.paused = True
            session.transport.pause_reading()
            self.log.info("agent {name} ({id}): {n} frames waiting to be handled; pausing reads from it",
                          name=session.agent.name, id=session.agent.id, n=session.inbound)

    def _handled(self, result: Any, session: AgentSession) -> Any:
        session.inbound -= 1
        if session.paused and session.inbound <= MAX_INBOUND // 2:
            session.paused = False
            if not session.closed:
                session.transport.resume_reading()
        return result

    @inlineCallbacks
    def _catalog(self, session: AgentSession, frame: Frame):
        try:
            records = parse_catalog(frame.json(), self.max_catalog_records)
        except FrameError as exc:
            self.bad_frames.complain(session, f"sent a catalog that was refused, nothing of it stored: {exc}")
            return session
        session.catalog = None  # changing: unknown until written
        count = yield self.catalog.replace_agent_catalog(session.agent.id, records)
        session.catalog = frozenset((ns, ver) for ns, ver, _ in records)
        self.log.debug("agent {name} advertises {n} metric(s)", name=session.agent.name, n=count)
        if not session.closed:
            yield self.listener.catalog_changed(session)
        return session

    def _catalog_failed(self, failure: Any, session: AgentSession, frame: Frame, seq: int) -> AgentSession:
        if is_unavailable(failure) and not session.closed and not self._stopped:
            def again() -> None:
                if session.catalogs == seq and not session.closed:  # else a newer one is on its way
                    self.handle_catalog(session, frame)

            self.clock.callLater(RETRY_DELAY, again)
            return session
        log_failure(self.log, failure, "could not store the catalog of agent {name}", name=session.agent.name)
        return session

    def _task_status(self, session: AgentSession, frame: Frame) -> AgentSession:
        self.status.received(session, frame)
        return session

    def _status_failed(self, failure: Any, session: AgentSession) -> AgentSession:
        log_failure(self.log, failure, "could not take the task statuses of agent {name}", name=session.agent.name)
        return session

    # -- timers ------------------------------------------------------------------------

    def tick(self) -> Deferred:
        """Every agent's heartbeat, then the taskLists that are due. Heartbeats go out
        in slices of SLICE sessions, one slice per reactor turn, so a push that arrives
        meanwhile is not queued behind 10,000 heartbeat writes. The returned Deferred
        (which the timer waits for) fires once the heartbeats are out, never later: the
        due taskLists are read and sent SLICE agents at a time on their own (`_send_due`),
        so a slow database delays taskLists, not heartbeats, whose absence would make
        every agent drop its connection. While such a round runs, ticks start no other."""
        now = self.clock.seconds()
        beat = framing.encode(framing.HEARTBEAT, rfc3339(utcnow()).encode())
        # Sessions not recorded yet (the database is unavailable, see _open_later) get
        # heartbeats too, so their agents keep the connection.
        sessions = list(self.sessions.values()) + self._recording + self._opening
        collect = not self._listing  # a round still running: only heartbeats this time
        due: list[AgentSession] = []
        done: Deferred = Deferred()

        def beat_slice(start: int) -> None:
            for session in sessions[start:start + SLICE]:
                if session.closed:
                    continue
                session.transport.send_frame(beat)
                if collect and session.id is not None and session.next_task_list <= now:
                    due.append(session)
            if start + SLICE < len(sessions):
                self.clock.callLater(0, beat_slice, start + SLICE)
            else:
                if due:
                    self._send_due(due)
                done.callback(None)

        beat_slice(0)
        return done

    def _send_due(self, due: list[AgentSession]) -> None:
        """One round of due taskLists, a read of SLICE agents at a time."""
        self._listing = True

        def lists_from(start: int) -> None:
            if start >= len(due) or self._stopped:
                self._listing = False
                return
            d = maybeDeferred(self.listener.task_lists_due,
                              [s for s in due[start:start + SLICE] if not s.closed])
            d.addErrback(lambda f: log_failure(self.log, f, "sending task lists failed"))
            d.addCallback(lambda _: lists_from(start + SLICE))

        lists_from(0)
