"""Alembic revisions against the real databases: they build exactly the models' schema,
upgrade a database holding data without losing it, and step back cleanly."""
from __future__ import annotations

import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from taskd.db import migrate, models
from taskd.db.engine import create_engine

REVISIONS = [rev for rev, _ in migrate.history()]
NOW = datetime(2026, 1, 2, 3, 4, 5, 123456)


@pytest.fixture(params=["sqlite", "mysql"])
def fresh_db(request, tmp_path, mysql_dbs):
    if request.param == "sqlite":
        cfg = ("sqlite3", str(tmp_path / "m.db"))
    else:
        cfg = ("mysql", mysql_dbs.dsn(mysql_dbs.create("mig")))
    engine = create_engine(*cfg, pool_size=1)
    yield cfg, engine
    engine.dispose()


def _diff(engine: sa.Engine) -> list:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": False})
        return compare_metadata(ctx, models.metadata)


def test_history_is_numbered_and_linear():
    assert REVISIONS == [f"{i:04d}" for i in range(1, len(REVISIONS) + 1)]
    assert migrate.head_revision() == REVISIONS[-1]


def test_upgrade_from_zero_matches_models(fresh_db):
    _, engine = fresh_db
    assert migrate.current_revision(engine) is None
    migrate.upgrade(engine)
    assert migrate.current_revision(engine) == migrate.head_revision()
    assert _diff(engine) == []


def test_upgrade_twice_is_a_no_op(fresh_db):
    _, engine = fresh_db
    migrate.upgrade(engine)
    migrate.upgrade(engine)
    assert migrate.current_revision(engine) == migrate.head_revision()


def _seed(conn: sa.Connection) -> None:
    conn.execute(sa.insert(models.agent).values(
        id=1, org_id=1, name="agent1", enabled=False, public=True, online=False,
        created=NOW, updated=NOW))
    conn.execute(sa.insert(models.agent_tag).values(org_id=1, agent_id=1, tag="dc1", created=NOW))
    conn.execute(sa.insert(models.task).values(
        id=1, org_id=1, name="example-task-1", task_type="", config={"/example-task": {"param1": "value1"}},
        interval=300, route={"type": "byIds", "config": {"ids": [1]}}, enabled=True, created=NOW, updated=NOW))
    conn.execute(sa.insert(models.task_metric).values(task_id=1, namespace="/example-task/*", version=0, created=NOW))
    conn.execute(sa.insert(models.route_by_id_index).values(task_id=1, agent_id=1, created=NOW))


@pytest.mark.parametrize("revision", REVISIONS)
def test_each_revision_upgrades_a_database_holding_data(fresh_db, revision):
    """Data written at the revision before `revision` survives upgrading through it to head."""
    _, engine = fresh_db
    start = REVISIONS.index(revision)
    if start == 0:
        # 0001 creates the schema: seed right after it, then run every later revision.
        migrate.upgrade(engine, revision)
    else:
        migrate.upgrade(engine, REVISIONS[start - 1])
    with engine.begin() as conn:
        _seed(conn)
    migrate.upgrade(engine)
    with engine.connect() as conn:
        task = conn.execute(sa.select(models.task)).one()
        assert task.config == {"/example-task": {"param1": "value1"}}
        assert task.route == {"type": "byIds", "config": {"ids": [1]}}
        agent = conn.execute(sa.select(models.agent)).one()
        assert agent.created == NOW  # microseconds kept on MySQL too
        assert conn.execute(sa.select(models.agent_tag.c.tag)).scalars().all() == ["dc1"]
        assert conn.execute(sa.select(sa.func.count()).select_from(models.route_by_id_index)).scalar() == 1
    assert _diff(engine) == []


def test_downgrade_to_base_removes_every_table(fresh_db):
    _, engine = fresh_db
    migrate.upgrade(engine)
    migrate.downgrade(engine, "base")
    names = set(sa.inspect(engine).get_table_names())
    assert names & {t.name for t in models.metadata.sorted_tables} == set()
    migrate.upgrade(engine)
    assert _diff(engine) == []


@pytest.mark.parametrize("parent", ["agent", "task"])
def test_cascade_deletes_children_at_the_database_level(fresh_db, parent):
    """The foreign keys themselves cascade (not only the stores' explicit deletes)."""
    _, engine = fresh_db
    migrate.upgrade(engine)
    with engine.begin() as conn:
        _seed(conn)
        _seed_status(conn)
    with engine.begin() as conn:
        conn.execute(sa.delete(models.metadata.tables[parent]))
    children = {"agent": (models.agent_tag, models.route_by_id_index, models.task_status),
                "task": (models.task_metric, models.route_by_id_index, models.task_status)}
    with engine.connect() as conn:
        for table in children[parent]:
            assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() == 0, table.name


# -- 0002: task_status -------------------------------------------------------------------

