"""A MultiService that stops its children one at a time, in reverse order.

Twisted's MultiService stops every child at once. taskd's children depend on each
other on the way down: the sessions must close their sockets and record agents offline
while the event transport and the database pool still run. So each child's stop
Deferred is awaited before the next child is stopped (as Buildbot's AsyncMultiService
does), and a failing child is logged without keeping the others from stopping.
"""
from __future__ import annotations

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.logger import Logger


class OrderedMultiService(MultiService):
    log = Logger()

    @inlineCallbacks
    def stopService(self) -> Deferred:
        self.running = 0
        for child in reversed(list(self)):
            try:
                yield maybeDeferred(child.stopService)
            except Exception:
                self.log.failure("stopping {child} failed", child=getattr(child, "name", child))
