"""twistd plugins for taskd; tiny, because twistd imports every plugin file just
to list them. A ``taskagent`` maker will sit beside ``taskserver``."""
from taskd.server.plugin import TaskServerMaker

taskserver = TaskServerMaker()
