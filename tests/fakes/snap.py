"""An emulator of Snap's REST API v1 (snapd, intelsdi-x/snap) for the task-agent's tests.

This is a stand-in, not Snap: snapd can no longer be installed (the project is archived
and its packages are gone), yet the agent's Snap driver must be exercised over real HTTP.
It follows docs/snap-api.md — snap ca32c9a, the build
raintank-apps pinned — and implements the part of the API the agent uses (docs/snap-api.md
§9): the ``meta``/``body`` envelope pretty-printed with a 2-space indent, the exact
``meta.type`` strings, messages, status codes and error texts, UUID task ids, the task
state machine (``Stopping`` after a stop, auto-``Disabled`` after ``max-failures``
consecutive failed runs), Go-formatted durations (``300s`` echoed as ``5m0s``), the
global plugin config at the literal path ``/v1/plugins////config``, a seedable metric
catalog, and plain-text 404/405 answers for unknown paths and methods.

Not emulated: plugins (load/unload/list), tribe, ``/watch`` streams, auth, HTTPS, cron
schedules, real metric collection (runs are simulated with ``tick``/``run_due``).

State lives in :class:`tests.fakes.snap_state.SnapState`; this module adds HTTP and the
failure knobs (all plain attributes, change them at any time)::

    snap = SnapEmulator(clock=clock, strict=True, catalog=[metric("/a/b", 1)]).start()
    snap.error_mode = True          # every request answers 500 (error envelope) ...
    snap.error_mode = lambda method, path: method == "POST"  # ... or only some
    snap.half_create = 1            # next create: task stored Stopped, answer 500
    snap.drop_create_response = 1   # next create succeeds, connection dropped unanswered
    snap.stop_delay = 3.0           # a stopped task stays Stopping for 3 s of ``clock``
    snap.hang = True                # accept requests, never answer
    await snap.set_down(True)       # stop listening, drop connections (refused)
    snap.wipe()                     # what a snapd restart loses: tasks + global config
    snap.fail_task(task_id, "boom", times=3); snap.tick(); snap.run_due()
    await snap.stop()
"""
from __future__ import annotations

import json
from typing import Any, Callable
from urllib.parse import quote_plus

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from tests.fakes.loopback import LoopbackServer
from tests.fakes.snap_state import SnapFault, SnapState, ns_matches, go_value

__all__ = ["SnapEmulator", "SnapFault", "metric", "TYPES"]

#: meta.type and meta.message of each successful call (docs/snap-api.md §3, §4).
TYPES = {
    "config_get": (200, "config_plugin_item_returned", "Plugin config item retrieved"),
    "config_put": (200, "config_plugin_item_created", "Plugin config item(s) set"),
    "config_delete": (200, "config_plugin_item_deleted", "Plugin config item field(s) deleted"),
    "metrics": (200, "metrics_returned", "Metrics returned"),
    "metric": (200, "metric_returned", "Metric returned"),
    "create": (201, "scheduled_task_created", "Scheduled task created ({id})"),
    "list": (200, "scheduled_task_list_returned", "Scheduled tasks retrieved"),
    "get": (200, "scheduled_task_returned", "Scheduled task ({id}) returned"),
    "start": (200, "scheduled_task_started", "Scheduled task ({id}) started"),
    "stop": (200, "scheduled_task_stopped", "Scheduled task ({id}) stopped"),
    "remove": (200, "scheduled_task_removed", "Scheduled task ({id}) removed"),
    "enable": (200, "scheduled_task_enabled", "Disabled task ({id}) enabled"),
}


