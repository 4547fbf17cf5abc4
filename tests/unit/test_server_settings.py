"""The task-server's option table, ServerSettings, log levels and the twistd plugin."""
from __future__ import annotations

import dataclasses
import io

import pytest
from twisted.logger import LogLevel
from twisted.python.reflect import namedAny

from taskd import logsetup
from taskd.config import ConfigError
from taskd.server.plugin import ServerOptions, TaskServerMaker
from taskd.server.settings import SERVER_OPTIONS, ServerSettings, load_server_settings

GO_NOTES_FILE = """\
log-level = 1
addr = :8082
db-type = mysql
db-connect-str = DB_USERNAME:DB_PASSWORD@tcp(NGINX_REVERSE_PROXY:3306)/task_server?charset=utf8
stats-enabled = true
statsd-addr = localhost:8125
statsd-type = standard
admin-key = YOUR_TASK_SERVER_API_KEY
exchange =
#rabbitmq-url = amqp://RMQ_USER:RMQ_PASSWORD@NGINX_REVERSE_PROXY:5672/
"""


def write(tmp_path, text: str) -> str:
    path = tmp_path / "task-server.ini"
    path.write_text(text)
    return str(path)


def load_error(**kwargs) -> str:
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as info:
        load_server_settings(**kwargs)
    return str(info.value)


def test_defaults():
    settings = load_server_settings(env={})
    assert settings == ServerSettings()
    assert (settings.log_level, settings.addr, settings.db_type) == (2, "tcp:8082", "sqlite3")
    assert settings.auth_valid_ttl == 300.0 and settings.auth_invalid_ttl == 30.0
    assert settings.max_body_size == 1048576 and settings.db_pool_size == 10


def test_fields_match_the_option_table():
    names = [f.name for f in dataclasses.fields(ServerSettings)]
    assert names == [opt.attr for opt in SERVER_OPTIONS] + ["config_path", "config_file_missing"]


def test_every_option_has_help():
    assert all(opt.help.endswith(".") and len(opt.help) > 20 for opt in SERVER_OPTIONS)


def test_file_from_the_go_operator_notes(tmp_path):
    path = write(tmp_path, GO_NOTES_FILE)
    settings = load_server_settings(path=path, env={})
    assert settings.log_level == 1
    assert settings.db_type == "mysql"
    assert settings.db_connect_str.startswith("DB_USERNAME:DB_PASSWORD@tcp(")
    assert settings.stats_enabled is True
    assert settings.admin_key == "YOUR_TASK_SERVER_API_KEY"
    assert settings.exchange == ""
    assert settings.config_path == path and settings.config_file_missing is False


def test_later_go_layout_app_api_key_and_stats_section(tmp_path):
    path = write(tmp_path, "app-api-key = k\n[stats]\nenabled = yes\naddr = statsd:9125\n"
                           "type = datadog\n")
    settings = load_server_settings(path=path, env={})
    assert settings.admin_key == "k"
    assert (settings.stats_enabled, settings.statsd_addr, settings.statsd_type) == (
        True, "statsd:9125", "datadog")


def test_new_keys(tmp_path):
    path = write(tmp_path, "db-pool-size = 20\nmax-body-size = 512k\nauth-valid-org-id = 1,2\n"
                           "auth-valid-ttl = 1m30s\nauth-invalid-ttl = 10\n")
    settings = load_server_settings(path=path, env={})
    assert settings.db_pool_size == 20 and settings.max_body_size == 524288
    assert settings.auth_valid_org_id == (1, 2)
    assert (settings.auth_valid_ttl, settings.auth_invalid_ttl) == (90.0, 10.0)


def test_precedence_file_env_flags(tmp_path):
    path = write(tmp_path, "log-level = 1\naddr = :9000\nexchange = fromfile\n")
    env = {"TASKSERVER_LOG_LEVEL": "4", "TASKSERVER_ADDR": "[::1]:9001"}
    settings = load_server_settings(path=path, env=env, flags={"addr": "127.0.0.1:9002"})
    assert settings.exchange == "fromfile"
    assert settings.log_level == 4
    assert settings.addr == "tcp:9002:interface=127.0.0.1"


def test_env_alias_and_env_names():
    env = {"TASKSERVER_APP_API_KEY": "k", "TASKSERVER_DB_CONNECT_STR": "/tmp/x.db"}
    settings = load_server_settings(env=env)
    assert (settings.admin_key, settings.db_connect_str) == ("k", "/tmp/x.db")


def test_missing_file_is_flagged_not_an_error(tmp_path):
    settings = load_server_settings(path=str(tmp_path / "absent.ini"), env={})
    assert settings.config_file_missing is True
    assert settings.config_path == str(tmp_path / "absent.ini")
    assert dataclasses.replace(settings, config_path=None, config_file_missing=False) == (
        ServerSettings())


