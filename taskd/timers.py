"""A repeating timer as a service, for the loops every daemon part runs (flushes,
supervision, status ticks).

Twisted's ``TimerService`` calls at once on start and has no clock to inject; every
taskd loop first fires one interval after start (unless asked otherwise) and runs on
an injectable ``IReactorTime`` so unit tests drive it with ``task.Clock``. A call that
fails is logged, naming the loop, and stops only that loop: the daemon lives on.
A bottom module: agent and server alike may use it.
"""
from __future__ import annotations

from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger


class RepeatingTimer(Service):
    """Calls ``fn()`` every ``interval`` seconds of ``clock`` while running.

    Start and stop are idempotent, so an owner may call them from its own
    ``startService``/``stopService`` or add the timer as a child service.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, interval: float, fn: Callable[[], Any], *,
                 what: str, now: bool = False, log: Logger | None = None) -> None:
        self.clock, self.interval, self.fn, self.what, self.now = clock, interval, fn, what, now
        if log is not None:  # the failure is logged in the owner's namespace
            self.log = log
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        if self.running:
            return
        super().startService()
        loop = self._loop = LoopingCall(self.fn)
        loop.clock = self.clock
        loop.start(self.interval, now=self.now).addErrback(
            lambda f: self.log.failure("{what} stopped", f, what=self.what))

    def stopService(self) -> None:
        if not self.running:
            return
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
