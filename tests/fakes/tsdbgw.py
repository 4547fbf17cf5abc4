"""An emulator of tsdb-gw's ``POST /metrics`` for the publisher's tests.

This is a stand-in, not tsdb-gw (a Go service we cannot run here). It is faithful to
docs/tsdb-gw.md for what the publisher sends: the exact
Content-Type check (§5.1), the snappy *framing* (§5.2, decoded with
``cramjam.snappy.decompress``; a raw block or garbage is a body read error), the envelope
(§4: at least 9 bytes, format 0 or 1; only format 1 is decoded here), Bearer/Basic auth
(§5.3), and the msgp MetricDataArray decoded by its *own* decoder (§2), which records
the type byte of every field so it can refuse what the Go decoder refuses: the unsigned
ints ``0xcc``-``0xcf`` for OrgId/Interval/Time, a msgpack integer for Value, non-str
strings. Unknown keys are skipped, missing ones keep their zero value, an empty mtype
becomes ``gauge``, then each metric is validated (§2.3 Validate: Metric is required in
the 2018 era, and the v2 tag rules of §2.3 apply when ``strict_tags``, the default, so
what passes here passes on both generations).

Answers follow the gateway's ``era`` (§6):

* ``"2018"`` (default, ≤ Jan 2019): decode errors 500; one invalid metric → 400 with the
  error text and the whole batch dropped; success 200 ``"ok"``.
* ``"2019"``: decode errors 400; invalid metrics skipped; 200 with the
  ``{"Invalid", "Published", "ValidationErrors"}`` summary.

Bad snappy is 500 in both. Keys: ``admin_key`` is an admin (payload OrgId and Id kept),
``org_keys`` maps other keys to their org (OrgId forced, Id recomputed). One deliberate
strictness beyond the gateway: for an admin key the emulator recomputes the Id (§3.1)
and answers 400 on a mismatch, where the real gateway would silently store a wrong
series. Not emulated: ``application/json`` bodies and envelope format 0 (answered as
errors), Kafka, ``/events``, other routes (404).

Usage, inside the running reactor::

    gw = TsdbGwEmulator(admin_key="k").start()      # gw.url = http://127.0.0.1:<port>
    gw.fail(503, times=2)       # the next 2 requests answer 503 ...
    gw.fail(400)                # ... or every request, until gw.fail(None)
    gw.hang = True              # accept requests, never answer (client timeouts)
    await gw.set_down(True)     # stop listening, drop connections; set_down(False): same port
    gw.metrics                  # every accepted metric (dicts; "_types" holds the type bytes)
    gw.requests                 # every request: RequestRecord(status, content_type, n, error)
    await gw.stop()
"""
from __future__ import annotations

import base64
import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import cramjam
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from tests.fakes.loopback import LoopbackServer

__all__ = ["TsdbGwEmulator", "RequestRecord", "MsgpError", "decode_metric_array", "v1_id"]

CONTENT_TYPES = ("rt-metric-binary", "rt-metric-binary-snappy")
STREAM_ID = b"\xff\x06\x00\x00sNaPpY"
MTYPES = ("gauge", "rate", "count", "counter", "timestamp")
INT_FIELDS, STR_FIELDS = ("OrgId", "Interval", "Time"), ("Id", "Name", "Metric", "Unit", "Mtype")
ZERO = {"Id": "", "OrgId": 0, "Name": "", "Metric": "", "Interval": 0, "Value": 0.0, "Unit": "",
        "Time": 0, "Mtype": "", "Tags": []}


class MsgpError(ValueError):
    """What tinylib/msgp would answer for these bytes."""


