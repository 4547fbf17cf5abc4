"""API-key auth against the grafana.com emulator on real loopback sockets.

Cache TTLs run on an injected ``task.Clock`` so expiry is tested without sleeping;
only the HTTP exchange uses the real reactor, and its Deferreds are awaited.
"""
from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived

from taskd.server.auth import ADMIN_USER, AuthError, Authenticator, User, bearer_key
from tests.fakes.auth_endpoint import org, start_auth_endpoint
from tests.waiting import until

ADMIN = "admin-secret-key"
KEY_A = "eyJrIjoiQUFBQUFBQUFBQUFBQUFBQSIsIm4iOiJhIiwiaWQiOjJ9"
KEY_B = "eyJrIjoiQkJCQkJCQkJCQkJCQkJCQiIsIm4iOiJiIiwiaWQiOjN9"
UNKNOWN = "eyJrIjoiWlpaWlpaWlpaWlpaWlpaWiIsIm4iOiJ6IiwiaWQiOjl9"


@pytest_twisted.async_yield_fixture
async def endpoint():
    ep = start_auth_endpoint({KEY_A: org(2, "Acme", role="Editor"), KEY_B: org(3, "Other")})
    yield ep
    await ep.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def logs():
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def make(endpoint, clock, **kw: Any) -> Authenticator:
    kw.setdefault("admin_key", ADMIN)
    return Authenticator(endpoint=endpoint.url, clock=clock, **kw)


async def refused(d: Deferred) -> AuthError:
    with pytest.raises(AuthError) as info:
        await d
    return info.value


# --- admin key -------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_admin_key_is_org_1_admin_without_http(endpoint, clock):
    user = await make(endpoint, clock).authenticate(ADMIN)
    assert user == User(org_id=1, org_name="admin", org_slug="admin", role="Admin", is_admin=True)
    assert user == ADMIN_USER
    assert endpoint.requests == 0


@pytest_twisted.ensureDeferred
async def test_near_miss_admin_keys_are_not_admin(endpoint, clock):
    auth = make(endpoint, clock)
    for key in (ADMIN + "x", ADMIN[:-1], ADMIN.upper()):
        err = await refused(auth.authenticate(key))
        assert err.status == 401
    assert endpoint.requests == 3  # they were checked remotely like any other key


@pytest_twisted.ensureDeferred
async def test_empty_admin_key_never_matches(endpoint, clock):
    auth = make(endpoint, clock, admin_key="")
    for key in ("", " ", "\t"):
        err = await refused(auth.authenticate(key))
        assert err.status == 401
    assert endpoint.requests == 0
    user = await auth.authenticate(KEY_A)  # other keys still work
    assert not user.is_admin


# --- remote check ----------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_valid_key_gives_the_endpoints_user(endpoint, clock):
    user = await make(endpoint, clock).authenticate(KEY_A)
    assert user == User(org_id=2, org_name="Acme", org_slug="acme", role="Editor", is_admin=False)
    assert endpoint.tokens == [KEY_A]  # sent as the form field "token"


@pytest_twisted.ensureDeferred
async def test_unknown_key_is_401(endpoint, clock):
    err = await refused(make(endpoint, clock).authenticate(UNKNOWN))
    assert (err.status, err.message) == (401, "invalid API key")
    assert UNKNOWN not in str(err)


@pytest_twisted.ensureDeferred
async def test_valid_answer_is_cached_until_valid_ttl(endpoint, clock):
    auth = make(endpoint, clock, valid_ttl=300)
    await auth.authenticate(KEY_A)
    clock.advance(299)
    assert (await auth.authenticate(KEY_A)).org_id == 2
    assert endpoint.requests == 1
    clock.advance(1)
    endpoint.keys[KEY_A] = org(2, "Acme Renamed")
    assert (await auth.authenticate(KEY_A)).org_name == "Acme Renamed"
    assert endpoint.requests == 2


