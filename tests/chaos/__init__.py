"""Chaos scenarios: faults injected into a real cluster (servers, nginx, agents) that the
suite starts itself, each ending with a check of the end state (issue 11, item 7)."""
