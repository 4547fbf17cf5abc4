"""The agent's one websocket to the task-server, kept up forever.

Reconnects with exponential backoff from about 1 s to `reconnect-max-backoff` (30 s),
with jitter so a restarted server is not hit by every agent in the same second. The log
gets one line per change of state (connected, lost, cannot connect, refused), not one
per attempt. A refused upgrade (HTTP 4xx: bad key, agent unknown with auto-create off)
is retried only at the cap, since retrying sooner cannot help. Three missed heartbeats
mean the connection is dead even if TCP has not noticed, and it is dropped.

For wss:// the server's certificate and host name are checked by Twisted's
``optionsForClientTLS`` against the system's CAs; ``ca-bundle`` adds an operator's CAs to
those (:class:`ExtraCABundle`), through public interfaces only.
"""
from __future__ import annotations

import random
import re
from typing import Any, Callable
from urllib.parse import urlsplit

import idna
from autobahn.exception import Disconnected
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address
from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from taskd.stats import NULL_STATS
from taskd.timers import RepeatingTimer
from taskd.wire import framing
from taskd.wire.framing import Frame, FrameError

_REFUSED = re.compile(r"upgrade failed \[(\d{3})\]:?\s*([^)]*)")
_HINTS = {
    401: "the server did not accept api-key",
    403: "the server does not accept this key's org",
    404: "the agent is not registered and the server does not auto-create agents",
}


@implementer(IOpenSSLClientConnectionCreator)
class ExtraCABundle:
    """A TLS client creator like ``optionsForClientTLS(hostname)`` — Twisted's TLS defaults,
    the system's CAs, SNI, the host name checked against the certificate — whose CAs are
    the system's plus those of an operator's bundle file (ca-bundle), for wss://.

    Why not ``optionsForClientTLS`` itself: its public trust roots are either the
    platform's or a given list of certificates, never both, and pyOpenSSL refuses to change
    a context once it made a connection. So the context comes from the public
    ``CertificateOptions`` and gets the bundle before any connection, and the two things
    ``optionsForClientTLS`` adds per connection are done here as Twisted does them: SNI
    for a DNS name, and the leaf certificate checked with ``service_identity``.
    """

    def __init__(self, hostname: str, path: str) -> None:
        self.hostname, self.path = hostname, path
        self._is_ip = isIPAddress(hostname) or isIPv6Address(hostname)
        self._context = ssl.CertificateOptions(trustRoot=ssl.platformTrust()).getContext()
        self._context.load_verify_locations(path)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if not self._is_ip:  # IP literals are not server names (RFC 6066)
            connection.set_tlsext_host_name(idna.encode(self.hostname))
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                              self._verifier(tlsProtocol))
        return connection

    def _verifier(self, tlsProtocol: Any) -> Callable[..., bool]:
        check = verify_certificate_ip_address if self._is_ip else verify_certificate_hostname
        protocol = tlsProtocol  # dropped after the leaf is checked: no cycle through OpenSSL

        def verify(connection: Any, cert: Any, errno: int, depth: int, ok: int) -> bool:
            nonlocal protocol
            if depth != 0:
                return bool(ok)  # the chain is OpenSSL's to verify; the name is the leaf's
            try:
                check(cert.to_cryptography(), self.hostname)
            except (VerificationError, CertificateError):  # wrong name; no names at all
                if protocol is not None:
                    protocol.failVerification(Failure())  # the connection fails with this reason
                ok = False
            except BaseException:  # an exception raised into OpenSSL would be lost
                ServerConnection.log.failure("checking the server certificate's name failed")
                ok = False
            protocol = None
            return bool(ok)

        return verify


def backoff(attempt: int, cap: float, rng: random.Random) -> float:
    """~1 s, 2 s, 4 s … up to `cap`, each scaled by a random 0.5–1.0."""
    return min(cap, 2.0 ** max(0, attempt - 1)) * rng.uniform(0.5, 1.0)


