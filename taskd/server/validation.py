"""Turning client input into validated specs, with messages that say what to fix.

Everything a client can send passes through here before touching a store: request
bodies (JSON, or forms for agents as the notes' curl examples send them) and query
strings. Errors are `Invalid` (HTTP 400) naming the field and the accepted form.
Fields the API itself returns (`id`, `created`, …) are accepted and ignored so a client
can PUT back what it GOT; anything else unknown is refused, so a typo never silently
drops a setting.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from taskd.db.listing import Page
from taskd.db.tasks import ANY, BY_IDS, BY_TAGS, Route, TaskSpec
from taskd.errors import Invalid



@dataclass(frozen=True)
class ParsedBody:
    """A request body as the API parsed it (taskd.server.api.bodies), before validation:
    defined here, below the HTTP layer, so validation does not import it."""

    kind: str  # "json" | "form" | "empty"
    data: Any  # json: decoded value; form: dict[str, list[str]]; empty: None


NAME_RE = re.compile(r"^[0-9a-zA-Z_-]+$")
MAX_NAME = 255
MAX_LIMIT = 1000
MAX_INT = 2**31 - 1
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}

AGENT_FIELDS = {"name", "enabled", "public", "tags"}
AGENT_READ_ONLY = {"id", "orgId", "online", "onlineChange", "enabledChange", "created", "updated", "failingTasks",
                   "staleTasks"}
TASK_FIELDS = {"name", "taskType", "config", "interval", "route", "metrics", "enabled"}
TASK_READ_ONLY = {"id", "orgId", "created", "updated", "agents", "unrouted", "status"}


@dataclass(frozen=True)
class AgentInput:
    """None = not sent (PUT keeps the current value)."""

    id: int | None
    name: str | None
    enabled: bool | None
    public: bool | None
    tags: tuple[str, ...] | None


def _bool(field: str, value: Any, from_form: bool) -> bool:
    if isinstance(value, bool):
        return value
    if from_form and isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise Invalid(f"{field} must be true or false")


def _int(field: str, value: Any, from_form: bool, minimum: int = 0) -> int:
    if from_form and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON has one number type: 300.0 is the integer 300 (as JSON Schema says)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"{field} must be an integer")
    if not minimum <= value <= MAX_INT:
        raise Invalid(f"{field} must be between {minimum} and {MAX_INT}")
    return value


def _text(field: str, value: Any, *, required: bool = True, pattern: re.Pattern | None = None) -> str:
    if not isinstance(value, str):
        raise Invalid(f"{field} must be a string")
    if required and not value.strip():
        raise Invalid(f"{field} must not be empty")
    if len(value) > MAX_NAME:
        raise Invalid(f"{field} must be at most {MAX_NAME} characters")
    if _CONTROL.search(value):
        raise Invalid(f"{field} must not contain control characters")
    if pattern is not None and not pattern.match(value):
        raise Invalid(f"{field} {value!r} may only contain letters, digits, '_' and '-'")
    return value


def _tag(field: str, value: Any) -> str:
    tag = _text(field, value)
    if tag != tag.strip() or "," in tag:
        raise Invalid(f"{field} {tag!r} must not contain commas or surrounding spaces")
    return tag


def _fields(body: ParsedBody, accepted: set[str], ignored: set[str], what: str) -> tuple[dict, bool]:
    """The body as {field: value} and whether it came from a form."""
    if body.kind == "empty":
        return {}, False
    if body.kind == "form":
        data = {k: (v if k == "tags" else v[-1]) for k, v in body.data.items()}
        from_form = True
    elif isinstance(body.data, dict):
        data, from_form = dict(body.data), False
    else:
        raise Invalid(f"the body must be a JSON object describing the {what}")
    unknown = sorted(set(data) - accepted - ignored)
    if unknown:
        raise Invalid(
            f"unknown field {unknown[0]!r} in the {what}; accepted fields: {', '.join(sorted(accepted))}"
        )
    return data, from_form


def parse_agent(body: ParsedBody, *, for_update: bool) -> AgentInput:
    data, form = _fields(body, AGENT_FIELDS | ({"id"} if for_update else set()), AGENT_READ_ONLY, "agent")
    agent_id = None
    if for_update:
        if "id" not in data:
            raise Invalid("id is required: PUT /api/v1/agents updates the agent with that id")
        agent_id = _int("id", data["id"], form, minimum=1)
    name = data.get("name")
    if name is None and not for_update:
        raise Invalid("name is required")
    if name is not None:
        name = _text("name", name, pattern=NAME_RE)
    tags = None
    if "tags" in data and data["tags"] is not None:
        raw = data["tags"]
        if form:  # repeated fields and/or comma-separated values
            raw = [t.strip() for v in raw for t in v.split(",") if t.strip()]
        if not isinstance(raw, list):
            raise Invalid("tags must be a list of strings")
        tags = tuple(sorted({_tag(f"tags[{i}]", t) for i, t in enumerate(raw)}))
    elif "tags" in data:
        tags = ()
    return AgentInput(
        id=agent_id,
        name=name,
        enabled=_bool("enabled", data["enabled"], form) if "enabled" in data else None,
        public=_bool("public", data["public"], form) if "public" in data else None,
        tags=tags,
    )


def parse_route(value: Any) -> Route:
    if not isinstance(value, dict):
        raise Invalid('route must be an object such as {"type": "any"}')
    extra = sorted(set(value) - {"type", "config"})
    if extra:
        raise Invalid(f"route has unknown field {extra[0]!r}; it takes only type and config")
    rtype, config = value.get("type"), value.get("config")
    if rtype == ANY:
        if config not in (None, {}):
            raise Invalid('route of type "any" takes no config')
        return Route(ANY, {})
    if rtype not in (BY_TAGS, BY_IDS):
        raise Invalid(f'route.type must be "any", "byTags" or "byIds", not {rtype!r}')
    key = "tags" if rtype == BY_TAGS else "ids"
    if not isinstance(config, dict) or set(config) != {key} or not isinstance(config[key], list) or not config[key]:
        raise Invalid(f'route of type "{rtype}" needs config {{"{key}": [...]}} with at least one entry and nothing else')
    if rtype == BY_TAGS:
        return Route(BY_TAGS, {"tags": sorted({_tag(f"route.config.tags[{i}]", t) for i, t in enumerate(config[key])})})
    return Route(BY_IDS, {"ids": sorted({_int(f"route.config.ids[{i}]", v, False, 1) for i, v in enumerate(config[key])})})


#: Bounds of one config value that is a list or an object (a collector's headers, its
#: status codes or regexes): nesting below the key, and items in it, all levels counted.
CONFIG_MAX_DEPTH = 4
CONFIG_MAX_ITEMS = 1000


def _task_config(value: Any) -> dict:
    if not isinstance(value, dict):
        raise Invalid('config must be an object of objects, e.g. {"/namespace": {"key": "value"}}')
    for ns, items in value.items():
        if not isinstance(items, dict):
            raise Invalid(f"config[{ns!r}] must be an object of key: value settings")
        for key, item in items.items():
            where = f"config[{ns!r}][{key!r}]"
            if item is None:
                raise Invalid(f"{where} must be a string, number, boolean, list or object, not null")
            if isinstance(item, (dict, list)):
                _config_value(where, item, 1, [0])
    return value


def _config_value(where: str, value: Any, depth: int, count: list[int]) -> None:
    """Lists and objects (of strings, numbers, booleans, lists, objects), bounded: what
    the built-in collectors take (headers, status codes, regexes). Non-finite numbers
    were refused when the body was parsed."""
    if depth > CONFIG_MAX_DEPTH:
        raise Invalid(f"{where}: nested deeper than {CONFIG_MAX_DEPTH} levels")
    children = value.items() if isinstance(value, dict) else enumerate(value)
    for k, child in children:
        count[0] += 1
        if count[0] > CONFIG_MAX_ITEMS:
            raise Invalid(f"{where}: more than {CONFIG_MAX_ITEMS} items")
        inner = f"{where}[{k!r}]"
        if child is None:
            raise Invalid(f"{inner} must be a string, number, boolean, list or object, not null")
        if isinstance(child, (dict, list)):
            _config_value(inner, child, depth + 1, count)


def _task_metrics(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise Invalid('metrics must be an object of namespace: version, e.g. {"/example/*": 0}')
    out = {}
    for ns, ver in value.items():
        _text(f"metrics key {ns!r}", ns)
        out[ns] = _int(f"metrics[{ns!r}]", ver, False, 0)
    return out


def parse_task(body: ParsedBody, *, for_update: bool) -> tuple[int | None, TaskSpec]:
    if body.kind == "form":
        raise Invalid("tasks take a JSON body (Content-Type: application/json)")
    if body.kind == "empty":
        raise Invalid("the body must be a JSON object describing the task")
    data, _ = _fields(body, TASK_FIELDS | ({"id"} if for_update else set()), TASK_READ_ONLY, "task")
    task_id = None
    if for_update:
        if "id" not in data:
            raise Invalid("id is required: PUT /api/v1/tasks updates the task with that id")
        task_id = _int("id", data["id"], False, 1)
    for required in ("name", "interval", "route"):
        if required not in data:
            raise Invalid(f"{required} is required")
    interval = _int("interval", data["interval"], False, 0)
    if interval <= 0:
        raise Invalid("interval must be a positive number of seconds")
    return task_id, TaskSpec(
        name=_text("name", data["name"]),
        task_type=_text("taskType", data.get("taskType", ""), required=False),
        config=_task_config(data.get("config", {})),
        interval=interval,
        route=parse_route(data["route"]),
        metrics=_task_metrics(data.get("metrics", {})),
        enabled=_bool("enabled", data.get("enabled", False), False),
    )


def parse_id(what: str, raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_INT:
        raise Invalid(f"{what} id {raw!r} must be a positive integer")
    return int(raw)


# -- query strings ---------------------------------------------------------------------

class Query:
    """Query-string arguments of one request, consumed field by field."""

    def __init__(self, args: Mapping[bytes, list[bytes]]) -> None:
        try:
            self.args = {k.decode(): [v.decode() for v in vs] for k, vs in args.items()}
        except UnicodeDecodeError:
            raise Invalid("query string is not valid UTF-8") from None

    def check_known(self, known: set[str]) -> None:
        unknown = sorted(set(self.args) - known)
        if unknown:
            raise Invalid(f"unknown query parameter {unknown[0]!r}; accepted: {', '.join(sorted(known))}")

    def one(self, name: str) -> str | None:
        values = self.args.get(name)
        return values[-1] if values else None

    def many(self, name: str) -> tuple[str, ...]:
        return tuple(t.strip() for v in self.args.get(name, []) for t in v.split(",") if t.strip())

    def text(self, name: str) -> str | None:
        value = self.one(name)
        return None if value in (None, "") else value

    def boolean(self, name: str) -> bool | None:
        value = self.one(name)
        return None if value in (None, "") else _bool(name, value, True)

    def integer(self, name: str, minimum: int = 0) -> int | None:
        value = self.one(name)
        return None if value in (None, "") else _int(name, value, True, minimum)

    def page(self, orderable: Mapping[str, Any], default: str) -> Page:
        order = self.one("orderBy") or default
        descending = False
        spec = order.strip()
        if spec.startswith("-"):
            descending, spec = True, spec[1:]
        parts = spec.split()
        if len(parts) == 2 and parts[1].lower() in ("asc", "desc"):
            descending, spec = parts[1].lower() == "desc", parts[0]
        lookup = {k.lower(): k for k in orderable} | {_snake(k): k for k in orderable}
        column = lookup.get(spec.lower())
        if column is None:
            raise Invalid(f"orderBy {order!r} is not one of: {', '.join(orderable)} (add ' desc' or a leading '-' to reverse)")
        limit = self.integer("limit", 1)
        if limit is not None and limit > MAX_LIMIT:
            raise Invalid(f"limit must be between 1 and {MAX_LIMIT}")
        return Page(column, descending, limit or 50, self.integer("page", 1) or 1)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


PAGE_PARAMS = {"orderBy", "limit", "page"}
