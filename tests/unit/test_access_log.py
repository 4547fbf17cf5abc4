"""The API's access line: one per request, at debug, without headers."""
from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.logger import LogLevel, globalLogPublisher
from twisted.web.resource import Resource

from taskd.server.api.site import TaskdSite


class FakeRequest:
    method = b"GET"
    uri = b"/api/v1/agents/7?x=1"
    code = 200
    sentLength = 123

    def getClientAddress(self):
        return IPv4Address("TCP", "10.1.2.3", 5555)

    def getHeader(self, name):  # pragma: no cover - must not be consulted
        raise AssertionError("the access line never reads headers")


def test_one_debug_line_per_request(monkeypatch):
    from taskd import logsetup

    monkeypatch.setattr(logsetup, "_installed", None)  # not one an earlier test installed
    site = TaskdSite(Resource(), max_body_size=1024)
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        site.log(FakeRequest())
    finally:
        globalLogPublisher.removeObserver(seen.append)
    [event] = [e for e in seen if e.get("log_namespace") == "taskd.server.access"]
    assert event["log_level"] == LogLevel.debug
    assert (event["method"], event["uri"], event["code"], event["length"], event["ip"]) == (
        "GET", "/api/v1/agents/7?x=1", 200, 123, "10.1.2.3")


def test_not_built_when_the_installed_observer_drops_debug(monkeypatch):
    from taskd import logsetup

    site = TaskdSite(Resource(), max_body_size=1024)
    predicate = logsetup.make_predicate(2)  # info, the default log-level
    monkeypatch.setattr(logsetup, "_installed", predicate)
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        site.log(FakeRequest())
        assert [e for e in seen if e.get("log_namespace") == "taskd.server.access"] == []
        logsetup.set_level(predicate, 1)  # log-level changed to debug
        site.log(FakeRequest())
        assert len([e for e in seen if e.get("log_namespace") == "taskd.server.access"]) == 1
    finally:
        globalLogPublisher.removeObserver(seen.append)
