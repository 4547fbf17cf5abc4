"""API-key authentication for the REST API, checked against grafana.com with a cache.

Every API request carries a key, and asking grafana.com about each one would make
taskd as slow and as available as that remote call.  So answers are cached (valid
keys for minutes, invalid ones briefly), concurrent checks of one key share a
single request, and when grafana.com is down a key that was valid before keeps
working: an outage of the auth endpoint should not take the task API down for
users it already knew.  The cache holds sha256 digests, never keys, and is bounded
so that clients spraying random keys cannot grow it without limit.

Nor can they turn taskd into an amplifier against the endpoint: at most
`max_concurrent` checks are in flight, the rest wait in a bounded queue and are
refused with 503 once it is full. Only a clear "no" (401/403/404) makes a key invalid:
a rate-limited, slow or broken endpoint (408/429/5xx, a timeout, a body that is not an
answer or is too large) is "unavailable", so a cached user keeps working and an unknown
key is told to retry (503, Retry-After) instead of being told its key is wrong. One
deadline covers the whole exchange, body included.

Defects of the original fixed here: no blocking HTTP call, no unbounded cache, no
keys in logs, and a clear message when the header is missing or misspelt.
"""
from __future__ import annotations

import hashlib
import hmac
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import treq
from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferredTimeout, fail, succeed
from twisted.internet.error import ConnectingCancelledError, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import RequestTransmissionFailed, ResponseNeverReceived

__all__ = ["User", "AuthError", "bearer_key", "Authenticator", "ADMIN_USER"]

_log = Logger()

#: Endpoint failures are logged at most once per this many seconds (with a count
#: of those not logged): an outage would otherwise log one line per API request.
_WARN_INTERVAL = 60.0
#: Endpoint answers that say "this key is not valid"; anything else that is not a 200
#: says nothing about the key (rate limits, timeouts, outages).
_INVALID_CODES = frozenset({401, 403, 404})
MAX_BODY = 64 * 1024
RETRY_AFTER = 5  # seconds a 503 asks the client to wait


@dataclass(frozen=True)
class User:
    org_id: int
    org_name: str
    org_slug: str
    role: str
    is_admin: bool = False
    # Set for an agent token (taskd.server.agenttokens): it opens this agent's websocket only.
    agent_id: int | None = None
    agent_name: str | None = None
    token_id: str | None = None  # which token (a prefix of its hash): a reset closes the others only


ADMIN_USER = User(org_id=1, org_name="admin", org_slug="admin", role="Admin", is_admin=True)


