"""Deciding what each connected agent is told: on domain events, and when agents connect.

Every server subscribes to every event (its own and, over RabbitMQ, the others') and
acts only for the agents it holds: on a `task.*` event it re-reads the task and its
routes and sends each local agent the difference from what that agent was last sent.
Re-reading instead of trusting the event payload makes duplicates and reordering across
servers harmless; pushes for one task are serialised so a slow read can never overwrite
a newer one. It is the session manager's listener too: it gives connecting agents their
`any` tasks and first taskList, re-routes an agent whose catalog changed, and sends the
periodic taskLists, all told through agentview.AgentView. On `agent.offline` it waits
(the agent may come straight back), then moves that agent's `any` tasks. A periodic
sweep (and one a relocation delay after this dispatcher starts) does the same,
level-triggered: it moves every enabled `any` task whose agent has been offline
longer than the relocation delay and assigns those with no agent, so an offline event
lost, or published before any dispatcher ran, changes nothing in the end state.

Dispatch latency (the `dispatch.latency` timer): the clock is read when a `task.*` event
reaches this server (for a change made through this server's API that is the moment the
request's write committed, in the same reactor turn), carried through the serialised
push, and timed again right after each `taskAdd`/`taskUpdate`/`taskRemove` frame is
handed to that agent's websocket: one timing per agent told, tagged with the frame's
event and whether the change came from this server or another one.
"""
from __future__ import annotations

import random
from typing import Any, Iterable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredSemaphore, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskd.db.availability import log_failure
from taskd.db.connector import Database
from taskd.db.tasks import Task
from taskd.routing import BY_IDS, BY_TAGS, Candidate, routes_to, selects
from taskd.server.agentview import AgentView, Desired
from taskd.server.events import Event, EventBus
from taskd.server.agentsession import CLOSE_NORMAL, CLOSE_PUBLIC_CHANGED, AgentSession
from taskd.stats import NULL_STATS
from taskd.wire.messages import task_payload

REMOTE_JITTER = 2.1  # the original's extra random delay for offline events from elsewhere


