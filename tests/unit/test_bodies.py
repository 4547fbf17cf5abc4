"""taskd.server.api.bodies: JSON / urlencoded / multipart parsing, incl. the notes' requests."""
from __future__ import annotations

import random

import pytest

from taskd.server.api.bodies import BodyError, ParsedBody, parse_body
from tests import notes_requests as notes

FORM = b"application/x-www-form-urlencoded"
JSON = b"application/json"


def _form(boundary: bytes, *parts: bytes, close: bytes = b"--\r\n") -> bytes:
    out = b""
    for p in parts:
        out += b"--" + boundary + b"\r\n" + p + b"\r\n"
    return out + b"--" + boundary + close


def _field(header_name: bytes, value: bytes, disposition: bytes = b"form-data") -> bytes:
    return b"Content-Disposition: " + disposition + b"; name=" + header_name + b"\r\n\r\n" + value


def _err(content_types, body) -> str:
    with pytest.raises(BodyError) as info:
        parse_body(content_types, body)
    assert isinstance(info.value.message, str) and info.value.message
    return info.value.message


# --- the notes' three requests -------------------------------------------------------

def test_curl_request_is_byte_exact():
    expected = (
        b'POST /api/v1/agents HTTP/1.1\r\nHost: 127.0.0.1:4999\r\nUser-Agent: curl/7.88.1\r\n'
        b'Accept: */*\r\nAuthorization: Bearer EASY\r\nCache-Control: no-cache\r\n'
        b'Postman-Token: 4ba0a028-5b71-f875-718b-63d71eb866ae\r\nContent-Length: 146\r\n'
        b'Content-Type: application/x-www-form-urlencoded; '
        b'boundary=------------------------b9023d6ba4b27ab4\r\n\r\n'
        b'--------------------------b9023d6ba4b27ab4\r\nContent-Disposition: attachment; '
        b'name="name"\r\n\r\nagent2\r\n--------------------------b9023d6ba4b27ab4--\r\n')
    assert notes.CURL.build("agent2", "127.0.0.1:4999") == expected
    assert notes.CURL_REQUEST == expected.replace(b"127.0.0.1:4999", notes.HOST_PLACEHOLDER)


def test_go_payload_is_the_notes_literal():
    assert notes.GO_CLIENT.body == (
        b"------WebKitFormBoundary7MA4YWxkTrZu0gW\r\nContent-Disposition: form-data; "
        b"name=\"name\"\r\n\r\nagent2\r\n------WebKitFormBoundary7MA4YWxkTrZu0gW--")
    assert notes.RAW_HTTP.body == notes.GO_CLIENT.body + b"\r\n"
    assert notes.RAW_HTTP_NO_FINAL_CRLF.body == notes.GO_CLIENT.body


@pytest.mark.parametrize("req", notes.ALL, ids=lambda r: r.label)
@pytest.mark.parametrize("name", ["agent2", "other_agent-7"])
def test_build_keeps_content_length_and_split_round_trips(req, name):
    raw = req.build(name, "127.0.0.1:1234")
    assert b"Host: 127.0.0.1:1234\r\n" in raw and notes.HOST_PLACEHOLDER not in raw
    content_types, body = notes.split(raw)
    assert content_types == list(req.content_types)
    assert body == req.body_for(name)
    assert b"Content-Length: %d\r\n" % len(body) in raw


@pytest.mark.parametrize("req", notes.ALL, ids=lambda r: r.label)
def test_notes_requests_parse_to_name(req):
    content_types, body = notes.split(req.build("agent2", "localhost:4000"))
    assert parse_body(content_types, body) == ParsedBody("form", {"name": ["agent2"]})


@pytest.mark.parametrize("req", notes.ALL, ids=lambda r: r.label)
def test_notes_bodies_parse_whatever_the_headers_say(req):
    # The body is authoritative: wrong, missing or disagreeing headers don't matter.
    for cts in (None, [], [FORM], [JSON], [b"multipart/form-data; boundary=wrong"],
                [b"multipart/form-data; boundary=wrong", FORM]):
        assert parse_body(cts, req.body) == ParsedBody("form", {"name": ["agent2"]}), cts


def test_go_request_with_header_order_reversed():
    assert parse_body([FORM, notes.GO_CLIENT.content_types[0]], notes.GO_CLIENT.body).data == \
        {"name": ["agent2"]}


# --- JSON ------------------------------------------------------------------------------

def test_json_object_and_array():
    assert parse_body([JSON], b'{"name": "a", "enabled": true}') == \
        ParsedBody("json", {"name": "a", "enabled": True})
    assert parse_body([b"application/json; charset=utf-8"], b' [1, "x", null]\n') == \
        ParsedBody("json", [1, "x", None])
    assert parse_body([JSON], b'"just a string"') == ParsedBody("json", "just a string")


