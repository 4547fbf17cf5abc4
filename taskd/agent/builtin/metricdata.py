"""tsdb-gw's binary metric format: the MetricData record, its Id, the envelope, snappy framing.

Follows docs/tsdb-gw.md (the section numbers below are those of the wire notes it was
written from; its section map gives its own). The encoder is written by hand rather than with the ``msgpack`` package because the
gateway's msgp decoder only accepts the *signed* integer forms (§1.2) and msgpack-python
writes non-negative ints above 127 as unsigned (``0xcc``-``0xcf``), which tsdb-gw rejects.

What is sent (§0.1): the 10-field schema-v1 record with ``Name == Metric``, so both gateway
generations decode it and compute the same Id; tags are ``key=value`` strings, sorted
(the sort is part of the Id algorithm and the sorted order is what gets serialized).
"""
from __future__ import annotations

import hashlib
import math
import numbers
import struct
from typing import Iterable, Sequence

import cramjam

from taskd.agent.builtin.collector import Point

__all__ = ["MTYPES", "FORMAT_MSGP", "CONTENT_TYPE", "CONTENT_TYPE_SNAPPY", "metric_id",
           "finite_value", "invalid_reason", "pack_int", "pack_str", "pack_float", "pack_array_header",
           "encode_point", "encode_points", "envelope", "encode_message", "snappy_frame"]

#: The mtypes both gateway generations accept (§1.1); an empty one means ``gauge``.
MTYPES = frozenset({"gauge", "rate", "count", "counter", "timestamp"})
FORMAT_MSGP = 1  # envelope format byte of a msgp MetricDataArray (§3)
CONTENT_TYPE = "rt-metric-binary"
CONTENT_TYPE_SNAPPY = "rt-metric-binary-snappy"

_FIELDS = ("Id", "OrgId", "Name", "Metric", "Interval", "Value", "Unit", "Time", "Mtype", "Tags")


def metric_id(org_id: int, name: str, unit: str, mtype: str, interval: int,
              tags: Iterable[str] = ()) -> str:
    """``<org>.<md5 hex>`` of KEY, unit, mtype, interval and the sorted tags, NUL-joined (§2.1).

    KEY is ``Metric`` under schema v1 and ``Name`` under v2; taskd sends them equal, so this
    one function gives the Id both generations compute. An admin key makes the gateway keep
    the Id as sent (§2.2), so it must be right.
    """
    parts = [name.encode("utf-8"), unit.encode("utf-8"), mtype.encode("utf-8"),
             str(int(interval)).encode("ascii")]
    parts.extend(t.encode("utf-8") for t in sorted(tags))
    digest = hashlib.md5(b"\x00".join(parts)).hexdigest()
    return f"{int(org_id)}.{digest}"


def _tag_problem(tag: str) -> str | None:
    """Why the v2 gateway would reject this tag (§2.3), or None."""
    if not tag or tag[0] == "=" or "=" not in tag[:-1]:
        return f"invalid tag {tag!r} (want key=value)"
    if "!" in tag.partition("=")[0] or ";" in tag:
        return f"invalid tag {tag!r} (no '!' in the key, no ';')"
    return None


