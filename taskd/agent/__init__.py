"""The task-agent: holds a websocket to a task-server and runs the tasks it is handed."""
