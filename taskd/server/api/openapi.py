"""The REST API as an OpenAPI 3.1 document, served at `GET /api/v1/openapi.json`.

Written by hand next to the handlers (app.py) rather than generated from them: the
handlers' validation is richer than any decorator could state, and the document is the
contract clients and schemathesis hold us to. tests/unit/test_openapi.py fails when a
Klein route is missing here or a path here has no route; tests/integration/test_openapi_fuzz.py
runs schemathesis against a real server to prove answers match it.
"""
from __future__ import annotations

import re
from typing import Any

from taskd import __version__
from taskd.db import agents as agent_db, catalog as catalog_db, tasks as task_db

MAX_INT = 2**31 - 1
ROLE = "x-taskd-role"
ENVELOPE_TYPES = ["agent", "agents", "task", "tasks", "metrics", "servers", "token", "heartbeat", "runResults",
                  "error"]
_NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"
_TAG = r"^[^,\s\x00-\x1f\x7f]([^,\x00-\x1f\x7f]*[^,\s\x00-\x1f\x7f])?$"
_TIME = {"type": "string", "format": "date-time"}
_ERRORS = {
    400: "Malformed body or query, failed validation, unknown field or parameter (the message says what to fix)",
    401: "Missing or unknown key",
    403: "The key's org or role may not do this",
    404: "Unknown id, or one this org may not see",
    409: "Name already used in the org (ad-hoc test: no online agent can run it)",
    413: "Body larger than max-body-size",
    429: "Too many ad-hoc runs of this org waiting; retry when they have answered",
    503: "Database or auth endpoint unavailable; nothing was committed, retry after Retry-After",
}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _envelope(type_: str | None, body: dict) -> dict:
    meta_type = {"type": "string", "enum": [type_]} if type_ else {"type": "string", "enum": ENVELOPE_TYPES}
    return {
        "type": "object",
        "required": ["meta", "body"],
        "properties": {
            "meta": {
                "type": "object",
                "required": ["code", "message", "type"],
                "properties": {"code": {"type": "integer"}, "message": {"type": "string"}, "type": meta_type},
            },
            "body": body,
        },
    }


def _ok(type_: str, body: dict, description: str, links: dict | None = None) -> dict:
    out = {"description": description, "content": {"application/json": {"schema": _envelope(type_, body)}}}
    if links:
        out["links"] = links
    return out


def _links(kind: str) -> dict:
    """What a created agent or task leads to, for clients and schemathesis' stateful phase."""
    param = f"{kind}_id"
    cap = kind.capitalize()
    out = {f"Get{cap}": {"operationId": f"get{cap}", "parameters": {param: "$response.body#/body/id"}},
           f"Delete{cap}": {"operationId": f"delete{cap}", "parameters": {param: "$response.body#/body/id"}},
           f"Update{cap}": {"operationId": f"update{cap}", "requestBody": "$response.body#/body"}}
    if kind == "agent":
        out["GetAgentMetrics"] = {"operationId": "getAgentMetrics", "parameters": {param: "$response.body#/body/id"}}
    return out


def _responses(ok: dict, *errors: int) -> dict:
    out: dict[Any, Any] = {"200": ok}
    for code in sorted(set(errors) | {401, 503}):
        out[str(code)] = {"$ref": f"#/components/responses/E{code}"}
    return out


def _query(name: str, schema: dict, description: str, explode: bool = False) -> dict:
    param = {"name": name, "in": "query", "required": False, "schema": schema, "description": description}
    if explode:
        param.update(style="form", explode=True)
    return param


def _path_id(name: str, what: str) -> dict:
    return {"name": name, "in": "path", "required": True, "description": f"the {what}'s id",
            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_INT}}