@pytest_twisted.ensureDeferred
async def test_invalid_answer_is_cached_for_invalid_ttl_only(endpoint, clock):
    auth = make(endpoint, clock, invalid_ttl=30)
    await refused(auth.authenticate(UNKNOWN))
    endpoint.keys[UNKNOWN] = org(4, "Late")  # key created meanwhile
    clock.advance(29)
    assert (await refused(auth.authenticate(UNKNOWN))).status == 401
    assert endpoint.requests == 1
    clock.advance(1)
    assert (await auth.authenticate(UNKNOWN)).org_id == 4
    assert endpoint.requests == 2


# --- endpoint failures -----------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_500_reuses_expired_valid_entry_and_keeps_it(endpoint, clock):
    auth = make(endpoint, clock)
    await auth.authenticate(KEY_A)
    endpoint.mode = "error500"
    for _ in range(2):
        clock.advance(301)
        assert (await auth.authenticate(KEY_A)).org_id == 2
    assert endpoint.requests == 3  # each expired lookup did try the endpoint
    endpoint.mode = "normal"
    endpoint.keys[KEY_A] = org(2, "Back")
    assert (await auth.authenticate(KEY_A)).org_name == "Back"


@pytest_twisted.ensureDeferred
async def test_500_with_nothing_cached_is_503(endpoint, clock):
    endpoint.mode = "error500"
    err = await refused(make(endpoint, clock).authenticate(KEY_A))
    assert err.status == 503
    assert err.message == "cannot verify the API key: the auth endpoint is unavailable; try again"


@pytest_twisted.ensureDeferred
async def test_500_does_not_revive_expired_invalid_entry(endpoint, clock):
    auth = make(endpoint, clock)
    await refused(auth.authenticate(UNKNOWN))
    clock.advance(31)
    endpoint.mode = "error500"
    assert (await refused(auth.authenticate(UNKNOWN))).status == 503


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_an_endpoint_failure(endpoint, clock):
    auth = make(endpoint, clock)
    await auth.authenticate(KEY_A)
    await endpoint.stop()
    assert (await refused(auth.authenticate(KEY_B))).status == 503
    clock.advance(301)
    assert (await auth.authenticate(KEY_A)).org_id == 2


@pytest_twisted.ensureDeferred
async def test_garbage_body_is_an_endpoint_failure(endpoint, clock):
    auth = make(endpoint, clock)
    endpoint.mode = "garbage"
    assert (await refused(auth.authenticate(KEY_A))).status == 503
    assert endpoint.requests == 1


@pytest.mark.parametrize("answer", [
    {"orgName": "x", "orgSlug": "x", "role": "Admin"},
    {"orgId": "2", "orgName": "x"},
    {"orgId": None},
    {"orgId": True},
    {"orgId": 0},
])
@pytest_twisted.ensureDeferred
async def test_missing_or_invalid_org_id_is_an_endpoint_failure(endpoint, clock, answer):
    endpoint.keys[KEY_A] = answer
    assert (await refused(make(endpoint, clock).authenticate(KEY_A))).status == 503


@pytest_twisted.ensureDeferred
async def test_request_timeout_is_an_endpoint_failure(endpoint, clock, logs):
    endpoint.mode = "hang"
    auth = make(endpoint, clock, request_timeout=0.2)
    assert (await refused(auth.authenticate(KEY_A))).status == 503
    assert endpoint.requests == 1  # a timeout is not retried
    [line] = auth_warnings(logs)
    assert line == (f"auth endpoint {endpoint.url} unavailable: no answer within 0.2 s "
                    "(0 similar failures not logged)")


class DropsFirstRequest:
    """Fails the first POST as a kept-alive connection closed under us would."""

    def __init__(self, error: Exception) -> None:
        self.error: Exception | None = error

    def post(self, url: str, **kw: Any) -> Deferred:
        if self.error is not None:
            error, self.error = self.error, None
            return fail(error)
        return treq.post(url, **kw)


