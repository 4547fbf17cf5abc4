"""Configuration loading shared by the task-server and the task-agent.

The Go daemons used globalconf: a flat INI file, environment variables and flags,
all spelling the same keys. Operators have files and container environments
written for that, so we keep the spellings and the precedence (explicit flags win):

    defaults < config file < environment variables < command-line flags

Variables are the prefix plus the key upper-cased, "-" → "_" (TASKSERVER_ADDR;
aliases too). Empty ones are ignored, as globalconf did, so an unset compose
variable does not blank a file value.

Every value is parsed by its key's type at start-up, so a typo stops the daemon
with one line naming the key, the problem and its source (file and line, variable
or flag) rather than failing later. Values are checked in every source, even where
a higher one overrides them. Secret values are never echoed (the original logged
its admin key in clear). ``#``/``;`` start comments only at the start of a line, as
passwords may contain them; values cannot span lines.
"""
from __future__ import annotations

import configparser
import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import getPlugins

from taskd.timeutil import parse_go_duration

Parser = Callable[[str], Any]
"""Raw text → value, or ValueError("is not an integer"): never quoting the text."""


class ConfigError(Exception):
    """A configuration problem, rendered as one line fit for an operator."""

    def __init__(self, key: str, message: str, origin: str | None = None) -> None:
        super().__init__(key, message, origin)
        self.key, self.message, self.origin = key, message, origin

    def __str__(self) -> str:
        text = f"{self.key}: {self.message}"
        if self.origin:
            text += f" (from {self.origin})"
        return " ".join(text.splitlines())


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


@dataclass(frozen=True)
class Option:
    """One key. ``default`` is written as in the file and parsed like any value."""

    name: str
    parse: Parser = str
    default: str = ""
    help: str = ""
    aliases: tuple[str, ...] = ()
    sections: tuple[tuple[str, str], ...] = ()  # e.g. (("stats", "addr"),)
    secret: bool = False
    redact: Callable[[str], str] | None = None  # how a secret may be shown

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")

    def env_var(self, prefix: str, spelling: str | None = None) -> str:
        return prefix + (spelling or self.name).upper().replace("-", "_")

    def show(self, raw: str) -> str:
        if not self.secret:
            return repr(raw)
        return repr(self.redact(raw)) if self.redact else "value (not shown)"

    def describe(self, env_prefix: str) -> str:
        default = self.default if self.default else "empty"
        return f"{self.help} Default: {default}. Env: {self.env_var(env_prefix)}."


def usage_parameters(options: Iterable[Option], env_prefix: str) -> list[list[Any]]:
    """``optParameters`` rows for a twistd plugin: one ``--key`` per key and alias,
    all defaulting to None so that only flags actually given override the file."""
    return [row for opt in options for row in (
        [opt.name, None, None, opt.describe(env_prefix)],
        *([alias, None, None, f"Alias of --{opt.name}."] for alias in opt.aliases))]


@dataclass(frozen=True)
class _Raw:
    value: str
    origin: str  # "FILE line N", "TASKSERVER_ADDR", "--addr"
    spelling: str


class Loaded(dict[str, Any]):
    """Parsed values by key name; ``origins`` says where each came from."""

    def __init__(self, path: str | None, file_missing: bool) -> None:
        super().__init__()
        self.path, self.file_missing, self.origins = path, file_missing, {}


_TOP = "\x00top"  # synthetic section for the flat part of the file


def _spellings(options: list[Option]) -> dict[str, Option]:
    return {spelling: o for o in options for spelling in (o.name, *o.aliases)}


def _put(layer: dict[str, _Raw], opt: Option, raw: _Raw) -> None:
    if opt.name in layer:
        first = layer[opt.name]
        raise ConfigError(raw.spelling, f"sets {opt.name} again; "
                          f"{first.spelling} already set it at {first.origin}", raw.origin)
    layer[opt.name] = raw


def _key_lines(text: str) -> dict[tuple[str, str], int]:
    """Line number of each (section, key) in a file configparser accepted."""
    section, lines = _TOP, {}
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if m := re.match(r"\[(.+)\]", stripped):
            section = m[1]
            lines.setdefault((section, ""), n)
        elif "=" in stripped:
            lines.setdefault((section, stripped.split("=", 1)[0].strip().lower()), n)
    return lines


