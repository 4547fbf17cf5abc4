"""The keys both daemons have (logging and statsd), defined once so their spelling,
parsing, defaults and help cannot drift apart between task-server and task-agent."""
from __future__ import annotations

from taskd.config import Option
from taskd.configtypes import choice, int_range, parse_bool, parse_host_port
from taskd.stats import parse_stats_prefix


def logging_options() -> tuple[Option, ...]:
    return (
        Option("log-level", int_range(0, 6), "2",
               "Least severe messages logged: 0 TRACE, 1 DEBUG, 2 INFO, 3 WARN, 4 ERROR,"
               " 5 CRITICAL, 6 FATAL."),
        Option("log-format", choice("text", "json"), "text",
               "Log line format: text (classic twistd lines) or json (one JSON object per line,"
               " for log shippers)."),
    )


def parse_metrics_addr(raw: str) -> str:
    """`metrics-addr`: empty, `off`, or where to listen (as `addr`)."""
    text = raw.strip()
    if text.lower() in ("", "off"):
        return text.lower()
    from taskd.configtypes import parse_listen_addr

    return parse_listen_addr(text)


def metrics_option(who: str) -> Option:
    """Where the daemon serves its Prometheus metrics (taskd.promstats)."""
    if who == "server":
        return Option("metrics-addr", parse_metrics_addr, "",
                      "Where Prometheus scrapes the server's own metrics: empty serves"
                      " GET /metrics on the main port (unauthenticated; do not proxy it to"
                      " the outside), HOST:PORT listens apart, off serves none.")
    return Option("metrics-addr", parse_metrics_addr, "",
                  "Where Prometheus scrapes the agent's own metrics (GET /metrics), such as"
                  " 127.0.0.1:9283; empty or off serves none.")


def stats_options(who: str, default_prefix: str) -> tuple[Option, ...]:
    """`who` is "server" or "agent", for the help text."""
    return (
        Option("stats-enabled", parse_bool, "false",
               f"Send the {who}'s own metrics to statsd; also [stats] enabled.",
               sections=(("stats", "enabled"),)),
        Option("statsd-addr", parse_host_port, "localhost:8125",
               "HOST:PORT of the statsd server; also [stats] addr.",
               sections=(("stats", "addr"),)),
        Option("statsd-type", choice("standard", "datadog"), "standard",
               "statsd flavour: standard or datadog (with tags); also [stats] type.",
               sections=(("stats", "type"),)),
        Option("stats-prefix", parse_stats_prefix, default_prefix,
               "Prefix of every metric name; $hostname is replaced by this host's name with"
               " dots as underscores; also [stats] prefix.", sections=(("stats", "prefix"),)),
    )