class _Reader:
    """A msgpack reader that, like msgp's typed readers, insists on the expected family."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise MsgpError("msgp: too few bytes left to read object")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def byte(self) -> int:
        return self._take(1)[0]

    def peek(self) -> int:
        if self.pos >= len(self.data):
            raise MsgpError("msgp: too few bytes left to read object")
        return self.data[self.pos]

    def header(self, kind: str) -> int:
        b = self.byte()
        fix, mask, wide = {"array": (0x90, 0xF0, (0xDC, 0xDD)), "map": (0x80, 0xF0, (0xDE, 0xDF))}[kind]
        if b & mask == fix:
            return b & 0x0F
        if b == wide[0]:
            return struct.unpack(">H", self._take(2))[0]
        if b == wide[1]:
            return struct.unpack(">I", self._take(4))[0]
        raise MsgpError(f"msgp: attempted to decode type {b:#04x} as {kind}")

    def int(self) -> tuple[int, int]:
        """Signed family only (msgp ReadInt*); 0xcc-0xcf are a type error."""
        b = self.byte()
        if b <= 0x7F:
            return b, b
        if b >= 0xE0:
            return b - 0x100, b
        fmt = {0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}.get(b)
        if fmt is None:
            raise MsgpError(f"msgp: attempted to decode type {b:#04x} as int")
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0], b

    def float(self) -> tuple[float, int]:
        b = self.byte()
        if b == 0xCB:
            return struct.unpack(">d", self._take(8))[0], b
        if b == 0xCA:
            return struct.unpack(">f", self._take(4))[0], b
        raise MsgpError(f"msgp: attempted to decode type {b:#04x} as float64")

    def str(self) -> tuple[str, int]:
        b = self.byte()
        if b & 0xE0 == 0xA0:
            n = b & 0x1F
        elif b in (0xD9, 0xDA, 0xDB):
            n = int.from_bytes(self._take({0xD9: 1, 0xDA: 2, 0xDB: 4}[b]), "big")
        else:
            raise MsgpError(f"msgp: attempted to decode type {b:#04x} as str")
        return self._take(n).decode("utf-8", "replace"), b

    def skip(self) -> None:
        """Skip any one object (unknown keys are skipped by the gateway)."""
        b = self.peek()
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            self.pos += 1
        elif b & 0xE0 == 0xA0 or b in (0xD9, 0xDA, 0xDB):
            self.str()
        elif b in (0xC4, 0xC5, 0xC6):
            self.pos += 1
            self._take(int.from_bytes(self._take({0xC4: 1, 0xC5: 2, 0xC6: 4}[b]), "big"))
        elif b in (0xCA, 0xCB):
            self.float()
        elif b in (0xCC, 0xCD, 0xCE, 0xCF):
            self._take(1 + {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}[b])
        elif b in (0xD0, 0xD1, 0xD2, 0xD3):
            self.int()
        elif b & 0xF0 == 0x90 or b in (0xDC, 0xDD):
            for _ in range(self.header("array")):
                self.skip()
        elif b & 0xF0 == 0x80 or b in (0xDE, 0xDF):
            for _ in range(2 * self.header("map")):
                self.skip()
        else:  # ext types: not written by any publisher
            raise MsgpError(f"msgp: unsupported type {b:#04x}")


def decode_metric_array(body: bytes) -> list[dict[str, Any]]:
    """The MetricDataArray, each record a dict of the fields plus ``"_types"``: field →
    the type byte it was written with (so tests can check the exact forms)."""
    r = _Reader(body)
    out: list[dict[str, Any]] = []
    for _ in range(r.header("array")):
        if r.peek() == 0xC0:
            r.pos += 1
            out.append({**ZERO, "_types": {}})
            continue
        metric: dict[str, Any] = {**ZERO, "Tags": [], "_types": {}}
        for _ in range(r.header("map")):
            key, _t = r.str()
            if key in INT_FIELDS:
                metric[key], metric["_types"][key] = r.int()
            elif key in STR_FIELDS:
                metric[key], metric["_types"][key] = r.str()
            elif key == "Value":
                metric[key], metric["_types"][key] = r.float()
            elif key == "Tags":
                metric["_types"][key] = r.peek()
                metric["Tags"] = [r.str()[0] for _ in range(r.header("array"))]
            else:
                r.skip()
        out.append(metric)
    if r.pos != len(body):
        raise MsgpError(f"msgp: {len(body) - r.pos} trailing bytes after the array")
    return out


def v1_id(m: dict[str, Any], key: str = "Metric") -> str:
    """SetId (§3.1): KEY is Metric in schema v1, Name (``key="Name"``) in v2."""
    raw = b"\x00".join([m[key].encode(), m["Unit"].encode(), m["Mtype"].encode(),
                        str(m["Interval"]).encode()] + [t.encode() for t in sorted(m["Tags"])])
    return f"{m['OrgId']}.{hashlib.md5(raw).hexdigest()}"


def _validate(m: dict[str, Any], strict_tags: bool, v1: bool) -> str | None:
    if m["OrgId"] == 0:
        return "org-id cannot be 0"
    if m["Interval"] == 0:
        return "interval cannot be 0"
    if not m["Name"]:
        return "name cannot be empty"
    if v1 and not m["Metric"]:
        return "metric cannot be empty"
    if m["Mtype"] not in MTYPES:
        return "invalid mtype"
    for tag in m["Tags"] if strict_tags else ():
        if (not tag or tag[0] == "=" or "=" not in tag[:-1] or "!" in tag.partition("=")[0]
                or ";" in tag):
            return "invalid tag format"
    return None


@dataclass
class RequestRecord:
    status: int
    content_type: str
    metrics: int = 0           # metrics accepted from this request
    error: str = ""            # the error text answered, if any
    injected: bool = False     # the status came from fail(), not from the request
    answer: str = ""           # the success body


@dataclass
class _Failure:
    status: int
    times: int | None
    body: bytes = field(default=b'"emulated failure"')


class _MetricsResource(Resource):
    isLeaf = True

    def __init__(self, gw: TsdbGwEmulator) -> None:
        super().__init__()
        self.gw = gw

    def render(self, request: Request) -> bytes | int:
        gw = self.gw
        ctype = (request.getHeader(b"content-type") or b"").decode("latin-1")
        if gw.hang:
            gw.requests.append(RequestRecord(0, ctype, error="hung"))
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")
        if request.path != b"/metrics":
            return gw._answer(request, RequestRecord(404, ctype, error="404 page not found"))
        if request.method != b"POST":
            return gw._answer(request, RequestRecord(405, ctype, error="method not allowed"))
        failure = gw._failure
        if failure is not None:
            if failure.times is not None:
                failure.times -= 1
                if failure.times <= 0:
                    gw._failure = None
            request.setResponseCode(failure.status)
            gw.requests.append(RequestRecord(failure.status, ctype, error=failure.body.decode(), injected=True))
            return failure.body
        body = request.content.read() if request.content is not None else b""
        return gw._answer(request, gw.handle(request.getHeader(b"authorization"), ctype, body))


class TsdbGwEmulator(LoopbackServer):
    """A running emulated tsdb-gw; see the module docstring."""

    def __init__(self, admin_key: str = "not_very_secret_key", org_keys: dict[str, int] | None = None,
                 *, era: str = "2018", strict_tags: bool = True) -> None:
        if era not in ("2018", "2019"):
            raise ValueError("era is '2018' or '2019'")
        self.admin_key, self.org_keys = admin_key, dict(org_keys or {})
        self.era, self.strict_tags = era, strict_tags
        self.metrics: list[dict[str, Any]] = []
        self.requests: list[RequestRecord] = []
        self.hang = False
        self.url = ""
        self.port = 0
        self._failure: _Failure | None = None
        self._reactor: Any = None
        self._listener: Any = None
        self._serve(_MetricsResource(self))

    # -- test controls ------------------------------------------------------------------

    def fail(self, status: int | None, times: int | None = None, body: bytes = b'"emulated failure"') -> None:
        """Answer ``status`` to the next ``times`` requests (None: until ``fail(None)``)."""
        self._failure = None if status is None else _Failure(status, times, body)

    @property
    def errors(self) -> list[RequestRecord]:
        """Requests refused for what they contained (not injected failures)."""
        return [r for r in self.requests if r.status not in (200, 0) and not r.injected]

    # -- the gateway's /metrics handler ---------------------------------------------------

    def _answer(self, request: Request, record: RequestRecord) -> bytes:
        self.requests.append(record)
        request.setResponseCode(record.status)
        if record.status == 200:
            return record.answer.encode()
        return json.dumps(record.error).encode()

    def _auth(self, header: bytes | None) -> tuple[bool, int] | str:
        """(admin, org) for a good key, else the 401 text (§5.3)."""
        text = (header or b"").decode("latin-1")
        scheme, _, cred = text.partition(" ")
        if scheme == "Bearer" and cred:
            key = cred
        elif scheme == "Basic" and cred:
            try:
                user, _, key = base64.b64decode(cred).decode().partition(":")
            except ValueError:
                return "Unauthorized"
            if user != "api_key":
                return "invalid key"
        else:
            return "Unauthorized"
        if key == self.admin_key:
            return True, 1
        if key in self.org_keys:
            return False, self.org_keys[key]
        return "invalid key"

    def handle(self, authorization: bytes | None, ctype: str, body: bytes) -> RequestRecord:
        """What the gateway answers to this POST /metrics; accepted metrics are stored."""
        auth = self._auth(authorization)
        if isinstance(auth, str):
            return RequestRecord(401, ctype, error=auth)
        admin, org = auth
        if ctype not in CONTENT_TYPES:
            return RequestRecord(400, ctype, error=f"unknown content-type: {ctype}")
        bad_data = 500 if self.era == "2018" else 400
        if ctype.endswith("-snappy"):
            try:
                if not body.startswith(STREAM_ID):
                    raise ValueError("snappy: corrupt input")
                body = bytes(cramjam.snappy.decompress(body))
            except Exception as e:  # noqa: BLE001 - a body read error, whatever the cause
                return RequestRecord(500, ctype, error=str(e) or "snappy: corrupt input")
        if len(body) < 9:
            return RequestRecord(bad_data, ctype, error="too small")
        if body[0] != 1:  # format 0 (JSON in the envelope) is real but not emulated
            return RequestRecord(bad_data, ctype, error=f"unknown format {body[0]}")
        try:
            metrics = decode_metric_array(body[9:])
        except MsgpError as e:
            return RequestRecord(bad_data, ctype, error=str(e))
        accepted, invalid = [], {}
        for i, m in enumerate(metrics):
            if not admin:
                m["OrgId"] = org
            m["Mtype"] = m["Mtype"] or "gauge"
            problem = _validate(m, self.strict_tags, v1=self.era == "2018")
            want = v1_id(m, "Metric" if self.era == "2018" else "Name")
            if problem is None and admin and m["Id"] != want:
                problem = f"emulator: Id {m['Id']!r} is not SetId's {want!r}"
            if problem is not None:
                if self.era == "2018":
                    return RequestRecord(400, ctype, error=f"metric {i}: {problem}")
                invalid.setdefault(problem, []).append(i)
                continue
            m["Id"] = want
            accepted.append(m)
        self.metrics.extend(accepted)
        if self.era == "2018":
            answer = '"ok"'
        else:
            answer = json.dumps({"Invalid": sum(len(v) for v in invalid.values()), "Published": len(accepted),
                                 "ValidationErrors": {k: {"Count": len(v), "ExampleIds": v[:9]}
                                                      for k, v in invalid.items()}})
        return RequestRecord(200, ctype, metrics=len(accepted), answer=answer)
