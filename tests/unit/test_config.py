"""The generic config machinery: value parsers, INI reading, precedence, errors."""
from __future__ import annotations

import os

import pytest

from taskd.config import ConfigError, Option, load, usage_parameters
from taskd.configtypes import (
    byte_size,
    choice,
    int_list,
    int_range,
    parse_bool,
    parse_duration,
    parse_host_port,
    parse_listen_addr,
    url,
)

OPTIONS = (
    Option("log-level", int_range(0, 6), "2", "Level."),
    Option("addr", parse_listen_addr, ":8082", "Listen."),
    Option("name", str, "", "Name."),
    Option("api-key", str, "", "Key.", aliases=("app-api-key",), secret=True),
    Option("stats-enabled", parse_bool, "false", "Stats.", sections=(("stats", "enabled"),)),
    Option("statsd-addr", parse_host_port, "localhost:8125", "statsd.",
           sections=(("stats", "addr"),)),
    Option("ttl", parse_duration, "5m", "TTL."),
)


def write(tmp_path, text: str) -> str:
    path = tmp_path / "test.ini"
    path.write_text(text)
    return str(path)


def error(**kwargs) -> ConfigError:
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as info:
        load(OPTIONS, env_prefix="TEST_", **kwargs)
    return info.value


# -- parsers ---------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("5m", 300.0), ("30s", 30.0), ("1m30s", 90.0), ("1h", 3600.0), ("500ms", 0.5),
    ("1.5s", 1.5), ("1h2m3s", 3723.0), ("250us", 0.00025), ("300", 300.0), ("2.5", 2.5),
    ("0", 0.0), (" 10s ", 10.0),
])
def test_duration_accepts_go_form_and_plain_seconds(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["-5s", "-1", "abc", "5 m", "m", "5x", "", "1m-30s", "nan",
                                  "inf"])
def test_duration_rejects_negatives_and_garbage(text):
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


@pytest.mark.parametrize("text, value", [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("On", True),
    ("false", False), ("False", False), ("0", False), ("no", False), ("OFF", False),
])
def test_bool_words(text, value):
    assert parse_bool(text) is value


@pytest.mark.parametrize("text", ["", "2", "y", "enabled"])
def test_bool_rejects_other_words(text):
    with pytest.raises(ValueError, match="is not a boolean"):
        parse_bool(text)


@pytest.mark.parametrize("text, value", [
    ("1048576", 1048576), ("512k", 524288), ("1M", 1048576), ("1m", 1048576),
    ("1MiB", 1048576), ("1MB", 1000000), ("2kB", 2000), ("1G", 1024**3), ("1.5k", 1536),
])
def test_byte_size_units(text, value):
    assert byte_size()(text) == value


@pytest.mark.parametrize("text", ["", "1T", "k", "-1", "0.3", "1 M B"])
def test_byte_size_rejects_garbage(text):
    with pytest.raises(ValueError):
        byte_size()(text)


def test_byte_size_range():
    with pytest.raises(ValueError, match=">= 1"):
        byte_size(lo=1)("0")


def test_int_range():
    assert int_range(0, 6)("6") == 6
    assert int_range(0, 6)(" 0 ") == 0
    with pytest.raises(ValueError, match="is not in 0..6"):
        int_range(0, 6)("7")
    with pytest.raises(ValueError, match="is not an integer"):
        int_range(0, 6)("1.0")


def test_int_list():
    parse = int_list(lo=1)
    assert parse("1,2") == (1, 2)
    assert parse(" 3 , 4 ") == (3, 4)
    assert parse("") == ()
    with pytest.raises(ValueError, match="not an integer"):
        parse("1,,2")
    with pytest.raises(ValueError, match=">= 1"):
        parse("0,1")


def test_choice_is_case_insensitive_and_canonical():
    parse = choice("sqlite3", "mysql")
    assert parse("MySQL") == "mysql"
    with pytest.raises(ValueError, match=r"is not one of sqlite3\|mysql"):
        parse("postgres")


def test_url():
    parse = url("http", "https")
    assert parse("https://grafana.com") == "https://grafana.com"
    with pytest.raises(ValueError, match="http:// or https://"):
        parse("ftp://grafana.com")
    with pytest.raises(ValueError, match="no host"):
        parse("https://")
    with pytest.raises(ValueError, match="not a valid URL"):
        parse("http://host:99999999/")


