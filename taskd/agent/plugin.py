"""``twistd taskagent``: the task-agent's command line (see taskd.daemon)."""
from __future__ import annotations

from typing import Any

from twisted.application.service import IService, IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer

from taskd.agent.settings import AGENT_OPTIONS, DEFAULT_CONFIG_PATH, ENV_PREFIX, load_agent_settings
from taskd.daemon import DaemonMaker, options_class

AgentOptions = options_class(
    "AgentOptions", table=AGENT_OPTIONS, env_prefix=ENV_PREFIX, default_config=DEFAULT_CONFIG_PATH,
    what="Runs the task-agent: keeps a websocket to the task-server and runs its tasks through Snap"
         " (executor = snap) or its built-in collectors (executor = builtin).",
)


@implementer(IServiceMaker, IPlugin)
class TaskAgentMaker(DaemonMaker):
    tapname = "taskagent"
    description = "taskd task-agent: runs the tasks a task-server hands it"
    options = AgentOptions

    def load(self, path: str, env: Any, flags: dict[str, str]) -> Any:
        return load_agent_settings(path=path, env=env, flags=flags)

    def build(self, settings: Any) -> IService:
        from taskd.agent.assembly import make_service

        return make_service(settings)
