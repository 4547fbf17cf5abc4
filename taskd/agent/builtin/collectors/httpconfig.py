"""The `http` collector's settings: every key, its default and what makes it invalid.

The assertion keys are blackbox_exporter's http prober's (`valid_status_codes`,
`fail_if_body_matches`, ...), so a module written for it translates key by key; each
bad value is a ConfigError naming the key (and the item), never echoing a secret.
"""
from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping
from urllib.parse import urlsplit

import hyperlink

from taskd.agent.builtin.collectors.common import MAX_PATTERNS, Field, ip_version, regex_list, server_name

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
MAX_REDIRECTS = 50
DEFAULT_STATUS = ((200, 299),)


def _url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL are not supported (use basic_auth)")
    try:
        parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    return hyperlink.parse(value).to_uri().to_text()  # IDN host -> punycode, non-ASCII -> %XX


def _method(value: str) -> str:
    if value.upper() not in METHODS:
        raise ValueError(f"must be one of {', '.join(METHODS)}")
    return value.upper()


_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _headers(value: dict[str, str]) -> dict[str, str]:
    for name, text in value.items():
        if not _TOKEN.match(name):
            raise ValueError(f"{name!r} is not a valid header name")
        if "\r" in text or "\n" in text or "\0" in text:
            raise ValueError(f"the value of {name} contains a line break")
    return value


def _status_codes(value: list) -> tuple[tuple[int, int], ...]:
    """200, "200-299" or "2xx" items -> inclusive ranges."""
    if not value:
        raise ValueError("must list at least one status code")
    out = []
    for i, item in enumerate(value):
        lo = hi = None
        if isinstance(item, int) and not isinstance(item, bool):
            lo = hi = item
        elif isinstance(item, str) and re.fullmatch(r"[1-5]xx", item.strip()):
            lo = int(item.strip()[0]) * 100
            hi = lo + 99
        elif isinstance(item, str) and (m := re.fullmatch(r"\s*(\d{3})\s*-\s*(\d{3})\s*", item)):
            lo, hi = int(m[1]), int(m[2])
        if lo is None or hi is None or not 100 <= lo <= hi <= 599:
            raise ValueError(f"item {i} must be a status code (200), a range (\"200-299\") or \"2xx\"")
        out.append((lo, hi))
    return tuple(out)


@dataclass(frozen=True)
class HeaderMatch:
    header: str
    regexp: re.Pattern
    allow_missing: bool


def _header_matches(value: list) -> tuple[HeaderMatch, ...]:
    if len(value) > MAX_PATTERNS:
        raise ValueError(f"at most {MAX_PATTERNS} header rules")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping) or set(item) - {"header", "regexp", "allow_missing"} \
                or not isinstance(item.get("header"), str) or not _TOKEN.match(item["header"]) \
                or not isinstance(item.get("regexp"), str) \
                or not isinstance(item.get("allow_missing", False), bool):
            raise ValueError(f'item {i} must be {{"header": name, "regexp": regex, "allow_missing": bool}}')
        [pattern] = regex_list([item["regexp"]])
        out.append(HeaderMatch(item["header"], pattern, item.get("allow_missing", False)))
    return tuple(out)


def _basic_auth(value: dict[str, str]) -> str:
    if set(value) != {"username", "password"}:
        raise ValueError('must be {"username": ..., "password": ...}')
    if ":" in value["username"]:
        raise ValueError("the username may not contain ':'")
    return "Basic " + base64.b64encode(f"{value['username']}:{value['password']}".encode()).decode("ascii")


def _redirects(value: int) -> int:
    if not 0 <= value <= MAX_REDIRECTS:
        raise ValueError(f"must be 0-{MAX_REDIRECTS}")
    return value


FIELDS = (
    Field("url", "string", required=True, check=_url),
    Field("method", "string", default="GET", check=_method),
    Field("headers", "map", default=MappingProxyType({}), check=_headers),
    Field("body", "string", default=""),
    Field("insecure", "bool", default=False),
    Field("valid_status_codes", "list", default=DEFAULT_STATUS, check=_status_codes),
    Field("fail_if_body_matches", "list", default=(), check=regex_list),
    Field("fail_if_body_not_matches", "list", default=(), check=regex_list),
    Field("fail_if_header_matches", "list", default=(), check=_header_matches),
    Field("fail_if_header_not_matches", "list", default=(), check=_header_matches),
    Field("follow_redirects", "bool", default=False),
    Field("max_redirects", "integer", default=10, check=_redirects),
    Field("ip_version", "string", default="any", check=ip_version),
    Field("basic_auth", "map", default=None, check=_basic_auth),
    Field("bearer_token", "string", default=""),
    Field("server_name", "string", default="", check=server_name),
)


@dataclass(frozen=True)
class HttpConfig:
    url: str
    method: str
    headers: Mapping[str, str]
    body: str
    insecure: bool
    valid_status_codes: tuple[tuple[int, int], ...]
    fail_if_body_matches: tuple[re.Pattern, ...]
    fail_if_body_not_matches: tuple[re.Pattern, ...]
    fail_if_header_matches: tuple[HeaderMatch, ...]
    fail_if_header_not_matches: tuple[HeaderMatch, ...]
    follow_redirects: bool
    max_redirects: int
    ip_version: str
    basic_auth: str | None  # the Authorization header's value
    bearer_token: str
    server_name: str
    timeout: float

    @property
    def reads_body(self) -> bool:
        return bool(self.fail_if_body_matches or self.fail_if_body_not_matches)

    def authorization(self) -> str | None:
        if self.basic_auth:
            return self.basic_auth
        return f"Bearer {self.bearer_token}" if self.bearer_token else None


def check_combination(values: dict[str, Any]) -> str | None:
    """A reason the keys do not go together, or None."""
    if values["basic_auth"] and values["bearer_token"]:
        return "basic_auth, bearer_token: give one of them"
    if (values["basic_auth"] or values["bearer_token"]) and any(k.lower() == "authorization"
                                                                 for k in values["headers"]):
        return "headers: Authorization is set by basic_auth/bearer_token; give it once"
    if values["body"] and values["method"] in ("GET", "HEAD"):
        return f"body: a {values['method']} request has no body (use method POST or PUT)"
    return None
