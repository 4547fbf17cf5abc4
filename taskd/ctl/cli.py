"""taskctl: agents, tasks, metrics and servers of a task-server, from a terminal.

Where it connects, first found wins: --url/--key, then TASKD_URL/TASKD_KEY, then the
[taskctl] section of --config (default ~/.config/taskd/taskctl.ini: `url = …`,
`key = …`), then http://localhost:8082 with no key.

Exit status: 0 done; 1 the server refused (its message is printed, as the API wrote it);
2 a usage error, or no answer from the server.
"""
from __future__ import annotations

import argparse
import configparser
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence, TextIO

from taskd.ctl import tables
from taskd.ctl.client import ApiError, Client, Unreachable

DEFAULT_URL = "http://localhost:8082"
DEFAULT_CONFIG = Path("~/.config/taskd/taskctl.ini")


def _page_options(p: argparse.ArgumentParser, order_default: str) -> None:
    p.add_argument("--order-by", help=f"sort column (default {order_default}); a leading - sorts descending:"
                                      " --order-by=-name")
    p.add_argument("--limit", type=int, help="rows per page (default 50, at most 1000)")
    p.add_argument("--page", type=int, help="page number, from 1")


def _flag(p: argparse.ArgumentParser, dest: str, yes: str, no: str, yes_help: str, no_help: str) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument(f"--{yes}", dest=dest, action="store_const", const=True, help=yes_help)
    group.add_argument(f"--{no}", dest=dest, action="store_const", const=False, help=no_help)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="taskctl", description=__doc__.split("\n\n")[0],
                                  epilog="Exit status: 0 done, 1 refused by the server, 2 usage error or no answer.")
    top.add_argument("--url", help=f"the task-server's base URL (env TASKD_URL; default {DEFAULT_URL})")
    top.add_argument("--key", help="API key or agent token (env TASKD_KEY)")
    top.add_argument("--config", help=f"INI file with a [taskctl] section: url, key (default {DEFAULT_CONFIG})")
    top.add_argument("--json", action="store_true", help="print the API's JSON instead of tables")
    top.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server (default 30)")
    kinds = top.add_subparsers(dest="kind", metavar="{agents,tasks,metrics,servers}", required=True)

    agents = kinds.add_parser("agents", help="list, show, register, change or delete agents")
    a = agents.add_subparsers(dest="action", required=True)
    p = a.add_parser("list", help="agents the key's org sees (its own and public ones)")
    p.add_argument("--name", help="exact name, or a pattern with *")
    p.add_argument("--metric", help="agents advertising a metric matching this namespace pattern")
    p.add_argument("--tag", action="append", help="agents with this tag (repeatable: any of them)")
    _flag(p, "enabled", "enabled", "disabled", "only enabled agents", "only disabled agents")
    _flag(p, "public", "public", "private", "only public agents (of any org)", "only the org's private agents")
    _page_options(p, "name")
    p = a.add_parser("get", help="one agent")
    p.add_argument("id", type=int)
    p = a.add_parser("create", help="register an agent")
    p.add_argument("name")
    p.add_argument("--enabled", action="store_true", help="enabled (default: disabled)")
    p.add_argument("--public", action="store_true", help="public: runs every org's 'any' tasks (public-agent-orgs only)")
    p.add_argument("--tag", action="append", help="a tag (repeatable)")
    p = a.add_parser("update", help="change an agent; what is not given stays")
    p.add_argument("id", type=int)
    p.add_argument("--name", help="new name")
    _flag(p, "enabled", "enable", "disable", "enable the agent", "disable the agent")
    _flag(p, "public", "public", "private", "make the agent public (public-agent-orgs only)", "make the agent private")
    p.add_argument("--tag", action="append", help="replace the tags with these (repeatable)")
    p.add_argument("--no-tags", action="store_true", help="remove every tag")
    p = a.add_parser("delete", help="delete an agent (its token too)")
    p.add_argument("id", type=int)
    p = a.add_parser("token", help="issue the agent a new token (shown once; replaces the old one)")
    p.add_argument("id", type=int)

    tasks = kinds.add_parser("tasks", help="list, show, create, change or delete tasks")
    t = tasks.add_subparsers(dest="action", required=True)
    p = t.add_parser("list", help="the key's org's tasks")
    p.add_argument("--name", help="exact name, or a pattern with *")
    p.add_argument("--metric", help="tasks asking for a metric matching this pattern")
    _flag(p, "enabled", "enabled", "disabled", "only enabled tasks", "only disabled tasks")
    _page_options(p, "name")
    for name, what in (("get", "one task, with where it is routed and its status"),
                       ("status", "what each agent last reported about a task"), ("delete", "delete a task")):
        p = t.add_parser(name, help=what)
        p.add_argument("id", type=int)
    p = t.add_parser("create", help="create a task from a JSON file (the API's task body)")
    p.add_argument("-f", "--file", required=True, help="JSON file, or - for stdin")
    p = t.add_parser("update", help="replace a task with the JSON file's (its 'id', or ID)")
    p.add_argument("-f", "--file", required=True, help="JSON file, or - for stdin")
    p.add_argument("id", type=int, nargs="?", help="the task to replace (default: the file's 'id')")

    p = kinds.add_parser("metrics", help="the metrics catalog the org's agents advertise")
    p.add_argument("--namespace", help="namespace pattern, with *")
    p.add_argument("--version", type=int)
    _page_options(p, "namespace")
    kinds.add_parser("servers", help="the live task-servers (admin org only)")
    return top


