"""The tsdb-gw binary format: test vectors and bytes of docs/tsdb-gw.md §2.4 and §3.3,
and the msgpack forms the gateway's decoder accepts (§2.2)."""
from __future__ import annotations

import struct

import cramjam
import msgpack
import pytest

from taskd.agent.builtin.collector import Point
from taskd.agent.builtin.metricdata import (encode_message, encode_point, encode_points, envelope,
                                            invalid_reason, metric_id, pack_array_header, pack_float,
                                            pack_int, pack_str, snappy_frame)

NS1 = "raintank.apps.ns1.zones.example-com.qps"
VECTOR_A = Point(org_id=1, name=NS1, value=1.5, time=1500000000, interval=60, unit="ms", mtype="gauge")


@pytest.mark.parametrize("args, expected", [
    ((1, NS1, "ms", "gauge", 60, []), "1.70418cbc67ae889195a8d97d9c0d0e4e"),
    ((42, "intel.procfs.cpu.all.user_percentage", "", "gauge", 10,
      ["plugin_running_on:agent1", "dc:ams"]), "42.822efd3f61e74be71f958e67269513e3"),
    ((1, "some.metric", "unknown", "gauge", 10, ["host=web01", "env=prod"]), "1.07987a332ecbac48cf65d0227b3a1a3e"),
    ((1, "dummy", "P", "gauge", 60, ["hostname=phall-sandbox"]), "1.35fe936049e9cf9fc0453685dc3ba566"),
    ((1, "a", "P", "gauge", 60, []), "1.d9c98f4457b6aa06a08e401b0fbc977f"),
], ids=["A", "B", "C", "D1", "D2"])
def test_id_vectors(args, expected):
    assert metric_id(*args) == expected


def test_id_does_not_depend_on_tag_order():
    assert metric_id(1, "m", "", "gauge", 10, ["b=2", "a=1"]) == metric_id(1, "m", "", "gauge", 10, ["a=1", "b=2"])
    assert metric_id(1, "m", "", "gauge", 10, ["a=1"]) != metric_id(1, "m", "", "gauge", 10, ["a=2"])


def test_the_212_byte_message_of_section_1_3():
    msg = encode_message([VECTOR_A])
    assert len(msg) == 212
    assert msg[:9] == bytes.fromhex("01 0000000000000000")
    assert msg[9:11] == b"\x91\x8a"
    expected_record = b"".join([
        b"\x8a",
        bytes.fromhex("a24964 d922") + b"1.70418cbc67ae889195a8d97d9c0d0e4e",
        bytes.fromhex("a54f72674964 01"),
        bytes.fromhex("a44e616d65 d927") + NS1.encode(),
        bytes.fromhex("a64d6574726963 d927") + NS1.encode(),
        bytes.fromhex("a8496e74657276616c 3c"),
        bytes.fromhex("a556616c7565 cb3ff8000000000000"),
        bytes.fromhex("a4556e6974 a26d73"),
        bytes.fromhex("a454696d65 d259682f00"),
        bytes.fromhex("a54d74797065 a56761756765"),
        bytes.fromhex("a454616773 90"),
    ])
    assert len(expected_record) == 202
    assert msg[10:] == expected_record


def test_snappy_framing_of_the_212_byte_message():
    """§5.2: stream identifier, then an uncompressed chunk with the masked CRC-32C given."""
    framed = snappy_frame(encode_message([VECTOR_A]))
    assert framed[:10] == bytes.fromhex("ff060000734e61507059")
    assert framed[10:18] == bytes.fromhex("01 d80000 3d121aa9")
    assert bytes(cramjam.snappy.decompress(framed)) == encode_message([VECTOR_A])


def test_large_messages_survive_the_framing():
    points = [Point(1, f"some.metric.{i}", i * 0.5, 1500000000 + i, 10) for i in range(5000)]
    raw = encode_message(points)
    assert len(raw) > 65536  # several chunks
    assert bytes(cramjam.snappy.decompress(snappy_frame(raw))) == raw


@pytest.mark.parametrize("value, encoded", [
    (0, "00"), (60, "3c"), (127, "7f"), (128, "d10080"), (200, "d100c8"), (300, "d1012c"),
    (32767, "d17fff"), (32768, "d200008000"), (2 ** 31 - 1, "d27fffffff"),
    (2 ** 31, "d30000000080000000"), (1500000000, "d259682f00"),
    (-1, "ff"), (-32, "e0"), (-33, "d0df"), (-128, "d080"), (-129, "d1ff7f"),
    (-(2 ** 31), "d280000000"), (-(2 ** 31) - 1, "d3ffffffff7fffffff"),
])
def test_int_forms_are_the_smallest_signed_ones(value, encoded):
    raw = pack_int(value)
    assert raw.hex() == encoded
    assert raw[0] not in (0xCC, 0xCD, 0xCE, 0xCF)
    assert msgpack.unpackb(raw) == value