class AuthError(Exception):
    """Why a request is refused; ``message`` is shown to the caller, so it never
    contains the key."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after  # seconds, for a 503's Retry-After


_EXPECTED = "expected the header 'Authorization: Bearer <key>'"


def bearer_key(authorization: list[bytes] | None, authentication: list[bytes] | None) -> str:
    """Return the key from raw ``Authorization`` header values.

    ``authentication`` is only looked at to explain a failure: the operators' notes
    once said ``Authentication:``, and a silent 401 would leave people guessing.
    """
    if not authorization:
        if authentication:
            raise AuthError(
                401, "use the 'Authorization: Bearer <key>' header; 'Authentication' is not read")
        raise AuthError(401, "missing 'Authorization: Bearer <key>' header")
    if len(authorization) != 1:
        raise AuthError(401, f"send exactly one Authorization header; {_EXPECTED}")
    parts = authorization[0].decode("latin-1").strip().split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer" or not parts[1].strip():
        raise AuthError(401, f"malformed Authorization header; {_EXPECTED}")
    return parts[1].strip()


def _stale_connection(e: BaseException) -> bool:
    if not isinstance(e, (RequestTransmissionFailed, ResponseNeverReceived)):
        return False
    return all(r.check(ConnectionLost, ConnectionDone) for r in e.reasons)


class _EndpointFailure(Exception):
    """The endpoint gave no usable answer; the text is safe to log (no key)."""


class _Busy(Exception):
    """Too many checks in flight and queued: this one was not even sent."""


def _unavailable() -> AuthError:
    return AuthError(503, "cannot verify the API key: the auth endpoint is unavailable; try again",
                     RETRY_AFTER)


@dataclass
class _Entry:
    user: User | None  # None: the endpoint said the key is invalid
    stored_at: float


class Authenticator:
    """Turns API keys into :class:`User` s.

    ``clock`` only timestamps cache entries (inject ``task.Clock`` in tests); the
    HTTP request itself runs on the global reactor through ``http`` (the ``treq``
    module or a ``treq.HTTPClient``).
    """

    def __init__(self, *, admin_key: str, endpoint: str, valid_org_ids: Sequence[int] = (),
                 valid_ttl: float = 300.0, invalid_ttl: float = 30.0,
                 clock: IReactorTime, http: Any = None, max_entries: int = 10000,
                 request_timeout: float = 10.0, max_concurrent: int = 20, max_queued: int = 1000,
                 max_body: int = MAX_BODY) -> None:
        if max_entries < 1 or max_concurrent < 1 or max_queued < 0:
            raise ValueError("max_entries and max_concurrent must be at least 1, max_queued at least 0")
        self._admin_key = admin_key.encode("utf-8")
        self._endpoint = endpoint.rstrip("/")
        self._url = self._endpoint + "/api/api-keys/check"
        self._valid_org_ids = frozenset(valid_org_ids)
        self._valid_ttl = valid_ttl
        self._invalid_ttl = invalid_ttl
        self._clock = clock
        self._http = treq if http is None else http
        self._max_entries = max_entries
        self._timeout = request_timeout
        # Two dicts in insertion order (oldest first): invalid entries are evicted first,
        # so a spray of bad keys cannot push out the valid entries we fall back on.
        self._valid: OrderedDict[str, _Entry] = OrderedDict()
        self._invalid: OrderedDict[str, _Entry] = OrderedDict()
        self._inflight: dict[str, list[Deferred[User]]] = {}
        self._max_concurrent = max_concurrent
        self._max_queued = max_queued
        self._max_body = max_body
        self._running = 0  # checks sent and not yet settled
        self._queue: OrderedDict[str, str] = OrderedDict()  # digest -> key, waiting for a slot
        self.peak_running = 0  # the most checks ever in flight at once (bench/security.py reads it)
        self.refused_busy = 0  # unknown keys answered 503 because the queue was full
        self.cache_hits = 0  # keys answered from the cache
        self.checks = {"valid": 0, "invalid": 0, "unavailable": 0}  # checks at the endpoint, by outcome
        self._last_busy_warn: float | None = None
        self._last_warn: float | None = None
        self._suppressed = 0
        self._failing = False  # a warning was logged and no recovery since

    @property
    def in_flight(self) -> int:
        """Checks sent to the endpoint and not yet answered."""
        return self._running

    @property
    def cache_size(self) -> int:
        return len(self._valid) + len(self._invalid)

    def authenticate(self, key: str) -> Deferred[User]:
        """Fire with the key's :class:`User`, or fail with :class:`AuthError`."""
        if self._admin_key and hmac.compare_digest(key.encode("utf-8"), self._admin_key):
            return succeed(ADMIN_USER)
        if not key.strip():
            return fail(AuthError(401, "missing API key"))
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        now = self._clock.seconds()
        entry = self._valid.get(digest) or self._invalid.get(digest)
        if entry is not None:
            ttl = self._valid_ttl if entry.user else self._invalid_ttl
            if now - entry.stored_at < ttl:
                self.cache_hits += 1
                try:
                    return succeed(self._accept(entry.user))
                except AuthError as e:
                    return fail(e)
        waiter: Deferred[User] = Deferred()
        waiters = self._inflight.get(digest)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        if self._running >= self._max_concurrent and len(self._queue) >= self._max_queued:
            return self._busy(digest)
        # Register the waiter before starting: the check may complete synchronously.
        self._inflight[digest] = [waiter]
        if self._running < self._max_concurrent:
            self._start(digest, key)
        else:
            self._queue[digest] = key
        return waiter

    def _busy(self, digest: str) -> Deferred[User]:
        """No room to check another key: a user we knew keeps working (stale), others retry."""
        cached = self._valid.get(digest)
        if cached is not None:
            try:
                return succeed(self._accept(cached.user))
            except AuthError as e:
                return fail(e)
        self.refused_busy += 1
        now = self._clock.seconds()
        if self._last_busy_warn is None or now - self._last_busy_warn >= _WARN_INTERVAL:
            _log.warn("auth checks saturated: {running} in flight and {queued} queued (auth-max-concurrent);"
                      " {n} request(s) with unknown keys answered 503 so far", running=self._running,
                      queued=len(self._queue), n=self.refused_busy)
            self._last_busy_warn = now
        return fail(AuthError(503, "too many API keys are being checked at once; try again", RETRY_AFTER))

    def _start(self, digest: str, key: str) -> None:
        self._running += 1
        self.peak_running = max(self.peak_running, self._running)
        check = Deferred.fromCoroutine(self._check(key))
        check.addTimeout(self._timeout, self._clock)
        check.addBoth(self._finished, digest, key)

    def _finished(self, result: Any, digest: str, key: str) -> None:
        self._running -= 1
        try:
            self._settle(result, digest, key)
        finally:
            while self._queue and self._running < self._max_concurrent:
                next_digest, next_key = self._queue.popitem(last=False)
                self._start(next_digest, next_key)

    def _accept(self, user: User | None) -> User:
        if user is None:
            raise AuthError(401, "invalid API key")
        # The admin key never gets here: it is allowed whatever the list says.
        if self._valid_org_ids and user.org_id not in self._valid_org_ids:
            raise AuthError(403, f"org {user.org_id} is not allowed on this server")
        return user

    def _settle(self, result: User | None | Failure, digest: str, key: str) -> None:
        """Store the endpoint's answer and hand the outcome to every waiter.

        On failure, an expired valid entry is reused (and kept) rather than refusing
        a user grafana.com vouched for a while ago: an outage of the endpoint is
        far more likely than that user's key having been revoked meanwhile.
        """
        self.checks["unavailable" if isinstance(result, Failure) else "valid" if result else "invalid"] += 1
        if isinstance(result, Failure):
            self._warn(result, key)
            cached = self._valid.get(digest)
            user = cached.user if cached else None
        else:
            self._recovered()
            user = result
            self._store(digest, _Entry(user, self._clock.seconds()))
        outcome: User | AuthError
        if isinstance(result, Failure) and user is None:
            outcome = _unavailable()
        else:
            try:
                outcome = self._accept(user)
            except AuthError as e:
                outcome = e
        # A waiter its caller cancelled ignores this (Deferred suppresses the
        # second result), while the others still get theirs.
        for waiter in self._inflight.pop(digest, []):
            if isinstance(outcome, AuthError):
                waiter.errback(Failure(outcome))
            else:
                waiter.callback(outcome)

    def _store(self, digest: str, entry: _Entry) -> None:
        self._valid.pop(digest, None)
        self._invalid.pop(digest, None)
        (self._valid if entry.user else self._invalid)[digest] = entry
        while self.cache_size > self._max_entries:
            (self._invalid or self._valid).popitem(last=False)

    async def _check(self, key: str) -> User | None:
        """Ask the endpoint; ``None`` means invalid key.

        Redirects are not followed so the token is never posted to another host.
        A request that died with its kept-alive connection (the server closed it
        as we reused it) is sent once more on a fresh one: checking a key changes
        nothing, and that race should not cost an uncached user a 503.
        """
        for attempt in (1, 2):
            try:
                response = await self._http.post(
                    self._url, data={"token": key}, timeout=self._timeout,
                    allow_redirects=False)
                body = await self._read_body(response)
                break
            except _EndpointFailure:
                raise
            except Exception as e:
                if attempt == 1 and _stale_connection(e):
                    continue
                raise _EndpointFailure(self._describe(e)) from None
        code = response.code
        if code in _INVALID_CODES:
            return None
        if code != 200:
            raise _EndpointFailure(f"HTTP {code}")
        try:
            data = json.loads(body)
            org_id = data["orgId"]
        except (ValueError, TypeError, KeyError):
            raise _EndpointFailure("HTTP 200 with an unparsable body") from None
        if not isinstance(org_id, int) or isinstance(org_id, bool) or org_id < 1:
            raise _EndpointFailure("HTTP 200 without a valid orgId")
        return User(org_id=org_id, org_name=str(data.get("orgName") or ""),
                    org_slug=str(data.get("orgSlug") or ""),
                    # Least privilege when the endpoint does not say.
                    role=str(data.get("role") or "Viewer"), is_admin=False)

    async def _read_body(self, response: Any) -> bytes:
        """The body, refused beyond `max_body` bytes (the connection is dropped then)."""
        chunks: list[bytes] = []
        size = 0

        def collect(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > self._max_body:
                raise _EndpointFailure(f"answer body larger than {self._max_body} bytes")
            chunks.append(data)

        await treq.collect(response, collect)
        return b"".join(chunks)

    def _describe(self, e: BaseException) -> str:
        """A short, key-free reason for the log, unwrapping twisted.web's wrappers."""
        reasons = getattr(e, "reasons", None)
        if reasons:
            e = reasons[0].value
        if isinstance(e, (CancelledError, ConnectingCancelledError, DeferredTimeout)):
            return f"no answer within {self._timeout:g} s"
        return f"{type(e).__name__}: {e}"[:300]

    def _warn(self, failure: Failure, key: str) -> None:
        now = self._clock.seconds()
        if self._last_warn is not None and now - self._last_warn < _WARN_INTERVAL:
            self._suppressed += 1
            return
        if failure.check(_EndpointFailure):
            reason = str(failure.value)
        else:  # a bug of ours; still never log the key
            reason = f"{failure.type.__name__}: {failure.value}"[:300]
        if key in reason:
            reason = reason.replace(key, "<redacted>")
        _log.warn("auth endpoint {endpoint} unavailable: {reason} "
                  "({suppressed} similar failures not logged)",
                  endpoint=self._endpoint, reason=reason, suppressed=self._suppressed)
        self._last_warn = now
        self._suppressed = 0
        self._failing = True

    def _recovered(self) -> None:
        # The warning timer is not reset, so a flapping endpoint still yields at
        # most one warning and one recovery line per interval.
        if self._failing:
            _log.info("auth endpoint {endpoint} answers again", endpoint=self._endpoint)
            self._failing = False