def test_json_sent_with_urlencoded_content_type():
    # curl -d '{...}' labels JSON as urlencoded.
    assert parse_body([FORM], b'{"name":"agent9","tags":["a"]}') == \
        ParsedBody("json", {"name": "agent9", "tags": ["a"]})
    assert parse_body(None, b'\r\n  [{"a": 1}]') == ParsedBody("json", [{"a": 1}])
    assert parse_body([FORM], b'\xef\xbb\xbf{"a": 1}') == ParsedBody("json", {"a": 1})  # BOM


def test_malformed_json_message_has_position():
    msg = _err([JSON], b'{"name": "a" "b"}')
    assert msg == "malformed JSON body: Expecting ',' delimiter at line 1 column 14"
    assert "line 2 column" in _err([FORM], b'{\n  "name": }')


@pytest.mark.parametrize("const", [b"NaN", b"Infinity", b"-Infinity"])
def test_json_nan_and_infinity_rejected(const):
    msg = _err([JSON], b'{"interval": ' + const + b"}")
    assert const.lstrip(b"-").decode() in msg


def test_json_pathological_input():
    assert "nested too deeply" in _err([JSON], b"[" * 100_000)
    assert "malformed JSON body" in _err([JSON], b"1" * 10_000)


# --- urlencoded -------------------------------------------------------------------------

def test_urlencoded_repeated_tags():
    body = b"name=agent3&tags=a&tags=b%20c&tags=d+e&enabled=true&empty="
    assert parse_body([FORM], body) == ParsedBody("form", {
        "name": ["agent3"], "tags": ["a", "b c", "d e"], "enabled": ["true"], "empty": [""]})
    assert parse_body(None, b"name=x\n") == ParsedBody("form", {"name": ["x"]})


def test_urlencoded_malformed():
    assert "bad query field" in _err([FORM], b"name")
    assert "bad query field" in _err([FORM], b"name=a&&b=c")


def test_empty_bodies():
    for cts in (None, [JSON], [FORM], list(notes.GO_CLIENT.content_types)):
        assert parse_body(cts, b"") == ParsedBody("empty", None)
        assert parse_body(cts, b" \r\n\t") == ParsedBody("empty", None)


# --- multipart --------------------------------------------------------------------------

def test_multipart_two_fields_quoted_and_unquoted_names_repeated():
    body = _form(b"XyZ", _field(b'"name"', b"agent4"), _field(b"tags", b"a"),
                 _field(b'"tags"', "b\u00e9".encode()),
                 b'Content-Disposition: form-data; name="sp \\"q\\""\r\n\r\nv')
    got = parse_body([b"multipart/form-data; boundary=XyZ"], body)
    assert got == ParsedBody("form", {"name": ["agent4"], "tags": ["a", "b\u00e9"],
                                      'sp "q"': ["v"]})


def test_multipart_value_keeps_inner_lines_and_empty_value():
    body = _form(b"b", _field(b"desc", b"line1\r\nline2\r\n--not-the-boundary"),
                 _field(b"blank", b""))
    assert parse_body([b'multipart/form-data; boundary="b"'], body).data == \
        {"desc": ["line1\r\nline2\r\n--not-the-boundary"], "blank": [""]}


def test_multipart_header_names_case_insensitive_and_nameless_parts_ignored():
    body = _form(b"B", b'content-DISPOSITION: Form-Data; NAME="name"\r\n\r\nx',
                 b"Content-Type: text/plain\r\n\r\nno disposition",
                 b"Content-Disposition: form-data\r\n\r\nno name",
                 b"\r\nno headers at all")
    assert parse_body([b"multipart/form-data; boundary=B"], body).data == {"name": ["x"]}


def test_multipart_lf_only_and_preamble():
    body = b"--B\nContent-Disposition: form-data; name=name\n\nlf\n--B--\n"
    assert parse_body([FORM], body).data == {"name": ["lf"]}
    with_preamble = b"This is a preamble.\r\n" + _form(b"B", _field(b"name", b"pre"))
    assert parse_body([b"multipart/form-data; boundary=B"], with_preamble).data == \
        {"name": ["pre"]}


def test_multipart_missing_closing_delimiter():
    body = b"--B\r\n" + _field(b"name", b"agent2") + b"\r\n"
    msg = _err([b"multipart/form-data; boundary=B"], body)
    assert "malformed" in msg and "closing delimiter" in msg
    # A closing delimiter of another boundary doesn't count either.
    assert "malformed multipart" in _err(list(notes.GO_CLIENT.content_types),
                                          notes.GO_CLIENT.body[:-len(b"--")] + b"X--")


def test_multipart_claimed_but_body_is_not_multipart():
    msg = _err([b"multipart/form-data; boundary=B"], b"name=agent2")
    assert "malformed multipart body" in msg
    assert "malformed multipart body" in _err([b"multipart/form-data"], b"name=agent2")
    assert "no parts" in _err([b"multipart/form-data; boundary=B"], b"--B--\r\n")


def test_multipart_part_without_blank_line():
    assert "blank line" in _err(None, b"--B\r\nContent-Disposition: form-data; name=a\r\n--B--")
    assert "header" in _err(None, b"--B\r\nnot a header\r\n\r\nv\r\n--B--")


