"""What travels between task-server and task-agent; shared by both so they cannot drift."""
