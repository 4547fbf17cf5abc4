"""taskd: task-server and task-agent for metric collection tasks."""

__version__ = "0.1.0"
