"""twistd plugins for taskd; tiny, because twistd imports every plugin file just
to list them."""
from taskd.agent.plugin import TaskAgentMaker
from taskd.server.plugin import TaskServerMaker

taskserver = TaskServerMaker()
taskagent = TaskAgentMaker()