def test_record_ints_use_signed_forms_at_the_boundaries():
    for org, interval, ts in ((127, 128, 32767), (128, 32767, 32768), (2 ** 31 - 1, 60, 2 ** 31)):
        rec = encode_point(Point(org, "m", 1.0, ts, interval))
        decoded = msgpack.unpackb(rec)
        assert (decoded["OrgId"], decoded["Interval"], decoded["Time"]) == (org, interval, ts)
        assert pack_int(org) + b"\xa4Name" in rec
        assert b"\xa8Interval" + pack_int(interval) in rec and b"\xa4Time" + pack_int(ts) in rec


def test_value_is_always_float64():
    rec = encode_point(Point(1, "m", 3, 1500000000, 10))  # an int value from a collector
    assert b"\xa5Value\xcb" + struct.pack(">d", 3.0) in rec
    assert pack_float(-0.25) == b"\xcb" + struct.pack(">d", -0.25)
    assert isinstance(msgpack.unpackb(rec)["Value"], float)


def test_str_family_lengths():
    assert pack_str("") == b"\xa0"
    assert pack_str("x" * 31) == b"\xbf" + b"x" * 31
    assert pack_str("x" * 32) == b"\xd9\x20" + b"x" * 32
    assert pack_str("x" * 255) == b"\xd9\xff" + b"x" * 255
    assert pack_str("x" * 256) == b"\xda\x01\x00" + b"x" * 256
    assert pack_str("x" * 65536)[:5] == b"\xdb\x00\x01\x00\x00"
    assert pack_str("é") == b"\xa2\xc3\xa9"  # length in UTF-8 bytes
    for n in (0, 31, 32, 255, 256, 70000):
        assert msgpack.unpackb(pack_str("y" * n)) == "y" * n


def test_array_headers():
    assert pack_array_header(0) == b"\x90"
    assert pack_array_header(15) == b"\x9f"
    assert pack_array_header(16) == b"\xdc\x00\x10"
    assert pack_array_header(65535) == b"\xdc\xff\xff"
    assert pack_array_header(65536) == b"\xdd\x00\x01\x00\x00"
    points = [Point(1, "m", 1.0, 1500000000, 10)] * 20
    assert encode_points(points)[:3] == b"\xdc\x00\x14"
    assert len(msgpack.unpackb(encode_points(points))) == 20


def test_tags_are_sorted_and_hashed_as_sent():
    p = Point(1, "some.metric", 2.0, 1500000000, 10, unit="unknown", tags=("host=web01", "env=prod"))
    decoded = msgpack.unpackb(encode_point(p))
    assert decoded["Tags"] == ["env=prod", "host=web01"]
    assert decoded["Id"] == "1.07987a332ecbac48cf65d0227b3a1a3e"  # vector C
    assert list(decoded) == ["Id", "OrgId", "Name", "Metric", "Interval", "Value", "Unit", "Time", "Mtype", "Tags"]
    assert decoded["Name"] == decoded["Metric"] == "some.metric"


def test_an_empty_mtype_is_sent_and_hashed_as_gauge():
    decoded = msgpack.unpackb(encode_point(Point(1, "a", 1.0, 1, 60, unit="P", mtype="")))
    assert decoded["Mtype"] == "gauge"
    assert decoded["Id"] == "1.d9c98f4457b6aa06a08e401b0fbc977f"  # vector D2


def test_envelope():
    assert envelope(b"xyz") == b"\x01" + b"\x00" * 8 + b"xyz"
    assert envelope(b"", fmt=0, msg_id=-1) == b"\x00" + b"\xff" * 8


@pytest.mark.parametrize("point, reason", [
    (Point(0, "m", 1.0, 1, 10), "org-id cannot be 0"),
    (Point(1, "m", 1.0, 1, 0), "interval cannot be 0"),
    (Point(1, "", 1.0, 1, 10), "name cannot be empty"),
    (Point(1, "m", 1.0, 1, 10, mtype="histogram"), "invalid mtype"),
    (Point(1, "m", 1.0, 1, 10, tags=("dc:ams",)), "invalid tag"),
    (Point(1, "m", 1.0, 1, 10, tags=("=v",)), "invalid tag"),
    (Point(1, "m", 1.0, 1, 10, tags=("k=",)), "invalid tag"),
    (Point(1, "m", 1.0, 1, 10, tags=("k!=v",)), "invalid tag"),
    (Point(1, "m", 1.0, 1, 10, tags=("k=a;b",)), "invalid tag"),
    (Point(1, "m", None, 1, 10), "value None is not a finite number"),  # type: ignore[arg-type]
    (Point(1, "m", "n/a", 1, 10), "value 'n/a' is not a finite number"),  # type: ignore[arg-type]
    (Point(1, "m", float("nan"), 1, 10), "value nan is not a finite number"),
    (Point(1, "m", float("-inf"), 1, 10), "value -inf is not a finite number"),
    (Point(1, "m", 10 ** 400, 1, 10), "is not a finite number"),
])
def test_invalid_points_are_named(point, reason):
    assert reason in (invalid_reason(point) or "")


def test_valid_points_pass():
    assert invalid_reason(Point(1, "m", 1.0, 1, 10, mtype="", tags=("k=v", "a==", "x=!y"))) is None
    assert invalid_reason(Point(-5, "m", 1.0, 1, -10, mtype="counter")) is None