@pytest_twisted.ensureDeferred
async def test_request_lost_with_a_stale_connection_is_sent_again(endpoint, clock):
    for error in (RequestTransmissionFailed([Failure(ConnectionLost())]),
                  ResponseNeverReceived([Failure(ConnectionDone())])):
        auth = make(endpoint, clock, http=DropsFirstRequest(error))
        assert (await auth.authenticate(KEY_A)).org_id == 2
    assert endpoint.requests == 2


@pytest_twisted.ensureDeferred
async def test_other_transport_errors_are_not_retried(endpoint, clock):
    auth = make(endpoint, clock, http=DropsFirstRequest(ResponseFailed([Failure(ConnectionLost())])))
    assert (await refused(auth.authenticate(KEY_A))).status == 503
    assert endpoint.requests == 0


# --- org allow-list --------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_org_allow_list(endpoint, clock):
    auth = make(endpoint, clock, valid_org_ids=[2])
    assert (await auth.authenticate(KEY_A)).org_id == 2
    err = await refused(auth.authenticate(KEY_B))
    assert (err.status, err.message) == (403, "org 3 is not allowed on this server")
    err = await refused(auth.authenticate(KEY_B))  # cached answer, same verdict
    assert err.status == 403
    assert (await auth.authenticate(ADMIN)).is_admin


# --- coalescing and bounds -------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_concurrent_lookups_share_one_request(endpoint, clock):
    auth = make(endpoint, clock)
    d1, d2 = auth.authenticate(KEY_A), auth.authenticate(KEY_A)
    assert await d1 == await d2 == User(2, "Acme", "acme", "Editor", False)
    e1, e2 = auth.authenticate(UNKNOWN), auth.authenticate(UNKNOWN)
    assert (await refused(e1)).status == (await refused(e2)).status == 401
    assert endpoint.requests == 2


@pytest_twisted.ensureDeferred
async def test_cancelling_one_waiter_leaves_the_others(endpoint, clock):
    auth = make(endpoint, clock)
    d1, d2 = auth.authenticate(KEY_A), auth.authenticate(KEY_A)
    d1.cancel()
    with pytest.raises(CancelledError):
        await d1
    assert (await d2).org_id == 2


@pytest_twisted.ensureDeferred
async def test_cache_is_bounded_and_sprays_do_not_evict_valid_keys(endpoint, clock):
    auth = make(endpoint, clock, max_entries=3)
    await auth.authenticate(KEY_A)
    for i in range(20):
        await refused(auth.authenticate(f"spray-{i}"))
        assert auth.cache_size <= 3
    await auth.authenticate(KEY_A)
    assert endpoint.requests == 21  # KEY_A still cached
    small = make(endpoint, clock, max_entries=1)
    await small.authenticate(KEY_A)
    await small.authenticate(KEY_B)  # evicts KEY_A, the oldest
    await small.authenticate(KEY_A)
    assert endpoint.requests == 24
    assert small.cache_size == 1


@pytest_twisted.ensureDeferred
async def test_cache_does_not_hold_keys_in_clear(endpoint, clock):
    auth = make(endpoint, clock)
    await auth.authenticate(KEY_A)
    await refused(auth.authenticate(UNKNOWN))
    held = repr(vars(auth))
    assert KEY_A not in held and UNKNOWN not in held


# --- header parsing --------------------------------------------------------

def test_bearer_key_accepts_bearer_in_any_case():
    assert bearer_key([b"Bearer abc"], None) == "abc"
    assert bearer_key([b"bearer   abc "], None) == "abc"
    assert bearer_key([b"BEARER abc"], [b"Bearer ignored"]) == "abc"


def test_bearer_key_points_out_the_authentication_typo():
    with pytest.raises(AuthError) as info:
        bearer_key(None, [b"Bearer abc"])
    assert info.value.status == 401
    assert info.value.message == (
        "use the 'Authorization: Bearer <key>' header; 'Authentication' is not read")


