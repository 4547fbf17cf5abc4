"""What the built-in collectors share: strict config fields, series names, run deadlines, bodies.

Every collector validates its ``task.config[<namespace>]`` the same way (unknown keys,
wrong types and bad values are a `ConfigError` naming the key, so the operator knows
what to fix), advertises its settings as Snap-style policy rows in its catalog, names
series ``raintank.apps.<type>.<slug>.<metric>`` and turns whatever a failed run raised
into one short `CollectError` line such as ``GET http://x/: timeout after 2s``. The
HTTP collectors read response bodies with a cap, and drop the connection on a timeout.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Coroutine, Iterable, Mapping, TypeVar

from twisted.internet import defer
from twisted.internet import error as net_error
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

from taskd.agent.builtin.collector import CollectError, ConfigError, Sample, TaskInfo
from taskd.agent.builtin.netpolicy import BlockedAddress

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0
MAX_PATTERNS = 50
MAX_PATTERN_LENGTH = 1000


@dataclass(frozen=True)
class Field:
    """One config key. ``type`` is string, integer, float, bool, map (of strings) or list (of
    anything the check accepts); Snap has no policy type for the last two. ``check``
    normalises the typed value or raises ValueError(reason)."""

    name: str
    type: str
    required: bool = False
    default: Any = None
    check: Callable[[Any], Any] | None = None


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be greater than 0 (seconds)")
    return value


def regex_list(value: list) -> tuple[re.Pattern, ...]:
    """A `fail_if_*` key's regular expressions (Python `re`), compiled; bounded in number and length."""
    if len(value) > MAX_PATTERNS:
        raise ValueError(f"at most {MAX_PATTERNS} regular expressions")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item or len(item) > MAX_PATTERN_LENGTH:
            raise ValueError(f"item {i} must be a regular expression of 1-{MAX_PATTERN_LENGTH} characters")
        try:
            out.append(re.compile(item))
        except re.error as exc:
            raise ValueError(f"item {i} is not a valid regular expression: {exc}") from None
    return tuple(out)



def host_name(value: str) -> str:
    """A `host` key: a name or an IP address (brackets around an IPv6 one are dropped)."""
    host = value.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise ValueError("must be a host name or IP address")
    return host


def server_name(value: str) -> str:
    """A `server_name` key: the TLS name to send and to check the certificate against."""
    name = value.strip()
    if not name or any(c.isspace() for c in name) or "/" in name:
        raise ValueError("must be a host name")
    return name


def ip_version(value: str) -> str:
    """An `ip_version` key: any, 4 or 6."""
    if value not in ("any", "4", "6"):
        raise ValueError("must be any, 4 or 6")
    return value


def days_until(cert: Any, now: float) -> float:
    """Days from `now` (Unix seconds) to a cryptography certificate's notAfter."""
    import datetime

    not_after = getattr(cert, "not_valid_after_utc", None) or \
        cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    return (not_after.timestamp() - now) / 86400.0


#: Every collector's optional ``timeout``; its default depends on the task (see parse_fields).
TIMEOUT = Field("timeout", "float", check=_positive)