def _ci(word: str) -> str:
    """`word` in any case, as a JSON Schema (ECMA-262) pattern, which has no (?i)."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in word)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def _order_by(columns: list[str]) -> dict:
    """Exactly what Query.page accepts, so a fuzzer's 'invalid' value really is invalid."""
    names = sorted({_ci(c) for c in columns} | {_ci(_snake(c)) for c in columns})
    pattern = rf"^-?({'|'.join(names)})( ({_ci('asc')}|{_ci('desc')}))?$"
    return _query("orderBy", {"type": "string", "pattern": pattern, "examples": [columns[0], f"-{columns[0]}"]},
                  "a column as shown in the JSON; a leading '-' or a trailing ' desc' reverses "
                  f"(snake_case and any case are accepted too): {', '.join(columns)}")


#: A query-string boolean as Query.boolean reads it (absent or empty: not sent).
_QBOOL = {"type": "string", "pattern": rf"^({'|'.join(_ci(w) for w in ('true', 'false', 'yes', 'no', 'on', 'off'))}|1|0)$",
          "examples": ["true", "false"]}


_PAGING = [
    _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "page size (default 50)"),
    _query("page", {"type": "integer", "minimum": 1, "maximum": MAX_INT}, "page number from 1 (default 1)"),
]
_BOOL = {"type": "boolean"}
_TEXT = {"type": "string", "minLength": 1, "maxLength": 255, "pattern": _NO_CONTROL}


def _form(name: str, read_only: dict, fields: dict, required: list[str]) -> dict:
    """A form body: every value is text (booleans as true/false/yes/no/on/off/1/0, tags
    repeated or comma-separated, empty pieces skipped), as the notes' curl calls send it."""
    return {"type": "object", "required": required, "additionalProperties": False,
            "description": f"{name} as form fields",
            "properties": {"name": fields["name"], "id": {"type": "string", "pattern": "^[1-9][0-9]{0,8}$"}
                           if name == "AgentUpdate" else {"readOnly": True},
                           "enabled": _QBOOL, "public": _QBOOL, **read_only,
                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 255,
                                                               "pattern": _NO_CONTROL}}}}