def read_ini(path: str, options: Iterable[Option], *, only_known: bool = False) -> dict[str, _Raw] | None:
    """Raw values from the file by key name; None when there is no such file.
    `only_known`: skip the keys and sections of other options (a tool that reads a
    few keys of a daemon's file) instead of refusing them; a key that looks like a
    misspelling of one of `options` is still refused, or the tool would quietly use
    that option's default (say, another database)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or "not UTF-8 text"
        raise ConfigError("config", f"cannot read the file: {reason}", path) from None
    parser = configparser.RawConfigParser(
        delimiters=("=",), comment_prefixes=("#", ";"), inline_comment_prefixes=None,
        strict=True, empty_lines_in_values=False, interpolation=None,
        default_section="\x00default")
    try:
        parser.read_string(f"[{_TOP}]\n{text}", source=path)
    except configparser.DuplicateOptionError as e:
        key = e.option if e.section == _TOP else f"[{e.section}] {e.option}"
        raise ConfigError(key, "is set twice", f"{path} line {e.lineno - 1}") from None
    except configparser.DuplicateSectionError as e:
        raise ConfigError(f"[{e.section}]", "section appears twice",
                          f"{path} line {e.lineno - 1}") from None
    except configparser.ParsingError as e:  # the first bad line is enough
        raise ConfigError("config", "line is not 'key = value', a [section] or a comment",
                          f"{path} line {e.errors[0][0] - 1}") from None
    except configparser.Error as e:
        raise ConfigError("config", f"not an INI file ({type(e).__name__})", path) from None

    options = list(options)
    spellings = _spellings(options)
    by_section: dict[str, dict[str, Option]] = {}
    for opt in options:
        for section, key in opt.sections:
            by_section.setdefault(section, {})[key] = opt
    lines = _key_lines(text)
    layer: dict[str, _Raw] = {}
    for section in parser.sections():
        known = spellings if section == _TOP else by_section.get(section.lower())
        if known is None and only_known:
            continue
        if known is None:
            raise ConfigError(f"[{section}]", "is not a known section; the only one is "
                              + ", ".join(f"[{s}]" for s in by_section),
                              f"{path} line {lines.get((section, ''), 0)}")
        where = "" if section == _TOP else f"[{section}] "
        for key, value in parser.items(section):
            origin = f"{path} line {lines.get((section, key), 0)}"
            opt = known.get(key)
            if opt is None and only_known and not difflib.get_close_matches(key, list(known), n=1, cutoff=0.8):
                continue
            if opt is None:
                close = difflib.get_close_matches(key, list(known), n=1)
                hint = f"; did you mean {where}{close[0]}?" if close else ""
                raise ConfigError(f"{where}{key}", f"is not a known key{hint}", origin)
            if "\n" in value:
                raise ConfigError(opt.name, f"{opt.show(value)} continues on the next,"
                                  " indented line; values must fit on one line", origin)
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            _put(layer, opt, _Raw(value, origin, f"{where}{key}"))
    return layer


def _parse_value(opt: Option, raw: _Raw) -> Any:
    try:
        return opt.parse(raw.value)
    except ValueError as e:
        raise ConfigError(opt.name, f"{opt.show(raw.value)} {e.args[0]}", raw.origin) from None


def load(options: Iterable[Option], *, path: str | None = None,
         env: Mapping[str, str] = os.environ, env_prefix: str = "TASKSERVER_",
         flags: Mapping[str, str | None] | None = None, only_known: bool = False) -> Loaded:
    """Merge defaults < file ``path`` < ``env`` < ``flags`` into parsed values.

    ``flags`` maps key names or aliases (as given after ``--``) to their text;
    None values count as not given. A missing file means defaults.
    """
    options = list(options)
    spellings = _spellings(options)
    file_layer = read_ini(path, options, only_known=only_known) if path is not None else None
    env_layer: dict[str, _Raw] = {}
    for spelling, opt in spellings.items():
        if env.get(var := opt.env_var(env_prefix, spelling)):
            _put(env_layer, opt, _Raw(env[var], var, var))
    flag_layer: dict[str, _Raw] = {}
    for key, value in (flags or {}).items():
        flag = "--" + key.replace("_", "-")
        if (opt := spellings.get(flag[2:])) is None:
            raise ConfigError(flag, "is not a known option")
        if value is not None:
            _put(flag_layer, opt, _Raw(value, flag, flag))

    result = Loaded(path, file_missing=path is not None and file_layer is None)
    for opt in options:
        for raw in (_Raw(opt.default, "default", opt.name), *(
                layer[opt.name] for layer in (file_layer or {}, env_layer, flag_layer)
                if opt.name in layer)):
            result[opt.name], result.origins[opt.name] = _parse_value(opt, raw), raw.origin
    return result
