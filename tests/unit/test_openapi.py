"""The OpenAPI document and the Klein routes are the same set: a route added without its
operation (or an operation left behind by a removed route) fails here."""
from __future__ import annotations

import json
import re

from taskd.server.api import openapi
from taskd.server.api.app import Api
from taskd.server.validation import ParsedBody, parse_task

_PARAM = re.compile(r"<(?:[a-z]+:)?([a-z_]+)>")


def _api(**kw) -> Api:
    return Api(object(), object(), object(), max_body_size=1024, **kw)


def _klein_routes(api: Api) -> set[tuple[str, str]]:
    out = set()
    for rule in api.app.url_map.iter_rules():
        path = _PARAM.sub(r"{\1}", rule.rule)
        if path != "/":
            path = path.rstrip("/")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            out.add((method.lower(), path))
    return out


def _documented(doc: dict) -> set[tuple[str, str]]:
    methods = {"get", "put", "post", "delete", "patch"}
    return {(m, path) for path, item in doc["paths"].items() for m in item if m in methods}


def test_every_route_is_documented_and_every_documented_path_exists():
    api = _api(socket=lambda call, **kw: None, servers=object(), tokens=object(), metrics=object(), runs=object())
    assert _klein_routes(api) == _documented(openapi.document(servers=True, socket=True, tokens=True, metrics=True,
                                                              runs=True))


def test_optional_routes_follow_what_is_mounted():
    api = _api()
    doc = openapi.document(servers=False, socket=False, tokens=False, metrics=False, runs=False)
    assert _klein_routes(api) == _documented(doc)
    assert "/api/v1/servers" not in doc["paths"] and not any("socket" in p for p in doc["paths"])
    assert "/metrics" not in doc["paths"]


def test_document_is_openapi_3_1_and_its_refs_resolve():
    doc = openapi.document()
    assert doc["openapi"].startswith("3.1")
    text = json.dumps(doc)
    for ref in set(re.findall(r'"\$ref": "#/([^"]+)"', text)):
        node = doc
        for part in ref.split("/"):
            assert part in node, f"unresolved $ref #/{ref}"
            node = node[part]


def test_an_integral_float_is_the_integer_json_schema_says_it_is():
    """schemathesis (and any JSON Schema client) may send 300.0 for an integer field."""
    body = {"name": "t", "interval": 300.0, "route": {"type": "byIds", "config": {"ids": [4.0]}},
            "metrics": {"/a/*": 0.0}}
    _, spec = parse_task(ParsedBody("json", body), for_update=False)
    assert (spec.interval, spec.route.config["ids"], spec.metrics) == (300, [4], {"/a/*": 0})
    assert type(spec.interval) is int


def test_docs_api_md_shows_the_documents_operations():
    from pathlib import Path
    text = (Path(__file__).parents[2] / "docs" / "api.md").read_text()
    begin, end = "<!-- openapi-table: begin -->\n", "<!-- openapi-table: end -->"
    assert begin in text and end in text
    shown = text.split(begin, 1)[1].split(end, 1)[0]
    assert shown == openapi.markdown_table(), "docs/api.md's table is stale: paste `python -m taskd.server.api.openapi`"