@pytest.mark.parametrize("text, endpoint", [
    (":8082", "tcp:8082"),
    ("localhost:8082", "tcp:8082:interface=localhost"),
    ("127.0.0.1:80", "tcp:80:interface=127.0.0.1"),
    ("[::1]:8082", r"tcp6:8082:interface=\:\:1"),
    ("[::]:0", r"tcp6:0:interface=\:\:"),
    ("tcp:8082", "tcp:8082"),
    ("tcp:port=80:interface=127.0.0.1", "tcp:port=80:interface=127.0.0.1"),
    ("tcp6:8082", "tcp6:8082"),
    ("unix:/run/taskd.sock", "unix:/run/taskd.sock"),
    ("ssl:8443:privateKey=/no/such/key.pem", "ssl:8443:privateKey=/no/such/key.pem"),
    ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
])
def test_listen_addr_forms(text, endpoint):
    assert parse_listen_addr(text) == endpoint


@pytest.mark.parametrize("text", [
    "foo:bar:baz", "8082", "", "localhost:http", "[nothost]:80", "unix:", "tcp:abc",
    "tcp:80:bogus=1", "ssl", "::1:8082",
])
def test_listen_addr_rejects_other_text(text):
    with pytest.raises(ValueError, match="is not :PORT, HOST:PORT or a Twisted endpoint"):
        parse_listen_addr(text)


@pytest.mark.parametrize("text", [":65536", "host:99999", "[::1]:70000", "tcp:65536",
                                  "tcp6:port=70000"])
def test_listen_addr_rejects_bad_ports(text):
    with pytest.raises(ValueError, match="port number outside 0..65535"):
        parse_listen_addr(text)


def test_host_port():
    assert parse_host_port("localhost:8125") == "localhost:8125"
    assert parse_host_port("[::1]:8125") == "[::1]:8125"
    for bad in (":8125", "localhost", "localhost:0", "host:65536"):
        with pytest.raises(ValueError):
            parse_host_port(bad)


# -- loading ---------------------------------------------------------------

def test_defaults_are_parsed_like_values():
    values = load(OPTIONS, env={}, env_prefix="TEST_")
    assert values["addr"] == "tcp:8082"
    assert values["ttl"] == 300.0
    assert values.origins["addr"] == "default"
    assert values.file_missing is False


def test_missing_file_gives_defaults(tmp_path):
    values = load(OPTIONS, path=str(tmp_path / "absent.ini"), env={}, env_prefix="TEST_")
    assert values["log-level"] == 2
    assert values.file_missing is True


def test_flat_file_with_comments_quotes_and_empty_values(tmp_path):
    path = write(tmp_path, '# comment\n; other comment\n\nlog-level = 1\naddr = :9000\n'
                           'name =\napi-key = "k#y;1"\nTTL=1m30s\n')
    values = load(OPTIONS, path=path, env={}, env_prefix="TEST_")
    assert (values["log-level"], values["addr"], values["name"]) == (1, "tcp:9000", "")
    assert values["api-key"] == "k#y;1"
    assert values["ttl"] == 90.0
    assert values.origins["addr"] == f"{path} line 5"


def test_precedence_file_then_env_then_flags(tmp_path):
    path = write(tmp_path, "log-level = 1\naddr = :9000\nname = file\n")
    env = {"TEST_LOG_LEVEL": "3", "TEST_ADDR": ":9100"}
    values = load(OPTIONS, path=path, env=env, env_prefix="TEST_", flags={"addr": ":9200"})
    assert values["name"] == "file"
    assert values["log-level"] == 3
    assert values["addr"] == "tcp:9200"
    assert values.origins == {**values.origins, "name": f"{path} line 3",
                              "log-level": "TEST_LOG_LEVEL", "addr": "--addr"}


def test_empty_env_vars_and_none_flags_do_not_override(tmp_path):
    path = write(tmp_path, "name = file\n")
    values = load(OPTIONS, path=path, env={"TEST_NAME": ""}, env_prefix="TEST_",
                  flags={"name": None})
    assert values["name"] == "file"


def test_aliases_in_file_env_and_flags(tmp_path):
    path = write(tmp_path, "app-api-key = fromfile\n")
    assert load(OPTIONS, path=path, env={}, env_prefix="TEST_")["api-key"] == "fromfile"
    env = {"TEST_APP_API_KEY": "fromenv"}
    assert load(OPTIONS, path=path, env=env, env_prefix="TEST_")["api-key"] == "fromenv"
    flags = {"app-api-key": "fromflag"}
    assert load(OPTIONS, env=env, env_prefix="TEST_", flags=flags)["api-key"] == "fromflag"


def test_key_and_alias_both_in_one_source_is_an_error(tmp_path):
    path = write(tmp_path, "api-key = a\napp-api-key = b\n")
    e = error(path=path)
    assert str(e) == (f"app-api-key: sets api-key again; api-key already set it at {path} line 1"
                      f" (from {path} line 2)")