def _seed_status(conn: sa.Connection) -> None:
    conn.execute(sa.insert(models.task_status).values(
        task_id=1, agent_id=1, executor="snap", outcome="error", error="timed out", last_run=NOW, duration=0.25,
        metrics=None, runs=2**40, failures=1, skipped=0, updated=NOW))


def test_0002_adds_task_status_to_a_database_holding_0001_data(fresh_db):
    _, engine = fresh_db
    migrate.upgrade(engine, "0001")
    with engine.begin() as conn:
        _seed(conn)
    migrate.upgrade(engine, "0002")
    assert migrate.current_revision(engine) == "0002"
    with engine.begin() as conn:
        assert conn.execute(sa.select(models.task.c.name)).scalars().all() == ["example-task-1"]
        assert conn.execute(sa.select(models.agent.c.created)).scalar() == NOW
        assert conn.execute(sa.select(sa.func.count()).select_from(models.task_status)).scalar() == 0
        _seed_status(conn)
    with engine.connect() as conn:
        row = conn.execute(sa.select(models.task_status)).one()
    assert (row.outcome, row.last_run, row.updated, row.runs, row.duration) == ("error", NOW, NOW, 2**40, 0.25)
    indexes = {ix["name"]: ix["column_names"] for ix in sa.inspect(engine).get_indexes("task_status")}
    assert indexes["ix_task_status_agent_id_outcome"] == ["agent_id", "outcome"]
    assert sa.inspect(engine).get_pk_constraint("task_status")["constrained_columns"] == ["task_id", "agent_id"]


def test_0002_primary_key_is_one_row_per_task_and_agent(fresh_db):
    _, engine = fresh_db
    migrate.upgrade(engine, "0002")
    with engine.begin() as conn:
        _seed(conn)
        _seed_status(conn)
    with pytest.raises(sa.exc.IntegrityError):
        with engine.begin() as conn:
            _seed_status(conn)


def test_0002_downgrade_drops_only_task_status(fresh_db):
    _, engine = fresh_db
    migrate.upgrade(engine, "0002")
    with engine.begin() as conn:
        _seed(conn)
        _seed_status(conn)
    migrate.downgrade(engine, "0001")
    assert migrate.current_revision(engine) == "0001"
    names = set(sa.inspect(engine).get_table_names())
    assert "task_status" not in names and {"agent", "task", "route_by_id_index"} <= names
    with engine.connect() as conn:
        assert conn.execute(sa.select(models.task.c.name)).scalars().all() == ["example-task-1"]
        assert conn.execute(sa.select(sa.func.count()).select_from(models.route_by_id_index)).scalar() == 1
    migrate.upgrade(engine, "0002")
    with engine.begin() as conn:
        _seed_status(conn)  # the table is back, empty, and usable


# -- 0003: server_instance ---------------------------------------------------------------

def _seed_instance(conn: sa.Connection, id_: str = "0" * 36) -> None:
    conn.execute(sa.insert(models.server_instance).values(
        id=id_, name="web-1:8082", hostname="web-1", addr="tcp:8082", version="1.2.3", started=NOW,
        last_seen=NOW))


def test_0003_adds_server_instance_to_a_database_holding_0002_data(fresh_db):
    _, engine = fresh_db
    migrate.upgrade(engine, "0002")
    with engine.begin() as conn:
        _seed(conn)
        _seed_status(conn)
        conn.execute(sa.insert(models.agent_session).values(
            id="s1", agent_id=1, version=1, remote_ip="10.0.0.1", server="web-1:8082", created=NOW))
    migrate.upgrade(engine, "0003")
    assert migrate.current_revision(engine) == "0003"
    with engine.begin() as conn:
        assert conn.execute(sa.select(models.task.c.name)).scalars().all() == ["example-task-1"]
        assert conn.execute(sa.select(models.task_status.c.runs)).scalar() == 2**40
        assert conn.execute(sa.select(models.agent_session.c.server)).scalar() == "web-1:8082"
        assert conn.execute(sa.select(sa.func.count()).select_from(models.server_instance)).scalar() == 0
        _seed_instance(conn)
    with engine.connect() as conn:
        row = conn.execute(sa.select(models.server_instance)).one()
    assert (row.name, row.started, row.last_seen) == ("web-1:8082", NOW, NOW)  # microseconds kept
    indexes = {ix["name"]: ix["column_names"] for ix in sa.inspect(engine).get_indexes("server_instance")}
    assert indexes["ix_server_instance_name"] == ["name"]
    assert indexes["ix_server_instance_last_seen"] == ["last_seen"]
    with pytest.raises(sa.exc.IntegrityError):  # one row per run
        with engine.begin() as conn:
            _seed_instance(conn)


