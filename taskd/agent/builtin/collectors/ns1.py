"""The ``ns1`` collector: a zone's queries per second, from the NS1 API.

The successor of raintank-apps' Snap ns1 plugin: it asks
``<ns1-api-url>/v1/stats/qps/<zone>`` (the zone escaped twice, as the original did)
with the customer's key in ``X-NSONE-KEY`` and reports
``raintank.apps.ns1.zones.<zone slug>.qps`` - unit "ms" and gauge, as the original
published it. The key is a customer secret: it is only ever put in that header, never in
a message or a log line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import quote

from twisted.web.client import Agent
from twisted.web.http_headers import Headers

from taskd.agent.builtin.collector import CollectError, Collector, Sample, TaskInfo
from taskd.agent.builtin.collectors.common import Field, parse_fields, policy, read_body, run, slug
from taskd.agent.httpclient import QuietEndpointFactory

DEFAULT_API_URL = "https://api.nsone.net/"
MAX_BODY = 1024 * 1024  # the answer is a few bytes of JSON


def _key(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    if any(c in value for c in "\r\n\0"):
        raise ValueError("contains a line break")  # a header value cannot; never echo the key
    return value.strip()


def _zone(value: str) -> str:
    zone = value.strip()
    if not slug(zone):
        raise ValueError("must be a zone name")
    return zone


FIELDS = (
    Field("ns1_key", "string", required=True, check=_key),
    Field("zone", "string", required=True, check=_zone),
)


@dataclass(frozen=True)
class Ns1Config:
    ns1_key: str = field(repr=False)
    zone: str
    timeout: float


def qps_url(api_url: str, zone: str) -> str:
    """``<api>/v1/stats/qps/<zone>``, the zone quoted twice (what the original sent)."""
    return f"{api_url.rstrip('/')}/v1/stats/qps/{quote(quote(zone, safe=''), safe='')}"


def _message(body: bytes, key: str) -> str:
    """The ``message`` of an NS1 error body, short, with the key masked should it appear."""
    try:
        text = json.loads(body).get("message", "")
    except (ValueError, AttributeError):
        return ""
    return str(text)[:200].replace(key, "***") if text else ""


class Ns1Collector(Collector):
    """taskType ``ns1``: raintank.apps.ns1.zones.<zone slug>.qps."""

    name = "ns1"
    namespace = "/raintank/apps/ns1"
    catalog = ({"namespace": "/raintank/apps/ns1/zones/*/qps", "version": 1,
                "policy": [row for row in policy(FIELDS) if row["name"] != "timeout"]},)

    def parse_config(self, config: Mapping[str, Any], task: TaskInfo) -> Ns1Config:
        return Ns1Config(**parse_fields(self.namespace, config, FIELDS, task))

    async def collect(self, config: Ns1Config, task: TaskInfo) -> list[Sample]:
        return await run(self.reactor, config.timeout, f"NS1 qps of zone {config.zone}", self._get(config))

    async def _get(self, cfg: Ns1Config) -> list[Sample]:
        api = getattr(self.settings, "ns1_api_url", "") or DEFAULT_API_URL
        agent = Agent.usingEndpointFactory(self.reactor, QuietEndpointFactory(self.reactor, timeout=cfg.timeout))
        headers = Headers({"X-NSONE-KEY": [cfg.ns1_key], "Accept": ["application/json"]})
        response = await agent.request(b"GET", qps_url(api, cfg.zone).encode("ascii"), headers)
        _, body = await read_body(response, MAX_BODY)
        code = response.code
        if code == 401:
            raise CollectError("NS1 authentication failed")
        if code == 403:
            raise CollectError(f"NS1 access denied to zone {cfg.zone}")
        if code == 404:
            raise CollectError(f"NS1 zone {cfg.zone} not found")
        if code != 200:
            detail = _message(body, cfg.ns1_key)
            raise CollectError(f"NS1 answered {code} for zone {cfg.zone}" + (f": {detail}" if detail else ""))
        try:
            qps = json.loads(body)["qps"]
        except (ValueError, KeyError, TypeError):
            qps = None
        if isinstance(qps, bool) or not isinstance(qps, (int, float)):
            raise CollectError(f"NS1 answered unexpected JSON for zone {cfg.zone} (no numeric qps)")
        return [Sample(f"raintank.apps.ns1.zones.{slug(cfg.zone)}.qps", float(qps), "ms", "gauge")]