@pytest.mark.parametrize("disposition", [
    b'form-data; name="upload"; filename="a.txt"',
    b"attachment; name=upload; filename*=UTF-8''a.txt",
])
def test_multipart_file_part_rejected(disposition):
    body = _form(b"B", _field(b"name", b"agent2"),
                 b"Content-Disposition: " + disposition + b"\r\n"
                 b"Content-Type: text/plain\r\n\r\nfile contents")
    assert "file uploads are not accepted" in _err([b"multipart/form-data; boundary=B"], body)


# --- invalid UTF-8 in each kind -----------------------------------------------------------

def test_invalid_utf8_json():
    assert "UTF-8" in _err([JSON], b'{"name": "\xff\xfe"}')
    assert "UTF-8" in _err([FORM], b'{"name": "\xc3"}')


def test_invalid_utf8_urlencoded():
    assert "UTF-8" in _err([FORM], b"name=\xff")
    assert "UTF-8" in _err([FORM], b"name=%ff")
    assert "UTF-8" in _err(None, b"na%C3me=x")


def test_invalid_utf8_multipart():
    msg = _err(None, _form(b"B", _field(b"name", b"ok"), _field(b'"tags"', b"bad\xff")))
    assert "UTF-8" in msg and "'tags'" in msg
    assert "UTF-8" in _err(None, _form(b"B", _field(b'"n\xffame"', b"x")))


# --- never anything but BodyError ---------------------------------------------------------

_SEEDS = [r.body for r in notes.ALL] + [
    b'{"name": "agent2", "tags": ["a", "b"], "enabled": false, "n": 1.5e3}',
    b"[1, 2, {\"x\": null}]",
    b'{"id": 3, "name": "agent2", "public": true, "tags": null}',
    b'  {"route": {"type": "byTags", "config": {"tags": ["x"]}}, "interval": 60}',
    b"name=agent2&tags=a&tags=b%20c&x=",
    _form(b"B", _field(b"name", b"v"), b'Content-Disposition: form-data; name="f"; '
                                       b'filename="x"\r\n\r\ndata'),
]
_CONTENT_TYPES = [None, [], [FORM], [JSON], [b"multipart/form-data"],
                  [b"multipart/form-data; boundary=B"], [b'multipart/form-data; boundary="'],
                  list(notes.GO_CLIENT.content_types), list(notes.CURL.content_types),
                  [b"\xff\xfe; boundary=\xff"], [b"text/plain; boundary="]]
_ALPHABET = b'-\r\n{}[]":;=&%+\\ \t\x00\xff\xc3\xa9Bnamefilename' + notes.WEBKIT_BOUNDARY


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(5)
        pos = rng.randint(0, len(buf))
        if op == 0 and buf:  # delete a span
            del buf[pos:pos + rng.randint(1, 8)]
        elif op == 1:  # insert interesting bytes
            buf[pos:pos] = bytes(rng.choice(_ALPHABET) for _ in range(rng.randint(1, 6)))
        elif op == 2 and buf:  # flip a byte
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op == 3:  # truncate
            del buf[pos:]
        else:  # duplicate a span
            buf[pos:pos] = buf[pos:pos + rng.randint(1, 40)]
    return bytes(buf)


def test_fuzz_only_body_error_or_parsed_body():
    rng = random.Random(20240317)
    kinds = {"json": 0, "form": 0, "empty": 0, "error": 0}
    for i in range(4000):
        if i % 4 == 0:
            body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 80)))
        elif i % 4 == 1:
            body = bytes(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 120)))
        else:
            body = _mutate(rng, rng.choice(_SEEDS))
        cts = rng.choice(_CONTENT_TYPES)
        try:
            got = parse_body(cts, body)
        except BodyError as e:
            assert isinstance(e.message, str) and e.message
            kinds["error"] += 1
            continue
        assert isinstance(got, ParsedBody) and got.kind in ("json", "form", "empty")
        if got.kind == "form":
            assert isinstance(got.data, dict)
            assert all(isinstance(k, str) and isinstance(v, list) and
                       all(isinstance(s, str) for s in v) for k, v in got.data.items())
        elif got.kind == "empty":
            assert got.data is None
        kinds[got.kind] += 1
    # The mutations must actually exercise both outcomes, not only errors.
    assert kinds["error"] > 100 and kinds["form"] > 100 and kinds["json"] > 10, kinds


@pytest.mark.parametrize("raw, where", [
    (b'{"name": "t", "interval": 1e400}', "interval"),
    (b'{"config": {"/ns": {"x": -1e400}}}', "config./ns.x"),
    (b'{"route": {"config": {"ids": [1, 2e999]}}}', "route.config.ids[1]"),
    (b'1e400', "the body"),
])
def test_a_number_that_is_not_finite_is_refused_naming_where(raw, where):
    with pytest.raises(BodyError) as info:
        parse_body([b"application/json"], raw)
    assert info.value.message.startswith(f"{where}: not a finite number")


def test_large_finite_numbers_are_kept():
    assert parse_body([b"application/json"], b'{"x": 1.7e308, "y": -1e-400}').data == {"x": 1.7e308, "y": -0.0}