def _json_type(value: Any) -> str:
    """The JSON name of ``value``'s type, for messages that never echo the value itself."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, (list, tuple)):
        return "array"
    return type(value).__name__


_EXPECTED = {"string": "a string", "integer": "an integer", "float": "a number",
             "bool": "a boolean (true/false)", "map": "an object of string values", "list": "a list"}


def _typed(field: Field, value: Any) -> Any:
    """``value`` as ``field.type`` (integral floats count as integers: Go re-encodes them so)."""
    kind = field.type
    if kind == "string" and isinstance(value, str):
        return value
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "integer" and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isfinite(value):
            return float(value)
    if kind == "list" and isinstance(value, (list, tuple)):
        return list(value)
    if kind == "map" and isinstance(value, Mapping):
        if all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return dict(value)
        raise ConfigError(f"{field.name}: expected {_EXPECTED[kind]}, got an object with non-string values")
    raise ConfigError(f"{field.name}: expected {_EXPECTED[kind]}, got {_json_type(value)}")


#: A run's timeout is at most this share of the task's interval, so a hanging target's run
#: ends before the next slot even when it started late. At the full interval it would end
#: at (or, started late, after) the next slot, which would then be skipped: every other run.
MAX_TIMEOUT_SHARE = 0.8


def max_timeout(task: TaskInfo) -> float | None:
    """The longest timeout a run of ``task`` may have (None without a positive interval)."""
    return MAX_TIMEOUT_SHARE * task.interval if task.interval > 0 else None


def default_timeout(task: TaskInfo) -> float:
    """min(10 s, 0.8 × the task's interval): a run should end before the next one is due."""
    cap = max_timeout(task)
    return min(DEFAULT_TIMEOUT, cap) if cap is not None else DEFAULT_TIMEOUT


def parse_fields(namespace: str, config: Any, fields: Iterable[Field], task: TaskInfo) -> dict[str, Any]:
    """Check ``config`` against ``fields`` (+ ``timeout``); return every key's value or default.

    A JSON null counts as absent. Messages name the key and never echo values, so a
    secret put in the wrong key does not end up in the task's error. A configured
    ``timeout`` above 0.8 × the interval is lowered to it (`max_timeout`) rather than
    refused: tasks that worked before keep working, without skipping every other slot.
    """
    fields = (*fields, TIMEOUT)
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise ConfigError(f"{namespace}: expected an object of settings, got {_json_type(config)}")
    known = [f.name for f in fields]
    unknown = sorted(str(k) for k in config if k not in known)
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} in {namespace}: "
                          f"{', '.join(unknown)} (known: {', '.join(known)})")
    values: dict[str, Any] = {}
    for field in fields:
        raw = config.get(field.name)
        if raw is None:
            if field.required:
                raise ConfigError(f"{field.name}: required in {namespace}")
            values[field.name] = default_timeout(task) if field is TIMEOUT else field.default
            continue
        value = _typed(field, raw)
        if field.check is not None:
            try:
                value = field.check(value)
            except ValueError as exc:
                raise ConfigError(f"{field.name}: {exc}") from None
        values[field.name] = value
    cap = max_timeout(task)
    if cap is not None and values["timeout"] > cap:
        values["timeout"] = cap
    return values


def policy(fields: Iterable[Field]) -> list[dict[str, Any]]:
    """Snap-style policy rows for the catalog (maps are left out: Snap has no such type)."""
    return [{"name": f.name, "type": f.type, "required": f.required}
            for f in (*fields, TIMEOUT) if f.type not in ("map", "list")]


def catalog(name: str, metrics: Iterable[str], fields: Iterable[Field]) -> tuple[dict[str, Any], ...]:
    """One record per metric, ``/raintank/apps/<name>/*/<metric>``, version 1."""
    rows = policy(fields)
    return tuple({"namespace": f"/raintank/apps/{name}/*/{metric}", "version": 1, "policy": list(rows)}
                 for metric in metrics)


def slug(text: str) -> str:
    """Lowercase; '.' -> '_'; runs outside [a-z0-9_-] -> '-'; no '-' at the ends.

    The original's slug.Make with CustomSub {".": "_"}: a series path element that
    graphite's dots cannot split.
    """
    return re.sub(r"[^a-z0-9_-]+", "-", text.lower().replace(".", "_")).strip("-")


def series(collector: str, task: TaskInfo, metric: str) -> str:
    """``raintank.apps.<collector>.<slug of the task name>.<metric>`` (``task-<id>`` if the slug is empty)."""
    return f"raintank.apps.{collector}.{slug(task.name) or f'task-{task.id}'}.{metric}"


def seconds_text(seconds: float) -> str:
    return f"{seconds:g}s"