def finite_value(value: object) -> float | None:
    """``value`` as a float if it is a finite real number, else None (never raises).

    Publishers check values with this so a bad one is counted as invalid instead of raising
    while the batch is encoded. NaN and ±inf count as invalid: graphite cannot store them,
    tsdb-gw's JSON cannot carry them, and the executor already fails a run that yields one.
    """
    if not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except (OverflowError, TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def invalid_reason(point: Point) -> str | None:
    """Why ``point`` cannot be sent: either gateway generation would reject it (§1.1
    Validate, §2.3), or its value is not a finite real number (`finite_value`); or None.

    The old gateway answers 400 and drops the *whole batch* for one bad metric, and a value
    `pack_float` cannot pack would fail the whole encode, so the publisher filters these
    out before they can poison a batch.
    """
    if finite_value(point.value) is None:
        return f"value {point.value!r:.40} is not a finite number"
    if point.org_id == 0:
        return "org-id cannot be 0"
    if point.interval == 0:
        return "interval cannot be 0"
    if not point.name:
        return "name cannot be empty"
    if (point.mtype or "gauge") not in MTYPES:
        return f"invalid mtype {point.mtype!r}"
    for tag in point.tags:
        problem = _tag_problem(tag)
        if problem:
            return problem
    return None


# -- msgpack, the forms Go's msgp writes and tsdb-gw reads (§1.2) --------------------------

def pack_int(i: int) -> bytes:
    """The smallest *signed* msgpack form: fixint, then int8/16/32/64 (never 0xcc-0xcf)."""
    if 0 <= i <= 0x7F:
        return bytes((i,))
    if -32 <= i < 0:
        return struct.pack(">b", i)
    if -128 <= i <= 127:
        return b"\xd0" + struct.pack(">b", i)
    if -32768 <= i <= 32767:
        return b"\xd1" + struct.pack(">h", i)
    if -(2 ** 31) <= i < 2 ** 31:
        return b"\xd2" + struct.pack(">i", i)
    return b"\xd3" + struct.pack(">q", i)


def pack_float(value: float) -> bytes:
    """float64 (``0xcb``): a msgpack *integer* in Value is rejected by the gateway."""
    return b"\xcb" + struct.pack(">d", float(value))


def pack_str(text: str) -> bytes:
    """The str family only (fixstr, str8 for 32..255 bytes, str16, str32), as Go writes it."""
    raw = text.encode("utf-8")
    n = len(raw)
    if n < 32:
        return bytes((0xA0 | n,)) + raw
    if n < 256:
        return b"\xd9" + bytes((n,)) + raw
    if n < 65536:
        return b"\xda" + struct.pack(">H", n) + raw
    return b"\xdb" + struct.pack(">I", n) + raw


def pack_array_header(n: int) -> bytes:
    """fixarray, then ``0xdc`` + u16, then ``0xdd`` + u32."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 65536:
        return b"\xdc" + struct.pack(">H", n)
    return b"\xdd" + struct.pack(">I", n)


_KEYS = {name: pack_str(name) for name in _FIELDS}


def encode_point(point: Point) -> bytes:
    """One v1 MetricData record: a 10-entry fixmap (``0x8a``) in Go field order (§1.1).

    An empty mtype is sent (and hashed) as ``gauge``, which is what the gateway would
    default it to anyway; the Id is computed over exactly what is sent.
    """
    mtype = point.mtype or "gauge"
    tags = sorted(point.tags)
    out = [b"\x8a",
           _KEYS["Id"], pack_str(metric_id(point.org_id, point.name, point.unit, mtype, point.interval, tags)),
           _KEYS["OrgId"], pack_int(int(point.org_id)),
           _KEYS["Name"], pack_str(point.name),
           _KEYS["Metric"], pack_str(point.name),
           _KEYS["Interval"], pack_int(int(point.interval)),
           _KEYS["Value"], pack_float(point.value),
           _KEYS["Unit"], pack_str(point.unit),
           _KEYS["Time"], pack_int(int(point.time)),
           _KEYS["Mtype"], pack_str(mtype),
           _KEYS["Tags"], pack_array_header(len(tags))]
    out.extend(pack_str(t) for t in tags)
    return b"".join(out)


def encode_points(points: Sequence[Point]) -> bytes:
    """A MetricDataArray: the msgp array of records (the body of a format-1 message)."""
    return pack_array_header(len(points)) + b"".join(encode_point(p) for p in points)


def envelope(body: bytes, fmt: int = FORMAT_MSGP, msg_id: int = 0) -> bytes:
    """The 9-byte header (format byte, int64 big-endian id) before the body (§3).

    The id is unused by ingestion; 0 is what task-agent-ng sent.
    """
    return bytes((fmt,)) + struct.pack(">q", msg_id) + body


def encode_message(points: Sequence[Point]) -> bytes:
    """The whole ``rt-metric-binary`` body for ``points``."""
    return envelope(encode_points(points))


def snappy_frame(data: bytes) -> bytes:
    """The Snappy *framing* (stream) format the gateway's ``snappy.NewReader`` expects (§4.2).

    A raw snappy block would fail on the gateway with "snappy: corrupt input";
    ``cramjam.snappy.compress`` writes the framed format (``compress_raw`` is the block).
    """
    return bytes(cramjam.snappy.compress(data))