def connection(args: argparse.Namespace, env: dict[str, str]) -> Client:
    config = configparser.ConfigParser()
    path = Path(args.config) if args.config else DEFAULT_CONFIG.expanduser()
    if args.config and not path.is_file():
        raise UsageError(f"--config {args.config}: no such file")
    if path.is_file():
        config.read(path)
    section = config["taskctl"] if config.has_section("taskctl") else {}
    url = args.url or env.get("TASKD_URL") or section.get("url") or DEFAULT_URL
    key = args.key or env.get("TASKD_KEY") or section.get("key") or ""
    return Client(url, key, timeout=args.timeout)


class UsageError(Exception):
    pass


def _read_json(name: str, stdin: TextIO) -> dict:
    try:
        text = stdin.read() if name == "-" else Path(name).read_text()
    except OSError as exc:
        raise UsageError(f"-f {name}: {exc.strerror or exc}") from None
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"-f {name}: not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise UsageError(f"-f {name}: expected a JSON object (one task)")
    return body


def run(args: argparse.Namespace, client: Client, out: TextIO, stdin: TextIO) -> None:
    show_json = args.json

    def show(value: Any, columns: Sequence[tables.Column] | None = None) -> None:
        if show_json:
            out.write(tables.as_json(value))
        elif isinstance(value, list):
            out.write(tables.table(value, columns or ()))
        elif isinstance(value, dict):
            out.write(tables.fields(value))
        elif value is not None:
            out.write(f"{value}\n")

    def page(extra: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        return extra + [("orderBy", args.order_by), ("limit", args.limit), ("page", args.page)]

    call = client.call
    if args.kind == "agents":
        if args.action == "list":
            params = page([("name", args.name), ("metric", args.metric), ("enabled", args.enabled),
                           ("public", args.public)] + [("tag", t) for t in args.tag or ()])
            show(call("GET", "/agents", params=params), tables.AGENT_COLUMNS)
        elif args.action == "get":
            show(call("GET", f"/agents/{args.id}"))
        elif args.action == "create":
            show(call("POST", "/agents", body={"name": args.name, "enabled": args.enabled, "public": args.public,
                                               "tags": args.tag or []}))
        elif args.action == "update":
            body: dict[str, Any] = {"id": args.id}
            for key, value in (("name", args.name), ("enabled", args.enabled), ("public", args.public)):
                if value is not None:
                    body[key] = value
            if args.no_tags or args.tag:
                body["tags"] = [] if args.no_tags else args.tag
            show(call("PUT", "/agents", body=body))
        elif args.action == "delete":
            call("DELETE", f"/agents/{args.id}")
            show(None if show_json else f"agent {args.id} deleted")
        elif args.action == "token":
            show(call("POST", f"/agents/{args.id}/token"))
    elif args.kind == "tasks":
        if args.action == "list":
            params = page([("name", args.name), ("metric", args.metric), ("enabled", args.enabled)])
            show(call("GET", "/tasks", params=params), tables.TASK_COLUMNS)
        elif args.action == "get":
            show(call("GET", f"/tasks/{args.id}"))
        elif args.action == "status":
            show(call("GET", f"/tasks/{args.id}").get("status", []), tables.STATUS_COLUMNS)
        elif args.action == "create":
            show(call("POST", "/tasks", body=_read_json(args.file, stdin)))
        elif args.action == "update":
            body = _read_json(args.file, stdin)
            if args.id is not None:
                body["id"] = args.id
            if "id" not in body:
                raise UsageError("tasks update: give the task's id (in the file, or as ID)")
            show(call("PUT", "/tasks", body=body))
        elif args.action == "delete":
            call("DELETE", f"/tasks/{args.id}")
            show(None if show_json else f"task {args.id} deleted")
    elif args.kind == "metrics":
        params = page([("namespace", args.namespace), ("version", args.version)])
        show(call("GET", "/metrics", params=params), tables.METRIC_COLUMNS)
    elif args.kind == "servers":
        show(call("GET", "/servers"), tables.SERVER_COLUMNS)


def main(argv: Sequence[str] | None = None, *, env: dict[str, str] | None = None, out: TextIO = sys.stdout,
         err: TextIO = sys.stderr, stdin: TextIO = sys.stdin) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage error (or --help)
        return int(exc.code or 0)
    try:
        run(args, connection(args, dict(os.environ) if env is None else env), out, stdin)
    except ApiError as exc:
        err.write(f"taskctl: {exc.message} (HTTP {exc.status})\n")
        return 1
    except (Unreachable, UsageError) as exc:
        err.write(f"taskctl: {exc}\n")
        return 2
    return 0


def console() -> None:
    sys.exit(main())