class Dispatcher(Service):
    log = Logger()
    name = "dispatch"

    def __init__(self, *, sessions: dict[int, AgentSession], db: Database, events: EventBus, clock: Any,
                 instance_id: str, relocate_delay: float = 1.0, sweep_interval: float = 60.0,
                 task_list_interval: float = 60.0, rng: random.Random | None = None,
                 stats: Any = NULL_STATS, view: AgentView | None = None, concurrent_reads: int = 10) -> None:
        """`sessions`: the session manager's held sessions (agent id -> session), the
        same dict it was built with. `concurrent_reads`: task reads an event burst may
        have in the database pool at once (db-pool-size); the rest wait here, outside
        db-timeout, so that the backlog of a broker reconnect (hundreds of events at
        once) neither fails as a database outage nor crowds out the API's reads."""
        self.sessions = sessions
        self.view = view if view is not None else AgentView()
        self.task_list_interval = task_list_interval
        self.stats = stats
        self.db = db
        self.events = events
        self.clock = clock
        self.instance_id = instance_id
        self.relocate_delay = relocate_delay
        self.sweep_interval = sweep_interval
        self.rng = rng or random.Random()
        self._chains: dict[int, Deferred] = {}
        self._pending_relocations: dict[int, Any] = {}
        self._reloading: dict[int, int] = {}  # agent id -> reloads in flight (agent.updated)
        self._sweeper: LoopingCall | None = None
        self._startup_sweep: Any = None
        self._reads = DeferredSemaphore(concurrent_reads)
        events.subscribe(self.on_event)

    def startService(self) -> None:
        super().startService()
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = self.clock
        self._sweeper.start(self.sweep_interval, now=False).addErrback(
            lambda f: self.log.failure("sweep timer stopped", f))
        # Once at start-up, a relocation delay in: then the agents this server marked
        # offline while starting (their agent.offline went out before this dispatcher
        # ran) and have not come back count as gone, as do tasks left unassigned or on
        # agents long gone.
        self._startup_sweep = self.clock.callLater(self.relocate_delay, self.sweep)

    def stopService(self) -> None:
        super().stopService()
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        if self._startup_sweep is not None and self._startup_sweep.active():
            self._startup_sweep.cancel()
        for call in self._pending_relocations.values():
            if call.active():
                call.cancel()
        self._pending_relocations.clear()

    # -- events ------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        if not self.running:  # shutting down: other servers relocate, not this one
            return
        kind, payload = event.type, event.payload
        received = self.clock.seconds()
        source = "local" if event.source == self.instance_id else "remote"
        if kind == "task.created":
            # A task this server just wrote can be routed from memory (see _routed_here).
            created = payload if event.source == self.instance_id else None
            self.task_changed(payload["id"], since=received, source=source, created=created)
        elif kind == "task.deleted":
            # Its shared dict is dropped once the push is done, in the task's chain: a
            # push for it still in flight would share it again (kept for good).
            task_id = payload["id"]
            self.task_changed(task_id, since=received, source=source).addCallback(
                lambda _: self.view.forget_task(task_id))
        elif kind == "task.updated":
            self.task_changed(payload["new"]["id"], since=received, source=source)
        elif kind == "agent.offline":
            remote = event.source != self.instance_id
            delay = self.relocate_delay + (self.rng.uniform(0, REMOTE_JITTER) if remote else 0.0)
            self.schedule_relocation(payload["id"], delay)
        elif kind == "agent.updated":
            self._agent_updated(payload["new"])
        elif kind == "agent.deleted":
            session = self.sessions.get(payload["id"])
            if session is not None:
                self.log.info("agent {name} was deleted; closing its connection", name=session.agent.name)
                session.transport.close(CLOSE_NORMAL, "agent deleted")
            self.sweep()

    def task_changed(self, task_id: int, since: float | None = None, source: str = "local",
                     created: dict | None = None) -> Deferred:
        """Push task `task_id`'s current routing to local agents, after any push for the
        same task still in flight. `since`: when the change was received (clock
        seconds), to time the dispatch latency. `created`: the task's JSON, when this
        server has just created it."""
        prev = self._chains.get(task_id) or succeed(None)
        done: Deferred = Deferred()

        def run(_: Any) -> None:
            d = maybeDeferred(self._push_task, task_id, since, source, created)
            d.addErrback(lambda f: log_failure(self.log, f, "pushing task {id} failed", id=task_id))
            d.addBoth(lambda _: done.callback(None))

        def cleanup(_: Any) -> None:
            if self._chains.get(task_id) is done:
                del self._chains[task_id]

        done.addBoth(cleanup)
        self._chains[task_id] = done
        prev.addBoth(run)
        return done

    @inlineCallbacks
    def _push_task(self, task_id: int, since: float | None = None, source: str = "local",
                   created: dict | None = None):
        sessions = [s for s in self.sessions.values() if not s.closed]
        if not sessions:
            return
        seq = self.view.next_read()
        routed = self._routed_here(created, sessions) if created is not None else None
        if routed is not None:
            payload, enabled = self.view.share(created), bool(created["enabled"])
        else:
            task, routed = yield self._reads.run(self.db.routes.snapshot, task_id)
            payload = self.view.share(task_payload(task)) if task is not None else None
            enabled = task is not None and task.enabled
        told: dict[str, list[AgentSession]] = {}
        frames: dict = {}  # one encoding per (event, payload) for the whole fan-out
        for session in sessions:
            desired = Desired.one(task_id, payload, enabled and session.agent.id in routed)
            for _, event in self.view.apply(session, desired, seq, frames=frames):
                if since is not None and not session.closed:
                    self.stats.timing("dispatch.latency", (self.clock.seconds() - since) * 1000.0,
                                      tags={"event": event, "source": source})
                told.setdefault(event, []).append(session)
        if told:
            name = payload["name"] if payload else next(iter(told.values()))[0].view.get(task_id, {}).get("name")
            self.log.info("task {id} ({name}): {summary}", id=task_id, name=name, summary=_summary(told))

    def _routed_here(self, task: dict, sessions: list[AgentSession]) -> set[int] | None:
        """The agents among `sessions` a byIds/byTags task this server has just created
        is routed to, from what the sessions hold, with the rule of taskd.routing (a
        held agent is online; its tags and org; its catalog covers the task's metrics). None when that cannot be decided here, and the
        database is asked: an `any` task (its agent is chosen in the database), or a
        candidate whose catalog is unknown (being written) or whose agent is being
        reloaded after a change, or a held agent that may have changed unseen (byTags).
        A newly created task is in no agent's view yet, so this saves the read-back of
        what was just written (bench/analysis.md, API POST)."""
        route = task.get("route") or {}
        route_type = route.get("type")
        if route_type not in (BY_IDS, BY_TAGS):
            return None
        if route_type == BY_TAGS:
            # Every held agent's tags and org decide, so each must be as stored: read
            # since its session was held here, while the event connection that would
            # have brought any later agent.updated has stayed up, and not being reloaded.
            epoch = self.event_epoch()
            if epoch is None or any(s.agent_epoch != epoch or s.agent.id in self._reloading for s in sessions):
                return None
        config = route.get("config") or {}
        ids, tags, org_id = config.get("ids") or (), config.get("tags") or (), task.get("orgId")
        metrics = task.get("metrics") or {}
        routed = set()
        for session in sessions:
            held = _candidate(session)
            if not selects(route_type, ids, tags, org_id, held):
                continue
            if session.agent.id in self._reloading or (metrics and session.catalog is None):
                return None
            if routes_to(route_type, ids, tags, org_id, metrics, held):
                routed.add(session.agent.id)
        return routed

    @inlineCallbacks
    def resync(self, session: AgentSession):
        """Bring one agent's view to the database's truth with individual events."""
        seq = self.view.next_read()
        lists = yield self.db.routes.tasks_for_agents([session.agent.id])
        wanted = self._wanted(session, lists.get(session.agent.id, []), seq, {})
        for task_id, event in self.view.apply(session, Desired.full(wanted), seq):
            self.log.info("task {id} ({name}): {event} to agent {agent} ({ip})", id=task_id,
                          name=(wanted.get(task_id) or {}).get("name"), event=event,
                          agent=session.agent.name, ip=session.remote_ip)

    @inlineCallbacks
    def send_task_lists(self, sessions: Iterable[AgentSession]):
        """Send each agent its full enabled task list (one DB round for all of them).
        Agents running the same tasks share the task dicts (see AgentView.share) and
        the encoded frame."""
        sessions = [s for s in sessions if not s.closed]
        if not sessions:
            return
        seq = self.view.next_read()
        lists = yield self.db.routes.tasks_for_agents([s.agent.id for s in sessions])
        now = self.clock.seconds()
        payloads: dict[int, dict] = {}
        frames: dict = {}
        for session in sessions:
            wanted = self._wanted(session, lists.get(session.agent.id, []), seq, payloads)
            self.view.apply(session, Desired.full(wanted), seq, as_list=True, frames=frames)
            session.next_task_list = now + self.task_list_interval

    def _wanted(self, session: AgentSession, tasks: list[Task], seq: int,
                payloads: dict[int, dict]) -> dict[int, dict]:
        """The shared JSON of the tasks read `seq` found for `session`. `payloads`:
        id(Task) -> its shared JSON (a read shares Task objects). Made only for a task
        the view takes: one this read saw before its deletion (decided by a later read)
        must not be shared again."""
        wanted = {}
        for t in tasks:
            if session.decided(t.id) > seq:
                continue
            payload = payloads.get(id(t))
            if payload is None:
                payload = payloads[id(t)] = self.view.share(task_payload(t))
            wanted[t.id] = payload
        return wanted

    # -- the session manager's listener ------------------------------------------------

    def task_lists_due(self, sessions: list[AgentSession]) -> Deferred:
        return self.send_task_lists(sessions)

    def catalog_changed(self, session: AgentSession) -> Deferred:
        return self.agent_changed(session)

    def event_epoch(self) -> Any:
        """Names the unbroken stream of events this server receives: every agent change
        since then has reached it. 0 with no transport (every event is in-process), the
        transport's connection count while connected, None while disconnected."""
        transport = self.events.transport
        if transport is None:
            return 0
        if not getattr(transport, "connected", False):
            return None
        return getattr(transport, "connections", None)

    def _refresh(self, session: AgentSession, fresh: Any, seq: int, epoch: Any) -> None:
        """Hold `fresh` (read by read `seq` under `epoch`) as the session's agent, unless a
        read that started later already set it (reads finish in any order)."""
        if fresh is not None and seq > session.agent_read:
            session.agent, session.agent_read, session.agent_epoch = fresh, seq, epoch

    def _agent_updated(self, agent: dict) -> None:
        """Tags or visibility may have changed: reload the held agent and re-route it."""
        session = self.sessions.get(agent["id"])
        if session is None:  # or not yet: agents_connected reads it after it is held
            return
        self._reloading[agent["id"]] = self._reloading.get(agent["id"], 0) + 1
        seq, epoch = self.view.next_read(), self.event_epoch()

        was_public = session.agent.public

        def refreshed(fresh: Any) -> Any:
            self._refresh(session, fresh, seq, epoch)
            d = self.agent_changed(session)
            if fresh is not None and fresh.public != was_public:
                d.addCallback(lambda _: self._publicity_changed(session, fresh.public))
            return d

        def reloaded(_: Any) -> None:
            self._reloading[agent["id"]] -= 1
            if not self._reloading[agent["id"]]:
                del self._reloading[agent["id"]]

        self.db.agents.get(agent["id"]).addCallback(refreshed).addErrback(
            lambda f: log_failure(self.log, f, "re-routing agent {id} failed", id=agent["id"])).addBoth(reloaded)

    def _publicity_changed(self, session: AgentSession, public: bool) -> None:
        """The agent was made public or private. It has been re-routed (a task it may no
        longer run got its taskRemove); its connection is then closed, because it was
        opened telling the agent the old flag, on which its `blocked-nets = auto`
        depends: it reconnects at once and is told the new one (docs/protocol.md)."""
        if session.closed:
            return
        what = "public" if public else "private"
        self.log.info("agent {name} ({id}) was made {what}; closing its connection so that it reconnects knowing",
                      name=session.agent.name, id=session.agent.id, what=what)
        session.transport.close(CLOSE_PUBLIC_CHANGED, f"this agent was made {what}; reconnect")

    @inlineCallbacks
    def agent_changed(self, session: AgentSession, initial: bool = False):
        """The agent connected (`initial`), or its catalog/tags changed: move the `any`
        tasks it no longer qualifies for, give it unassigned ones it does, then bring it
        up to date — with its first taskList when it just connected."""
        released = yield self.db.routes.release_unqualified(session.agent.id)
        assigned = yield self.db.routes.assign_unassigned([session.agent.id])
        if initial:
            yield self.send_task_lists([session])
        else:
            yield self.resync(session)
        for task, new_agent in released:
            self._announce([task], f"moved off agent {session.agent.name}, which no longer qualifies, "
                                   f"to {f'agent {new_agent}' if new_agent else 'nowhere (unassigned)'}")
        self._announce(assigned, f"assigned to agent {session.agent.name}")

    @inlineCallbacks
    def agents_connected(self, sessions: list[AgentSession]):
        """Agents just connected (a batch of them): in one transaction move the `any`
        tasks they no longer qualify for, give them unassigned ones they do, and re-read
        the agents (now that their sessions are held, every later change reaches them),
        then send each its first taskList (one read for the batch), which already holds
        those."""
        seq, epoch = self.view.next_read(), self.event_epoch()
        released, assigned, catalogs, agents = yield self.db.routes.connect_assignments(
            [s.agent.id for s in sessions])
        for session in sessions:
            if session.catalog is None:
                session.catalog = catalogs.get(session.agent.id, frozenset())
            self._refresh(session, agents.get(session.agent.id), seq, epoch)
        yield self.send_task_lists(sessions)
        names = {s.agent.id: s.agent.name for s in sessions}
        for task, new_agent in released:
            self._announce([task], f"moved off a connecting agent that no longer qualifies, "
                                   f"to {f'agent {new_agent}' if new_agent else 'nowhere (unassigned)'}")
        for task, agent_id in assigned:
            self._announce([task], f"assigned to agent {names.get(agent_id, agent_id)}")

    # -- relocation and sweeping -------------------------------------------------------

    def schedule_relocation(self, agent_id: int, delay: float) -> None:
        previous = self._pending_relocations.pop(agent_id, None)
        if previous is not None and previous.active():
            previous.cancel()
        self._pending_relocations[agent_id] = self.clock.callLater(delay, self._relocate, agent_id)

    @inlineCallbacks
    def _relocate(self, agent_id: int):
        self._pending_relocations.pop(agent_id, None)
        try:
            moved = yield self.db.routes.relocate_from(agent_id)
        except Exception:
            log_failure(self.log, Failure(), "relocating the tasks of agent {id} failed", id=agent_id)
            return
        for task, new_agent in moved:
            where = f"to agent {new_agent}" if new_agent else "nowhere (no qualifying agent online; unassigned)"
            self.log.info("task {id} ({name}) moved off offline agent {old} {where}", id=task.id,
                          name=task.name, old=agent_id, where=where)
            payload = task_payload(task)
            self.events.publish("task.updated", {"old": payload, "new": payload})

    def sweep(self) -> Deferred:
        """Level-triggered `any` routing (see routes.sweep_any); never fails."""
        d = self.db.routes.sweep_any(self.relocate_delay)

        def swept(result: tuple[list[tuple[Task, int | None]], list[Task]]) -> None:
            moved, assigned = result
            for task, new_agent in moved:
                where = f"to agent {new_agent}" if new_agent else "nowhere (no qualifying agent online; unassigned)"
                self._announce([task], f"moved by the sweep off an agent offline for over {self.relocate_delay:g}s,"
                                       f" {where}")
            self._announce(assigned, "assigned by the periodic sweep")

        d.addCallback(swept)
        d.addErrback(lambda f: log_failure(self.log, f, "the sweep of `any` tasks failed"))
        return d

    def _announce(self, tasks: list[Task], how: str) -> None:
        for task in tasks:
            self.log.info("task {id} ({name}) {how}", id=task.id, name=task.name, how=how)
            payload = task_payload(task)
            self.events.publish("task.updated", {"old": payload, "new": payload})


def _candidate(session: AgentSession) -> Candidate:
    """A held agent as the routing rule sees it: online (its session is held here), its
    tags, org and advertised catalog (empty while unknown; the caller asks the database
    then)."""
    agent = session.agent
    return Candidate(id=agent.id, org_id=agent.org_id, public=agent.public, online=True,
                     tags=frozenset(agent.tags), catalog=session.catalog or frozenset(),
                     org_tags=frozenset(agent.org_tags))


def _summary(told: dict[str, list[AgentSession]], shown: int = 5) -> str:
    """`taskAdd to agent a1 (10.0.0.1), agent a2 (…)`; past `shown` agents, a count."""
    parts = []
    for event, sessions in told.items():
        names = ", ".join(f"agent {s.agent.name} ({s.remote_ip})" for s in sessions[:shown])
        more = f" and {len(sessions) - shown} more" if len(sessions) > shown else ""
        parts.append(f"{event} to {names}{more}")
    return "; ".join(parts)