def test_mysql_requires_db_connect_str(tmp_path):
    path = write(tmp_path, "db-type = mysql\n")
    assert load_error(path=path) == (
        f"db-connect-str: must be set when db-type is mysql (db-type from {path} line 1)")
    assert load_error(flags={"db-type": "mysql", "db-connect-str": "  "}).startswith(
        "db-connect-str: must be set")


@pytest.mark.parametrize("flags, start", [
    ({"log-level": "7"}, "log-level: '7' is not in 0..6"),
    ({"db-type": "postgres"}, "db-type: 'postgres' is not one of sqlite3|mysql"),
    ({"db-pool-size": "0"}, "db-pool-size: '0' is not in 1..100"),
    ({"db-timeout": "0"}, "db-timeout: '0' must be between 100ms and 1h"),
    ({"db-timeout": "soon"}, "db-timeout: 'soon' is not a duration"),
    ({"statsd-type": "graphite"}, "statsd-type: 'graphite' is not one of standard|datadog"),
    ({"auth-endpoint": "grafana.com"},
     "auth-endpoint: 'grafana.com' is not a http:// or https://"),
    ({"auth-valid-org-id": "1,x"}, "auth-valid-org-id: '1,x' has an item that is not an integer"),
    ({"auth-valid-ttl": "-5m"}, "auth-valid-ttl: '-5m' is not a duration"),
    ({"max-body-size": "lots"}, "max-body-size: 'lots' is not a size"),
    ({"stats-enabled": "maybe"}, "stats-enabled: 'maybe' is not a boolean"),
    ({"addr": ":99999"}, "addr: ':99999' has a port number outside 0..65535"),
])
def test_bad_values_name_the_key(flags, start):
    assert load_error(flags=flags).startswith(start)


SECRET = "hunter2-do-not-print"


def test_rabbitmq_password_is_redacted_in_errors():
    message = load_error(env={"TASKSERVER_RABBITMQ_URL": f"http://rmq:{SECRET}@broker/"})
    assert SECRET not in message
    assert message == ("rabbitmq-url: 'http://rmq:***@broker/' is not a amqp:// or amqps:// URL"
                       " (from TASKSERVER_RABBITMQ_URL)")


def test_admin_key_value_is_not_echoed(tmp_path):
    path = write(tmp_path, f"admin-key = {SECRET}\n  second-line\n")
    message = load_error(path=path)
    assert SECRET not in message and message.startswith("admin-key: value (not shown)")


def test_repr_hides_secrets():
    settings = ServerSettings(admin_key=SECRET, db_connect_str=f"u:{SECRET}@tcp(db:3306)/t",
                              rabbitmq_url=f"amqp://u:{SECRET}@rmq/")
    text = repr(settings)
    assert SECRET not in text
    assert "admin_key='***'" in text and "db_connect_str='u:***@tcp(db:3306)/t'" in text
    assert "admin_key=''" in repr(ServerSettings())


# -- log levels --------------------------------------------------------------

@pytest.mark.parametrize("level, expected", [
    (0, LogLevel.debug), (1, LogLevel.debug), (2, LogLevel.info), (3, LogLevel.warn),
    (4, LogLevel.error), (5, LogLevel.critical), (6, LogLevel.critical),
])
def test_go_levels_map_to_twisted_levels(level, expected):
    assert logsetup.log_level(level) is expected


def test_predicate_level_can_change_after_creation():
    predicate = logsetup.make_predicate(2)
    out = io.StringIO()
    observer = logsetup.observer_factory(predicate, "-", nodaemon=True)
    logsetup.set_level(predicate, 3)
    events = [{"log_level": LogLevel.info, "log_namespace": "t", "log_format": "quiet",
               "log_time": 0.0},
              {"log_level": LogLevel.warn, "log_namespace": "t", "log_format": "loud",
               "log_time": 0.0}]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdout", out)
        made = observer()
        for event in events:
            made(event)
    assert "loud" in out.getvalue() and "quiet" not in out.getvalue()


def test_observer_writes_to_twistd_logfile(tmp_path):
    logfile = tmp_path / "server.log"
    observer = logsetup.observer_factory(logsetup.make_predicate(1), str(logfile), False)()
    observer({"log_level": LogLevel.debug, "log_namespace": "t", "log_format": "hello file",
              "log_time": 0.0})
    assert "hello file" in logfile.read_text()


