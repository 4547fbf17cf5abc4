"""The processes of a benchmark run: the server under test, baselines, load clients.

The server (taskd or a baseline) is pinned to one core and everything else (this
coordinator, the load clients, the HTTP load generator) to the other, with `taskset`
when it is installed (`os.sched_setaffinity` otherwise). Every child is started with
`start_new_session` and stopped by its own pid, never by name.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.httpc import Http

PYTHON = sys.executable
TWISTD = str(Path(sys.executable).with_name("twistd"))
ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cores:
    """Which core the server gets and which the load gets."""

    def __init__(self) -> None:
        cpus = sorted(os.sched_getaffinity(0))
        self.pinned = len(cpus) >= 2
        self.server = cpus[0]
        self.load = cpus[1] if self.pinned else cpus[0]
        self.taskset = shutil.which("taskset")

    def describe(self) -> str:
        if not self.pinned:
            return "one CPU available: server and load share it (no pinning)"
        how = "taskset" if self.taskset else "sched_setaffinity"
        return f"server on CPU {self.server}, load (clients, coordinator, HTTP load) on CPU {self.load} ({how})"

    def server_cmd(self, cmd: list[str]) -> list[str]:
        if self.pinned and self.taskset:
            return [self.taskset, "-c", str(self.server), *cmd]
        return cmd

    def server_preexec(self):
        if self.pinned and not self.taskset:
            core = self.server
            return lambda: os.sched_setaffinity(0, {core})
        return None

    def pin_self_to_load(self) -> None:
        if self.pinned:
            os.sched_setaffinity(0, {self.load})


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def listen_drops() -> int | None:
    """The kernel's count of connections dropped because a listen queue was full (all
    sockets of the machine; Linux only): a storm that overflows the server's accept
    queue makes clients wait for TCP's SYN retransmits (1 s, 3 s, 7 s, ...)."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for head, values in zip(lines[::2], lines[1::2]):
        if head.startswith("TcpExt:"):
            fields = dict(zip(head.split()[1:], values.split()[1:]))
            return int(fields.get("ListenDrops", fields.get("ListenOverflows", 0)))
    return None


class ServerProc:
    """A server process (taskd's twistd or a baseline) pinned to the server core."""

    def __init__(self, name: str, cmd: list[str], workdir: Path, cores: Cores, port: int,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.cmd = cmd
        self.workdir = workdir
        self.cores = cores
        self.port = port
        self.env = env
        self.logfile = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 60.0, ready_path: str = "/") -> "ServerProc":
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                self.cores.server_cmd(self.cmd), stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT),
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})},
                preexec_fn=self.cores.server_preexec(), start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        http = Http(self.port)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}; log:\n{self.tail()}")
            try:
                status, _ = await http.request("GET", ready_path, timeout=2)
                if status == 200:
                    http.close()
                    return self
            except (OSError, asyncio.TimeoutError, ConnectionError):
                http.close()
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} did not answer within {timeout}s; log:\n{self.tail()}")
            await asyncio.sleep(0.05)

    async def stop(self, timeout: float = 30.0) -> float:
        """SIGTERM, wait for the exit; returns how long the shutdown took."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        while self.proc.poll() is None:
            if time.monotonic() - t0 > timeout:
                self.kill()
                break
            await asyncio.sleep(0.05)
        return time.monotonic() - t0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


TASKD_PATH: str | None = None
"""--taskd-path: a directory whose `taskd` package the server imports instead of the
installed one (to measure a candidate fix before it lands)."""


def taskd_server(workdir: Path, cores: Cores, db: Any, key: str, name: str) -> ServerProc:
    port = free_port()
    config = workdir / f"{name}.ini"
    keys = {
        "addr": f"127.0.0.1:{port}", "instance-id": f"bench-{name}", "db-type": db.db_type,
        "db-connect-str": db.connect_str, "admin-key": key,
        # everything else (log-level, heartbeat and task-list intervals, pool size) at its default
    }
    config.write_text("".join(f"{k} = {v}\n" for k, v in keys.items()))
    cmd = [TWISTD, "--nodaemon", "--pidfile=", "taskserver", "--config", str(config)]
    env = {"PYTHONPATH": TASKD_PATH} if TASKD_PATH else None
    return ServerProc(name, cmd, workdir, cores, port, env=env)


def baseline_server(workdir: Path, cores: Cores, kind: str, name: str) -> ServerProc:
    port = free_port()
    return ServerProc(name, [PYTHON, "-m", "bench.baselines", kind, "--port", str(port)], workdir, cores, port)


class LoadClient:
    """One `bench.loadclient` process; `call` sends a command and awaits its reply."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.pending: dict[int, asyncio.Future] = {}
        self.expects: dict[str, asyncio.Future] = {}
        self.seq = 0
        self.names: list[str] = []  # agents this process holds
        self._reader: asyncio.Task | None = None

    async def start(self) -> "LoadClient":
        self.proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "bench.loadclient", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            cwd=str(ROOT), start_new_session=True, limit=1 << 24,
        )
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        assert json.loads(line)["ev"] == "ready", line
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            msg = json.loads(line)
            if msg.get("ev") == "reply":
                fut = self.pending.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            elif msg.get("ev") == "expect":
                fut = self.expects.pop(msg["tag"], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        for fut in list(self.pending.values()) + list(self.expects.values()):
            if not fut.done():
                fut.set_exception(RuntimeError(f"load client {self.index} exited"))

    async def call(self, cmd: str, deadline: float = 120.0, **args: Any) -> dict:
        self.seq += 1
        fut = asyncio.get_running_loop().create_future()
        self.pending[self.seq] = fut
        self.proc.stdin.write((json.dumps({"cmd": cmd, "id": self.seq, **args}) + "\n").encode())
        await self.proc.stdin.drain()
        reply = await asyncio.wait_for(fut, deadline)
        if "error" in reply:
            raise RuntimeError(f"load client {self.index}: {cmd}: {reply['error']}")
        return reply

    def expect_future(self, tag: str) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.expects[tag] = fut
        return fut

    async def quit(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            self.proc.stdin.write(b'{"cmd": "quit"}\n')
            await self.proc.stdin.drain()
            await asyncio.wait_for(self.proc.wait(), 5)
        except (asyncio.TimeoutError, ConnectionError, BrokenPipeError):
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()


class ClientPool:
    """Agents spread round-robin over a few load-client processes."""

    def __init__(self, processes: int) -> None:
        self.clients = [LoadClient(i) for i in range(processes)]

    async def start(self) -> "ClientPool":
        await asyncio.gather(*(c.start() for c in self.clients))
        return self

    def owner(self, index: int) -> LoadClient:
        return self.clients[index % len(self.clients)]

    def split(self, indexes: range | list[int]) -> dict[LoadClient, list[int]]:
        out: dict[LoadClient, list[int]] = {c: [] for c in self.clients}
        for i in indexes:
            out[self.owner(i)].append(i)
        return out

    async def all(self, cmd: str, deadline: float = 120.0, **args: Any) -> list[dict]:
        return list(await asyncio.gather(*(c.call(cmd, deadline=deadline, **args) for c in self.clients)))

    async def quit(self) -> None:
        await asyncio.gather(*(c.quit() for c in self.clients), return_exceptions=True)
