"""The services behind the REST API: org scoping and ownership, then store, then event.

Protocol classes (HTTP handlers now, the websocket later) call these and never the
stores directly, so the visibility rules live in one place: an org sees its own agents
and every public one, changes only its own, and sees only its own tasks.
"""
from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.logger import Logger

from taskd.db.agents import Agent, AgentFilter, AgentStore
from taskd.db.catalog import CatalogStore, Metric, MetricFilter
from taskd.db.listing import Page
from taskd.db.routes import RouteStore, TaskDetail
from taskd.db.taskstatus import StatusStore
from taskd.db.tasks import Task, TaskFilter, TaskSpec, TaskStore
from taskd.errors import Conflict, Forbidden, NotFound
from taskd.server.agentcache import AgentCache, BatchLoader, ShortLived
from taskd.server.auth import User
from taskd.server.events import EventBus
from taskd.server.render import agent_json, task_json
from taskd.server.validation import AgentInput
from taskd.stats import NULL_STATS

log = Logger(namespace="taskd.server.domain")


class AgentService:
    def __init__(self, agents: AgentStore, catalog: CatalogStore, events: EventBus, *,
                 stats: Any = NULL_STATS, status: StatusStore | None = None, clock: Any = None,
                 max_agents_per_org: int | None = None,
                 public_agent_orgs: frozenset[int] | None = None) -> None:
        """`public_agent_orgs`: the orgs that may publish agents (None: every org, as the
        original allowed; the server passes its `public-agent-orgs`)."""
        if clock is None:
            from twisted.internet import reactor as clock
        self.agents = agents
        self.max_agents_per_org = max_agents_per_org
        self.public_agent_orgs = public_agent_orgs
        self.status = status
        self.catalog = catalog
        self.events = events
        self.stats = stats
        # Reads of one agent (GET, websocket upgrades) come from memory; see agentcache.
        self.cache = AgentCache(events, clock)
        self.failing = ShortLived(clock, ttl=FAILING_TTL)
        # Upgrades arriving together (a reconnect storm) look their agents up together.
        self.by_name = BatchLoader(clock, agents.get_many_by_name)

    def visible(self, user: User, agent_id: int, *, fresh: bool = False) -> "Deferred[Agent]":
        """The agent, if `user` may see it. From the cache unless `fresh` (a read that
        a write will be based on goes to the database)."""
        agent = None if fresh else self.cache.get(agent_id)
        if agent is not None:
            return succeed(agent) if agent.visible_to(user.org_id) else fail(_no_agent(agent_id))
        token = self.cache.token()

        def loaded(agent: Agent | None) -> Agent:
            self.cache.put(agent, token)
            if agent is None or not agent.visible_to(user.org_id):
                raise _no_agent(agent_id)
            return agent

        return self.agents.get(agent_id).addCallback(loaded)

    @inlineCallbacks
    def owned(self, user: User, agent_id: int) -> "Deferred[Agent]":
        agent = yield self.visible(user, agent_id, fresh=True)
        if agent.org_id != user.org_id:
            raise Forbidden(f"agent {agent_id} is a public agent of another org; only its owner can change it")
        return agent

    def may_publish(self, user: User) -> bool:
        """May `user`'s org have public agents? A public agent is given every org's `any`
        tasks, config (third-party keys) included, so that is the operator's choice."""
        return self.public_agent_orgs is None or user.org_id in self.public_agent_orgs

    def _check_publish(self, user: User) -> None:
        if not self.may_publish(user):
            who = f"org {user.org_id}" + (f" ({user.org_slug})" if user.org_slug else "")
            raise Forbidden(f"this key's {who} may not publish agents: a public"
                            " agent runs other orgs' tasks, so only the orgs in the server's public-agent-orgs"
                            " may; send public: false (or leave it out)")

    def list(self, user: User, flt: AgentFilter, page: Page) -> "Deferred[list[Agent]]":
        return self.agents.list(user.org_id, flt, page)

    @inlineCallbacks
    def create(self, user: User, spec: AgentInput) -> "Deferred[Agent]":
        if spec.public:
            self._check_publish(user)
        agent = yield self.agents.create(
            user.org_id, spec.name, enabled=bool(spec.enabled), public=bool(spec.public), tags=spec.tags or (),
            max_per_org=self.max_agents_per_org,
        )
        log.info("agent {name} ({id}) registered in org {org}", name=agent.name, id=agent.id, org=agent.org_id)
        self.events.publish("agent.created", agent_event(agent))
        return agent

    @inlineCallbacks
    def for_socket(self, user: User, name: str, *, autocreate: bool) -> "Deferred[Agent]":
        """The agent connecting under `name` in the key's org; created when missing
        (enabled; public, as the later original did, only for an org that may publish),
        unless auto-create is off."""
        agent = self.cache.get_by_name(user.org_id, name)
        if agent is not None:
            return agent
        token = self.cache.token()
        agent = yield self.by_name.get((user.org_id, name))
        if agent is not None:
            self.cache.put(agent, token)
            return agent
        if not autocreate:
            raise NotFound(f"agent {name!r} is not registered in this org; register it with "
                           "POST /api/v1/agents (agent-autocreate is off)")
        try:
            agent = yield self.agents.create(user.org_id, name, enabled=True, public=self.may_publish(user), tags=(),
                                             max_per_org=self.max_agents_per_org)
        except Conflict:  # created concurrently by another connection
            return (yield self.agents.get_by_name(user.org_id, name))
        except Exception:
            self.stats.incr("agents.autocreate_failure")
            raise
        self.stats.incr("agents.autocreate_success")
        log.info("agent {name} ({id}) auto-created in org {org} on its first connection", name=agent.name,
                 id=agent.id, org=agent.org_id)
        self.events.publish("agent.created", agent_event(agent))
        return agent

    @inlineCallbacks
    def update(self, user: User, spec: AgentInput) -> "Deferred[Agent]":
        current = yield self.visible(user, spec.id, fresh=True)
        if current.org_id != user.org_id:  # another org's public agent: its own tags only
            return (yield self._tag_public(user, current, spec))
        if spec.public and not current.public:  # an agent already public may stay so
            self._check_publish(user)
        old, new = yield self.agents.update(
            current.id,
            name=spec.name if spec.name is not None else current.name,
            enabled=spec.enabled if spec.enabled is not None else current.enabled,
            public=spec.public if spec.public is not None else current.public,
            tags=spec.tags if spec.tags is not None else current.tags,
        )
        log.info("agent {name} ({id}) updated: enabled {enabled}, public {public}, tags {tags}", name=new.name,
                 id=new.id, enabled=new.enabled, public=new.public, tags=",".join(new.tags) or "none")
        self.events.publish("agent.updated", {"old": agent_event(old), "new": agent_event(new)})
        return new

    @inlineCallbacks
    def _tag_public(self, user: User, current: Agent, spec: AgentInput) -> "Deferred[Agent]":
        """An org setting its own tags on another org's public agent, for its own byTags
        routing (as in the original). Fields sent back unchanged (a GET body) are fine;
        changing any other field is the owner's business."""
        changed = [name for name, value, now in (("name", spec.name, current.name),
                                                 ("enabled", spec.enabled, current.enabled),
                                                 ("public", spec.public, current.public))
                   if value is not None and value != now]
        if changed:
            raise Forbidden(f"agent {current.id} is a public agent of another org: only its owner may change"
                            f" {', '.join(changed)}; your org may set only its own tags on it")
        if spec.tags is None:
            return current
        old, new = yield self.agents.set_org_tags(current.id, user.org_id, spec.tags)
        log.info("agent {name} ({id}) of org {owner}: org {org} set its tags to {tags}", name=new.name, id=new.id,
                 owner=new.org_id, org=user.org_id, tags=",".join(new.tags_for(user.org_id)) or "none")
        self.events.publish("agent.updated", {"old": agent_event(old), "new": agent_event(new)})
        return new

    @inlineCallbacks
    def delete(self, user: User, agent_id: int) -> "Deferred[Agent]":
        yield self.owned(user, agent_id)
        old = yield self.agents.delete(agent_id)
        if old is None:
            raise NotFound(f"agent {agent_id} does not exist")
        log.info("agent {name} ({id}) deleted", name=old.name, id=old.id)
        self.events.publish("agent.deleted", agent_event(old))
        return old

    @inlineCallbacks
    def metrics(self, user: User, agent_id: int) -> "Deferred[list[Metric]]":
        yield self.visible(user, agent_id)
        return (yield self.catalog.agent_metrics(agent_id))

    def catalog_list(self, user: User, flt: MetricFilter, page: Page) -> "Deferred[list[Metric]]":
        return self.catalog.list(user.org_id, flt, page)

    def failing_tasks(self, agents: list[Agent]) -> "Deferred[dict[int, tuple[int, int]]]":
        """agent id -> (failing, stale): tasks whose latest status there is an error or
        that are stale there, and the stale ones; a few queries for a whole page of
        (already visible) agents."""
        if self.status is None or not agents:
            return succeed({a.id: (0, 0) for a in agents})
        # Counts up to FAILING_TTL old: a GET of an agent is then no database read at all.
        found, missing = self.failing.lookup([a.id for a in agents])
        if not missing:
            return succeed(found)
        token = self.failing.token()

        def counted(counts: dict[int, int]) -> dict[int, int]:
            self.failing.store(counts, token)
            return {**found, **counts}

        return self.status.failing_counts(missing).addCallback(counted)


