"""The agent's saved task list: what it runs after a restart while no server answers.

The file (``<state-dir>/tasks.json``) is rewritten whole after every change of the task
set, atomically (temp file, fsync, os.replace), so a crash leaves the old or the new list,
never half of one. Task config may hold secrets: the file is mode 0600 and its content is
never logged. The write is synchronous on the reactor thread: a task list is a few hundred
KB at most (``MAX_BYTES``; larger lists are not saved, with one warning), which a local
disk writes in well under the heartbeat interval. A missing file is silence; a corrupt
one is one warning naming the file, then ignored.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Mapping

from twisted.logger import Logger

FILE_NAME = "tasks.json"
MAX_BYTES = 4 * 1024 * 1024

log = Logger(namespace="taskd.agent.state")


@dataclass(frozen=True)
class SavedList:
    saved_at: float
    tasks: dict[int, dict]


class TaskState:
    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, FILE_NAME)
        self.state_dir = state_dir

    def save(self, tasks: Mapping[int, dict], now: float | None = None) -> bool:
        """Write the list atomically; False (and one warning) if it could not be."""
        body = json.dumps({"saved_at": time.time() if now is None else now,
                           "tasks": list(tasks.values())}).encode("utf-8")
        if len(body) > MAX_BYTES:
            log.warn("task list is {n} bytes, over {max}; not saved to {path}", n=len(body), max=MAX_BYTES,
                     path=self.path)
            return False
        tmp = self.path + ".tmp"
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warn("could not save the task list to {path}: {err}", path=self.path, err=exc.strerror or str(exc))
            return False
        return True

    def load(self) -> SavedList | None:
        """The saved list, or None (missing: silently; unreadable or corrupt: one warning)."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warn("ignoring saved task list {path}: {err}", path=self.path, err=exc.strerror or str(exc))
            return None
        try:
            value = json.loads(raw)
            saved_at = float(value["saved_at"])
            tasks = {}
            for t in value["tasks"]:
                if not isinstance(t, dict) or isinstance(t.get("id"), bool) or not isinstance(t.get("id"), int):
                    raise ValueError("task without an integer id")
                tasks[t["id"]] = t
        except (ValueError, TypeError, KeyError, AttributeError):
            log.warn("ignoring saved task list {path}: not a task list file", path=self.path)
            return None
        return SavedList(saved_at=saved_at, tasks=tasks)
