"""The value types a configuration key can have: raw text in, a checked value out.

Each parser raises ``ValueError`` with a message that completes "<key> ..." and never
quotes the raw text (it may be a secret); :mod:`taskd.config` adds the key and where the
value came from. Listen addresses are checked here, with Twisted's own endpoint parser,
so a bad ``addr`` stops the daemon at start-up instead of when it binds.
"""
from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import getPlugins

from taskd.timeutil import parse_go_duration

Parser = Callable[[str], Any]
"""Raw text → value, or ValueError("is not an integer"): never quoting the text."""


def int_range(lo: int | None = None, hi: int | None = None) -> Parser:
    def parse_int(raw: str) -> int:
        if not re.fullmatch(r"[+-]?\d+", raw.strip()):
            raise ValueError("is not an integer")
        n = int(raw)
        if (lo is not None and n < lo) or (hi is not None and n > hi):
            raise ValueError(f"is not in {lo}..{hi}" if None not in (lo, hi) else
                             f"is not >= {lo}" if lo is not None else f"is not <= {hi}")
        return n
    return parse_int


_BOOLS = {**dict.fromkeys(("true", "1", "yes", "on"), True),
          **dict.fromkeys(("false", "0", "no", "off"), False)}


def parse_bool(raw: str) -> bool:
    try:
        return _BOOLS[raw.strip().lower()]
    except KeyError:
        raise ValueError("is not a boolean (true/false, 1/0, yes/no, on/off)") from None


_SECONDS = re.compile(r"\d+(?:\.\d*)?|\.\d+")


def parse_duration(raw: str) -> float:
    """Go duration (``1m30s``, ``500ms``) or plain seconds (``2.5``) → seconds."""
    text = raw.strip()
    if _SECONDS.fullmatch(text):
        return float(text)
    try:
        return parse_go_duration(text) / 1e9
    except ValueError:
        raise ValueError("is not a duration such as 30s, 5m, 1m30s, 500ms or plain seconds") from None


def int_list(lo: int | None = None, hi: int | None = None) -> Parser:
    def parse_int_list(raw: str) -> tuple[int, ...]:
        try:
            return tuple(map(int_range(lo, hi), raw.split(","))) if raw.strip() else ()
        except ValueError as e:
            raise ValueError(f"has an item that {e.args[0]} (want 1,2,...)") from None
    return parse_int_list


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "kb": 1000,
               "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
               "g": 1024**3, "gib": 1024**3, "gb": 1000**3}


def byte_size(lo: int | None = None, hi: int | None = None) -> Parser:
    """Bytes; ``k``/``M``/``G`` and ``KiB``/``MiB``/``GiB`` are powers of 1024,
    ``kB``/``MB``/``GB`` powers of 1000."""
    def parse_byte_size(raw: str) -> int:
        m = _SIZE.fullmatch(raw.strip())
        if not m or m[2].lower() not in _SIZE_UNITS:
            raise ValueError("is not a size such as 1048576, 512k, 1M or 1MiB")
        size = float(m[1]) * _SIZE_UNITS[m[2].lower()]
        if size != int(size):
            raise ValueError("is not a whole number of bytes")
        return int_range(lo, hi)(str(int(size)))
    return parse_byte_size


def choice(*values: str) -> Parser:
    def parse_choice(raw: str) -> str:
        for value in values:
            if raw.strip().lower() == value.lower():
                return value
        raise ValueError(f"is not one of {'|'.join(values)}")
    return parse_choice


def url(*schemes: str) -> Parser:
    def parse_url(raw: str) -> str:
        text = raw.strip()
        try:
            parts = urlsplit(text)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise ValueError("is not a valid URL") from None
        if parts.scheme.lower() not in schemes:
            raise ValueError(f"is not a {' or '.join(s + '://' for s in schemes)} URL")
        if not parts.hostname:
            raise ValueError("has no host")
        return text
    return parse_url


def _port(text: str, lo: int = 0) -> int:
    port = int(text)
    if not lo <= port <= 65535:
        raise ValueError(f"has a port number outside {lo}..65535")
    return port


def _escape(value: str) -> str:
    """Quote a value for a Twisted endpoint description."""
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


_ADDR_FORMS = "is not :PORT, HOST:PORT or a Twisted endpoint string"
_HOST_PORT = re.compile(r"([^\s:\[\]]*):(\d+)")
_V6_PORT = re.compile(r"\[([^\]\s]+)\]:(\d+)")


_BUILTIN_SERVER_TYPES = ("tcp", "unix", "ssl")  # serverFromString's own; others are plugins


def _endpoint_type(text: str) -> str | None:
    """The endpoint type ``text`` starts with, if Twisted knows it (built in or
    plugin, matched case-insensitively as serverFromString does)."""
    kind = text.split(":", 1)[0]
    if kind in _BUILTIN_SERVER_TYPES:
        return kind
    if any(p.prefix.lower() == kind.lower() for p in getPlugins(IStreamServerEndpointStringParser)):
        return kind.lower()
    return None


def _strports_args(text: str) -> tuple[list[str], dict[str, str]]:
    """A strports description → (positional, keyword) arguments: ``:`` separates,
    the first ``=`` of a part names it, a backslash escapes the next character."""
    parts: list[list[str]] = [[""]]
    escaped = False
    for ch in text:
        if escaped:
            parts[-1][-1] += ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append([""])
        elif ch == "=" and len(parts[-1]) == 1:
            parts[-1].append("")
        else:
            parts[-1][-1] += ch
    if escaped:
        raise ValueError(_ADDR_FORMS)
    args = [p[0] for p in parts if len(p) == 1]
    return args, {p[0]: p[1] for p in parts if len(p) == 2}


def parse_listen_addr(raw: str) -> str:
    """Go-style listen address or Twisted server endpoint → endpoint description."""
    text = raw.strip()
    if m := _V6_PORT.fullmatch(text):
        try:
            ipaddress.IPv6Address(m[1])
        except ValueError:
            raise ValueError(_ADDR_FORMS) from None
        return f"tcp6:{_port(m[2])}:interface={_escape(m[1])}"
    kind = _endpoint_type(text) if text else None
    if kind is None:
        if not (m := _HOST_PORT.fullmatch(text)):
            raise ValueError(_ADDR_FORMS)
        port = _port(m[2])
        return f"tcp:{port}:interface={m[1]}" if m[1] else f"tcp:{port}"
    args, kwargs = _strports_args(text)
    first = args[1] if len(args) > 1 else kwargs.get("address" if kind == "unix" else "port")
    try:
        if kind in ("tcp", "unix"):  # ssl reads the certificate files, plugins act: not now
            serverFromString(None, text)
        if kind in ("tcp", "tcp6", "ssl"):
            _port(first)
        elif kind == "unix" and not first:
            raise ValueError(_ADDR_FORMS)
    except TypeError:
        raise ValueError(_ADDR_FORMS) from None
    except ValueError as e:
        raise ValueError(e.args[0] if "port number" in str(e) else _ADDR_FORMS) from None
    return text


def parse_host_port(raw: str) -> str:
    """A ``HOST:PORT`` or ``[IPv6]:PORT`` to connect to, returned unchanged."""
    text = raw.strip()
    m = _V6_PORT.fullmatch(text) or _HOST_PORT.fullmatch(text)
    if not m or not m[1]:
        raise ValueError("is not HOST:PORT")
    _port(m[2], lo=1)
    return text
