"""The saved task list: atomic save, load, corrupt files, permissions, resume until taskList."""
from __future__ import annotations

import json
import os
import stat

from twisted.logger import globalLogPublisher

from taskd.agent.taskcache import TaskCache
from taskd.agent.taskstate import FILE_NAME, TaskState
from taskd.wire.framing import Frame

TASKS = {1: {"id": 1, "name": "a", "interval": 10, "config": {"secret": "hunter2"}},
         2: {"id": 2, "name": "b", "interval": 60}}


def _logs():
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    return seen, lambda: globalLogPublisher.removeObserver(seen.append)


def _text(events):
    from twisted.logger import formatEvent
    return [formatEvent(e) for e in events]


def test_save_then_load_round_trips(tmp_path):
    state = TaskState(str(tmp_path / "sub"))
    assert state.save(TASKS, now=1700000000.0)
    saved = state.load()
    assert saved is not None and saved.tasks == TASKS and saved.saved_at == 1700000000.0


def test_file_is_private_and_no_temp_left(tmp_path):
    state = TaskState(str(tmp_path))
    state.save(TASKS)
    mode = stat.S_IMODE(os.stat(tmp_path / FILE_NAME).st_mode)
    assert mode == 0o600
    assert os.listdir(tmp_path) == [FILE_NAME]


def test_missing_file_is_silent(tmp_path):
    seen, stop = _logs()
    try:
        assert TaskState(str(tmp_path)).load() is None
    finally:
        stop()
    assert not [e for e in seen if e.get("log_namespace") == "taskd.agent.state"]


def test_corrupt_file_is_one_warning_naming_it(tmp_path):
    path = tmp_path / FILE_NAME
    for body in (b"{not json", json.dumps({"saved_at": 1, "tasks": [{"id": "x"}]}).encode(), b"[]"):
        path.write_bytes(body)
        seen, stop = _logs()
        try:
            assert TaskState(str(tmp_path)).load() is None
        finally:
            stop()
        lines = [t for t in _text(e for e in seen if e.get("log_namespace") == "taskd.agent.state")]
        assert len(lines) == 1 and str(path) in lines[0]


def test_cache_saves_every_change_and_never_logs_config(tmp_path):
    state = TaskState(str(tmp_path))
    applied = []
    cache = TaskCache(applied.append, state=state)
    seen, stop = _logs()
    try:
        cache.handle(Frame("taskList", json.dumps(list(TASKS.values())).encode()))
        assert state.load().tasks == TASKS
        cache.handle(Frame("taskRemove", json.dumps(TASKS[2]).encode()))
        assert set(state.load().tasks) == {1}
    finally:
        stop()
    assert not any("hunter2" in t for t in _text(seen))


def test_restart_resumes_saved_list_until_first_tasklist(tmp_path):
    TaskState(str(tmp_path)).save(TASKS, now=1700000000.0)
    applied = []
    cache = TaskCache(applied.append, state=TaskState(str(tmp_path)))
    seen, stop = _logs()
    try:
        assert cache.resume_saved()
    finally:
        stop()
    assert applied == [TASKS]
    lines = _text(seen)
    assert any("running the saved task list from 2023-11-14T22:13:20Z (2 tasks) until a server answers" in t
               for t in lines)
    cache.handle(Frame("taskList", json.dumps([TASKS[1]]).encode()))  # replaces it
    assert applied[-1] == {1: TASKS[1]}
    assert set(TaskState(str(tmp_path)).load().tasks) == {1}


def test_without_state_nothing_resumes(tmp_path):
    applied = []
    assert not TaskCache(applied.append).resume_saved()
    assert applied == []
