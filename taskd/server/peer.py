"""Who is at the other end of a request: the one place that reads forwarding headers.

Both the REST API (refused upgrades are logged with the agent's address) and the
websocket endpoint (sessions record it) need the agent's address, and behind nginx the
socket's peer is the proxy. Kept apart from either protocol module so neither imports
the other for it.
"""
from __future__ import annotations

from twisted.web.iweb import IRequest


def client_ip(request: IRequest) -> str:
    """The agent's address; behind a local reverse proxy (nginx) its forwarded one."""
    peer = request.getClientAddress()
    host = getattr(peer, "host", "") or ""
    if host in ("127.0.0.1", "::1"):
        forwarded = request.getHeader(b"x-forwarded-for") or request.getHeader(b"x-real-ip")
        if forwarded:
            return forwarded.decode("latin-1").split(",")[0].strip()[:64] or host
    return host
