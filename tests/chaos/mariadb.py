"""A private `mariadbd` for the chaos scenarios that freeze or restart the database.

The machine's MariaDB is shared with everything else running here, so it is never
stopped or frozen. This initialises a data directory of its own with Debian's
`mariadb-install-db` (under a second), runs `mariadbd` on a free loopback port as the
current user with no config file (`--no-defaults`), and lets a scenario SIGSTOP /
SIGCONT it (`freeze`, `thaw`: a stalled database, connections accepted by the kernel and
never answered) or SIGKILL it and start it again on the same port and data directory
(`kill`, `start`: a crashed and restarted database, InnoDB recovering on start).
root has no password, as on the shared one, so the servers' DSNs look the same.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pymysql
import pytest
from twisted.internet.threads import deferToThread

from tests.integration.daemons import free_port
from tests.waiting import until

INSTALL_DB = shutil.which("mariadb-install-db") or "/usr/bin/mariadb-install-db"
MARIADBD = shutil.which("mariadbd", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", "")) or "/usr/sbin/mariadbd"
# Small and lazy: a throwaway database on a loaded 2-core machine, not a durable one.
TUNING = ["--innodb-buffer-pool-size=64M", "--innodb-log-file-size=16M", "--innodb-flush-log-at-trx-commit=2",
          "--skip-log-bin", "--max-connections=300"]


def require_mariadb() -> None:
    for tool in (INSTALL_DB, MARIADBD):
        if not (os.path.isfile(tool) and os.access(tool, os.X_OK)):
            pytest.fail(f"{tool} is required for the database chaos scenarios and is missing: "
                        "apt-get install -y mariadb-server (which .ci/run starts anyway)")


class PrivateMariaDB:
    def __init__(self, workdir: Path) -> None:
        require_mariadb()
        workdir.mkdir(parents=True, exist_ok=True)
        self.dir = workdir
        self.datadir = workdir / "data"
        self.error_log = workdir / "mariadbd.err"
        self.port = free_port()
        # a unix socket path must stay under ~108 bytes: not in pytest's deep tmp_path
        self.sockdir = Path(tempfile.mkdtemp(prefix="taskd-mdb-"))
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        self.proc: subprocess.Popen | None = None
        self.frozen = False

    def _args(self) -> list[str]:
        return ["--no-defaults", f"--datadir={self.datadir}", f"--user={self.user}", *TUNING]

    def install(self) -> None:
        result = subprocess.run([INSTALL_DB, *self._args(), "--auth-root-authentication-method=normal",
                                 "--skip-test-db"], capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, f"mariadb-install-db failed:\n{result.stdout}\n{result.stderr}"

    async def start(self, timeout: float = 60.0) -> "PrivateMariaDB":
        if not self.datadir.exists():
            self.install()
        with open(self.error_log, "ab") as err:
            self.proc = subprocess.Popen(
                [MARIADBD, *self._args(), f"--port={self.port}", "--bind-address=127.0.0.1",
                 f"--socket={self.sockdir / 'mysqld.sock'}", f"--pid-file={self.dir / 'mariadbd.pid'}",
                 f"--log-error={self.error_log}"], stdout=err, stderr=subprocess.STDOUT)
        self.frozen = False
        await until(self._answers, timeout, interval=0.1, what=lambda: f"private mariadbd starting:\n{self.log()}")
        return self

    async def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"private mariadbd exited {self.proc.returncode}:\n{self.log()}")
        # in a thread: a scenario times API answers meanwhile, so the reactor must not block
        return await deferToThread(self._connects)

    def _connects(self) -> bool:
        try:
            self.connect().close()
        except pymysql.MySQLError:
            return False
        return True

    def connect(self, database: str | None = None) -> pymysql.Connection:
        return pymysql.connect(host="127.0.0.1", port=self.port, user="root", password="", database=database,
                               connect_timeout=2, read_timeout=10, write_timeout=10)

    def create_database(self, name: str) -> str:
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        finally:
            conn.close()
        return name

    def freeze(self) -> None:
        """SIGSTOP: the kernel still accepts connections, mariadbd answers nothing."""
        self.proc.send_signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.frozen = False

    async def kill(self) -> None:
        """SIGKILL (a crash: no clean shutdown) and wait until it is gone."""
        self.proc.send_signal(signal.SIGKILL)
        await until(lambda: self.proc.poll() is not None, 30, interval=0.05, what="private mariadbd dying")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.frozen:
                self.thaw()
            self.proc.send_signal(signal.SIGTERM)
            try:
                await until(lambda: self.proc.poll() is not None, 60, interval=0.1, what="private mariadbd stopping")
            except AssertionError:
                await self.kill()
        shutil.rmtree(self.sockdir, ignore_errors=True)

    def remove(self) -> None:
        """The data directory (a few dozen MB) once stopped: pytest keeps old tmp dirs."""
        shutil.rmtree(self.datadir, ignore_errors=True)

    def log(self) -> str:
        return self.error_log.read_text(errors="replace")[-4000:] if self.error_log.exists() else ""