@pytest.mark.parametrize("authorization", [None, []])
def test_bearer_key_missing(authorization):
    with pytest.raises(AuthError) as info:
        bearer_key(authorization, None)
    assert (info.value.status, info.value.message) == (
        401, "missing 'Authorization: Bearer <key>' header")


@pytest.mark.parametrize("value", [
    b"", b"Bearer", b"Bearer   ", b"Basic c2VjcmV0LWtleQ==", b"Token secret-key", b"secret-key",
])
def test_bearer_key_wrong_form(value):
    with pytest.raises(AuthError) as info:
        bearer_key([value], None)
    assert info.value.status == 401
    assert "'Authorization: Bearer <key>'" in info.value.message
    assert "secret-key" not in info.value.message and "c2Vj" not in info.value.message


def test_bearer_key_refuses_two_headers():
    with pytest.raises(AuthError) as info:
        bearer_key([b"Bearer a", b"Bearer b"], None)
    assert info.value.status == 401


# --- logging ---------------------------------------------------------------

def auth_warnings(logs: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in logs if e.get("log_namespace") == "taskd.server.auth"
            and e["log_level"].name == "warn"]


@pytest_twisted.ensureDeferred
async def test_failures_are_logged_without_the_key_and_rate_limited(endpoint, clock, logs):
    auth = make(endpoint, clock)
    await auth.authenticate(KEY_A)
    await refused(auth.authenticate(UNKNOWN))
    for mode in ("error500", "garbage"):
        endpoint.mode = mode
        await refused(auth.authenticate(KEY_B))
        clock.advance(61)
    endpoint.keys[KEY_B] = {"orgId": KEY_B}  # an answer that echoes the token
    endpoint.mode = "normal"
    await refused(auth.authenticate(KEY_B))
    clock.advance(61)
    await endpoint.stop()
    await refused(auth.authenticate(KEY_B))
    await refused(auth.authenticate(UNKNOWN))  # within 60 s: counted, not logged
    clock.advance(61)
    await refused(auth.authenticate(UNKNOWN))

    warned = auth_warnings(logs)
    assert len(warned) == 5
    assert all(endpoint.url in line for line in warned)
    assert "HTTP 500" in warned[0] and "unparsable" in warned[1]
    assert "orgId" in warned[2] and "ConnectionRefusedError" in warned[3]
    assert "(1 similar failures not logged)" in warned[4]
    everything = [formatEvent(e) for e in logs] + [repr(e) for e in logs]
    for key in (KEY_A, KEY_B, UNKNOWN):
        for fragment in (key, key[:12], key[-12:]):
            assert not any(fragment in line for line in everything)


@pytest_twisted.ensureDeferred
async def test_a_flapping_endpoint_logs_little(endpoint, clock, logs):
    auth = make(endpoint, clock)
    for i in range(3):
        endpoint.mode = "error500"
        await refused(auth.authenticate(f"{UNKNOWN}-{i}"))
        endpoint.mode = "normal"
        await refused(auth.authenticate(UNKNOWN))
        clock.advance(20)  # the three outages fall within one 60 s interval
    ours = [formatEvent(e) for e in logs if e.get("log_namespace") == "taskd.server.auth"]
    assert ours == [f"auth endpoint {endpoint.url} unavailable: HTTP 500 "
                    "(0 similar failures not logged)",
                    f"auth endpoint {endpoint.url} answers again"]


# --- an endpoint that is rate-limited, slow, or floods us ---------------------------

