"""Task config sealed at rest, on both databases: the API and the agents see it in clear,
the database file and a mysqldump do not; keys rotate with `taskd-db reencrypt`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest_twisted
import sqlalchemy as sa

from taskd.db.sealing import key_id, new_key
from tests.integration.agent_client import connect_agent
from tests.integration.harness import ADMIN_KEY, start_server, stop_server

SECRET = "ns1-api-key-7f3c9e1d0b"
TASK = {"name": "secret-task", "interval": 60, "enabled": True, "route": {"type": "any"},
        "config": {"/raintank/apps/ns1": {"apiKey": SECRET, "zone": "example.com"}}}
TASKD_DB = str(Path(sys.executable).with_name("taskd-db"))


def raw_configs(engine: sa.Engine) -> list[str]:
    """task.config as stored, without taskd's column type in between."""
    with engine.connect() as conn:
        return [str(row[0]) for row in conn.exec_driver_sql("SELECT config FROM task")]


def stored_bytes(db_type: str, connect_str: str) -> bytes:
    """What an attacker with the database gets: the sqlite files, or a mysqldump."""
    if db_type == "sqlite3":
        return b"".join(p.read_bytes() for p in Path(connect_str).parent.glob(Path(connect_str).name + "*"))
    return subprocess.run(["mysqldump", "-h", "127.0.0.1", "-u", "root", connect_str.rsplit("/", 1)[1].split("?")[0]],
                          capture_output=True, check=True, timeout=60).stdout


def key_file(path: Path, *keys: str) -> str:
    path.write_text("".join(k + "\n" for k in keys))
    path.chmod(0o600)
    return str(path)


@pytest_twisted.ensureDeferred
async def test_config_is_sealed_at_rest_and_clear_to_the_api_and_agents(db_config, tmp_path):
    first = new_key()
    api = await start_server(*db_config, db_encryption_key=key_file(tmp_path / "db.key", first))
    try:
        created = await api.ok("POST", "/api/v1/tasks", json_body=TASK)
        assert created["config"] == TASK["config"]
        assert (await api.ok("GET", f"/api/v1/tasks/{created['id']}"))["config"] == TASK["config"]
        agent = connect_agent(api.base, "sealed-agent", ADMIN_KEY)
        await agent.opened
        task_list = await agent.next("taskList")
        assert [t["config"] for t in task_list] in ([TASK["config"]], [])  # routed there or not yet
        [raw] = raw_configs(api.server.engine)
        assert SECRET not in raw and "example.com" not in raw and key_id(bytes.fromhex(first)) in raw
        await agent.disconnect()
    finally:
        await stop_server(api)
    assert SECRET.encode() not in stored_bytes(*db_config)


@pytest_twisted.ensureDeferred
async def test_keys_rotate_with_taskd_db_reencrypt(db_config, tmp_path):
    old, new = new_key(), new_key()
    api = await start_server(*db_config, db_encryption_key=key_file(tmp_path / "old.key", old))
    await api.ok("POST", "/api/v1/tasks", json_body=TASK)
    await stop_server(api)
    # New key first, old one still there to open what it sealed; then rewrite everything.
    both = key_file(tmp_path / "both.key", new, old)
    ini = tmp_path / "task-server.ini"
    ini.write_text(f"db-type = {db_config[0]}\ndb-connect-str = {db_config[1]}\ndb-encryption-key = {both}\n")
    done = subprocess.run([TASKD_DB, "--config", str(ini), "reencrypt"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"1 task config(s) sealed with key {key_id(bytes.fromhex(new))}" in done.stdout
    # Only the new key from now on: everything still opens.
    api = await start_server(*db_config, wipe=False, db_encryption_key=key_file(tmp_path / "new.key", new))
    try:
        [task] = await api.ok("GET", "/api/v1/tasks")
        assert task["config"] == TASK["config"]
        [raw] = raw_configs(api.server.engine)
        assert key_id(bytes.fromhex(new)) in raw and key_id(bytes.fromhex(old)) not in raw
    finally:
        await stop_server(api)


@pytest_twisted.ensureDeferred
async def test_without_a_key_config_is_stored_as_before_and_the_server_warns(db_config, logs):
    api = await start_server(*db_config)
    try:
        await api.ok("POST", "/api/v1/tasks", json_body=TASK)
        [raw] = raw_configs(api.server.engine)
        assert SECRET in raw
    finally:
        await stop_server(api)
    warned = [e for e in logs if "db-encryption-key is not set" in str(e.get("log_format", ""))]
    assert len(warned) == 1


def test_a_bad_key_file_stops_start_up_naming_the_key(tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_text("short\n")
    done = subprocess.run([TASKD_DB, "--db-type", "sqlite3", "--db-connect-str", str(tmp_path / "x.db"),
                           "--config", str(tmp_path / "none.ini"), "reencrypt"],
                          capture_output=True, text=True, timeout=60,
                          env={"TASKSERVER_DB_ENCRYPTION_KEY": str(bad), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and "db-encryption-key" in done.stderr and "bad.key" in done.stderr
