"""``twistd taskserver``: the task-server's command line (see taskd.daemon)."""
from __future__ import annotations

from typing import Any

from twisted.application.service import IService, IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer

from taskd.daemon import DaemonMaker, options_class
from taskd.server.settings import DEFAULT_CONFIG_PATH, ENV_PREFIX, SERVER_OPTIONS, load_server_settings

ServerOptions = options_class(
    "ServerOptions", table=SERVER_OPTIONS, env_prefix=ENV_PREFIX, default_config=DEFAULT_CONFIG_PATH,
    what="Runs the task-server: the REST API and the agents' websocket on one port.",
)


@implementer(IServiceMaker, IPlugin)
class TaskServerMaker(DaemonMaker):
    tapname = "taskserver"
    description = "taskd task-server: REST API and agent websocket"
    options = ServerOptions

    def load(self, path: str, env: Any, flags: dict[str, str]) -> Any:
        return load_server_settings(path=path, env=env, flags=flags)

    def build(self, settings: Any) -> IService:
        # Imported here: it pulls in the database and web stacks, which listing
        # twistd's plugins or parsing flags should not pay for.
        from taskd.server.assembly import make_service

        return make_service(settings)
