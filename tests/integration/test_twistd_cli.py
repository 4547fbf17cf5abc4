"""The real ``twistd taskserver`` command line: plugin discovery, help, and the
one-line config errors operators see when start-up is refused."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from taskd.server.settings import SERVER_OPTIONS

TWISTD = str(Path(sys.executable).parent / "twistd")


def twistd(*args: str, cwd: Path,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TASKSERVER_")}
    environ.update(env or {})
    return subprocess.run([TWISTD, *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=60)


def start(tmp_path: Path, *args: str, env: dict[str, str] | None = None):
    """Run ``twistd -n taskserver ...`` expecting a refusal; return the last stderr line."""
    result = twistd("-n", "--pidfile=", "taskserver", *args, cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_help_lists_every_key_with_its_help(tmp_path):
    result = twistd("taskserver", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for opt in SERVER_OPTIONS:
        assert f"--{opt.name}=" in text
        assert " ".join(opt.help.split()) in text
        assert f"Env: TASKSERVER_{opt.attr.upper()}." in text
        for alias in opt.aliases:
            assert f"--{alias}=" in text
    assert "--config=" in text and "environment variables" in text


def test_bad_key_in_config_file(tmp_path):
    config = tmp_path / "task-server.ini"
    config.write_text("log-level = 1\nadmin-kye = s3cret\n")
    assert start(tmp_path, "--config", str(config)) == (
        "taskserver: config error: admin-kye: is not a known key; did you mean admin-key?"
        f" (from {config} line 2)")


def test_bad_addr_flag(tmp_path):
    assert start(tmp_path, "--config", str(tmp_path / "absent.ini"), "--addr", "foo:bar:baz") == (
        "taskserver: config error: addr: 'foo:bar:baz' is not :PORT, HOST:PORT or a Twisted"
        " endpoint string (from --addr)")


def test_bad_log_level_env(tmp_path):
    line = start(tmp_path, "-c", str(tmp_path / "absent.ini"), env={"TASKSERVER_LOG_LEVEL": "9"})
    assert line == ("taskserver: config error: log-level: '9' is not in 0..6"
                    " (from TASKSERVER_LOG_LEVEL)")


@pytest.mark.parametrize("env, flags, winner", [
    ({"TASKSERVER_DB_TYPE": "mysql"}, [], "TASKSERVER_DB_TYPE"),
    ({"TASKSERVER_DB_TYPE": "sqlite3"}, ["--db-type", "mysql"], "--db-type"),
])
def test_env_beats_file_and_flag_beats_env(tmp_path, env, flags, winner):
    config = tmp_path / "task-server.ini"
    config.write_text("db-type = sqlite3\n")
    line = start(tmp_path, "-c", str(config), *flags, env=env)
    assert line == ("taskserver: config error: db-connect-str: must be set when db-type is"
                    f" mysql (db-type from {winner})")
