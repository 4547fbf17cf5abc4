"""Real `twistd taskserver` processes for tests that need whole daemons (multi-server)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import treq

from tests.waiting import until

TWISTD = str(Path(sys.executable).with_name("twistd"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Daemon:
    """A `twistd <plugin>` child process with its INI file and log (stdout + stderr)."""

    plugin = ""

    def __init__(self, workdir: Path, name: str, keys: dict[str, str]) -> None:
        self.name = name
        self.config = workdir / f"{name}.ini"
        self.logfile = workdir / f"{name}.log"
        self.config.write_text("".join(f"{k} = {v}\n" for k, v in keys.items()))
        self.proc: subprocess.Popen | None = None

    def spawn(self, env: dict[str, str]) -> None:
        with open(self.logfile, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [TWISTD, "--nodaemon", "--pidfile=", self.plugin, "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, env={**env, "PYTHONUNBUFFERED": "1"},
            )

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            await until(lambda: self.proc.poll() is not None, timeout, interval=0.05,
                        what=lambda: f"{self.name} stopping:\n{self.log()}")
        except AssertionError:
            self.proc.kill()
            raise
        return self.proc.returncode

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""


class ServerProcess(_Daemon):
    plugin = "taskserver"

    def __init__(self, workdir: Path, name: str, **keys: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        super().__init__(workdir, name, {"addr": f"127.0.0.1:{self.port}", "instance-id": name,
                                          "log-level": "1", **keys})

    async def start(self, timeout: float = 30.0) -> "ServerProcess":
        self.spawn(dict(os.environ))

        async def serving() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.log()}")
            try:
                resp = await treq.get(self.base + "/", timeout=1)
                await resp.content()
            except Exception:
                return False
            return resp.code == 200

        await until(serving, timeout, interval=0.1, what=lambda: f"{self.name} starting:\n{self.log()}")
        return self


class AgentProcess(_Daemon):
    """A real `twistd taskagent` process. `keys` are the INI keys (`name` among them,
    hence `label` for the files)."""

    plugin = "taskagent"

    def __init__(self, workdir: Path, label: str, /, **keys: str) -> None:
        super().__init__(workdir, label, keys)

    def start(self) -> "AgentProcess":
        self.spawn({k: v for k, v in os.environ.items() if not k.startswith("TASKAGENT_")})
        return self

    async def wait_log(self, text: str, timeout: float = 20.0) -> str:
        """Wait until the log contains `text`; returns the log."""
        def logged() -> bool:
            if text in self.log():
                return True
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode} before logging "
                                     f"{text!r}:\n{self.log()}")
            return False

        await until(logged, timeout, interval=0.05, what=lambda: f"{self.name} logging {text!r}:\n{self.log()}")
        return self.log()