def test_daemon_without_logfile_logs_to_twistd_log(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    observer = logsetup.observer_factory(logsetup.make_predicate(), None, nodaemon=False)()
    observer({"log_level": LogLevel.info, "log_namespace": "t", "log_format": "to default",
              "log_time": 0.0})
    assert "to default" in (tmp_path / "twistd.log").read_text()


def test_daemon_cannot_log_to_stdout():
    with pytest.raises(SystemExit):
        logsetup.observer_factory(logsetup.make_predicate(), "-", nodaemon=False)()


# -- the plugin's options and maker ------------------------------------------

def parse(argv, parent=None) -> ServerOptions:
    options = ServerOptions()
    if parent is not None:
        options.parent = parent
    options.parseOptions(argv)
    return options


def test_options_have_a_flag_per_key_and_alias():
    options = ServerOptions()
    for opt in SERVER_OPTIONS:
        for name in (opt.name, *opt.aliases):
            assert name in options and options[name] is None
    assert options["config"] == "/etc/taskd/task-server.ini"


def test_only_given_flags_are_passed_on():
    options = parse(["-c", "x.ini", "--addr", ":1", "--app-api-key", "k"])
    assert options.flags() == {"addr": ":1", "app-api-key": "k"}
    assert options["config"] == "x.ini"


def test_post_options_installs_the_filtering_logger_into_twistd():
    parent = {"logger": None, "logfile": None, "nodaemon": True}
    options = parse([], parent)
    assert parent["logger"] == logsetup.TWISTD_LOGGER
    out = io.StringIO()
    logsetup.set_level(options.log_predicate, 4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdout", out)
        observer = namedAny(parent["logger"])()
        observer({"log_level": LogLevel.warn, "log_namespace": "t", "log_format": "dropped",
                  "log_time": 0.0})
        observer({"log_level": LogLevel.error, "log_namespace": "t", "log_format": "kept",
                  "log_time": 0.0})
    assert "kept" in out.getvalue() and "dropped" not in out.getvalue()


@pytest.mark.parametrize("parent", [{"logger": "my.logger"}, {"logger": None, "syslog": True}])
def test_users_own_logger_choice_is_kept(parent):
    before = dict(parent)
    parse([], parent)
    assert parent == before


def test_options_without_parent_do_not_fail():
    assert parse(["--log-level", "1"]).flags() == {"log-level": "1"}


def test_make_service_config_error_is_one_line_and_exit_2(tmp_path):
    path = write(tmp_path, "log-level = 1\nadmin-kye = x\n")
    err = io.StringIO()
    with pytest.raises(SystemExit) as info:
        TaskServerMaker().makeService(parse(["-c", path]), env={}, stderr=err)
    assert info.value.code == 2
    assert err.getvalue() == ("taskserver: config error: admin-kye: is not a known key; "
                              f"did you mean admin-key? (from {path} line 2)\n")


def test_make_service_passes_settings_and_level(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("taskd.server.assembly.make_service",
                        lambda settings: seen.append(settings) or "service")
    options = parse(["-c", str(tmp_path / "absent.ini"), "--log-level", "3"])
    assert TaskServerMaker().makeService(options, env={"TASKSERVER_EXCHANGE": "ev"}) == "service"
    assert seen[0].log_level == 3 and seen[0].exchange == "ev"
    assert seen[0].config_file_missing is True
    assert options.log_predicate.logLevelForNamespace("any") is LogLevel.warn


def test_make_service_start_up_error_is_one_line_and_exit_1(tmp_path, monkeypatch):
    from taskd.server import assembly

    def refuse(settings):
        raise assembly.StartupError("db-connect-str: cannot open the mysql database: refused")

    monkeypatch.setattr(assembly, "make_service", refuse)
    err = io.StringIO()
    with pytest.raises(SystemExit) as info:
        TaskServerMaker().makeService(parse(["-c", str(tmp_path / "absent.ini")]), env={},
                                      stderr=err)
    assert info.value.code == 1
    assert err.getvalue() == ("taskserver: start-up error: db-connect-str: cannot open the"
                              " mysql database: refused\n")


def test_server_liveness_keys_default_and_must_leave_room_for_a_heartbeat(tmp_path):
    settings = load_server_settings(env={})
    assert (settings.server_heartbeat_interval, settings.server_dead_after) == (5.0, 30.0)
    settings = load_server_settings(write(tmp_path, "server-heartbeat-interval = 200ms\nserver-dead-after = 1s\n"),
                                    env={})
    assert (settings.server_heartbeat_interval, settings.server_dead_after) == (0.2, 1.0)
    message = load_error(path=write(tmp_path, "server-heartbeat-interval = 10s\nserver-dead-after = 10s\n"))
    assert message.startswith("server-dead-after: must be longer than server-heartbeat-interval (10s)")
    assert "line 2" in message
    assert load_error(flags={"server-heartbeat-interval": "0s"}).startswith("server-heartbeat-interval:")
