"""Request body parsing for the REST API: JSON, urlencoded and multipart/form-data.

Why this sniffs the body instead of trusting Content-Type: the operators' notes
("Registering an Agent") give three ways to register an agent, and all three
send headers that disagree with the body:

* curl: ``-H 'Content-Type: application/x-www-form-urlencoded' -H 'content-type:
  multipart/...' -F name=agent2`` sends ONE header saying *urlencoded* but carrying
  curl's own boundary, and a multipart body whose part is ``Content-Disposition:
  attachment`` (not ``form-data``).
* raw HTTP: plain multipart; the body may or may not end with a final CRLF.
* Go client: two Content-Type headers (multipart, then urlencoded) and a body with
  no trailing CRLF after the closing delimiter.

Operators also ``curl -d '{...}'``, which labels JSON as urlencoded. So the body is
authoritative: a body starting with a ``--boundary`` line is multipart (whatever
boundary the headers declare), one starting with ``{``/``[`` is JSON. Headers only
decide when the body does not. Anything that cannot be parsed raises BodyError
(-> HTTP 400) and nothing else escapes, whatever the input.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any
from urllib.parse import parse_qs

from taskd.server.validation import ParsedBody  # noqa: F401 (what parse_body returns)

__all__ = ["BodyError", "ParsedBody", "parse_body"]


class BodyError(Exception):
    """The body cannot be parsed; ``message`` tells the client what to fix (HTTP 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# RFC 2046 boundary characters (a little more lenient on length).
_BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{0,199}[0-9A-Za-z'()+_,\-./:=?]")
_DECLARED = re.compile(r'(?:^|[;,\s])boundary\s*=\s*(?:"([^"]*)"|([^;,\s"]+))', re.I)
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;]*))')
_BLANK_LINE = re.compile(rb"(?:\A|\r?\n)\r?\n")


def parse_body(content_types: list[bytes] | None, body: bytes) -> ParsedBody:
    body = bytes(body)
    if not body.strip():
        return ParsedBody("empty", None)
    cts = [ct.decode("latin-1") if isinstance(ct, (bytes, bytearray)) else str(ct)
           for ct in (content_types or [])]
    stripped = body.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
    first = re.match(rb"--([^\r\n]*)\r?\n", stripped)
    sniffed = _BOUNDARY.fullmatch(first.group(1).rstrip(b" \t")) if first else None
    declared = [m.group(1) if m.group(1) is not None else m.group(2)
                for ct in cts for m in _DECLARED.finditer(ct)]
    if sniffed or declared or any("multipart/" in ct.lower() for ct in cts):
        return ParsedBody("form", _parse_multipart(stripped, sniffed, declared))
    if stripped[:1] in (b"{", b"[") or any("json" in ct.lower() for ct in cts):
        return ParsedBody("json", _parse_json(body))
    return ParsedBody("form", _parse_urlencoded(body))


def _reject_constant(name: str) -> Any:
    raise BodyError(f"malformed JSON body: {name} is not valid JSON")


