"""The task-server's keys, their meaning, and the frozen settings built from them.

One table drives the file reader, the environment variables, the twistd flags and
their help, so a key cannot be accepted in one place and unknown in another. Key
names are the Go task-server's, so its config files keep working; ``app-api-key``
and the ``[stats]`` section are the later Go spellings. ``db-pool-size`` and
``max-body-size`` are new.

Settings are frozen and typed so the rest of the server never re-parses strings,
and their repr hides secrets so they can be logged at start-up (the original
printed its admin key in clear).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from taskd.common_options import logging_options, stats_options, metrics_option
from taskd.config import ConfigError, Option, load
from taskd.configtypes import (
    byte_size,
    choice,
    int_list,
    int_range,
    parse_bool,
    parse_duration,
    parse_listen_addr,
    url,
)
from taskd.db.options import DB_OPTIONS, DEFAULT_SQLITE_PATH, redact_userinfo  # noqa: F401
from taskd.stats import SERVER_PREFIX

ENV_PREFIX = "TASKSERVER_"
DEFAULT_CONFIG_PATH = "/etc/taskd/task-server.ini"


def positive_duration(raw: str) -> float:
    """A duration that drives a timer, where 0 would mean a busy loop."""
    seconds = parse_duration(raw)
    if seconds <= 0:
        raise ValueError("must be longer than 0, e.g. 2s or 500ms")
    return seconds


SERVER_OPTIONS: tuple[Option, ...] = (
    *logging_options(),
    Option("addr", parse_listen_addr, ":8082",
           "Where the REST API and the agents' websocket listen: :PORT, HOST:PORT,"
           " [IPv6]:PORT or a Twisted endpoint such as ssl:8443:privateKey=key.pem."),
    *DB_OPTIONS,
    *stats_options("server", SERVER_PREFIX),
    metrics_option("server"),
    Option("admin-key", str, "",
           "API key that acts as an admin of org 1; empty means no admin key is accepted.",
           aliases=("app-api-key",), secret=True),
    Option("exchange", str, "",
           "RabbitMQ topic exchange carrying events between servers that share a"
           " database; empty keeps events inside this process."),
    Option("rabbitmq-url", url("amqp", "amqps"), "amqp://guest:guest@localhost:5672/",
           "RabbitMQ broker URL, used only when exchange is set.",
           secret=True, redact=redact_userinfo),
    Option("rabbitmq-queue-expiry", parse_duration, "10m",
           "How long the broker keeps this server's event queue (and what waits in it)"
           " after the server disconnects; a server away longer relies on the periodic"
           " reconciliation for what it missed."),
    Option("auth-endpoint", url("http", "https"), "https://grafana.com",
           "http(s) URL of the grafana.com-style service that checks API keys."),
    Option("auth-valid-org-id", int_list(lo=1), "",
           "Comma-separated org ids whose keys are accepted; empty accepts every org."),
    Option("auth-valid-ttl", parse_duration, "5m",
           "How long a valid API key is cached: a duration such as 30s, 5m, 1h, or seconds."),
    Option("auth-invalid-ttl", parse_duration, "30s",
           "How long a rejected API key is cached: a duration such as 30s, 5m, or seconds."),
    Option("auth-max-concurrent", int_range(lo=1), "20",
           "Most API-key checks sent to auth-endpoint at once; more wait in a queue."),
    Option("auth-max-queued", int_range(lo=0), "1000",
           "Most API-key checks waiting for a free slot; beyond it a request with an"
           " unknown key answers 503 (a cached valid key still works)."),
    Option("auth-timeout", positive_duration, "10s",
           "Deadline for one API-key check, answer body included; a check that misses it"
           " counts as the endpoint being unavailable (never as an invalid key)."),
    Option("max-body-size", byte_size(lo=1), "1M",
           "Largest request body accepted, in bytes or with a unit: 512k, 1M, 1MiB."),
    Option("agent-autocreate", parse_bool, "true",
           "Create an agent (enabled; public if its org is in public-agent-orgs) when an"
           " unknown name connects with a valid key; false refuses the connection with a"
           " 404 until it is registered."),
    Option("public-agent-orgs", int_list(lo=1), "1",
           "Comma-separated org ids that may publish agents (create or set public: true,"
           " or have them auto-created public). A public agent runs every org's 'any'"
           " tasks and sees their config; other orgs' agents are private. Empty: none."),
    Option("max-catalog-records", int_range(lo=1), "5000",
           "Most metrics one agent may advertise; a larger catalog is refused (nothing of"
           " it stored, one log line naming the agent) and the agent keeps its previous one."),
    Option("max-agents-per-org", int_range(lo=1), "1000",
           "Most agents one org may have; creating one more (POST or an unknown name"
           " connecting with agent-autocreate) answers 403."),
    Option("max-bad-frames", int_range(lo=1), "100",
           "Bad frames (unknown events, bad catalogs, bad task statuses) one agent"
           " connection may send before it is closed (1008); they are logged at most once"
           " a minute per connection."),
    Option("instance-id", str, "",
           "This server's name on agent session rows; empty means HOSTNAME:PORT. Must"
           " differ between servers sharing a database. Set it where the hostname may"
           " change: a restart under the same name takes over its earlier run at once."),
    Option("server-heartbeat-interval", positive_duration, "5s",
           "How often this server refreshes its row in the shared database, which tells"
           " the other servers it is alive."),
    Option("server-dead-after", positive_duration, "30s",
           "How long a server's row may go unrefreshed before another server declares it"
           " dead: its sessions are removed and its agents marked offline. Must be longer"
           " than the server heartbeat interval; the servers' clocks must agree (NTP)."),
    Option("heartbeat-interval", parse_duration, "2s",
           "How often every connected agent gets a heartbeat."),
    Option("task-list-interval", parse_duration, "60s",
           "How often every agent gets its full task list (and unassigned tasks are swept)."),
    Option("relocate-delay", parse_duration, "1s",
           "How long an offline agent may take to come back before its 'any' tasks move"
           " (plus up to 2.1s of jitter when the agent was on another server)."),
    Option("stale-min-window", positive_duration, "60s",
           "A routed task whose online agent has reported no run of it for max(3 intervals,"
           " this) is shown as stale (GET /api/v1/tasks/<id>, staleTasks, failingTasks)."),
    Option("status-flush-interval", positive_duration, "2s",
           "How often the task statuses agents reported are written to the database, all"
           " in one transaction; the API shows a status up to this much later."),
)
"""Every task-server key, in the order help lists them."""

_SECRETS = {opt.attr: opt for opt in SERVER_OPTIONS if opt.secret}


@dataclass(frozen=True)
class ServerSettings:
    log_level: int = 2
    log_format: str = "text"
    addr: str = "tcp:8082"
    db_type: str = "sqlite3"
    db_connect_str: str = ""
    db_pool_size: int = 10
    db_timeout: float = 5.0
    db_encryption_key: str = ""
    stats_enabled: bool = False
    statsd_addr: str = "localhost:8125"
    statsd_type: str = "standard"
    stats_prefix: str = SERVER_PREFIX
    metrics_addr: str = ""
    admin_key: str = ""
    exchange: str = ""
    rabbitmq_url: str = "amqp://guest:guest@localhost:5672/"
    rabbitmq_queue_expiry: float = 600.0
    auth_endpoint: str = "https://grafana.com"
    auth_valid_org_id: tuple[int, ...] = ()
    auth_valid_ttl: float = 300.0
    auth_invalid_ttl: float = 30.0
    auth_max_concurrent: int = 20
    auth_max_queued: int = 1000
    auth_timeout: float = 10.0
    max_body_size: int = 1048576
    agent_autocreate: bool = True
    public_agent_orgs: tuple[int, ...] = (1,)
    max_catalog_records: int = 5000
    max_agents_per_org: int = 1000
    max_bad_frames: int = 100
    instance_id: str = ""
    server_heartbeat_interval: float = 5.0
    server_dead_after: float = 30.0
    heartbeat_interval: float = 2.0
    task_list_interval: float = 60.0
    relocate_delay: float = 1.0
    stale_min_window: float = 60.0
    status_flush_interval: float = 2.0
    config_path: str | None = None
    config_file_missing: bool = False

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            opt = _SECRETS.get(f.name)
            if opt is not None and value:
                value = opt.redact(value) if opt.redact else "***"
            shown.append(f"{f.name}={value!r}")
        return f"ServerSettings({', '.join(shown)})"


def load_server_settings(path: str | None = None, env: Mapping[str, str] = os.environ,
                         flags: Mapping[str, str | None] | None = None) -> ServerSettings:
    """Settings from defaults < file at ``path`` < ``env`` < ``flags``.

    Raises ConfigError, whose str() is the one line to show the operator.
    """
    values = load(SERVER_OPTIONS, path=path, env=env, env_prefix=ENV_PREFIX, flags=flags)
    if values["db-type"] == "mysql" and not values["db-connect-str"].strip():
        raise ConfigError("db-connect-str", "must be set when db-type is mysql"
                          f" (db-type from {values.origins['db-type']})")
    if values["server-dead-after"] <= values["server-heartbeat-interval"]:
        raise ConfigError("server-dead-after", "must be longer than server-heartbeat-interval"
                          f" ({values['server-heartbeat-interval']:g}s), or every server would"
                          " declare the others dead between two of their heartbeats",
                          values.origins.get("server-dead-after"))
    return ServerSettings(
        **{opt.attr: values[opt.name] for opt in SERVER_OPTIONS},
        config_path=os.path.abspath(path) if path is not None else None,
        config_file_missing=values.file_missing,
    )