@pytest.mark.parametrize("code", [408, 429, 400, 502, 503])
@pytest_twisted.ensureDeferred
async def test_only_a_clear_no_makes_a_key_invalid(endpoint, clock, code):
    """A 429 (or 408, 5xx...) says nothing about the key: a user we knew keeps working,
    an unknown key is told to retry (503 with Retry-After), never that it is wrong."""
    auth = make(endpoint, clock)
    await auth.authenticate(KEY_A)
    clock.advance(301)  # expired: the next call asks the endpoint again
    endpoint.mode, endpoint.status_code = "status", code
    assert (await auth.authenticate(KEY_A)).org_id == 2
    err = await refused(auth.authenticate(KEY_B))
    assert (err.status, err.retry_after) == (503, 5)
    endpoint.mode = "normal"
    clock.advance(1)
    assert (await auth.authenticate(KEY_A)).org_id == 2  # the valid entry was not wiped
    assert (await auth.authenticate(KEY_B)).org_id == 3  # nor was B remembered as invalid


@pytest.mark.parametrize("code", [401, 403, 404])
@pytest_twisted.ensureDeferred
async def test_401_403_404_mean_invalid(endpoint, clock, code):
    endpoint.mode, endpoint.status_code = "status", code
    assert (await refused(make(endpoint, clock).authenticate(KEY_A))).status == 401


@pytest_twisted.ensureDeferred
async def test_checks_in_flight_are_capped_and_the_queue_is_bounded(endpoint, clock):
    endpoint.mode = "hang"
    auth = make(endpoint, clock, max_concurrent=3, max_queued=2, request_timeout=30)
    pending = [auth.authenticate(f"random-key-{i}") for i in range(5)]
    await until(lambda: endpoint.requests == 3, what="three checks sent")
    assert auth.peak_running == 3  # the other two wait, unsent
    err = await refused(auth.authenticate("one-too-many"))
    assert (err.status, err.retry_after) == (503, 5) and "too many" in err.message
    endpoint.mode = "normal"
    endpoint.keys.update({f"random-key-{i}": org(9, "n") for i in range(5)})
    clock.advance(30)  # the three hung checks hit their deadline; the queued two are sent then
    await until(lambda: all(d.called for d in pending), what="every check settled")
    outcomes = [await d.addErrback(lambda f: f.value.status) for d in pending]
    assert outcomes[:3] == [503, 503, 503]
    assert [u.org_id for u in outcomes[3:]] == [9, 9]
    assert auth.peak_running == 3 and endpoint.requests == 5


@pytest_twisted.ensureDeferred
async def test_a_valid_cached_key_works_while_the_queue_is_full(endpoint, clock):
    auth = make(endpoint, clock, max_concurrent=1, max_queued=0, request_timeout=30)
    await auth.authenticate(KEY_A)
    clock.advance(301)  # expired, so it would need a check
    endpoint.mode = "hang"
    hung = auth.authenticate("some-random-key")
    await until(lambda: endpoint.requests == 2, what="the random key's check sent")
    assert (await auth.authenticate(KEY_A)).org_id == 2  # served stale, not queued, not 503
    clock.advance(30)
    assert (await refused(hung)).status == 503


@pytest_twisted.ensureDeferred
async def test_a_body_that_stalls_after_its_headers_hits_the_deadline(endpoint, clock, logs):
    endpoint.mode = "stall-body"
    auth = make(endpoint, clock, request_timeout=10)
    check = auth.authenticate(KEY_A)
    await until(lambda: endpoint.requests == 1, what="the check sent")
    clock.advance(10)  # treq's own timeout covers only the headers: this deadline is ours
    await until(lambda: check.called, what="the check ended by its deadline")
    assert (await refused(check)).status == 503
    [line] = auth_warnings(logs)
    assert "no answer within 10 s" in line


@pytest_twisted.ensureDeferred
async def test_an_answer_body_over_64_kb_is_refused(endpoint, clock, logs):
    endpoint.mode = "huge-body"
    assert (await refused(make(endpoint, clock).authenticate(KEY_A))).status == 503
    [line] = auth_warnings(logs)
    assert "answer body larger than 65536 bytes" in line