def test_0003_downgrade_drops_only_server_instance(fresh_db):
    _, engine = fresh_db
    migrate.upgrade(engine, "0003")
    with engine.begin() as conn:
        _seed(conn)
        _seed_status(conn)
        _seed_instance(conn)
    migrate.downgrade(engine, "0002")
    assert migrate.current_revision(engine) == "0002"
    names = set(sa.inspect(engine).get_table_names())
    assert "server_instance" not in names and {"agent", "task", "task_status"} <= names
    with engine.connect() as conn:
        assert conn.execute(sa.select(models.task.c.name)).scalars().all() == ["example-task-1"]
        assert conn.execute(sa.select(sa.func.count()).select_from(models.task_status)).scalar() == 1
    migrate.upgrade(engine, "0003")
    with engine.begin() as conn:
        _seed_instance(conn)  # the table is back, empty, and usable


# -- 0004: agent_token -------------------------------------------------------------------

def _seed_token(conn: sa.Connection, agent_id: int = 1, digest: str = "a" * 64) -> None:
    conn.execute(sa.insert(models.agent_token).values(agent_id=agent_id, token_hash=digest, created=NOW))


def test_0004_adds_agent_token_to_a_database_holding_0003_data(fresh_db):
    _, engine = fresh_db
    migrate.upgrade(engine, "0003")
    with engine.begin() as conn:
        _seed(conn)
        _seed_status(conn)
        _seed_instance(conn)
    migrate.upgrade(engine, "0004")
    assert migrate.current_revision(engine) == "0004"
    with engine.begin() as conn:
        assert conn.execute(sa.select(models.task.c.name)).scalars().all() == ["example-task-1"]
        assert conn.execute(sa.select(models.server_instance.c.name)).scalar() == "web-1:8082"
        assert conn.execute(sa.select(sa.func.count()).select_from(models.agent_token)).scalar() == 0
        _seed_token(conn)
    with engine.connect() as conn:
        assert conn.execute(sa.select(models.agent_token)).one().created == NOW
    with pytest.raises(sa.exc.IntegrityError):  # one token per agent
        with engine.begin() as conn:
            _seed_token(conn, digest="b" * 64)
    with pytest.raises(sa.exc.IntegrityError):  # a token hash names one agent
        with engine.begin() as conn:
            conn.execute(sa.insert(models.agent).values(id=2, org_id=1, name="agent2", enabled=False, public=False,
                                                        online=False, created=NOW, updated=NOW))
            _seed_token(conn, agent_id=2)
    with engine.begin() as conn:  # deleting the agent revokes its token (the FK cascades)
        conn.execute(sa.delete(models.agent))
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(models.agent_token)).scalar() == 0


def test_0004_downgrade_drops_only_agent_token(fresh_db):
    _, engine = fresh_db
    migrate.upgrade(engine, "0004")
    with engine.begin() as conn:
        _seed(conn)
        _seed_token(conn)
    migrate.downgrade(engine, "0003")
    assert migrate.current_revision(engine) == "0003"
    names = set(sa.inspect(engine).get_table_names())
    assert "agent_token" not in names and {"agent", "task", "server_instance"} <= names
    with engine.connect() as conn:
        assert conn.execute(sa.select(models.agent.c.name)).scalars().all() == ["agent1"]
    migrate.upgrade(engine, "0004")
    with engine.begin() as conn:
        _seed_token(conn)  # the table is back, empty, and usable


