"""``twistd taskserver``: the task-server's command line.

The flags are generated from the settings table so that every key has a flag of
the same name, with the same help, and no flag exists that the file lacks. Flags
default to None so that only the ones actually given override the file and the
environment. Settings are loaded in makeService rather than while parsing, so a
config error is one line on stderr and exit status 2, not twistd's usage dump.
"""
from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

from twisted.application.service import IService, IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer

from taskd import logsetup
from taskd.config import ConfigError, usage_parameters
from taskd.server.settings import (
    DEFAULT_CONFIG_PATH,
    ENV_PREFIX,
    SERVER_OPTIONS,
    load_server_settings,
)

_FLAG_NAMES = frozenset(row[0] for row in usage_parameters(SERVER_OPTIONS, ENV_PREFIX))


class ServerOptions(usage.Options):
    longdesc = (
        "Runs the task-server: the REST API and the agents' websocket on one port. "
        "Settings come from, lowest precedence first: built-in defaults, the config "
        "file (flat 'key = value' lines; [stats] enabled/addr/type also accepted), "
        f"environment variables ({ENV_PREFIX} + the key upper-cased with '-' as '_', "
        f"e.g. {ENV_PREFIX}DB_CONNECT_STR), then these flags. A missing config file "
        "means defaults."
    )
    optParameters = [
        ["config", "c", DEFAULT_CONFIG_PATH, "INI file to read settings from."],
        *usage_parameters(SERVER_OPTIONS, ENV_PREFIX),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.log_predicate = logsetup.make_predicate()

    def flags(self) -> dict[str, str]:
        """The settings flags given on the command line."""
        return {k: v for k, v in self.items() if k in _FLAG_NAMES and v is not None}

    def postOptions(self) -> None:
        logsetup.install_twistd_logger(getattr(self, "parent", None), self.log_predicate)


@implementer(IServiceMaker, IPlugin)
class TaskServerMaker:
    tapname = "taskserver"
    description = "taskd task-server: REST API and agent websocket"
    options = ServerOptions

    def makeService(self, options: ServerOptions, *, env: Any = None,
                    stderr: Any = None) -> IService:
        try:
            settings = load_server_settings(
                path=options["config"], env=os.environ if env is None else env,
                flags=options.flags())
        except ConfigError as e:
            self._fail(f"config error: {e}", 2, stderr)
        logsetup.set_level(options.log_predicate, settings.log_level)
        # Imported here: it pulls in the database and web stacks, which listing
        # twistd's plugins or parsing flags should not pay for.
        from taskd.server.service import StartupError, make_service

        try:
            return make_service(settings)
        except StartupError as e:
            self._fail(f"start-up error: {e}", 1, stderr)

    def _fail(self, line: str, status: int, stderr: Any) -> NoReturn:
        out = sys.stderr if stderr is None else stderr
        out.write(f"{self.tapname}: {line}\n")
        out.flush()
        raise SystemExit(status)
