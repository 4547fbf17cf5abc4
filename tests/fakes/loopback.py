"""What every emulator here shares: a quiet web site on 127.0.0.1 that can be taken down
(listener closed, open connections aborted, so clients see "refused") and brought back on
the same port, as a restarting service would be."""
from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import Request, Site


class QuietSite(Site):
    noisy = False

    def log(self, request: Request) -> None:  # no access log lines in the tests' output
        pass


class TrackingFactory(WrappingFactory):
    """Knows its open connections, so the emulator can drop them all and wait."""

    noisy = False

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self._waiting: list[Deferred[None]] = []

    def close_all(self) -> Deferred[None]:
        if not self.protocols:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._waiting.append(done)
        for p in list(self.protocols):
            p.transport.abortConnection()
        return done

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)


class LoopbackServer:
    """Mixin: ``start``/``set_down``/``stop`` of a site serving ``resource`` on 127.0.0.1.

    Subclasses call ``_serve(resource)`` in ``__init__``; ``url`` and ``port`` are set by
    ``start`` (port 0: the OS picks; ``set_down(False)`` listens on that port again).
    """

    url = ""
    port = 0
    _reactor: Any = None
    _listener: Any = None

    def _serve(self, resource: Resource) -> None:
        self._factory = TrackingFactory(QuietSite(resource))

    @property
    def down(self) -> bool:
        return self._listener is None

    def start(self, reactor: Any = None, port: int = 0) -> Any:
        """Listen; call inside the running reactor. Returns self."""
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self._reactor = reactor
        self._started(reactor)
        self._listener = reactor.listenTCP(port or self.port, self._factory, interface="127.0.0.1")
        self.port = self._listener.getHost().port
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def _started(self, reactor: Any) -> None:
        """Hook for subclasses (e.g. to default a clock to the reactor)."""

    def set_down(self, down: bool = True) -> Deferred[None]:
        """Down: stop listening and drop every connection (clients get refused).
        Up again: listen on the same port."""
        if down == self.down:
            return succeed(None)
        if not down:
            self.start(self._reactor, self.port)
            return succeed(None)
        return self.stop()

    def stop(self) -> Deferred[None]:
        if self._listener is None:
            return succeed(None)
        listener, self._listener = self._listener, None
        return Deferred.fromCoroutine(self._stop(listener))

    async def _stop(self, listener: Any) -> None:
        await maybeDeferred(listener.stopListening)
        await self._factory.close_all()
