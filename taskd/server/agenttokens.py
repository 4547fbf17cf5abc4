"""Agent tokens: a secret per agent that opens that agent's websocket and nothing else.

An API key opens every agent of its org and the REST API; a host running one agent needs
neither. A token (anchor: Synthetic Monitoring's per-probe tokens) is issued once by
`POST /api/v1/agents/<id>/token`, which shows it that once: only its sha256 is stored.
Issuing again replaces it and closes the connection the old one opened, on whichever
server holds it (the `agent.tokenReset` event); deleting the agent revokes it. Tokens
are told from API keys by their prefix, so they are never sent to the key check.
"""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from taskd.db.agents import Agent, AgentStore
from taskd.server.auth import AuthError, User
from taskd.server.events import EventBus

PREFIX = "taskd_agent_"
TOKEN_RESET = "agent.tokenReset"
CLOSE_TOKEN_RESET = 4001  # the close code of a session whose token was replaced

log = Logger(namespace="taskd.server.agenttokens")


def is_token(key: str) -> bool:
    return key.startswith(PREFIX)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_id(digest: str) -> str:
    """Names one token (in events and sessions) without being usable as it."""
    return digest[:16]


@dataclass(frozen=True)
class Issued:
    agent: Agent
    token: str


class AgentTokens:
    def __init__(self, agents: AgentStore, events: EventBus) -> None:
        self.agents = agents
        self.events = events

    @inlineCallbacks
    def issue(self, agent: Agent) -> "Deferred[Issued]":
        """A new token for `agent` (already checked to be the caller's own), replacing
        any earlier one; the session the old one opened is closed."""
        token = PREFIX + secrets.token_urlsafe(32)
        digest = token_hash(token)
        if not (yield self.agents.set_token(agent.id, digest)):
            from taskd.errors import NotFound
            raise NotFound(f"agent {agent.id} does not exist")
        log.info("agent {name} ({id}) of org {org} was issued a new token", name=agent.name, id=agent.id,
                 org=agent.org_id)
        # `tokenId` names the new token: a server closes the connections opened with any
        # other (an agent may already be back with the new one when the event arrives).
        self.events.publish(TOKEN_RESET, {"id": agent.id, "name": agent.name, "orgId": agent.org_id,
                                          "tokenId": token_id(digest)})
        return Issued(agent, token)

    @inlineCallbacks
    def user_for(self, token: str) -> "Deferred[User]":
        """The caller a token stands for: its agent's org, allowed that agent only."""
        digest = token_hash(token)
        agent = yield self.agents.by_token(digest)
        if agent is None:
            raise AuthError(401, "unknown or replaced agent token")
        return User(org_id=agent.org_id, org_name="", org_slug="", role="Agent", agent_id=agent.id,
                    agent_name=agent.name, token_id=token_id(digest))
