"""The task-agent's keys, their meaning, and the frozen settings built from them.

Key names are the Go task-agent's (so its config files keep working); the rest are new
and have defaults that match the original's behaviour. An empty `name` means the
hostname, as the later Go agent did.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, fields

from taskd.common_options import logging_options, stats_options, metrics_option
from taskd.config import ConfigError, Option, load
from taskd.configtypes import choice, int_range, parse_bool, parse_duration, parse_host_port, url
from taskd.agent.builtin.netpolicy import parse_blocked_nets
from taskd.stats import AGENT_PREFIX

ENV_PREFIX = "TASKAGENT_"
DEFAULT_CONFIG_PATH = "/etc/taskd/task-agent.ini"

AGENT_OPTIONS: tuple[Option, ...] = (
    *logging_options(),
    Option("server-url", url("ws", "wss"), "ws://localhost:8082/api/v1",
           "The task-server's API base as a websocket URL (ws:// or wss://); the agent"
           " connects to <server-url>/socket/<name>/1."),
    Option("tsdb-url", url("http", "https"), "http://localhost:80/",
           "tsdb-gw base URL the tasks' metrics are published to."),
    Option("snap-url", url("http", "https"), "http://localhost:8181/",
           "The local Snap daemon's REST API."),
    *stats_options("agent", AGENT_PREFIX),
    metrics_option("agent"),
    Option("api-key", str, "",
           "API key sent as 'Authorization: Bearer' to the task-server (and given to Snap's"
           " publisher for tsdb-gw).", secret=True),
    Option("name", str, "",
           "This agent's name on the task-server; empty means the hostname."),
    Option("reconnect-max-backoff", parse_duration, "30s",
           "Longest wait between reconnection attempts (backoff starts near 1s, doubles, with jitter)."),
    Option("heartbeat-interval", parse_duration, "2s",
           "The server's heartbeat interval; three missed heartbeats mean a dead connection."),
    Option("ca-bundle", str, "",
           "PEM file of extra CA certificates trusted for wss:// (the system CAs are always trusted)."),
    Option("executor", choice("snap", "builtin"), "snap",
           "What runs the tasks: snap (the local Snap daemon at snap-url, as the original"
           " agent) or builtin (collectors in this process, chosen by the task's taskType)."),
    Option("status-interval", parse_duration, "10s",
           "How often changed task statuses are sent to the server (coalesced per task); a task"
           " starting to fail or recovering is sent within 1 s."),
    Option("publisher", choice("tsdbgw", "graphite"), "tsdbgw",
           "builtin executor: where metrics go: tsdbgw (POST to tsdb-url) or graphite"
           " (carbon plaintext to graphite-addr)."),
    Option("tsdb-key", str, "",
           "Bearer key for tsdb-gw; empty means api-key (as the Snap publisher used).", secret=True),
    Option("tsdb-snappy", parse_bool, "true",
           "Send tsdb-gw batches snappy-framed (rt-metric-binary-snappy) instead of plain rt-metric-binary."),
    Option("tsdb-batch-size", int_range(1, 1_000_000), "5000",
           "Most metrics per tsdb-gw POST; a full batch is sent at once."),
    Option("tsdb-flush-interval", parse_duration, "1s",
           "Longest a metric waits before its (partial) batch is sent."),
    Option("tsdb-queue-size", int_range(1, 100_000_000), "200000",
           "Most metrics held while tsdb-gw is slow or down; beyond it new metrics are dropped and counted."),
    Option("tsdb-max-backoff", parse_duration, "30s",
           "Longest wait between retries of a batch after a connection error or 5xx (jittered, doubling from 0.1s)."),
    Option("tsdb-timeout", parse_duration, "10s",
           "Timeout of one tsdb-gw request."),
    Option("graphite-addr", parse_host_port, "localhost:2003",
           "HOST:PORT of the carbon plaintext receiver (publisher = graphite)."),
    Option("max-run-lateness", parse_duration, "1s",
           "builtin executor: a run whose timer fires later than this (the agent is out of CPU)"
           " is skipped, not started, and counted in its task's skipped; no task is skipped more"
           " than nine times in a row. Keeps an overloaded agent connected and publishing, with"
           " timings of its target, not of its backlog. 0 turns this off."),
    Option("state-dir", str, "",
           "Directory where the agent saves its last task list (tasks.json, mode 0600) so that,"
           " restarted while no server answers, it resumes those tasks until the first taskList;"
           " empty means do not save (the packaged unit sets /var/lib/taskd)."),
    Option("ns1-api-url", url("http", "https"), "https://api.nsone.net/",
           "Base URL of the NS1 API used by the ns1 collector (/v1/stats/qps/<zone>)."),
    Option("proxy-url", lambda raw: url("http")(raw) if raw.strip() else "", "",
           "http://[user:password@]host:port of an HTTP proxy the http collector's checks go"
           " through (CONNECT tunnels, for http:// and https:// URLs alike); empty: direct."
           " blocked-nets still applies to the checked host.", secret=True),
    Option("blocked-nets", parse_blocked_nets, "auto",
           "Networks the built-in collectors may not connect to (checked after DNS, on"
           " every connection and redirect hop): comma-separated CIDRs, none, or auto:"
           " while the server says this agent is public, loopback, RFC 1918, link-local"
           " (cloud metadata), CGNAT and ULA; nothing on a private agent."),
)


@dataclass(frozen=True)
class AgentSettings:
    log_level: int = 2
    log_format: str = "text"
    server_url: str = "ws://localhost:8082/api/v1"
    tsdb_url: str = "http://localhost:80/"
    snap_url: str = "http://localhost:8181/"
    stats_enabled: bool = False
    statsd_addr: str = "localhost:8125"
    statsd_type: str = "standard"
    stats_prefix: str = AGENT_PREFIX
    metrics_addr: str = ""
    api_key: str = ""
    name: str = ""
    reconnect_max_backoff: float = 30.0
    heartbeat_interval: float = 2.0
    ca_bundle: str = ""
    executor: str = "snap"
    status_interval: float = 10.0
    publisher: str = "tsdbgw"
    tsdb_key: str = ""
    tsdb_snappy: bool = True
    tsdb_batch_size: int = 5000
    tsdb_flush_interval: float = 1.0
    tsdb_queue_size: int = 200000
    tsdb_max_backoff: float = 30.0
    tsdb_timeout: float = 10.0
    graphite_addr: str = "localhost:2003"
    ns1_api_url: str = "https://api.nsone.net/"
    state_dir: str = ""
    max_run_lateness: float = 1.0
    blocked_nets: str = "auto"
    proxy_url: str = ""
    config_path: str | None = None
    config_file_missing: bool = False

    @property
    def agent_name(self) -> str:
        return self.name or socket.gethostname()

    @property
    def tsdb_bearer(self) -> str:
        """The key sent to tsdb-gw: tsdb-key, else api-key."""
        return self.tsdb_key or self.api_key

    @property
    def socket_url(self) -> str:
        return f"{self.server_url.rstrip('/')}/socket/{self.agent_name}/1"

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={'***' if f.name in ('api_key', 'tsdb_key', 'proxy_url') and getattr(self, f.name) else repr(getattr(self, f.name))}"
            for f in fields(self)
        )
        return f"AgentSettings({shown})"


def load_agent_settings(path: str | None = None, env: Mapping[str, str] = os.environ,
                        flags: Mapping[str, str | None] | None = None) -> AgentSettings:
    """Settings from defaults < file at ``path`` < ``env`` < ``flags``; ConfigError."""
    values = load(AGENT_OPTIONS, path=path, env=env, env_prefix=ENV_PREFIX, flags=flags)
    name = values["name"].strip()
    if name and not all(c.isalnum() or c in "_-" for c in name):
        raise ConfigError("name", "may only contain letters, digits, '_' and '-'",
                          values.origins.get("name"))
    if values["ca-bundle"] and not os.path.isfile(values["ca-bundle"]):
        raise ConfigError("ca-bundle", "file does not exist", values.origins.get("ca-bundle"))
    return AgentSettings(
        **{opt.attr: values[opt.name] for opt in AGENT_OPTIONS},
        config_path=os.path.abspath(path) if path is not None else None,
        config_file_missing=values.file_missing,
    )