def _schemas() -> dict:
    read_only_agent = {k: {"readOnly": True} for k in
                       ("orgId", "online", "onlineChange", "enabledChange", "created", "updated", "failingTasks",
                        "staleTasks")}
    read_only_task = {k: {"readOnly": True} for k in ("orgId", "created", "updated", "agents", "unrouted", "status")}
    agent_fields = {
        "name": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[0-9a-zA-Z_-]+$"},
        "enabled": _BOOL,
        "public": {"type": "boolean", "description": "only orgs in public-agent-orgs may set true"},
        "tags": {"type": ["array", "null"], "items": {"type": "string", "maxLength": 255, "pattern": _TAG}},
    }
    config_value = _ref("ConfigValue")
    task_fields = {
        "name": _TEXT,
        "taskType": {"type": "string", "maxLength": 255, "pattern": _NO_CONTROL},
        "config": {"type": "object", "additionalProperties": {"type": "object", "additionalProperties": config_value}},
        "interval": {"type": "integer", "minimum": 1, "maximum": MAX_INT},
        "route": _ref("Route"),
        "metrics": {"type": "object", "propertyNames": _TEXT,
                    "additionalProperties": {"type": "integer", "minimum": 0, "maximum": MAX_INT}},
        "enabled": _BOOL,
    }
    return {
        "ConfigValue": {
            "description": "a string, number or boolean; for the built-in collectors also a list or object of"
                           " them (at most 4 levels, 1000 items, no null); Snap takes scalars only",
            "type": ["string", "number", "boolean", "array", "object"],
            "items": _ref("ConfigValue"), "additionalProperties": _ref("ConfigValue")},
        "Agent": {
            "type": "object",
            "required": ["id", "name", "enabled", "enabledChange", "public", "tags", "online", "onlineChange",
                         "created", "updated", "failingTasks", "staleTasks"],
            "properties": {
                "id": {"type": "integer"}, "name": {"type": "string"}, "enabled": _BOOL, "enabledChange": _TIME,
                "public": _BOOL, "tags": {"type": "array", "items": {"type": "string"}}, "online": _BOOL,
                "onlineChange": _TIME, "created": _TIME, "updated": _TIME, "failingTasks": {"type": "integer"},
                "staleTasks": {"type": "integer", "description": "routed tasks its executor has not reported a run of"
                                                                 " for max(3 intervals, 60 s)"},
            },
        },
        "AgentCreate": {"type": "object", "required": ["name"], "additionalProperties": False,
                        "properties": {**agent_fields, "id": {"readOnly": True}, **read_only_agent}},
        "AgentUpdate": {"type": "object", "required": ["id"], "additionalProperties": False,
                        "properties": {**agent_fields, "id": {"type": "integer", "minimum": 1, "maximum": MAX_INT},
                                       **read_only_agent}},
        "AgentCreateForm": _form("AgentCreate", read_only_agent, agent_fields, ["name"]),
        "AgentUpdateForm": _form("AgentUpdate", read_only_agent, agent_fields, ["id"]),
        "Route": {"oneOf": [
            {"type": "object", "required": ["type"], "additionalProperties": False,
             "properties": {"type": {"const": "any"}, "config": {"type": ["object", "null"], "maxProperties": 0}}},
            {"type": "object", "required": ["type", "config"], "additionalProperties": False,
             "properties": {"type": {"const": "byTags"}, "config": {
                 "type": "object", "required": ["tags"], "additionalProperties": False,
                 "properties": {"tags": {"type": "array", "minItems": 1,
                                         "items": {"type": "string", "maxLength": 255, "pattern": _TAG}}}}}},
            {"type": "object", "required": ["type", "config"], "additionalProperties": False,
             "properties": {"type": {"const": "byIds"}, "config": {
                 "type": "object", "required": ["ids"], "additionalProperties": False,
                 "properties": {"ids": {"type": "array", "minItems": 1, "description": "agents the org may see",
                                        "items": {"type": "integer", "minimum": 1, "maximum": MAX_INT}}}}}},
        ]},
        "Task": {
            "type": "object",
            "required": ["id", "name", "taskType", "orgId", "config", "interval", "route", "metrics", "enabled",
                         "created", "updated"],
            "properties": {
                "id": {"type": "integer"}, "name": {"type": "string"}, "taskType": {"type": "string"},
                "orgId": {"type": "integer"}, "config": {"type": "object"}, "interval": {"type": "integer"},
                "route": {"type": "object", "required": ["type", "config"]}, "metrics": {"type": "object"},
                "enabled": _BOOL, "created": _TIME, "updated": _TIME,
                "agents": {"type": "array", "items": {"type": "integer"}},
                "unrouted": {"type": "array", "description": "byIds: the named agents the task does not go to now, and why",
                             "items": {"type": "object", "required": ["id", "reason"],
                                       "properties": {"id": {"type": "integer"}, "reason": {"type": "string"}}}},
                "status": {"type": "array", "items": _ref("TaskStatus")},
            },
        },
        "TaskCreate": {"type": "object", "required": ["name", "interval", "route"], "additionalProperties": False,
                       "properties": {**task_fields, "id": {"readOnly": True}, **read_only_task}},
        "TaskUpdate": {"type": "object", "required": ["id", "name", "interval", "route"],
                       "additionalProperties": False,
                       "properties": {**task_fields, "id": {"type": "integer", "minimum": 1, "maximum": MAX_INT},
                                      **read_only_task}},
        "TaskStatus": {
            "type": "object",
            "required": ["agentId", "agentName", "executor", "outcome", "error", "lastRun", "duration", "metrics",
                         "runs", "failures", "skipped", "updated"],
            "properties": {
                "agentId": {"type": "integer"}, "agentName": {"type": "string"},
                "executor": {"type": "string"}, "outcome": {"type": "string"}, "error": {"type": "string"},
                "lastRun": {"type": ["string", "null"], "format": "date-time"},
                "duration": {"type": ["number", "null"]}, "metrics": {"type": ["integer", "null"]},
                "runs": {"type": "integer"}, "failures": {"type": "integer"}, "skipped": {"type": "integer"},
                "updated": _TIME,
            },
        },
        "Metric": {
            "type": "object", "required": ["namespace", "version", "policy", "public", "created"],
            "properties": {"namespace": {"type": "string"}, "version": {"type": "integer"},
                           "policy": {"type": "string"}, "public": _BOOL, "created": _TIME},
        },
        "Server": {
            "type": "object", "required": ["id", "name", "hostname", "addr", "version", "started", "lastSeen", "agents"],
            "properties": {"id": {"type": "string"}, "name": {"type": "string"}, "hostname": {"type": "string"},
                           "addr": {"type": "string"}, "version": {"type": "string"}, "started": _TIME,
                           "lastSeen": _TIME, "agents": {"type": "integer"}},
        },
        "Error": _envelope("error", {"type": "null"}),
    }


