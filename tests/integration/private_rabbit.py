"""A private RabbitMQ node for tests that restart the broker.

The machine's RabbitMQ is shared with everything else running here, so a test never stops
or restarts it. This starts Debian's own `rabbitmq-server` as a second node
(`taskd-test-<random>@localhost`) with its data, logs and config in a temp dir, on free
ports, with no plugins (so it claims no management port), and restarts it with
`rabbitmqctl -n <node> stop_app / start_app` — a real broker restart: connections are
cut, non-durable state is lost, durable queues and persistent messages survive — or, for
the chaos scenario (tests/chaos/broker.py), stops the whole node (`stop_node()`: the port
closes too) and `start()`s it again on the same port and data dir.
The server drops to the `rabbitmq` user, so its temp dir is one of its own under the
system temp dir (pytest's are private to root), handed to that user, removed at stop.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from twisted.internet.utils import getProcessOutputAndValue

from tests.integration.daemons import free_port
from tests.waiting import until

SERVER = shutil.which("rabbitmq-server") or "/usr/sbin/rabbitmq-server"
CTL = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"


class PrivateRabbit:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="taskd-rabbit-"))
        self.node = f"taskd-test-{uuid.uuid4().hex[:8]}@localhost"
        self.port, self.dist_port = free_port(), free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.proc: subprocess.Popen | None = None

    def _env(self) -> dict[str, str]:
        d = self.dir
        return {**os.environ,
                "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(d / "mnesia"), "RABBITMQ_LOG_BASE": str(d / "log"),
                "RABBITMQ_PID_FILE": str(d / "pid"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
                "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
                "RABBITMQ_FEATURE_FLAGS_FILE": str(d / "feature_flags")}

    def log(self) -> str:
        out = self.dir / "server.out"
        return out.read_text(errors="replace")[-4000:] if out.exists() else ""

    async def start(self, timeout: float = 90.0) -> "PrivateRabbit":
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n")
        subprocess.run(["chown", "-R", "rabbitmq:", str(self.dir)], check=True)
        with open(self.dir / "server.out", "ab") as out:
            self.proc = subprocess.Popen([SERVER], stdout=out, stderr=subprocess.STDOUT,
                                         env=self._env(), cwd=self.dir)
        await self.wait_ready(timeout)
        return self

    async def ctl(self, *args: str) -> str:
        out, err, code = await getProcessOutputAndValue(CTL, ("-n", self.node, *args),
                                                        env=self._env())
        assert code == 0, f"rabbitmqctl -n {self.node} {' '.join(args)}: {out!r} {err!r}"
        return out.decode()

    async def wait_ready(self, timeout: float = 90.0) -> None:
        async def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"private rabbitmq exited {self.proc.returncode}:\n{self.log()}")
            _out, _err, code = await getProcessOutputAndValue(
                CTL, ("-n", self.node, "await_startup", "--timeout", "5"), env=self._env())
            return code == 0
        await until(ready, timeout=timeout, interval=0.5, what=lambda: f"private rabbitmq up:\n{self.log()}")

    async def restart(self) -> None:
        """Stop and start the broker application (the Erlang node stays up)."""
        await self.ctl("stop_app")
        await self.ctl("start_app")
        await self.wait_ready()

    async def stop_node(self) -> None:
        """Stop the whole node (the Erlang VM exits) but keep its data dir, so `start()`
        brings the same node back on the same port with its durable queues and messages
        recovered from disk: a full broker restart, as a package upgrade or reboot does."""
        await self.ctl("stop")
        await until(lambda: self.proc.poll() is not None, timeout=30, what="private rabbitmq stopped")

    async def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        try:
            await self.ctl("stop")
            await until(lambda: self.proc.poll() is not None, timeout=30, what="private rabbitmq stopped")
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            shutil.rmtree(self.dir, ignore_errors=True)
