"""What each connected agent was told, and the one way to change it.

An agent's tasks reach it two ways: a full `taskList` (when it connects, then
periodically), and single `taskAdd` / `taskUpdate` / `taskRemove` events (a task push, or
a resync after the agent itself changed). Both are the same operation here: apply a
desired set — the whole list, or one task — to a session's `view` (the task JSON the
agent was last sent), and send the difference, or the whole list as one frame.

Database reads finish in any order (several DB threads; a slow task list vs. a quick
push), so every read that decides what agents are told is numbered when it *starts*
(`next_read`), and a session remembers, per task, the read that last decided it: an
older read never overrides a newer one.

Every session running a task holds the same dict for it (`share`), and a fan-out encodes
each frame once: the task JSON is ~1 KB, and 10,000 agents run the same tasks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from twisted.logger import Logger

from taskd.wire import framing

if TYPE_CHECKING:
    from taskd.server.agentsession import AgentSession


@dataclass(eq=False, kw_only=True)
class Told:
    """The per-session record of what the agent was told (mixed into AgentSession)."""

    view: dict[int, dict] = field(default_factory=dict)  # task id -> task JSON last sent
    # Every task id the view held during this session: the agent may report those
    # removed (taskd.server.statusintake), and no others beyond a small allowance.
    sent: set[int] = field(default_factory=set)
    # task id -> sequence number of the database read that last decided it (see
    # AgentView.next_read): a read that started earlier never overrides it. A task
    # without an entry was last decided by read `decided_floor`: each full read drops
    # the entries of tasks it left out of the view (see `decided`), or every push of
    # every task of the cluster would leave one here for good.
    decided_by: dict[int, int] = field(default_factory=dict)
    decided_floor: int = 0
    next_task_list: float = 0.0  # clock seconds: when the next periodic taskList is due

    def decided(self, task_id: int) -> int:
        """The sequence number of the read that last decided task `task_id` here."""
        return self.decided_by.get(task_id, self.decided_floor)


@dataclass(frozen=True)
class Desired:
    """What an agent should run, as one read saw it: the whole list (`only` None), or
    just task `only` (`tasks` holds it when it is wanted, and `current` is its JSON
    either way, which a `taskRemove` carries; None once deleted)."""

    tasks: Mapping[int, dict]
    only: int | None = None
    current: dict | None = None

    @classmethod
    def full(cls, tasks: Mapping[int, dict]) -> "Desired":
        return cls(tasks)

    @classmethod
    def one(cls, task_id: int, payload: dict | None, wanted: bool) -> "Desired":
        return cls({task_id: payload} if wanted and payload is not None else {}, task_id, payload)


class AgentView:
    """One per server: read numbering, the shared task dicts, and `apply`."""

    # The push log lines have always been the dispatcher's.
    log = Logger()

    def __init__(self) -> None:
        self._payloads: dict[int, dict] = {}  # task id -> the task JSON sessions share (see share)
        self._reads = 0

    def next_read(self) -> int:
        """Number a database read that will decide what agents are told. Comparing these
        numbers lets the result of the most recently *started* read win per task."""
        self._reads += 1
        return self._reads

    def share(self, payload: dict) -> dict:
        """One dict per task for every session that holds it: the one already known
        when equal, else `payload` (which becomes the known one). Each agent's view
        would otherwise keep its own copy of every task it runs (~1 KB each)."""
        known = self._payloads.get(payload["id"])
        if known == payload:
            return known
        self._payloads[payload["id"]] = payload
        return payload

    def forget_task(self, task_id: int) -> None:
        """The task was deleted (and that push is done: see Dispatcher.on_event): stop
        keeping its shared dict."""
        self._payloads.pop(task_id, None)

    def apply(self, session: "AgentSession", desired: Desired, seq: int, *, as_list: bool = False,
              frames: dict | None = None) -> list[tuple[int, str]]:
        """Bring `session`'s view to `desired` (read number `seq`), except for tasks a
        read that started later already decided, and tell the agent: with one
        `taskList` frame of its whole view (`as_list`, only for a full set), else with
        one event per task that changed, in task id order. Returns the (task id, event)
        pairs sent as events, right after their frames were handed to the websocket (the
        caller times `dispatch.latency` then). `frames` caches encoded frames across the
        sessions of one fan-out."""
        if desired.only is not None:
            ids: Any = (desired.only,)
        else:
            ids = sorted(set(session.view) | set(desired.tasks))
        changes = []
        for task_id in ids:
            change = self._decide(session, task_id, desired.tasks.get(task_id), seq)
            if change is not None:
                changes.append((task_id, change))
        if desired.only is None:
            self._settle(session, seq)
        if as_list:
            self._send_list(session, frames)
            return []
        sent = []
        for task_id, (event, had) in changes:
            body = session.view.get(task_id) or desired.current or had
            self._send_event(session, task_id, event, body, frames)
            sent.append((task_id, event))
        return sent

    # -- the parts of apply -------------------------------------------------------------

    @staticmethod
    def _decide(session: "AgentSession", task_id: int, payload: dict | None,
                seq: int) -> tuple[str, dict | None] | None:
        """Set task `task_id` of the view as read `seq` saw it (`payload`; None: not
        wanted), unless a newer read decided it; returns (event, what was there) when
        the agent must be told, else None."""
        if session.decided(task_id) > seq:
            return None
        session.decided_by[task_id] = seq
        had = session.view.get(task_id)
        if payload is not None:
            session.view[task_id] = payload
            session.sent.add(task_id)
            if had is None:
                return framing.TASK_ADD, had
            return (framing.TASK_UPDATE, had) if had != payload else None
        if had is not None:
            del session.view[task_id]
            return framing.TASK_REMOVE, had
        return None

    @staticmethod
    def _settle(session: "AgentSession", seq: int) -> None:
        """After a full read: every task left out of the view is now decided by read
        `seq` (or by a newer one, whose entry stays); the floor says so without an entry
        per task."""
        session.decided_floor = max(session.decided_floor, seq)
        if len(session.decided_by) > len(session.view):  # each task in the view has an entry
            session.decided_by = {task_id: decided for task_id, decided in session.decided_by.items()
                                  if task_id in session.view or decided > session.decided_floor}

    @staticmethod
    def _send_list(session: "AgentSession", frames: dict | None) -> None:
        """The whole view as one taskList; agents with the same list share the frame."""
        listed = sorted(session.view.values(), key=lambda t: (t["name"], t["id"]))
        key = (framing.TASK_LIST, *(id(t) for t in listed))  # the dicts are alive in views: ids are stable
        session.send_frame(_encoded(frames, key, framing.TASK_LIST, listed))

    def _send_event(self, session: "AgentSession", task_id: int, event: str, body: dict | None,
                    frames: dict | None) -> None:
        """One taskAdd/taskUpdate/taskRemove, encoded once per (event, body) of a fan-out."""
        session.send_frame(_encoded(frames, (event, id(body)), event, body))
        self.log.debug("{event} task {id} to agent {agent} ({ip})", event=event, id=task_id,
                       agent=session.agent.name, ip=session.remote_ip)


def _encoded(frames: dict | None, key: tuple, event: str, body: Any) -> bytes:
    """The frame for (`event`, `body`), encoded once per `key` in the `frames` cache of
    one fan-out (no cache: encoded each time)."""
    data = frames.get(key) if frames is not None else None
    if data is None:
        data = framing.encode_json(event, body)
        if frames is not None:
            frames[key] = data
    return data
