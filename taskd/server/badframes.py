"""What the server does about an agent that keeps sending frames it cannot use.

A bad frame (an unknown event, a catalog or taskStatus that does not parse, entries that
do not validate) is dropped and the socket stays open: old and new agents may disagree on
details. But an agent stuck in a loop (or a hostile one) must not be able to fill the
journal with a warning per frame, nor keep the server parsing garbage forever. So per
connection: the first complaint is logged, later ones at most once a minute (with how many
were not logged), and after `max_bad_frames` the connection is closed with 1008 (policy
violation) and a reason that says why; the agent's reconnect starts a fresh count.
"""
from __future__ import annotations

from typing import Any

from twisted.logger import Logger

LOG_EVERY = 60.0  # seconds between two logged complaints about one connection
CLOSE_POLICY_VIOLATION = 1008


class BadFrames:
    log = Logger()  # namespace taskd.server.badframes.BadFrames

    def __init__(self, clock: Any, max_bad_frames: int = 100, log_every: float = LOG_EVERY) -> None:
        self.clock = clock
        self.max_bad_frames = max_bad_frames
        self.log_every = log_every
        self.closed_for_it = 0  # connections closed for too many bad frames (for tests and stats)

    def complain(self, session: Any, message: str) -> None:
        """`session` sent a frame (or entries) it should not have: count it, maybe log
        it, and close the connection once it has sent too many."""
        if session.closed:
            return
        session.bad_frames += 1
        now = self.clock.seconds()
        if session.bad_logged_at is None or now - session.bad_logged_at >= self.log_every:
            unlogged = session.bad_unlogged
            self.log.warn("agent {name} ({id}) {message} (from {ip}){more}", name=session.agent.name,
                          id=session.agent.id, ip=session.remote_ip, message=message,
                          more=f" ({unlogged} more bad frame(s) since the last line)" if unlogged else "")
            session.bad_logged_at, session.bad_unlogged = now, 0
        else:
            session.bad_unlogged += 1
        if session.bad_frames >= self.max_bad_frames:
            self.closed_for_it += 1
            self.log.warn("agent {name} ({id}) from {ip} sent {n} bad frames; closing its connection",
                          name=session.agent.name, id=session.agent.id, ip=session.remote_ip, n=session.bad_frames)
            session.transport.close(CLOSE_POLICY_VIOLATION,
                                    f"too many bad frames ({session.bad_frames}); see the server log")
