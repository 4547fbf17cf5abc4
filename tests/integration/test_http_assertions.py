"""The http collector's assertions and request options (issue 14 item 1), against the
real twisted.web site of test_collectors: status codes, body and header regexes,
redirects, request bodies, auth, IP version; each failure names the assertion and what
was seen, and still publishes the run's measurements with success 0."""
from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor

from taskd.agent.builtin.collector import CollectError, ConfigError
from taskd.agent.builtin.collectors.http import HttpCollector
from tests.integration.test_collectors import SETTINGS, TASK, by_name, collect, web  # noqa: F401 (fixture)


def http() -> HttpCollector:
    return HttpCollector(reactor=reactor, settings=SETTINGS)


async def failed(config: dict) -> CollectError:
    with pytest.raises(CollectError) as caught:
        await collect(http(), config)
    assert by_name(caught.value.samples)["success"].value == 0
    return caught.value


@pytest_twisted.ensureDeferred
async def test_body_regexes(web):
    ok = by_name(await collect(http(), {"url": web.http + "/ok", "fail_if_body_not_matches": ["^x+$"],
                                        "fail_if_body_matches": ["error"]}))
    assert ok["success"].value == 1
    bad = await failed({"url": web.http + "/ok", "fail_if_body_matches": ["y", "x{3}"]})
    assert str(bad) == f"GET {web.http}/ok: body matches fail_if_body_matches 'x{{3}}' (at byte 0)"
    assert by_name(bad.samples)["status_code"].value == 200
    missing = await failed({"url": web.http + "/ok", "fail_if_body_not_matches": ["welcome"]})
    assert str(missing).endswith("body does not match fail_if_body_not_matches 'welcome'")


@pytest_twisted.ensureDeferred
async def test_header_regexes(web):
    ok = by_name(await collect(http(), {"url": web.http + "/echo", "fail_if_header_not_matches": [
        {"header": "X-Served-By", "regexp": "^taskd-"}]}))
    assert ok["success"].value == 1
    seen = await failed({"url": web.http + "/echo", "fail_if_header_matches": [{"header": "x-served-by",
                                                                                "regexp": "test$"}]})
    assert str(seen).endswith("header x-served-by matches fail_if_header_matches 'test$'")
    absent = await failed({"url": web.http + "/ok", "fail_if_header_not_matches": [{"header": "X-Served-By",
                                                                                    "regexp": "."}]})
    assert str(absent).endswith("header X-Served-By is missing (fail_if_header_not_matches; allow_missing is false)")
    allowed = by_name(await collect(http(), {"url": web.http + "/ok", "fail_if_header_not_matches": [
        {"header": "X-Served-By", "regexp": ".", "allow_missing": True}]}))
    assert allowed["success"].value == 1


def to(code: int, url: str | None = None) -> str:
    from urllib.parse import urlencode

    return "/to?" + urlencode({"code": code, **({"url": url} if url is not None else {})})


@pytest_twisted.ensureDeferred
async def test_a_post_answered_302_goes_on_as_a_get_and_307_keeps_the_method_and_body(web):
    for code, want in [(301, b"GET "), (302, b"GET "), (303, b"GET "), (307, b"POST hello"), (308, b"POST hello")]:
        got = by_name(await collect(http(), {"url": web.http + to(code, "/echo"), "method": "POST", "body": "hello",
                                             "follow_redirects": True, "fail_if_body_not_matches": [f"^{want.decode()}$"]}))
        assert (got["status_code"].value, got["redirects"].value, got["success"].value) == (200, 1, 1), code
        assert [m for m, _, _ in web.seen[-2:]] == [b"POST", want.split()[0]]


@pytest_twisted.ensureDeferred
async def test_credentials_follow_a_redirect_only_within_their_origin(web):
    same = by_name(await collect(http(), {"url": web.http + to(302, "/auth"), "basic_auth": {"username": "u",
                                          "password": "p"}, "follow_redirects": True}))
    assert same["success"].value == 1
    elsewhere = await failed({"url": web.http + to(302, web.https + "/auth"), "insecure": True,
                              "basic_auth": {"username": "u", "password": "p"}, "follow_redirects": True})
    assert "status 401" in str(elsewhere)
    assert web.seen[-1][2].getRawHeaders(b"authorization") is None


