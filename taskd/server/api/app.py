"""The REST API under /api/v1: routing, auth, and the envelope around every answer.

Handlers are small: parse input (validation.py), call a service (domain.py), render
(render.py). `_endpoint` is the one place that authenticates, maps every error to the
envelope with the right status, and makes sure no traceback ever reaches a client.
"""
from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from klein import Klein
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import BaseConverter

from taskd.db import agents as agent_db, catalog as catalog_db, tasks as task_db
from taskd.db.availability import DatabaseUnavailable
from taskd.errors import StoreError
from taskd.server.api.bodies import BodyError, ParsedBody, parse_body
from taskd.server.api import openapi
from taskd.server.api.envelope import JSON_CT, error, respond
from taskd.server.render import agent_json, metric_json, server_json, status_json, task_json
from taskd.server.agenttokens import AgentTokens, is_token
from taskd.server.auth import ADMIN_USER, AuthError, Authenticator, User, bearer_key
from taskd.server.adhoc import parse_timeout
from taskd.server.domain import AgentService, TaskService
from taskd.server.peer import client_ip
from taskd.server.validation import PAGE_PARAMS, Query, parse_agent, parse_id, parse_task
from taskd.stats import NULL_STATS

Handler = Callable[..., Awaitable[Any]]
PREFIX = "/api/v1"
#: Endpoint roles by rank (worldping-api's reqEditorRole on writes): reads need Viewer,
#: writes and agent connections Editor. A role the endpoint does not name ranks lowest.
ROLES = ("Viewer", "Editor", "Admin")


def role_rank(role: str) -> int:
    return ROLES.index(role) if role in ROLES else 0


def check_role(user: User, needed: str, what: str) -> None:
    """403 naming the role needed unless `user`'s role reaches `needed`."""
    if role_rank(user.role) < role_rank(needed):
        raise AuthError(403, f"this key's role is {user.role or 'none'}; {what} needs "
                             f"{' or '.join(ROLES[role_rank(needed):])}")


class Call:
    """What a handler gets: the caller, the query string, and the body on demand."""

    def __init__(self, request: IRequest, user: User | None) -> None:
        self.request = request
        self.user = user
        self.query = Query(request.args)

    def body(self) -> ParsedBody:
        self.request.content.seek(0)
        return parse_body(self.request.requestHeaders.getRawHeaders(b"content-type"), self.request.content.read())