class TaskService:
    """Tasks of the caller's org. An `any` task gets its agent in the transaction that
    writes it (taskd.db.tasks), so every server learns the assignment from the database
    with the event."""

    def __init__(self, tasks: TaskStore, events: EventBus, routes: RouteStore, *, stats: Any = NULL_STATS) -> None:
        self.tasks = tasks
        self.events = events
        self.routes = routes
        self.stats = stats

    def list(self, user: User, flt: TaskFilter, page: Page) -> "Deferred[list[Task]]":
        return self.tasks.list(user.org_id, flt, page)

    @inlineCallbacks
    def detail(self, user: User, task_id: int) -> "Deferred[TaskDetail]":
        """The task with its agents and their statuses (those the caller may see), from
        one read."""
        found = yield self.routes.task_detail(user.org_id, task_id)
        if found is None:
            raise NotFound(f"task {task_id} does not exist in this org")
        return found

    @inlineCallbacks
    def create(self, user: User, spec: TaskSpec) -> "Deferred[Task]":
        task = yield self.tasks.create(user.org_id, spec)  # with its `any` assignment
        self.stats.incr("api.tasks_create")
        log.info("task {id} ({name}) created in org {org}", id=task.id, name=task.name, org=task.org_id)
        self.events.publish("task.created", task_json(task))
        return task

    @inlineCallbacks
    def update(self, user: User, task_id: int, spec: TaskSpec) -> "Deferred[Task]":
        old, new = yield self.tasks.update(user.org_id, task_id, spec)  # with its `any` assignment
        self.stats.incr("api.tasks_update")
        log.info("task {id} ({name}) updated in org {org}", id=new.id, name=new.name, org=new.org_id)
        self.events.publish("task.updated", {"old": task_json(old), "new": task_json(new)})
        return new

    @inlineCallbacks
    def delete(self, user: User, task_id: int) -> "Deferred[Task]":
        old = yield self.tasks.delete(user.org_id, task_id)
        self.stats.incr("api.tasks_delete")
        log.info("task {id} ({name}) deleted in org {org}", id=old.id, name=old.name, org=old.org_id)
        self.events.publish("task.deleted", task_json(old))
        return old


FAILING_TTL = 2.0
"""Seconds an agent's failingTasks count may be served from memory."""


def _no_agent(agent_id: int) -> NotFound:
    return NotFound(f"agent {agent_id} does not exist")


def agent_event(agent: Agent) -> dict:
    """Agent JSON plus the org, which other servers need and the API never shows."""
    return {**agent_json(agent), "orgId": agent.org_id}