def _operations(servers: bool, socket: bool, tokens: bool, metrics: bool = False, runs: bool = False) -> dict:
    agents, tasks = _ref("Agent"), _ref("Task")
    agent_id, task_id = _path_id("agent_id", "agent"), _path_id("task_id", "task")
    agent_body = {"required": True, "content": {
        "application/json": {"schema": _ref("AgentCreate")},
        "application/x-www-form-urlencoded": {"schema": _ref("AgentCreateForm")},
    }}
    agent_update = {"required": True, "content": {
        "application/json": {"schema": _ref("AgentUpdate")},
        "application/x-www-form-urlencoded": {"schema": _ref("AgentUpdateForm")},
    }}
    heartbeat = {"get": {
        "operationId": "heartbeat", "summary": "liveness of this server and its last-known database state",
        "security": [],
        "responses": {"200": _ok("heartbeat", {
            "type": ["object", "null"],
            "properties": {"database": {"type": "string", "enum": ["available", "unavailable"]},
                           "unavailableSeconds": {"type": "number"}}}, "always, at once")},
    }}
    paths: dict[str, Any] = {
        "/": heartbeat, "/api/v1": heartbeat,
        "/api/v1/agents": {
            "get": {"operationId": "listAgents", "summary": "own agents and public ones",
                    "parameters": [
                        _query("name", {"type": "string"}, "exact name, * wildcard"),
                        _query("metric", {"type": "string"}, "namespace pattern the agent advertises, * wildcard"),
                        _query("enabled", _QBOOL, "filter by enabled"),
                        _query("public", _QBOOL, "true: public agents of any org; false: own private ones"),
                        _query("tag", {"type": "string"}, "any of these tags: repeat the parameter or separate with commas"),
                        _order_by(list(agent_db.ORDERABLE)), *_PAGING],
                    "responses": _responses(_ok("agents", {"type": "array", "items": agents}, "a page of agents"), 400)},
            "post": {"operationId": "createAgent", "summary": "create an agent",
                     "requestBody": agent_body,
                     "responses": _responses(_ok("agent", agents, "the new agent", _links("agent")), 400, 403, 409, 413)},
            "put": {"operationId": "updateAgent", "summary": "replace the fields sent of the agent with `id` (owner only)",
                    "requestBody": agent_update,
                    "responses": _responses(_ok("agent", agents, "the agent as stored"), 400, 403, 404, 409, 413)},
        },
        "/api/v1/agents/{agent_id}": {
            "parameters": [agent_id],
            "get": {"operationId": "getAgent", "summary": "an own or public agent",
                    "responses": _responses(_ok("agent", agents, "the agent"), 400, 404)},
            "delete": {"operationId": "deleteAgent", "summary": "delete an own agent with its tags, metrics and routes",
                       "responses": _responses(_ok("agent", {"type": "null"}, "deleted"), 400, 403, 404)},
        },
        "/api/v1/agents/{agent_id}/metrics": {
            "parameters": [agent_id],
            "get": {"operationId": "getAgentMetrics", "summary": "the agent's advertised catalog",
                    "responses": _responses(_ok("metrics", {"type": "array", "items": _ref("Metric")}, "its catalog"),
                                            400, 404)},
        },
        "/api/v1/tasks": {
            "get": {"operationId": "listTasks", "summary": "own tasks",
                    "parameters": [
                        _query("name", {"type": "string"}, "exact name, * wildcard"),
                        _query("metric", {"type": "string"}, "namespace pattern, * wildcard"),
                        _query("enabled", _QBOOL, "filter by enabled"),
                        _order_by(list(task_db.ORDERABLE)), *_PAGING],
                    "responses": _responses(_ok("tasks", {"type": "array", "items": tasks}, "a page of tasks"), 400)},
            "post": {"operationId": "createTask", "summary": "create a task (JSON only)",
                     "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("TaskCreate")}}},
                     "responses": _responses(_ok("task", tasks, "the new task", _links("task")), 400, 403, 409, 413)},
            "put": {"operationId": "updateTask", "summary": "replace the task with `id`",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("TaskUpdate")}}},
                    "responses": _responses(_ok("task", tasks, "the task as stored"), 400, 403, 404, 409, 413)},
        },
        "/api/v1/tasks/{task_id}": {
            "parameters": [task_id],
            "get": {"operationId": "getTask", "summary": "an own task with the agents it is routed to and their status",
                    "responses": _responses(_ok("task", tasks, "the task"), 400, 404)},
            "delete": {"operationId": "deleteTask", "summary": "delete an own task",
                       "responses": _responses(_ok("task", {"type": "null"}, "deleted"), 400, 403, 404)},
        },
        "/api/v1/metrics": {
            "get": {"operationId": "listMetrics", "summary": "the catalog visible to the org",
                    "parameters": [
                        _query("namespace", {"type": "string"}, "namespace pattern, * wildcard"),
                        _query("version", {"type": "integer", "minimum": 0, "maximum": MAX_INT}, "exact version"),
                        _order_by(list(catalog_db.ORDERABLE)), *_PAGING],
                    "responses": _responses(_ok("metrics", {"type": "array", "items": _ref("Metric")}, "a page"), 400)},
        },
        "/api/v1/openapi.json": {"get": {
            "operationId": "openapi", "summary": "this document", "security": [],
            "responses": {"200": {"description": "the OpenAPI document",
                                  "content": {"application/json": {"schema": {"type": "object"}}}}}}},
    }
    if tokens:
        paths["/api/v1/agents/{agent_id}/token"] = {"parameters": [agent_id], "post": {
            "operationId": "issueAgentToken",
            "summary": "a new token for an own agent, shown once; replaces the old one and closes its connection",
            "responses": _responses(_ok("token", {
                "type": "object", "required": ["agentId", "agentName", "token"],
                "properties": {"agentId": {"type": "integer"}, "agentName": {"type": "string"},
                               "token": {"type": "string", "pattern": "^taskd_agent_"}}}, "the token, this once"),
                400, 403, 404)}}
    if servers:
        paths["/api/v1/servers"] = {"get": {
            "operationId": "listServers", "summary": "live task-servers sharing the database (admin org only)",
            ROLE: "Viewer of org 1",
            "responses": _responses(_ok("servers", {"type": "array", "items": _ref("Server")}, "live servers"),
                                    400, 403)}}
    if runs:
        run_results = {"type": "object", "required": ["taskId", "results"], "properties": {
            "taskId": {"type": ["integer", "null"]},
            "results": {"type": "array", "items": {
                "type": "object", "required": ["agentId", "agentName", "outcome", "error", "duration", "metrics"],
                "properties": {"agentId": {"type": "integer"}, "agentName": {"type": "string"},
                               "outcome": {"type": "string", "enum": ["ok", "error", "unsupported", "timeout"]},
                               "error": {"type": ["string", "null"]}, "duration": {"type": ["number", "null"]},
                               "metrics": {"type": ["array", "null"], "items": {"type": "object"}}}}}}}
        timeout = _query("timeout", {"type": "number", "exclusiveMinimum": 0, "maximum": 60},
                         "seconds to wait for the agents (default 10)")
        paths["/api/v1/tasks/{task_id}/run"] = {"parameters": [task_id], "post": {
            "operationId": "runTask", "summary": "run a stored task once, now, on the agents it is routed to",
            "parameters": [timeout],
            "responses": _responses(_ok("runResults", run_results, "each agent's outcome and measurements"),
                                    400, 403, 404, 429)}}
        paths["/api/v1/tasks/test"] = {"post": {
            "operationId": "testTask", "summary": "run a task body that is not stored, once, on one agent",
            "parameters": [timeout, _query("agentId", {"type": "integer", "minimum": 1, "maximum": MAX_INT},
                                           "the agent to run it on (default: one capable online agent)")],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("TaskCreate")}}},
            "responses": _responses(_ok("runResults", run_results, "the agent's outcome and measurements"),
                                    400, 403, 404, 409, 429)}}
    if metrics:
        paths["/metrics"] = {"get": {
            "operationId": "metrics", "security": [],
            "summary": "self-metrics in the Prometheus text format (unauthenticated: keep it off the public site)",
            "responses": {"200": {"description": "the metrics",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}}}}
    if socket:
        paths["/api/v1/socket/{agent_name}/{version}"] = {"get": {
            "operationId": "agentSocket", "summary": "the agents' websocket (see docs/protocol.md)",
            ROLE: "Editor",
            "parameters": [
                {"name": "agent_name", "in": "path", "required": True, "schema": {"type": "string"}},
                {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {
                "101": {"description": "upgraded to a websocket"},
                **{str(c): {"$ref": f"#/components/responses/E{c}"} for c in (400, 401, 403, 404, 409, 426, 503)},
            }}}
    return paths


def _roles(paths: dict) -> None:
    """`x-taskd-role`: the least endpoint role an operation needs (docs/api.md#auth):
    reads need Viewer, writes Editor; operations without security need no key."""
    for item in paths.values():
        for method, op in item.items():
            if isinstance(op, dict) and "operationId" in op and op.get("security") != []:
                op.setdefault(ROLE, "Viewer" if method == "get" else "Editor")


def document(*, servers: bool = True, socket: bool = True, tokens: bool = True, metrics: bool = True,
             runs: bool = True) -> dict:
    """The whole document; `servers`/`socket`/`tokens`/`metrics` say whether those routes
    are mounted."""
    error_responses = {f"E{code}": {"description": text, "content": {"application/json": {"schema": _ref("Error")}}}
                       for code, text in {**_ERRORS, 426: "Not a websocket upgrade request"}.items()}
    error_responses["E401"]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    error_responses["E503"]["headers"] = {"Retry-After": {"schema": {"type": "string"}}}
    paths = _operations(servers, socket, tokens, metrics, runs)
    _roles(paths)
    return {
        "openapi": "3.1.0",
        "info": {"title": "taskd task-server REST API", "version": __version__,
                 "description": "Every answer is the envelope {meta: {code, message, type}, body}; "
                                "meta.code equals the HTTP status. See docs/api.md."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "an API key (or the admin-key); an agent token"
                                                          " (taskd_agent_...) opens only its agent's websocket"}},
            "schemas": _schemas(),
            "responses": error_responses,
        },
    }


def markdown_table(doc: dict | None = None) -> str:
    """The operations as the table docs/api.md shows (tests/unit/test_openapi.py keeps the
    two equal: `python -m taskd.server.api.openapi` prints it)."""
    doc = doc or document()
    lines = ["| method | path | operation | role | what |", "|---|---|---|---|---|"]
    for path, item in doc["paths"].items():
        for method in ("get", "post", "put", "delete"):
            if method in item:
                op = item[method]
                lines.append(f"| {method.upper()} | `{path}` | `{op['operationId']}` | {op.get(ROLE, 'none')} "
                             f"| {op['summary']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