class Api:
    log = Logger()

    def __init__(self, agents: AgentService, tasks: TaskService, auth: Authenticator, *, max_body_size: int,
                 socket: Handler | None = None, stats: Any = NULL_STATS, database: Any = None,
                 servers: Any = None, tokens: AgentTokens | None = None, metrics: Any = None,
                 runs: Any = None) -> None:
        """`database`: what `GET /` reports on (its `health()`); None reports nothing.
        `servers`: has `live()` -> Deferred of the live ServerInstances (the liveness
        service); None leaves GET /servers out. `metrics`: the twisted.web resource serving
        the Prometheus metrics at GET /metrics (None: not on this port)."""
        self.metrics = metrics
        self.runs = runs  # taskd.server.adhoc.TaskRuns (None: no ad-hoc runs)
        self.stats = stats
        self.database = database
        self.servers = servers
        self.tokens = tokens
        self.agents = agents
        self.tasks = tasks
        self.auth = auth
        self.socket = socket
        self.max_body_size = max_body_size
        self.app = Klein()
        self.app.url_map.converters["taskid"] = _TaskId
        self._openapi = json.dumps(openapi.document(servers=servers is not None, socket=socket is not None,
                                                    tokens=tokens is not None, metrics=metrics is not None,
                                                    runs=runs is not None),
                                   separators=(",", ":")).encode("utf-8")
        self._routes()

    def resource(self):
        return self.app.resource()

    # -- plumbing ----------------------------------------------------------------------

    def _route(self, path: str, method: str, type_: str, handler: Handler, *, auth: bool = True,
               raw: bool = False, role: str | None = None) -> None:
        needed = role or ("Viewer" if method == "GET" else "Editor")

        async def endpoint(request: IRequest, **kwargs: Any) -> Any:
            result = await self._endpoint(request, type_, handler, auth, kwargs, raw, needed, f"{method} {path}")
            if raw:
                self._socket_outcome(request, kwargs, result)
            else:  # by route template, so the label set stays small
                self.stats.incr("api.requests", tags={"route": f"{method} {path}", "code": request.code})
            return result

        endpoint.__name__ = f"{method} {path}"
        self.app.route(path, methods=[method], strict_slashes=False, endpoint=endpoint.__name__)(endpoint)

    async def _endpoint(self, request: IRequest, type_: str, handler: Handler, auth: bool, kwargs: dict,
                        raw: bool = False, role: str = "Viewer", what: str = "") -> Any:
        """raw: the handler's result (e.g. the websocket upgrade resource) is returned as
        is; errors still become the envelope."""
        try:
            if getattr(request, "body_too_large", False):
                return error(request, 413, f"request body is larger than {self.max_body_size} bytes (max-body-size)")
            user = await self._authenticate(request) if auth else None
            if user is not None and user.agent_id is not None:
                if not raw:
                    raise AuthError(403, "an agent token opens only its agent's websocket"
                                         " (GET /api/v1/socket/<name>/1); the REST API needs an API key")
            elif user is not None:
                check_role(user, role, what.replace("<", ":").replace(">", ""))
            result = await handler(Call(request, user), **kwargs)
            if raw:
                return result
            return respond(request, 200, "success", type_, result)
        except AuthError as exc:
            if exc.status == 401:
                request.setHeader(b"www-authenticate", b'Bearer realm="taskd"')
            if exc.retry_after is not None:
                request.setHeader(b"retry-after", str(exc.retry_after).encode("ascii"))
            return error(request, exc.status, exc.message)
        except (StoreError, BodyError) as exc:
            status = exc.status if isinstance(exc, StoreError) else 400
            return error(request, status, exc.message)
        except DatabaseUnavailable as exc:
            # Expected while the database is stalled or down: the pool logs the outage
            # once; each call only tells its client when to try again.
            request.setHeader(b"retry-after", str(exc.retry_after).encode("ascii"))
            return error(request, 503, f"database unavailable; retry in {exc.retry_after}s")
        except Exception:
            self.log.failure("unhandled error answering {method} {path}",
                             method=request.method.decode("ascii", "replace"),
                             path=request.path.decode("utf-8", "replace"))
            return error(request, 500, "internal server error; the server log has the details")

    def _socket_outcome(self, request: IRequest, kwargs: dict, result: Any) -> None:
        """Count and log a refused agent websocket upgrade (accepted ones are counted
        when the socket opens, by the session manager)."""
        status = request.code
        if status < 400:
            return
        self.stats.incr("agents.connections_failed", tags={"status": status})
        try:
            reason = json.loads(result)["meta"]["message"]
        except Exception:
            reason = ""
        self.log.info("agent connection refused: {name} from {ip}: HTTP {status} {reason}",
                      name=str(kwargs.get("agent_name", ""))[:255], ip=client_ip(request), status=status,
                      reason=reason)

    async def _authenticate(self, request: IRequest) -> User:
        headers = request.requestHeaders
        key = bearer_key(headers.getRawHeaders(b"authorization"), headers.getRawHeaders(b"authentication"))
        if self.tokens is not None and is_token(key):
            return await self.tokens.user_for(key)  # never sent to the key check
        return await self.auth.authenticate(key)

    def _routes(self) -> None:
        app = self.app

        @app.handle_errors(HTTPException)
        def http_error(request: IRequest, failure: Any) -> bytes:
            exc = failure.value
            path = request.path.decode("utf-8", "replace")
            method = request.method.decode("ascii", "replace")
            if isinstance(exc, MethodNotAllowed):
                allowed = sorted(exc.valid_methods or [])
                request.setHeader(b"allow", ", ".join(allowed).encode())
                return error(request, 405, f"method {method} is not allowed on {path}; use {', '.join(allowed)}")
            if isinstance(exc, NotFound):
                return error(request, 404, f"no such route: {method} {path} (the API is under {PREFIX}/)")
            return error(request, exc.code or 400, exc.description or exc.name)

        if self.metrics is not None:
            @app.route("/metrics", methods=["GET"], strict_slashes=False)
            def metrics(request: IRequest) -> Any:
                # Unauthenticated, as Prometheus scrapes it; the nginx site does not proxy it.
                return self.metrics

        @app.route(PREFIX + "/openapi.json", methods=["GET"], strict_slashes=False)
        def openapi_document(request: IRequest) -> bytes:
            request.setHeader(b"content-type", JSON_CT)
            return self._openapi

        heartbeat = self.heartbeat
        for path in ("/", PREFIX, PREFIX + "/"):
            self._route(path, "GET", "heartbeat", heartbeat, auth=False)

        r = self._route
        r(PREFIX + "/agents", "GET", "agents", self.list_agents)
        r(PREFIX + "/agents", "POST", "agent", self.create_agent)
        r(PREFIX + "/agents", "PUT", "agent", self.update_agent)
        r(PREFIX + "/agents/<agent_id>", "GET", "agent", self.get_agent)
        r(PREFIX + "/agents/<agent_id>", "DELETE", "agent", self.delete_agent)
        r(PREFIX + "/agents/<agent_id>/metrics", "GET", "metrics", self.agent_metrics)
        if self.tokens is not None:
            r(PREFIX + "/agents/<agent_id>/token", "POST", "token", self.issue_token)
        r(PREFIX + "/tasks", "GET", "tasks", self.list_tasks)
        r(PREFIX + "/tasks", "POST", "task", self.create_task)
        r(PREFIX + "/tasks", "PUT", "task", self.update_task)
        r(PREFIX + "/tasks/<taskid:task_id>", "GET", "task", self.get_task)
        r(PREFIX + "/tasks/<taskid:task_id>", "DELETE", "task", self.delete_task)
        if self.runs is not None:
            r(PREFIX + "/tasks/<taskid:task_id>/run", "POST", "runResults", self.run_task)
            r(PREFIX + "/tasks/test", "POST", "runResults", self.test_task)
        r(PREFIX + "/metrics", "GET", "metrics", self.list_metrics)
        if self.servers is not None:
            r(PREFIX + "/servers", "GET", "servers", self.list_servers)
        if self.socket is not None:
            r(PREFIX + "/socket/<agent_name>/<version>", "GET", "error", self.socket, raw=True, role="Editor")

    async def heartbeat(self, call: Call) -> dict | None:
        """Always answers, at once: the database's last-known state, never a wait on it
        (load balancers and monitors poll this while the database may be stalled)."""
        return self.database.health() if self.database is not None else None

    # -- agents ------------------------------------------------------------------------

    async def list_agents(self, call: Call) -> list:
        q = call.query
        q.check_known({"name", "metric", "enabled", "public", "tag"} | PAGE_PARAMS)
        flt = agent_db.AgentFilter(
            name=q.text("name"), metric=q.text("metric"), enabled=q.boolean("enabled"),
            public=q.boolean("public"), tags=q.many("tag"),
        )
        page = q.page(agent_db.ORDERABLE, "name")
        return await self._agents_json(await self.agents.list(call.user, flt, page), call.user.org_id)

    async def create_agent(self, call: Call) -> dict:
        call.query.check_known(set())
        spec = parse_agent(call.body(), for_update=False)
        return {**agent_json(await self.agents.create(call.user, spec)), "failingTasks": 0,
                "staleTasks": 0}  # nothing ran yet

    async def update_agent(self, call: Call) -> dict:
        call.query.check_known(set())
        spec = parse_agent(call.body(), for_update=True)
        [agent] = await self._agents_json([await self.agents.update(call.user, spec)], call.user.org_id)
        return agent

    async def get_agent(self, call: Call, agent_id: str) -> dict:
        [agent] = await self._agents_json([await self.agents.visible(call.user, parse_id("agent", agent_id))],
                                          call.user.org_id)
        return agent

    async def _agents_json(self, agents: list, org_id: int) -> list[dict]:
        """Agent JSON as `org_id` sees it (its own tags), with `failingTasks` (every
        answer about agents has it, so a GET compares equal to the POST or PUT before
        it), in one query for the whole page."""
        failing = await self.agents.failing_tasks(agents)
        return [{**agent_json(a, org_id), "failingTasks": failing.get(a.id, (0, 0))[0],
                 "staleTasks": failing.get(a.id, (0, 0))[1]} for a in agents]

    async def delete_agent(self, call: Call, agent_id: str) -> None:
        await self.agents.delete(call.user, parse_id("agent", agent_id))
        return None

    async def issue_token(self, call: Call, agent_id: str) -> dict:
        """A new token for an own agent, shown this once (only its hash is kept)."""
        call.query.check_known(set())
        agent = await self.agents.owned(call.user, parse_id("agent", agent_id))
        issued = await self.tokens.issue(agent)
        return {"agentId": agent.id, "agentName": agent.name, "token": issued.token}

    async def agent_metrics(self, call: Call, agent_id: str) -> list:
        metrics = await self.agents.metrics(call.user, parse_id("agent", agent_id))
        return [metric_json(m) for m in metrics]

    async def run_task(self, call: Call, task_id: str) -> dict:
        """Run a stored task once, now, on the agents it is routed to (docs/api.md)."""
        call.query.check_known({"timeout"})
        return await self.runs.stored(call.user, parse_id("task", task_id), parse_timeout(call.query.one("timeout")))

    async def test_task(self, call: Call) -> dict:
        """Run a task body that is not stored ("test before you save")."""
        call.query.check_known({"timeout", "agentId"})
        _, spec = parse_task(call.body(), for_update=False)
        agent = call.query.one("agentId")
        return await self.runs.test(call.user, spec, parse_id("agent", agent) if agent is not None else None,
                                    parse_timeout(call.query.one("timeout")))

    async def list_metrics(self, call: Call) -> list:
        q = call.query
        q.check_known({"namespace", "version"} | PAGE_PARAMS)
        flt = catalog_db.MetricFilter(namespace=q.text("namespace"), version=q.integer("version"))
        page = q.page(catalog_db.ORDERABLE, "namespace")
        return [metric_json(m) for m in await self.agents.catalog_list(call.user, flt, page)]

    # -- servers -----------------------------------------------------------------------

    async def list_servers(self, call: Call) -> list:
        """The cluster's live task-servers: operators' business, so the admin org's only."""
        call.query.check_known(set())
        if call.user.org_id != ADMIN_USER.org_id:
            raise AuthError(403, "only the admin org may list the task-servers")
        return [server_json(s) for s in await self.servers.live()]

    # -- tasks -------------------------------------------------------------------------

    async def list_tasks(self, call: Call) -> list:
        q = call.query
        q.check_known({"name", "metric", "enabled"} | PAGE_PARAMS)
        flt = task_db.TaskFilter(name=q.text("name"), metric=q.text("metric"), enabled=q.boolean("enabled"))
        page = q.page(task_db.ORDERABLE, "name")
        return [task_json(t) for t in await self.tasks.list(call.user, flt, page)]

    async def create_task(self, call: Call) -> dict:
        call.query.check_known(set())
        _, spec = parse_task(call.body(), for_update=False)
        return task_json(await self.tasks.create(call.user, spec))

    async def update_task(self, call: Call) -> dict:
        call.query.check_known(set())
        task_id, spec = parse_task(call.body(), for_update=True)
        return task_json(await self.tasks.update(call.user, task_id, spec))

    async def get_task(self, call: Call, task_id: str) -> dict:
        found = await self.tasks.detail(call.user, parse_id("task", task_id))
        return {**task_json(found.task), "agents": found.agents,
                "unrouted": [{"id": i, "reason": why} for i, why in found.unrouted],
                "status": [status_json(s) for s in found.statuses]}

    async def delete_task(self, call: Call, task_id: str) -> None:
        await self.tasks.delete(call.user, parse_id("task", task_id))
        return None


class _TaskId(BaseConverter):
    """A task id segment: anything but `test`, which is `POST /tasks/test` (so that path
    answers with its own methods only); a non-number is still parse_id's 400."""

    regex = r"(?!test(?:/|$))[^/]+"
