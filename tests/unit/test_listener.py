"""The server's listening socket."""
from __future__ import annotations

from taskd.server.assembly import with_backlog


def test_listeners_get_a_deep_backlog_unless_the_operator_set_one():
    assert with_backlog("tcp:8082") == "tcp:8082:backlog=1024"
    assert with_backlog("tcp:8082:interface=127.0.0.1") == "tcp:8082:interface=127.0.0.1:backlog=1024"
    assert with_backlog("tcp:8082:backlog=64") == "tcp:8082:backlog=64"
    assert with_backlog("unix:/run/taskd.sock") == "unix:/run/taskd.sock"
