"""The built-in executor: collectors run in the agent's reactor, points go to a publisher."""
