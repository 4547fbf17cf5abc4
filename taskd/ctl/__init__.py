"""`taskctl`: the task-server's REST API from a terminal."""