def describe(exc: BaseException, timeout: float) -> str:
    """A short operator-readable reason for a failed connection/request/query."""
    reasons = getattr(exc, "reasons", None)  # twisted.web's ResponseFailed & co. wrap Failures
    if reasons:
        return describe(reasons[0].value, timeout)
    if isinstance(exc, BlockedAddress):
        return str(exc)
    if isinstance(exc, (defer.TimeoutError, net_error.TimeoutError, TimeoutError)) or \
            type(exc).__name__ == "DNSQueryTimeoutError":
        return f"timeout after {seconds_text(timeout)}"
    if isinstance(exc, net_error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, net_error.DNSLookupError):
        return "host name lookup failed"
    if isinstance(exc, (net_error.ConnectionDone, net_error.ConnectionLost)):
        return "connection closed by the server"
    if isinstance(exc, net_error.NoRouteError):
        return "no route to host"
    if type(exc).__module__.startswith("OpenSSL"):  # SSL.Error: [[(lib, func, reason)], ...]
        details = [row[-1] for row in (exc.args[0] if exc.args and isinstance(exc.args[0], list) else [])
                   if isinstance(row, tuple) and row]
        return "TLS error: " + (", ".join(details) or str(exc) or type(exc).__name__)
    if isinstance(exc, net_error.ConnectError):
        return (exc.osError and str(exc.osError)) or str(exc).rstrip(".") or type(exc).__name__
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def run(reactor: Any, timeout: float, what: str, work: Coroutine[Any, Any, T],
              success: str | None = None) -> T:
    """Await ``work`` for at most ``timeout`` s of ``reactor``; failures become CollectError.

    ``success``: the run's ``success`` series; a failure that carries no samples of its
    own (no answer at all) gets that series at 0, so every run publishes a ``success``.

    At the deadline ``work`` is cancelled (which drops its connection) and the message is
    ``"<what>: timeout after <n>s"`` whatever the cancelled operation raised (twisted.web
    wraps a cancel in ResponseNeverReceived). Otherwise it is ``"<what>: <reason>"``; a
    CollectError raised by ``work`` passes as it is, and so does a CancelledError.
    """
    d = defer.Deferred.fromCoroutine(work)
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        d.cancel()

    timer = reactor.callLater(timeout, expire)
    try:
        return await d
    except Exception as exc:  # noqa: BLE001 - every failure is reported as the run's error
        if isinstance(exc, defer.CancelledError) and not expired:
            raise
        if expired:
            failure = CollectError(f"{what}: timeout after {seconds_text(timeout)}")
        elif isinstance(exc, CollectError):
            failure = exc
        else:
            failure = CollectError(f"{what}: {describe(exc, timeout)}")
        if success is not None and not failure.samples:
            failure.samples = [Sample(success, 0.0)]
        if failure is exc:
            raise
        raise failure from None
    finally:
        if timer.active():
            timer.cancel()


class _BodyReader(Protocol):
    """Reads a response body up to ``cap`` bytes, then drops the connection (the rest is unneeded)."""

    def __init__(self, done: defer.Deferred[tuple[int, bytes]], cap: int, keep: bool) -> None:
        self.done, self.cap, self.keep = done, cap, keep
        self.size, self.capped, self.chunks = 0, False, []

    def dataReceived(self, data: bytes) -> None:
        if self.capped:
            return
        data = data[:self.cap - self.size]
        self.size += len(data)
        if self.keep:
            self.chunks.append(data)
        if self.size >= self.cap:
            self.capped = True
            self.abort()

    def abort(self) -> None:
        # A response's transport (TransportProxyProducer) may lack abortConnection.
        if self.transport is not None:
            (getattr(self.transport, "abortConnection", None) or self.transport.loseConnection)()

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        if self.done.called:
            return
        if self.capped or reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback((self.size, b"".join(self.chunks)))
        else:
            self.done.errback(reason)


def read_body(response: IResponse, cap: int, keep: bool = True) -> defer.Deferred[tuple[int, bytes]]:
    """(bytes read, the body if ``keep``), at most ``cap``; cancelling drops the connection.

    twisted.web's readBody cannot abort a response's connection on cancel (its transport
    has no abortConnection), so a timed-out run would leave the connection open.
    """
    reader: _BodyReader
    done: defer.Deferred[tuple[int, bytes]] = defer.Deferred(lambda _: reader.abort())
    reader = _BodyReader(done, cap, keep)
    response.deliverBody(reader)
    return done
