"""What `twistd taskserver` and `twistd taskagent` share: flags generated from a
settings table, one-line start-up errors, and the log-level filter.

The flags come from the same table as the file keys and environment variables, so every
key has a flag of the same name and help, and no flag exists that the file lacks. Flags
default to None so only those actually given override the file and the environment.
Settings are loaded in makeService rather than while parsing, so a config error is one
line on stderr and exit status 2, not twistd's usage dump; a start-up error (database
unreachable, …) is one line and exit status 1.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Iterable, NoReturn

from twisted.application.service import IService
from twisted.python import usage

from taskd import logsetup
from taskd.config import ConfigError, Option, usage_parameters


class StartupError(Exception):
    """Start-up cannot continue; the message is one line for the operator."""


class DaemonOptions(usage.Options):
    table: tuple[Option, ...] = ()
    env_prefix = ""

    def __init__(self) -> None:
        super().__init__()
        self.log_predicate = logsetup.make_predicate()
        self.log_style = logsetup.LogStyle()

    def flags(self) -> dict[str, str]:
        """The settings flags given on the command line."""
        names = {row[0] for row in usage_parameters(self.table, self.env_prefix)}
        return {k: v for k, v in self.items() if k in names and v is not None}

    def postOptions(self) -> None:
        logsetup.install_twistd_logger(getattr(self, "parent", None), self.log_predicate,
                                       self.log_style)


def options_class(name: str, *, table: Iterable[Option], env_prefix: str, default_config: str,
                  what: str) -> type[DaemonOptions]:
    table = tuple(table)
    longdesc = (
        f"{what} Settings come from, lowest precedence first: built-in defaults, the config "
        "file (flat 'key = value' lines; [stats] enabled/addr/type also accepted), "
        f"environment variables ({env_prefix} + the key upper-cased with '-' as '_', "
        f"e.g. {env_prefix}LOG_LEVEL), then these flags. A missing config file means defaults."
    )
    return type(name, (DaemonOptions,), {
        "table": table,
        "env_prefix": env_prefix,
        "longdesc": longdesc,
        "optParameters": [
            ["config", "c", default_config, "INI file to read settings from."],
            *usage_parameters(table, env_prefix),
        ],
    })


class DaemonMaker:
    """Subclasses set tapname/description/options and implement load() and build()."""

    tapname = ""
    description = ""
    options: type[DaemonOptions] = DaemonOptions

    def load(self, path: str, env: Any, flags: dict[str, str]) -> Any:
        raise NotImplementedError

    def build(self, settings: Any) -> IService:
        raise NotImplementedError

    def makeService(self, options: DaemonOptions, *, env: Any = None, stderr: Any = None) -> IService:
        try:
            settings = self.load(options["config"], os.environ if env is None else env, options.flags())
        except ConfigError as e:
            self._fail(f"config error: {e}", 2, stderr)
        logsetup.set_level(options.log_predicate, settings.log_level)
        options.log_style.format = getattr(settings, "log_format", "text")
        try:
            return self.build(settings)
        except StartupError as e:
            self._fail(f"start-up error: {e}", 1, stderr)

    def _fail(self, line: str, status: int, stderr: Any) -> NoReturn:
        out = sys.stderr if stderr is None else stderr
        out.write(f"{self.tapname}: {line}\n")
        out.flush()
        raise SystemExit(status)


