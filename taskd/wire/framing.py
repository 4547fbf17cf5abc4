"""The binary event frame of the agent websocket (section 5 of the reference).

    offset 0   1 byte   format version, 0
    offset 1   1 byte   length N of the event name (1..255)
    offset 2   N bytes  event name, ASCII
    offset 2+N rest     payload (JSON for every event taskd knows; may be empty)

The server and the agent both import this module, so a change to the framing is one
change. `decode` rejects everything the original rejected (a frame shorter than 9 bytes,
another version, a length that overruns the frame) and a name that is not printable
ASCII, raising `FrameError` with the reason so the caller can log it against the agent.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

FORMAT_VERSION = 0
MIN_FRAME = 9  # the original refused anything shorter

# Server -> agent
HEARTBEAT = "heartbeat"
TASK_LIST = "taskList"
TASK_ADD = "taskAdd"
TASK_UPDATE = "taskUpdate"
TASK_REMOVE = "taskRemove"
RUN_TASK = "runTask"  # run this task once, now, and answer (docs/protocol.md); see FEATURES
# Agent -> server
CATALOG = "catalog"
TASK_STATUS = "taskStatus"  # per-task status (docs/protocol.md); old agents never send it
RUN_RESULT = "runResult"  # the answer to a runTask

# taskStatus outcomes (docs/protocol.md): what the agent sends and the server stores.
from taskd.outcomes import STATUS_ERROR, STATUS_OK, STATUS_OUTCOMES, STATUS_PENDING  # noqa: E402,F401

SERVER_EVENTS = frozenset({HEARTBEAT, TASK_LIST, TASK_ADD, TASK_UPDATE, TASK_REMOVE, RUN_TASK})
AGENT_EVENTS = frozenset({CATALOG, TASK_STATUS, RUN_RESULT})

# The upgrade request header where an agent lists the optional events it understands
# (comma-separated): a server sends `runTask` only to agents that list it, and answers
# "unsupported" for the others (the Go agent, older taskd agents).
FEATURES_HEADER = "X-Taskd-Agent-Features"
FEATURE_RUN_TASK = RUN_TASK

PROTOCOL_VERSION = 1  # the <version> in /socket/<agent>/<version>


class FrameError(ValueError):
    """A frame that cannot be decoded; the message says why."""


@dataclass(frozen=True)
class Frame:
    event: str
    payload: bytes

    def json(self) -> Any:
        """The payload as JSON; FrameError if it is not."""
        try:
            return json.loads(self.payload.decode("utf-8")) if self.payload else None
        except (UnicodeDecodeError, ValueError) as exc:
            raise FrameError(f"{self.event} payload is not JSON: {exc}") from None


def encode(event: str, payload: bytes = b"") -> bytes:
    name = event.encode("ascii")
    if not 1 <= len(name) <= 255:
        raise ValueError(f"event name must be 1..255 bytes, not {len(name)}")
    return bytes((FORMAT_VERSION, len(name))) + name + payload


def encode_json(event: str, value: Any) -> bytes:
    return encode(event, json.dumps(value, separators=(",", ":")).encode("utf-8"))


def decode(frame: bytes) -> Frame:
    if len(frame) < MIN_FRAME:
        raise FrameError(f"frame of {len(frame)} bytes is shorter than the minimum {MIN_FRAME}")
    if frame[0] != FORMAT_VERSION:
        raise FrameError(f"unknown frame format version {frame[0]} (expected {FORMAT_VERSION})")
    n = frame[1]
    if n == 0 or 2 + n > len(frame):
        raise FrameError(f"event name length {n} does not fit a frame of {len(frame)} bytes")
    raw = frame[2 : 2 + n]
    if not all(0x21 <= b <= 0x7E for b in raw):
        raise FrameError("event name is not printable ASCII")
    return Frame(raw.decode("ascii"), bytes(frame[2 + n :]))
