"""Connection strings carried over from the Go server keep working."""
from __future__ import annotations

import pytest

from taskd.db.engine import DEFAULT_SQLITE_PATH, DatabaseConfigError, create_engine, mysql_url, sqlite_path


def test_go_dsn_from_the_notes():
    url = mysql_url("DB_USERNAME:DB_PASSWORD@tcp(NGINX_REVERSE_PROXY:3306)/task_server?charset=utf8")
    assert url.drivername == "mysql+pymysql"
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "DB_USERNAME", "DB_PASSWORD", "NGINX_REVERSE_PROXY", 3306, "task_server")
    assert url.query["charset"] == "utf8mb4"  # Go's utf8 is 3-byte; taskd stores any Unicode


def test_go_dsn_password_with_special_characters_and_default_port():
    url = mysql_url("user:p@ss:w/rd@tcp(db.example)/tasks")
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "user", "p@ss:w/rd", "db.example", 3306, "tasks")


def test_go_dsn_unix_socket_and_no_password():
    url = mysql_url("root@unix(/run/mysqld/mysqld.sock)/task_server")
    assert url.username == "root" and url.password is None
    assert url.query["unix_socket"] == "/run/mysqld/mysqld.sock"


def test_sqlalchemy_urls_are_accepted_and_use_pymysql():
    assert mysql_url("mysql://u:p@h:3307/d").drivername == "mysql+pymysql"
    assert mysql_url("mysql+pymysql://u:p@h/d?charset=utf8mb4").query["charset"] == "utf8mb4"


@pytest.mark.parametrize("bad", ["", "not a dsn", "u:p@tcp(h:notaport)/db", "postgresql://u@h/d", "u:p@tcp(h:3306)/",
                                 "mysql://u:secret@h:abc/d"])
def test_bad_mysql_strings_name_the_key(bad):
    with pytest.raises(DatabaseConfigError, match="db-connect-str"):
        mysql_url(bad)


def test_sqlite_forms():
    assert sqlite_path("") == DEFAULT_SQLITE_PATH
    assert sqlite_path("file:/tmp/task-server.db?cache=shared&mode=rwc") == "/tmp/task-server.db"
    assert sqlite_path("sqlite:////var/lib/x.db") == "/var/lib/x.db"
    assert sqlite_path("/srv/t.db") == "/srv/t.db"


def test_sqlite_missing_directory_is_a_one_line_error(tmp_path):
    with pytest.raises(DatabaseConfigError, match=r"db-connect-str: directory .*nope.* does not exist"):
        create_engine("sqlite3", str(tmp_path / "nope" / "t.db"))


def test_sqlite_engine_uses_wal_and_foreign_keys(tmp_path):
    engine = create_engine("sqlite3", str(tmp_path / "t.db"))
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def test_unknown_db_type():
    with pytest.raises(DatabaseConfigError, match="db-type"):
        create_engine("postgres", "x")