def test_taskd_db_command_upgrades_and_reports(fresh_db, tmp_path):
    (db_type, connect_str), engine = fresh_db
    # The server's own example file, every other key and section in it: taskd-db reads
    # just the database keys and leaves the rest to the server.
    example = (Path(__file__).parents[2] / "etc" / "task-server.ini").read_text()
    lines = [ln for ln in example.splitlines() if not ln.startswith(("db-type", "db-connect-str"))]
    cfg = tmp_path / "server.ini"
    cfg.write_text(f"db-type = {db_type}\ndb-connect-str = {connect_str}\n" + "\n".join(lines) + "\n")
    cli = [sys.executable, "-m", "taskd.db.cli", "--config", str(cfg)]
    out = subprocess.run(cli + ["upgrade"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert migrate.current_revision(engine) == migrate.head_revision()
    out = subprocess.run(cli + ["current"], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == f"database: {migrate.head_revision()}; newest: {migrate.head_revision()}"


def test_taskd_db_command_names_a_bad_key_in_one_line(tmp_path):
    cfg = tmp_path / "server.ini"
    cfg.write_text("db-type = postgres\n")
    out = subprocess.run([sys.executable, "-m", "taskd.db.cli", "--config", str(cfg), "upgrade"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1
    assert "db-type" in out.stderr and "Traceback" not in out.stderr


def test_taskd_db_refuses_a_misspelt_database_key_instead_of_using_the_default(tmp_path):
    cfg = tmp_path / "server.ini"
    cfg.write_text("db-type = sqlite3\ndb-conect-str = /somewhere/else.db\nadmin-key = x\n")
    out = subprocess.run([sys.executable, "-m", "taskd.db.cli", "--config", str(cfg), "current"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "db-conect-str" in out.stderr and "db-connect-str" in out.stderr and "Traceback" not in out.stderr


def test_migrations_ship_inside_the_package():
    assert (Path(migrate.MIGRATIONS) / "env.py").is_file()
    assert Path(migrate.MIGRATIONS).is_relative_to(Path(migrate.__file__).parent)


# -- 0005: ids never reused --------------------------------------------------------------

def _max_ids(conn: sa.Connection) -> tuple[int, int]:
    return (conn.execute(sa.select(sa.func.max(models.agent.c.id))).scalar(),
            conn.execute(sa.select(sa.func.max(models.task.c.id))).scalar())


def test_0005_keeps_every_row_and_child_and_ids_are_never_reused_after_it(fresh_db):
    """On sqlite the tables are rebuilt with foreign keys off: no child row may be lost
    to a cascade, nor left pointing at the old table."""
    _, engine = fresh_db
    migrate.upgrade(engine, "0004")
    with engine.begin() as conn:
        _seed(conn)
        _seed_status(conn)
        _seed_token(conn)
    migrate.upgrade(engine, "0005")
    assert migrate.current_revision(engine) == "0005"
    with engine.begin() as conn:
        for table in (models.agent_tag, models.route_by_id_index, models.task_metric, models.task_status,
                      models.agent_token):
            assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() == 1, table.name
        # The newest agent and task are deleted, then new ones created: new ids.
        conn.execute(sa.delete(models.agent).where(models.agent.c.id == 1))
        conn.execute(sa.delete(models.task).where(models.task.c.id == 1))
        assert conn.execute(sa.select(sa.func.count()).select_from(models.agent_tag)).scalar() == 0  # still cascades
        conn.execute(sa.insert(models.agent).values(org_id=3, name="newcomer", enabled=False, public=True,
                                                    online=False, created=NOW, updated=NOW))
        conn.execute(sa.insert(models.task).values(
            org_id=1, name="t2", task_type="", config={}, interval=60, route={"type": "any", "config": {}},
            enabled=True, created=NOW, updated=NOW))
        assert _max_ids(conn) == (2, 2)
    migrate.upgrade(engine)
    assert _diff(engine) == []


def test_0005_downgrade_keeps_the_rows(fresh_db):
    _, engine = fresh_db
    migrate.upgrade(engine, "0005")
    with engine.begin() as conn:
        _seed(conn)
    migrate.downgrade(engine, "0004")
    assert migrate.current_revision(engine) == "0004"
    with engine.connect() as conn:
        assert conn.execute(sa.select(models.agent.c.name)).scalars().all() == ["agent1"]
        assert conn.execute(sa.select(models.agent_tag.c.tag)).scalars().all() == ["dc1"]
    migrate.upgrade(engine, "0005")
    assert migrate.current_revision(engine) == "0005"


# -- 0006: tags per org ------------------------------------------------------------------

def _tag(conn: sa.Connection, org_id: int, tag: str = "dc1") -> None:
    conn.execute(sa.insert(models.agent_tag).values(org_id=org_id, agent_id=1, tag=tag, created=NOW))


def test_0006_lets_two_orgs_put_the_same_tag_on_one_agent(fresh_db):
    _, engine = fresh_db
    migrate.upgrade(engine, "0005")
    with engine.begin() as conn:
        _seed(conn)  # agent 1 (org 1, public) tagged dc1 by org 1
    with pytest.raises(sa.exc.IntegrityError):  # before: one dc1 per agent, whoever set it
        with engine.begin() as conn:
            _tag(conn, 2)
    migrate.upgrade(engine, "0006")
    with engine.begin() as conn:
        _tag(conn, 2)
    with pytest.raises(sa.exc.IntegrityError):  # still once per org
        with engine.begin() as conn:
            _tag(conn, 2)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(models.agent_tag.c.org_id, models.agent_tag.c.tag)
                            .order_by(models.agent_tag.c.org_id)).all()
        assert [tuple(r) for r in rows] == [(1, "dc1"), (2, "dc1")]
    assert _diff(engine) == []


def test_0006_downgrade_drops_only_other_orgs_tags(fresh_db):
    _, engine = fresh_db
    migrate.upgrade(engine, "0006")
    with engine.begin() as conn:
        _seed(conn)
        _tag(conn, 2)
        _tag(conn, 2, "edge")
    migrate.downgrade(engine, "0005")
    with engine.connect() as conn:
        rows = conn.execute(sa.select(models.agent_tag.c.org_id, models.agent_tag.c.tag)).all()
        assert [tuple(r) for r in rows] == [(1, "dc1")]
