"""The agents' websocket: `GET /api/v1/socket/<agent>/<version>` on the API's port.

Everything that can refuse a connection (key, agent name, auto-create) is decided
*before* the upgrade, in an ordinary API handler, so a refused agent gets an HTTP 4xx
envelope it can log, not a socket that opens and dies. The Autobahn protocol itself is
thin: it hands frames to the SessionManager and closes with a protocol error on a text
or malformed frame, which affects only that connection.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.logger import Logger

from taskd.db.agents import Agent
from taskd.errors import Forbidden, Invalid
from taskd.server.domain import AgentService
from taskd.server.agentsession import CLOSE_PROTOCOL_ERROR, AgentSession
from taskd.server.sessions import SessionManager
from taskd.wire import framing
from taskd.server.validation import NAME_RE
from taskd.wire.framing import FrameError
from taskd.server.peer import client_ip  # noqa: F401 (re-exported)

log = Logger(namespace="taskd.server.websocket")


@dataclass(frozen=True)
class SocketContext:
    agent: Agent
    version: int
    remote_ip: str
    via_token: bool = False  # opened with the agent's own token (closed when it is replaced)
    token_id: str | None = None  # which one
    features: frozenset[str] = frozenset()  # framing.FEATURES_HEADER of its upgrade request


class AgentSocketProtocol(WebSocketServerProtocol):
    manager: SessionManager
    context: SocketContext
    session: AgentSession | None = None

    def onConnect(self, request: Any) -> tuple[None, dict[str, str]]:
        # Tells the agent whether it is public: its blocked-nets = auto depends on it
        # (taskd.agent.builtin.netpolicy). A change of the flag closes the session.
        return None, {"X-Taskd-Agent-Public": "true" if self.context.agent.public else "false"}

    def onOpen(self) -> None:
        self.session = self.manager.attach(self.context.agent, self.context.version, self.context.remote_ip, self,
                                           via_token=self.context.via_token, token_id=self.context.token_id,
                                           features=self.context.features)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.session is None:
            return
        name = self.session.agent.name
        if not isBinary:
            log.warn("agent {name} sent a text frame; closing its connection (protocol error)", name=name)
            self.close(CLOSE_PROTOCOL_ERROR, "text frames are not part of the protocol; send binary event frames")
            return
        try:
            self.manager.frame_received(self.session, payload)
        except FrameError as exc:
            log.warn("agent {name} sent a malformed frame ({err}); closing its connection", name=name, err=str(exc))
            self.close(CLOSE_PROTOCOL_ERROR, f"malformed frame: {exc}")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.session is not None:
            why = f"code {code}" + (f", {reason}" if reason else "") if code else "connection lost"
            self.manager.detach(self.session, why)

    # SessionTransport
    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resumeProducing()

    def send_frame(self, data: bytes) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(data, isBinary=True)

    def close(self, code: int, reason: str) -> None:
        # A close reason may carry at most 123 bytes of UTF-8. Autobahn's public
        # sendClose only accepts 1000 and 3000-4999 (it raises for 1001/1002, which then
        # drops the TCP connection: the agent sees 1006); sendCloseFrame sends any code.
        reason_utf8 = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
        self.sendCloseFrame(code=code, reasonUtf8=reason_utf8, isReply=False)


class _WithContext:
    """Hands one upgrade's SocketContext to the protocol built for it (WebSocketResource
    only ever calls buildProtocol)."""

    def __init__(self, factory: WebSocketServerFactory, context: SocketContext) -> None:
        self.factory = factory
        self.context = context

    def buildProtocol(self, addr: Any) -> AgentSocketProtocol:
        proto = self.factory.buildProtocol(addr)
        proto.context = self.context
        return proto


def make_factory(manager: SessionManager, *, max_frame: int = 8 << 20) -> WebSocketServerFactory:
    factory = WebSocketServerFactory()
    factory.protocol = type("BoundAgentSocketProtocol", (AgentSocketProtocol,), {"manager": manager})
    factory.setProtocolOptions(
        maxFramePayloadSize=max_frame,
        maxMessagePayloadSize=max_frame,
        openHandshakeTimeout=10,
        closeHandshakeTimeout=2,
        autoPingInterval=20,   # finds dead TCP connections the heartbeats cannot
        autoPingTimeout=20,
    )
    return factory


class SocketEndpoint:
    """The API handler for the socket route: checks, then returns the upgrade resource."""

    def __init__(self, agents: AgentService, factory: WebSocketServerFactory, *, autocreate: bool) -> None:
        self.agents = agents
        self.factory = factory
        self.autocreate = autocreate

    async def __call__(self, call: Any, agent_name: str, version: str) -> WebSocketResource:
        request = call.request
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if upgrade != b"websocket":
            raise Invalid("this is the agents' websocket endpoint: connect with a websocket client "
                          "(Upgrade: websocket)")
        if not NAME_RE.match(agent_name) or len(agent_name) > 255:
            raise Invalid(f"agent name {agent_name!r} may only contain letters, digits, '_' and '-'")
        if not version.isdigit() or not 1 <= int(version) <= 1000:
            raise Invalid(f"protocol version {version!r} must be a positive integer (this server speaks 1)")
        user = call.user
        if user.agent_id is not None and agent_name != user.agent_name:
            raise Forbidden(f"this agent token belongs to agent {user.agent_name!r}, not {agent_name!r}")
        agent = await self.agents.for_socket(user, agent_name, autocreate=self.autocreate and user.agent_id is None)
        if user.agent_id is not None and agent.id != user.agent_id:  # renamed meanwhile, another took the name
            raise Forbidden(f"this agent token belongs to agent {user.agent_id}, not to {agent_name!r}")
        listed = (request.getHeader(framing.FEATURES_HEADER.encode()) or b"").decode("ascii", "replace")
        features = frozenset(f.strip() for f in listed.split(",") if f.strip())
        context = SocketContext(agent, int(version), client_ip(request), via_token=user.agent_id is not None,
                                token_id=user.token_id, features=features)
        log.debug("upgrading agent {name} (org {org}) from {ip}", name=agent.name, org=agent.org_id, ip=context.remote_ip)
        return WebSocketResource(_WithContext(self.factory, context))