def _parse_json(body: bytes) -> Any:
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BodyError(f"JSON body is not valid UTF-8 (byte {e.start})") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise BodyError(f"malformed JSON body: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise BodyError("malformed JSON body: nested too deeply") from None
    except ValueError as e:  # e.g. integers beyond the int-string conversion limit
        raise BodyError(f"malformed JSON body: {e}") from None
    where = _non_finite(value)
    if where is not None:
        raise BodyError(f"{where}: not a finite number (1e400 and the like overflow; JSON numbers"
                        " must be finite)")
    return value


def _non_finite(value: Any) -> str | None:
    """The path of the first number JSON parsed to infinity (`1e400`), or None. Stored,
    such a value would come back as `Infinity`, which is not JSON, in the API's answer and
    in every agent's taskList."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return path or "the body"
        if isinstance(item, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(item))))
    return None


def _parse_urlencoded(body: bytes) -> dict[str, list[str]]:
    try:
        text = body.decode("utf-8").strip()
        return parse_qs(text, keep_blank_values=True, strict_parsing=True,
                        encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise BodyError("urlencoded body is not valid UTF-8 (also after %-decoding)") from None
    except ValueError as e:
        raise BodyError(f"malformed urlencoded body: {e} (expected name=value&name=value)") from None


def _parse_multipart(body: bytes, sniffed: re.Match | None, declared: list[str]) -> dict[str, list[str]]:
    candidates: list[bytes] = [sniffed.group(0)] if sniffed else []
    if candidates and candidates[0].endswith(b"--") and len(candidates[0]) > 2:
        candidates.insert(0, candidates[0][:-2])  # the first line was a closing delimiter
    for b in declared:
        bb = b.encode("latin-1")
        if bb and bb not in candidates:
            candidates.append(bb)
    if not candidates:
        raise BodyError("malformed multipart body: no boundary in Content-Type and the body "
                        "does not start with a '--<boundary>' line")
    first_error: BodyError | None = None
    for boundary in candidates:
        try:
            return _parse_with_boundary(body, boundary)
        except BodyError as e:
            first_error = first_error or e
    raise first_error  # type: ignore[misc]


def _parse_with_boundary(body: bytes, boundary: bytes) -> dict[str, list[str]]:
    shown = boundary.decode("latin-1")
    delim = re.compile(rb"(?:\A|\r?\n)--" + re.escape(boundary) + rb"(--)?[ \t]*(?=\r?\n|\Z)")
    parts: list[bytes] = []
    start = None
    for m in delim.finditer(body):
        if start is not None:
            parts.append(re.sub(rb"\A\r?\n", b"", body[start:m.start()]))
        if m.group(1):
            break
        start = m.end()
    else:
        if start is None:
            raise BodyError(f"malformed multipart body: no '--{shown}' boundary line found; "
                            "fix the body or the Content-Type")
        raise BodyError(f"malformed multipart body: missing closing delimiter '--{shown}--'")
    if not parts:
        raise BodyError("malformed multipart body: it contains no parts")
    form: dict[str, list[str]] = {}
    for part in parts:
        field = _parse_part(part)
        if field is not None:
            form.setdefault(field[0], []).append(field[1])
    return form


def _parse_part(part: bytes) -> tuple[str, str] | None:
    split = _BLANK_LINE.search(part)
    if split:
        head, value = part[:split.start()], part[split.end():]
    elif not part or part.endswith(b"\n"):
        head, value = part, b""
    else:
        raise BodyError("malformed multipart body: a part lacks the blank line after its headers")
    try:
        head_text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyError("malformed multipart body: part headers are not valid UTF-8") from None
    headers: dict[str, str] = {}
    last = None
    for line in re.split(r"\r?\n", head_text):
        if line[:1] in (" ", "\t") and last is not None:  # folded header
            headers[last] += " " + line.strip()
        elif line.strip():
            key, colon, val = line.partition(":")
            if not colon:
                raise BodyError(f"malformed multipart body: bad part header line {line[:60]!r}")
            last = key.strip().lower()
            headers.setdefault(last, val.strip())
    disposition = headers.get("content-disposition")
    if disposition is None:
        return None
    kind = disposition.split(";", 1)[0].strip().lower()
    params: dict[str, str] = {}
    for m in _PARAM.finditer(disposition):
        val = re.sub(r"\\(.)", r"\1", m.group(2)) if m.group(2) is not None else m.group(3).strip()
        params.setdefault(m.group(1).lower(), val)
    name = params.get("name")
    if "filename" in params or "filename*" in params:
        raise BodyError(f"file uploads are not accepted (field {name!r}); send plain form fields")
    if kind not in ("form-data", "attachment") or not name:
        return None
    try:
        return name, value.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyError(f"multipart field {name!r} is not valid UTF-8") from None
