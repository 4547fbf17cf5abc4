"""One agent's websocket as the server's logic sees it, apart from the manager of them all.

`AgentSession` is what the session manager (taskd.server.sessions), the dispatcher and
the websocket protocol pass around: the agent as read, what it was told (`Told`), and a
transport to write frames to. The two protocols say what a session needs from its
websocket and what the manager tells its listener; the close codes are the ones agents
see (docs/protocol.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from taskd.db.agents import Agent
from taskd.db.sessions import OnlineChange
from taskd.server.agentview import Told
from taskd.wire import framing

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_PUBLIC_CHANGED = 4002  # the agent was made public or private (docs/protocol.md)


class SessionTransport(Protocol):
    """What a session needs from its websocket (the Autobahn protocol, or a fake)."""

    def send_frame(self, data: bytes) -> None: ...
    def close(self, code: int, reason: str) -> None: ...
    def pause_reading(self) -> None: ...   # stop reading the agent's frames (back-pressure)
    def resume_reading(self) -> None: ...


class SessionListener(Protocol):
    """Who decides what agents are told (the Dispatcher). Each call returns a Deferred
    (or None) the manager waits for: `agents_connected` once sessions are recorded and
    held (their first taskLists), `catalog_changed` once an agent's new catalog is
    stored (re-route it), `task_lists_due` for each slice of due periodic taskLists."""

    def agents_connected(self, sessions: list["AgentSession"]) -> Any: ...
    def catalog_changed(self, session: "AgentSession") -> Any: ...
    def task_lists_due(self, sessions: list["AgentSession"]) -> Any: ...


@dataclass(eq=False)
class AgentSession(Told):
    """One websocket of one agent; `Told` (view, decided_by, ...) is what it was told."""

    agent: Agent
    version: int
    remote_ip: str
    transport: SessionTransport
    id: str | None = None
    closed: bool = False
    via_token: bool = False  # opened with the agent's own token (see taskd.server.agenttokens)
    token_id: str | None = None  # which token (agenttokens.token_id)
    features: frozenset[str] = frozenset()  # optional events it understands (framing.FEATURES_HEADER)
    # The (namespace, version) pairs the agent advertises, as stored; None while unknown
    # (not loaded yet, or a new catalog being written): then routing asks the database.
    catalog: frozenset[tuple[str, int]] | None = None
    # Which read set `agent` (see AgentView.next_read; 0: the websocket's, before the
    # session was held here), and the event connection it was read under (see
    # Dispatcher.event_epoch; None: unknown, so routing asks the database).
    agent_read: int = 0
    agent_epoch: Any = None
    ready: Deferred = field(default_factory=Deferred)    # fires once registered
    catalogs: int = 0  # catalog frames received: a retried one gives way to a newer one
    inbound: int = 0  # its catalog/taskStatus frames taken and not yet handled (see SessionManager)
    paused: bool = False  # reading its socket is paused until `inbound` drains
    bad_frames: int = 0  # frames it sent that could not be used (taskd.server.badframes)
    bad_logged_at: float | None = None
    bad_unlogged: int = 0
    gone: Deferred = field(default_factory=Deferred)     # fires once detached

    def send(self, event: str, value: Any) -> None:
        self.send_frame(framing.encode_json(event, value))

    def send_frame(self, data: bytes) -> None:
        """An already encoded frame (a fan-out encodes once for every agent)."""
        if not self.closed:
            self.transport.send_frame(data)

    def __repr__(self) -> str:
        return f"<session {self.id} agent {self.agent.name}({self.agent.id})>"


def online_payload(change: OnlineChange) -> dict:
    return {"id": change.agent_id, "name": change.name, "orgId": change.org_id}