class ServerConnection(Service):
    log = Logger()
    name = "connection"

    def __init__(self, *, url: str, api_key: str, reactor: Any, on_frame: Callable[[Frame], None],
                 on_connected: Callable[[], None] = lambda: None,
                 on_handshake: Callable[[dict], None] = lambda headers: None, max_backoff: float = 30.0,
                 heartbeat_interval: float = 2.0, ca_bundle: str = "",
                 rng: random.Random | None = None, stats: Any = NULL_STATS) -> None:
        self.stats = stats
        self.url = url
        self.api_key = api_key
        self.reactor = reactor
        self.on_frame = on_frame
        self.on_connected = on_connected
        self.on_handshake = on_handshake  # the upgrade answer's headers (lowercase names)
        self.max_backoff = max_backoff
        self.heartbeat_interval = heartbeat_interval
        self.ca_bundle = ca_bundle
        self.rng = rng or random.Random()
        self.protocol: Any = None
        self.connected = False
        self._loop: Deferred | None = None
        self._wait: Deferred | None = None
        self._last_state = ""
        self._last_seen = 0.0
        self._last_check = 0.0
        self._watchdog: RepeatingTimer | None = None
        self.attempts = 0

    # -- service -----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._loop = self._run()

    @inlineCallbacks
    def stopService(self):
        super().stopService()
        if self._wait is not None and not self._wait.called:
            self._wait.cancel()
        if self.protocol is not None and self.connected:
            closed = self.protocol.closed
            self.protocol.sendClose(1000, "agent shutting down")
            timer = self.reactor.callLater(3, lambda: None if closed.called else self.protocol.dropConnection(abort=True))
            yield closed
            if timer.active():
                timer.cancel()
        if self._loop is not None:
            yield self._loop

    def send(self, event: str, value: Any) -> bool:
        """Send an event now if connected; False (nothing sent) otherwise."""
        if not self.connected or self.protocol is None:
            return False
        try:
            self.protocol.sendMessage(framing.encode_json(event, value), isBinary=True)
        except Disconnected:  # dropped (a missed heartbeat), its connectionLost not run yet
            return False
        return True

    # -- the loop ----------------------------------------------------------------------

    def _state(self, state: str, line: str, **kw: Any) -> None:
        """Log `line` only when the state differs from the last one logged."""
        if state != self._last_state:
            self._last_state = state
            (self.log.warn if state != "connected" else self.log.info)(line, **kw)
        else:
            self.log.debug(line, **kw)

    @inlineCallbacks
    def _run(self):
        while self.running:
            self.attempts += 1
            refused = None
            try:
                protocol = yield self._connect()
            except CancelledError:
                return
            except Exception as exc:
                reason = str(exc) or type(exc).__name__
                match = _REFUSED.search(reason)
                if match:
                    refused = int(match.group(1))
                    hint = _HINTS.get(refused, "")
                    self._state(f"refused-{refused}", "server refused the agent at {url}: HTTP {code} {why}{hint};"
                                " retrying every {cap}s", url=self.url, code=refused, why=match.group(2).strip(' "\''),
                                hint=f" ({hint})" if hint else "", cap=self.max_backoff)
                else:
                    self._state("unreachable", "cannot connect to {url}: {reason}; retrying with backoff up to {cap}s",
                                url=self.url, reason=reason.splitlines()[0][:200], cap=self.max_backoff)
            else:
                self.attempts = 0
                self._state("connected", "connected to {url}", url=self.url)
                self.stats.gauge("server.connected", 1)
                self.on_connected()
                code, reason = yield protocol.closed
                self.connected = False
                self.stats.gauge("server.connected", 0)
                self._stop_watchdog()
                if not self.running:
                    return
                self._state("lost", "connection to {url} lost ({reason}); reconnecting", url=self.url,
                            reason=f"code {code}{': ' + reason if reason else ''}")
            if not self.running:
                return
            delay = self.max_backoff if refused else backoff(self.attempts, self.max_backoff, self.rng)
            self._wait = deferLater(self.reactor, delay, lambda: None)
            try:
                yield self._wait
            except CancelledError:
                return

    def _connect(self) -> Deferred:
        """Connect and complete the websocket handshake; fires with the open protocol."""
        parts = urlsplit(self.url)
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        factory = WebSocketClientFactory(self.url, headers={"Authorization": f"Bearer {self.api_key}",
                                                            framing.FEATURES_HEADER: framing.FEATURE_RUN_TASK})
        factory.setProtocolOptions(openHandshakeTimeout=10, closeHandshakeTimeout=2)
        factory.noisy = False  # no "Starting factory" line per reconnection attempt
        opened: Deferred = Deferred()
        conn = self

        class Protocol(WebSocketClientProtocol):
            def onConnect(self, response: Any) -> None:
                try:
                    conn.on_handshake(dict(response.headers))
                except Exception:
                    conn.log.failure("handling the server's upgrade answer failed")

            def onOpen(self) -> None:
                conn.protocol = self
                conn.connected = True
                conn._start_watchdog()
                opened.callback(self)

            def onMessage(self, payload: bytes, isBinary: bool) -> None:
                conn._last_seen = conn.reactor.seconds()
                if not isBinary:
                    conn.log.warn("server sent a text frame; ignored")
                    return
                try:
                    frame = framing.decode(payload)
                except FrameError as exc:
                    conn.log.warn("server sent a malformed frame ({err}); ignored", err=str(exc))
                    return
                try:
                    conn.on_frame(frame)
                except Exception:
                    conn.log.failure("handling {event} failed", event=frame.event)

            def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
                if not opened.called:
                    opened.errback(ConnectionError(reason or "connection closed during the handshake"))
                if not self.closed.called:
                    self.closed.callback((code, reason))

        def build(addr: Any) -> Protocol:
            proto = Protocol()
            proto.factory = factory
            proto.closed = Deferred()
            return proto

        factory.buildProtocol = build
        endpoint: Any = HostnameEndpoint(self.reactor, parts.hostname, port, timeout=10)
        if secure:
            creator = (ExtraCABundle(parts.hostname, self.ca_bundle) if self.ca_bundle
                       else ssl.optionsForClientTLS(parts.hostname))
            endpoint = wrapClientTLS(creator, endpoint)
        d = endpoint.connect(factory)
        d.addCallback(lambda _: opened)
        return d

    # -- dead connection detection -----------------------------------------------------

    def _start_watchdog(self) -> None:
        self._last_seen = self._last_check = self.reactor.seconds()
        self._stop_watchdog()  # never two: a watchdog per open connection
        self._watchdog = RepeatingTimer(self.reactor, self.heartbeat_interval, self._check_heartbeat,
                                        what="heartbeat watchdog", log=self.log)
        self._watchdog.startService()

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stopService()

    def _check_heartbeat(self) -> None:
        # A check that comes late (this process was out of CPU) says nothing of the
        # server: the heartbeats may sit unread in the socket. The silence allowed grows by
        # how late the check is, so an overloaded agent does not drop a live connection
        # (and pay a whole taskList again to reconnect).
        now = self.reactor.seconds()
        late = max(0.0, now - self._last_check - self.heartbeat_interval)
        self._last_check = now
        silent = now - self._last_seen
        if silent > 3 * self.heartbeat_interval + late and self.protocol is not None:
            self.log.warn("no heartbeat from the server for {s:.1f}s; dropping the connection", s=silent)
            self._stop_watchdog()
            self.protocol.dropConnection(abort=True)