@pytest_twisted.ensureDeferred
async def test_tls_figures_are_the_final_hops(web):
    to_plain = by_name(await collect(http(), {"url": web.https + to(302, web.http + "/ok"), "insecure": True,
                                              "follow_redirects": True}))
    assert to_plain["success"].value == 1 and "tls_version" not in to_plain and "tls_expiry_days" not in to_plain
    to_tls = by_name(await collect(http(), {"url": web.http + to(302, web.https + "/ok"), "insecure": True,
                                            "follow_redirects": True}))
    assert to_tls["success"].value == 1 and to_tls["tls_expiry_days"].value > 29


@pytest_twisted.ensureDeferred
async def test_a_redirect_without_location_is_a_failed_run_saying_so(web):
    bad = await failed({"url": web.http + to(302), "follow_redirects": True})
    assert str(bad) == f"GET {web.http}{to(302)}: a 302 redirect without a Location header"


@pytest_twisted.ensureDeferred
async def test_redirects_are_followed_only_when_asked_and_counted(web):
    plain = await failed({"url": web.http + "/redirect"})  # a 302 is not 2xx
    assert str(plain).endswith("status 302 is not in valid_status_codes (200-299)")
    followed = by_name(await collect(http(), {"url": web.http + "/redirect", "follow_redirects": True}))
    assert (followed["status_code"].value, followed["redirects"].value, followed["body_size"].value) == (200, 1, 1234)
    assert [path for _, path, _ in web.seen[-2:]] == ["/redirect", "/ok"]
    looping = await failed({"url": web.http + "/loop", "follow_redirects": True, "max_redirects": 3})
    assert str(looping) == f"GET {web.http}/loop: more than 3 redirects (max_redirects)"


@pytest_twisted.ensureDeferred
async def test_post_with_a_body_and_auth(web):
    echoed = by_name(await collect(http(), {"url": web.http + "/echo", "method": "POST", "body": "ping=1",
                                            "fail_if_body_not_matches": ["^POST ping=1$"]}))
    assert echoed["success"].value == 1
    for auth in ({"basic_auth": {"username": "u", "password": "p"}}, {"bearer_token": "t0k"}):
        got = by_name(await collect(http(), {"url": web.http + "/auth", **auth}))
        assert got["status_code"].value == 200
    refused = await failed({"url": web.http + "/auth", "bearer_token": "wrong"})
    assert str(refused).endswith("status 401 is not in valid_status_codes (200-299)")


@pytest_twisted.ensureDeferred
async def test_ip_version(web):
    got = by_name(await collect(http(), {"url": web.http + "/ok", "ip_version": "4"}))
    assert got["success"].value == 1
    six = await failed({"url": web.http + "/ok", "ip_version": "6"})
    assert str(six) == f"GET {web.http}/ok: 127.0.0.1 has no IPv6 address (ip_version 6)"


@pytest.mark.parametrize("config, says", [
    ({"valid_status_codes": []}, "valid_status_codes: must list at least one status code"),
    ({"valid_status_codes": [200, "2x"]}, "valid_status_codes: item 1 must be a status code"),
    ({"valid_status_codes": "200"}, "valid_status_codes: expected a list, got string"),
    ({"fail_if_body_matches": ["("]}, "fail_if_body_matches: item 0 is not a valid regular expression"),
    ({"fail_if_header_matches": [{"header": "X"}]}, "fail_if_header_matches: item 0 must be"),
    ({"fail_if_header_not_matches": [{"header": "X", "regexp": ".", "other": 1}]}, "item 0 must be"),
    ({"max_redirects": 99}, "max_redirects: must be 0-50"),
    ({"ip_version": "5"}, "ip_version: must be any, 4 or 6"),
    ({"basic_auth": {"username": "u"}}, "basic_auth: must be"),
    ({"basic_auth": {"username": "u", "password": "p"}, "bearer_token": "t"}, "give one of them"),
    ({"bearer_token": "t", "headers": {"authorization": "x"}}, "headers: Authorization is set by"),
    ({"body": "x"}, "body: a GET request has no body"),
    ({"method": "TRACE"}, "method: must be one of"),
    ({"server_name": "a b"}, "server_name: must be a host name"),
])
def test_bad_config_names_the_key(config, says):
    with pytest.raises(ConfigError) as caught:
        http().parse_config({"url": "http://example.com/", **config}, TASK)
    assert says in str(caught.value)
    assert "s3cret" not in str(caught.value)