def render_json(value: Any) -> bytes:
    """Go's ``json.MarshalIndent(v, "", "  ")`` with snap's ``\\u0026`` → ``&`` fix-up."""
    text = json.dumps(go_value(value), indent=2, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").encode("utf-8")


def envelope(code: int, type_: str, message: str, body: Any) -> bytes:
    return render_json({"meta": {"code": code, "message": message, "type": type_, "version": 1},
                        "body": body})


class _SnapResource(Resource):
    isLeaf = True

    def __init__(self, snap: SnapEmulator) -> None:
        super().__init__()
        self.snap = snap

    def render(self, request: Request) -> bytes | int:
        snap = self.snap
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("utf-8", "replace")
        body = request.content.read() if request.content is not None else b""
        snap.requests.append((method, path))
        snap.request_log.append((method, path, body))
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if snap.hang:
            return NOT_DONE_YET
        route = _route(path)
        if route is None:
            return _plain(request, 404, "404 page not found")
        methods, handler, params = route
        if method not in methods:
            request.setHeader(b"allow", ", ".join(methods).encode())
            return _plain(request, 405, "Method Not Allowed")
        if snap.error_mode and (not callable(snap.error_mode) or snap.error_mode(method, path)):
            return self._error(request, 500, snap.error_message)
        host = (request.getHeader(b"host") or b"localhost:8181").decode("ascii", "replace")
        try:
            kind, answer = handler(snap, method, params, body, host, request)
        except SnapFault as fault:
            return self._error(request, fault.status, fault.message)
        if kind is None:  # the connection was dropped on purpose
            return NOT_DONE_YET
        code, type_, message = TYPES[kind]
        task_id = answer.get("id", "") if isinstance(answer, dict) else ""
        request.setResponseCode(code)
        return envelope(code, type_, message.format(id=task_id), answer)

    def _error(self, request: Request, code: int, message: str) -> bytes:
        request.setResponseCode(code)
        return envelope(code, "error", message, {"message": message, "fields": {}})


def _plain(request: Request, code: int, text: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"x-content-type-options", b"nosniff")
    return (text + "\n").encode()


# -- routing (httprouter semantics: a :param is one segment and may be empty) -------------

def _route(path: str) -> tuple[tuple[str, ...], Callable, list[str]] | None:
    seg = path.split("/")
    if len(seg) < 3 or seg[0] != "" or seg[1] != "v1":
        return None
    rest = seg[2:]
    if rest[0] == "plugins" and len(rest) == 5 and rest[4] == "config":
        return ("GET", "PUT", "DELETE"), _config, rest[1:4]
    if rest[0] == "metrics":
        return ("GET",), _metrics, ["/".join(rest[1:])]
    if rest[0] == "tasks":
        if len(rest) == 1:
            return ("GET", "POST"), _tasks, []
        if len(rest) == 2:
            return ("GET", "DELETE"), _task, rest[1:]
        if len(rest) == 3 and rest[2] in ("start", "stop", "enable"):
            return ("PUT",), _task_action, rest[1:]
    return None


def _config(snap: SnapEmulator, method: str, p: list[str], body: bytes, host: str, req: Request):
    if method == "GET":
        return "config_get", snap.get_config(*p)
    if method == "PUT":
        return "config_put", snap.change_config(*p, body)
    return "config_delete", snap.change_config(*p, body, delete=True)


# -- the metric catalog ------------------------------------------------------------------

def metric(namespace: str, version: int = 1, policy: list[dict] | None = None,
           **extra: Any) -> dict[str, Any]:
    """A catalog entry to seed ``SnapEmulator.catalog`` with (``dynamic`` from ``*`` elements)."""
    entry: dict[str, Any] = {"namespace": namespace, "version": version,
                             "dynamic": "*" in namespace.split("/")}
    if policy:
        entry["policy"] = policy
    entry.update(extra)
    return entry


def catalog(snap: SnapState, host: str, ns: str | None = None, ver: str | None = None) -> list[dict]:
    """GET /v1/metrics: sorted by "namespace:version"; ``ns`` may end in ``/*``."""
    try:
        version = int(ver) if ver else 0
    except ValueError:
        raise SnapFault(400, f'strconv.Atoi: parsing "{ver}": invalid syntax') from None
    entries = sorted(snap.catalog, key=lambda m: f"{m['namespace']}:{m.get('version', 0)}")
    if ns:
        entries = [m for m in entries if ns_matches(ns, m["namespace"])
                   and version in (0, m.get("version", 0))]
        if not entries:
            raise SnapFault(404, f"Metric not found: {ns} (version: {version})")
    return [_metric_view(m, host) for m in entries]


def _metric_view(m: dict[str, Any], host: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if m.get("last_advertised_timestamp"):
        out["last_advertised_timestamp"] = m["last_advertised_timestamp"]
    out["namespace"] = m["namespace"]
    if m.get("version"):
        out["version"] = m["version"]
    out["dynamic"] = bool(m.get("dynamic"))
    for key in ("dynamic_elements", "description", "unit", "policy"):
        if m.get(key):
            out[key] = m[key]
    out["href"] = (f"http://{host}/v1/metrics?ns={quote_plus(m['namespace'], safe='')}"
                   f"&ver={m.get('version', 0)}")
    return out


def _metrics(snap: SnapEmulator, method: str, p: list[str], body: bytes, host: str, req: Request):
    def arg(name: bytes) -> str | None:
        values = (req.args or {}).get(name)
        return values[0].decode("utf-8", "replace") if values else None

    ns, ver = arg(b"ns"), arg(b"ver")
    if p[0]:  # GET /v1/metrics/<namespace...>
        ns = "/" + p[0]
        if ver is not None:
            found = catalog(snap, host, ns, ver)
            return "metric", {"Metric": found[0]}
    return "metrics", catalog(snap, host, ns, ver)


def _tasks(snap: SnapEmulator, method: str, p: list[str], body: bytes, host: str, req: Request):
    if method == "GET":
        return "list", snap.list_tasks(host)
    if snap.half_create > 0:
        snap.half_create -= 1
        return "create", snap.create(body, host, start_ok=False)  # raises the 500
    answer = snap.create(body, host)
    if snap.drop_create_response > 0:
        snap.drop_create_response -= 1
        req.channel.transport.abortConnection()
        return None, None
    return "create", answer


def _task(snap: SnapEmulator, method: str, p: list[str], body: bytes, host: str, req: Request):
    if method == "GET":
        return "get", snap.get_task(p[0], host)
    return "remove", snap.remove_task(p[0])


def _task_action(snap: SnapEmulator, method: str, p: list[str], body: bytes, host: str,
                 req: Request):
    if p[1] == "enable":
        return "enable", snap.enable_task(p[0], host)
    return p[1], (snap.start_task if p[1] == "start" else snap.stop_task)(p[0])


# -- the server ---------------------------------------------------------------------------

class SnapEmulator(SnapState, LoopbackServer):
    """A running emulated snapd; see the module docstring for the knobs.

    Introspection: ``tasks`` (id → :class:`SnapTask`), ``global_config``, ``catalog``,
    ``requests`` (every ``(method, path)`` received, in order) and ``request_log``
    (``(method, path, body)``).
    """

    def __init__(self, clock: Any = None, *, strict: bool = False,
                 catalog: list[dict[str, Any]] | None = None) -> None:
        super().__init__(clock, strict=strict, catalog=catalog)
        self.requests: list[tuple[str, str]] = []
        self.request_log: list[tuple[str, str, bytes]] = []
        self.error_mode: bool | Callable[[str, str], bool] = False
        self.error_message = "emulated internal server error (error_mode)"
        self.half_create = 0
        self.drop_create_response = 0
        self.hang = False
        self.url = ""
        self.port = 0
        self._reactor: Any = None
        self._listener: Any = None
        self._serve(_SnapResource(self))

    def _started(self, reactor: Any) -> None:
        if self.clock is None:
            self.clock = reactor