def test_stats_section(tmp_path):
    path = write(tmp_path, "name = x\n[stats]\nenabled = true\naddr = statsd:8125\n")
    values = load(OPTIONS, path=path, env={}, env_prefix="TEST_")
    assert values["stats-enabled"] is True
    assert values["statsd-addr"] == "statsd:8125"


def test_stats_section_and_flat_key_together_is_an_error(tmp_path):
    path = write(tmp_path, "stats-enabled = false\n[stats]\nenabled = true\n")
    assert error(path=path).key == "[stats] enabled"


def test_unknown_key_suggests_the_closest(tmp_path):
    path = write(tmp_path, "log-level = 1\nadress = :80\n")
    assert str(error(path=path)) == (
        f"adress: is not a known key; did you mean addr? (from {path} line 2)")


def test_unknown_key_in_stats_section_suggests_from_that_section(tmp_path):
    path = write(tmp_path, "[stats]\nenabeld = true\n")
    assert str(error(path=path)) == (
        f"[stats] enabeld: is not a known key; did you mean [stats] enabled? (from {path} line 2)")


def test_unknown_key_without_close_match(tmp_path):
    path = write(tmp_path, "zzzzzz = 1\n")
    assert str(error(path=path)) == f"zzzzzz: is not a known key (from {path} line 1)"


@pytest.mark.parametrize("header", ["[server]", "[DEFAULT]"])
def test_unknown_section(tmp_path, header):
    path = write(tmp_path, f"name = x\n\n{header}\nname = y\n")
    assert str(error(path=path)) == (
        f"{header}: is not a known section; the only one is [stats] (from {path} line 3)")


def test_line_without_equals_is_malformed(tmp_path):
    path = write(tmp_path, "name = x\naddr :8082\n")
    assert str(error(path=path)) == (
        f"config: line is not 'key = value', a [section] or a comment (from {path} line 2)")


def test_duplicate_key(tmp_path):
    path = write(tmp_path, "name = x\n# again\nname = y\n")
    assert str(error(path=path)) == f"name: is set twice (from {path} line 3)"


def test_unreadable_file(tmp_path):
    assert str(error(path=str(tmp_path))) == (
        f"config: cannot read the file: Is a directory (from {tmp_path})")


def test_bad_value_names_key_value_and_line(tmp_path):
    path = write(tmp_path, "log-level = 1\n\naddr = foo:bar:baz\n")
    assert str(error(path=path)) == (
        f"addr: 'foo:bar:baz' is not :PORT, HOST:PORT or a Twisted endpoint string"
        f" (from {path} line 3)")


def test_bad_value_from_env_and_flag_name_their_source():
    assert str(error(env={"TEST_LOG_LEVEL": "9"})) == (
        "log-level: '9' is not in 0..6 (from TEST_LOG_LEVEL)")
    assert str(error(flags={"ttl": "soon"})).endswith("(from --ttl)")


def test_overridden_bad_file_value_is_still_reported(tmp_path):
    path = write(tmp_path, "log-level = 9\n")
    assert error(path=path, flags={"log-level": "1"}).origin == f"{path} line 1"


def test_unknown_flag():
    assert str(error(flags={"bogus": "1"})) == "--bogus: is not a known option"


SECRET = "hunter2-do-not-print"


def test_secret_values_never_appear_in_errors(tmp_path):
    strict = Option("token", int_range(), "0", "Numeric token.", secret=True)
    with pytest.raises(ConfigError) as info:
        load([strict], env={"TEST_TOKEN": SECRET}, env_prefix="TEST_")
    assert SECRET not in str(info.value)
    assert str(info.value) == "token: value (not shown) is not an integer (from TEST_TOKEN)"

    path = write(tmp_path, f"api-key = {SECRET}\n  {SECRET}-continued\n")
    message = str(error(path=path))
    assert SECRET not in message and message.startswith("api-key: value (not shown)")


def test_error_is_one_line():
    e = ConfigError("name", "bad\nvalue", "here")
    assert str(e) == "name: bad value (from here)"


def test_usage_parameters_cover_keys_and_aliases_with_none_defaults():
    rows = usage_parameters(OPTIONS, "TEST_")
    assert [row[0] for row in rows] == ["log-level", "addr", "name", "api-key", "app-api-key",
                                       "stats-enabled", "statsd-addr", "ttl"]
    assert all(row[2] is None for row in rows)
    assert rows[1][3] == "Listen. Default: :8082. Env: TEST_ADDR."
    assert rows[4][3] == "Alias of --api-key."


def test_load_does_not_read_os_environ_when_env_given(monkeypatch):
    monkeypatch.setitem(os.environ, "TEST_NAME", "from-os")
    assert load(OPTIONS, env={}, env_prefix="TEST_")["name"] == ""
