"""Ad-hoc runs ("run it now and show me"): a task run once on some agents, answered to
the API caller within a deadline.

The caller's server may not hold the agents, so the request travels as an event
(`task.runRequest`) to every server; each one sends `runTask` to those of the agents it
holds and passes their `runResult` back as `task.runResult`, which the caller's server
collects. An agent that did not list `runTask` in its upgrade's features header (the Go
agent, an older taskd agent) is answered for at once as `unsupported`; one that does not
answer in time is reported as `timeout`. Only answers to a request a server sent to that
very agent are passed on, so an agent cannot forge results for another.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from taskd.server.agentsession import AgentSession
from taskd.server.events import EventBus
from taskd.wire import framing
from taskd.wire.framing import Frame, FrameError
from taskd.wire.messages import parse_run_result, run_request

RUN_REQUEST = "task.runRequest"
RUN_RESULT = "task.runResult"
MAX_ASKED = 10_000  # requests sent to held agents and not yet answered (bounded)
MAX_PER_AGENT = 4  # ad-hoc runs one agent is asked at once; more are answered "busy" at once
MAX_PER_ORG = 20   # ad-hoc run requests of one org in flight on one server (429 beyond)

log = Logger(namespace="taskd.server.adhoc")


@dataclass
class _Pending:
    agents: dict[int, str]             # agent id -> name
    results: dict[int, dict] = field(default_factory=dict)
    done: Deferred | None = None
    timer: Any = None


class AdhocRuns:
    def __init__(self, *, events: EventBus, sessions: dict[int, AgentSession], clock: Any, instance_id: str) -> None:
        self.events = events
        self.sessions = sessions
        self.clock = clock
        self.instance_id = instance_id
        self._pending: dict[str, _Pending] = {}
        # (request, agent) sent here -> (origin server, when it stops mattering)
        self._asked: dict[tuple[str, int], tuple[str, float]] = {}
        self._unsubscribe = events.subscribe(self._on_event)

    def stop(self) -> None:
        self._unsubscribe()
        for request_id in list(self._pending):
            self._finish(request_id)

    # -- the caller's side ----------------------------------------------------------

    def run(self, task: dict[str, Any], agents: Iterable[tuple[int, str]], timeout: float) -> "Deferred[list[dict]]":
        """Run `task` (as agents are sent it) once on `agents` ((id, name)); fires with
        one result per agent, in agent-name order, after every answer or `timeout` s."""
        pending = _Pending(dict(agents))
        request_id = uuid.uuid4().hex
        # The caller hanging up cancels the wait: forget the request, answer nobody.
        pending.done = Deferred(lambda _: self._forget(request_id))
        if not pending.agents:
            pending.done.callback([])
            return pending.done
        self._pending[request_id] = pending
        pending.timer = self.clock.callLater(timeout, self._finish, request_id, timeout)
        self.events.publish(RUN_REQUEST, {"requestId": request_id, "origin": self.instance_id, "task": task,
                                          "agentIds": sorted(pending.agents), "timeout": timeout})
        return pending.done

    def _forget(self, request_id: str) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is not None and pending.timer is not None and pending.timer.active():
            pending.timer.cancel()

    def _result(self, payload: dict) -> None:
        pending = self._pending.get(payload.get("requestId"))
        agent_id = payload.get("agentId")
        if pending is None or agent_id not in pending.agents or agent_id in pending.results:
            return
        pending.results[agent_id] = payload.get("result") or {}
        if len(pending.results) == len(pending.agents):
            self._finish(payload["requestId"])

    def _finish(self, request_id: str, timeout: float | None = None) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is None or pending.done is None or pending.done.called:
            return
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        rows = []
        for agent_id, name in sorted(pending.agents.items(), key=lambda kv: (kv[1], kv[0])):
            result = pending.results.get(agent_id) or {
                "outcome": "timeout", "error": f"no answer within {timeout:g}s" if timeout else "no answer",
                "duration": None, "metrics": []}
            rows.append({"agentId": agent_id, "agentName": name, **{k: result.get(k) for k in
                                                                     ("outcome", "error", "duration", "metrics")}})
        pending.done.callback(rows)

    # -- every server: the agents it holds ------------------------------------------

    def _on_event(self, event: Any) -> None:
        payload = event.payload if isinstance(event.payload, dict) else {}
        if event.type == RUN_REQUEST:
            self._ask(payload)
        elif event.type == RUN_RESULT and payload.get("origin") == self.instance_id:
            self._result(payload)

    def _ask(self, payload: dict) -> None:
        request_id, origin, task = payload.get("requestId"), payload.get("origin"), payload.get("task")
        now = self.clock.seconds()
        timeout = payload.get("timeout")
        expires = now + (float(timeout) if isinstance(timeout, (int, float)) and 0 < timeout <= 3600 else 60.0)
        for key in [k for k, (_, until) in self._asked.items() if until < now]:  # their callers gave up
            del self._asked[key]
        for agent_id in payload.get("agentIds") or ():
            session = self.sessions.get(agent_id)
            if session is None or session.closed:
                continue  # another server holds it (or nobody: the caller's deadline says so)
            if framing.FEATURE_RUN_TASK not in session.features:
                self._answer(origin, request_id, agent_id, {
                    "outcome": "unsupported", "error": "this agent does not know runTask (an older agent)",
                    "duration": None, "metrics": []})
                continue
            if sum(1 for (_, a) in self._asked if a == agent_id) >= MAX_PER_AGENT or len(self._asked) >= MAX_ASKED:
                self._answer(origin, request_id, agent_id, {
                    "outcome": "error", "error": f"this agent already runs {MAX_PER_AGENT} ad-hoc checks; try again",
                    "duration": None, "metrics": []})
                continue
            self._asked[(request_id, agent_id)] = (origin, expires)
            session.send(framing.RUN_TASK, run_request(request_id, task))

    def received(self, session: AgentSession, frame: Frame) -> str | None:
        """A runResult frame; a complaint (for the bad-frames count) when it is not one."""
        try:
            result = parse_run_result(frame.json())
        except FrameError as exc:
            return f"sent a bad runResult: {exc}; ignored"
        asked = self._asked.pop((result.request_id, session.agent.id), None)
        if asked is None:  # late (its caller gave up), or never asked: dropped, not held against the agent
            log.debug("agent {name} ({id}) answered run request {rid}, which is no longer waited for",
                      name=session.agent.name, id=session.agent.id, rid=result.request_id)
            return None
        origin, _ = asked
        body = result.to_json()
        self._answer(origin, result.request_id, session.agent.id, body)
        return None

    def _answer(self, origin: Any, request_id: Any, agent_id: int, result: dict) -> None:
        self.events.publish(RUN_RESULT, {"requestId": request_id, "origin": origin, "agentId": agent_id,
                                         "result": result})


DEFAULT_TIMEOUT = 10.0
MAX_TIMEOUT = 60.0


class TaskRuns:
    """The API side: which agents an ad-hoc run goes to, and what the caller may ask."""

    def __init__(self, runs: AdhocRuns, tasks: Any, agents: Any, routes: Any) -> None:
        self.runs = runs
        self._in_flight: dict[int, int] = {}  # org id -> its ad-hoc requests waiting here
        self.tasks = tasks    # TaskService (org scoping)
        self.agents = agents  # AgentService (visibility)
        self.routes = routes  # RouteStore

    async def stored(self, user: Any, task_id: int, timeout: float) -> dict:
        """Run a stored task once on the agents it is routed to now."""
        from taskd.wire.messages import task_payload

        found = await self.tasks.detail(user, task_id)
        named = await self.agents.agents.get_many(found.agents)
        results = await self._run(user, task_payload(found.task), [(i, named[i].name) for i in found.agents
                                                                    if i in named], timeout)
        return {"taskId": task_id, "results": results}

    async def _run(self, user: Any, task: dict, agents: list[tuple[int, str]], timeout: float) -> list[dict]:
        from taskd.errors import TooMany

        org = user.org_id
        if self._in_flight.get(org, 0) >= MAX_PER_ORG:
            raise TooMany(f"this org already has {MAX_PER_ORG} ad-hoc runs waiting on this server; try again"
                          " when they have answered")
        self._in_flight[org] = self._in_flight.get(org, 0) + 1
        try:
            return await self.runs.run(task, agents, timeout)
        finally:
            self._in_flight[org] -= 1
            if not self._in_flight[org]:
                del self._in_flight[org]

    async def test(self, user: Any, spec: Any, agent_id: int | None, timeout: float) -> dict:
        """Run a task body that is not stored, once, on `agent_id` (visible to the org and
        online) or on one capable online agent."""
        from datetime import datetime

        from taskd.db.tasks import Task
        from taskd.errors import Conflict
        from taskd.wire.messages import task_payload

        if agent_id is not None:
            agent = await self.agents.visible(user, agent_id, fresh=True)
            if not agent.online:
                raise Conflict(f"agent {agent_id} ({agent.name}) is offline; run the test on an online agent")
            chosen = [(agent.id, agent.name)]
        else:
            ids = await self.routes.capable(user.org_id, spec.metrics)
            first = (await self.agents.agents.get_many(ids[:1])).get(ids[0]) if ids else None
            if first is None:
                raise Conflict("no online agent of this org (or public one) can run this task's metrics;"
                               " connect one, or name one with ?agentId=")
            chosen = [(first.id, first.name)]
        now = datetime.utcnow()
        task = Task(id=0, org_id=user.org_id, name=spec.name, task_type=spec.task_type, config=spec.config,
                    interval=spec.interval, route=spec.route, metrics=spec.metrics, enabled=True, created=now,
                    updated=now)
        return {"taskId": None, "results": await self._run(user, task_payload(task), chosen, timeout)}


def parse_timeout(value: str | None) -> float:
    """The `timeout` query parameter: seconds, default 10, at most 60."""
    from taskd.errors import Invalid

    if value is None:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        raise Invalid(f"timeout {value!r} must be a number of seconds") from None
    if not 0 < seconds <= MAX_TIMEOUT:
        raise Invalid(f"timeout must be more than 0 and at most {MAX_TIMEOUT:g} seconds")
    return seconds
