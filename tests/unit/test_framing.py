"""The agent websocket's binary frame, and each way a frame can be malformed."""
from __future__ import annotations

import pytest

from taskd.wire import framing
from taskd.wire.framing import Frame, FrameError, decode, encode, encode_json


def test_layout_matches_the_reference():
    assert encode("taskAdd", b'{"id":1}') == b"\x00\x07taskAdd" + b'{"id":1}'


def test_round_trip_with_json_payload():
    frame = decode(encode_json("taskList", [{"id": 1}]))
    assert frame == Frame("taskList", b'[{"id":1}]')
    assert frame.json() == [{"id": 1}]


def test_empty_payload_is_allowed():
    frame = decode(encode("heartbeat"))
    assert frame.event == "heartbeat" and frame.payload == b"" and frame.json() is None


@pytest.mark.parametrize("raw", [b"", b"\x00", b"\x00\x07catalo", b"\x00\x03abc"])
def test_frames_shorter_than_nine_bytes_are_rejected(raw):
    with pytest.raises(FrameError, match="shorter than the minimum 9"):
        decode(raw)


def test_other_format_versions_are_rejected():
    with pytest.raises(FrameError, match="format version 1"):
        decode(b"\x01\x07catalog[]")


@pytest.mark.parametrize("raw", [b"\x00\x00catalog[]", b"\x00\xffcatalog[]", b"\x00\x0ccatalog[]"])
def test_bad_name_lengths_are_rejected(raw):
    with pytest.raises(FrameError, match="does not fit"):
        decode(raw)


@pytest.mark.parametrize("name", [b"cat alog", b"cat\x00log", "catalög".encode()[:7]])
def test_non_printable_names_are_rejected(name):
    with pytest.raises(FrameError, match="printable ASCII"):
        decode(b"\x00" + bytes([len(name)]) + name + b"[]")


def test_payload_that_is_not_json_raises_frame_error():
    with pytest.raises(FrameError, match="catalog payload is not JSON"):
        decode(encode("catalog", b"{nope")).json()
    with pytest.raises(FrameError):
        decode(encode("catalog", b"\xff\xfe")).json()


def test_encode_refuses_impossible_names():
    with pytest.raises(ValueError):
        encode("")
    with pytest.raises(ValueError):
        encode("x" * 256)


def test_event_name_sets():
    assert framing.CATALOG in framing.AGENT_EVENTS
    assert {"heartbeat", "taskList", "taskAdd", "taskUpdate", "taskRemove", "runTask"} == framing.SERVER_EVENTS
    assert {"catalog", "taskStatus", "runResult"} == framing.AGENT_EVENTS
