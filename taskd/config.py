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
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from taskd.configtypes import Parser


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
