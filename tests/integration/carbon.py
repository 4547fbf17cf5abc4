"""A real carbon-cache (Debian's graphite-carbon) on loopback, for the graphite publisher's tests.

Each instance gets free ports (line receiver, pickle receiver, cache query; UDP off), its
own directories under the test's tmp dir (storage, whisper, logs, pid) and a
storage-schemas.conf keeping every series at 1 s resolution for an hour (tags enabled;
the tag database is graphite-web's, which is absent: carbon logs that and stores the series
anyway), and runs in the foreground (``--nodaemon``, as a child process whose output goes to ``carbon.log``).
Whisper files are read back with ``whisper-fetch`` (from python3-whisper, which comes with
graphite-carbon for the system python; the venv's python may not have ``whisper``).

carbon-cache missing is a test *failure*, not a skip: CI installs graphite-carbon, and a
silently skipped test would hide that the graphite publisher was never checked against
the real thing.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.utils import getProcessOutputAndValue

from tests.integration.daemons import free_port
from tests.waiting import until

CARBON_CACHE = shutil.which("carbon-cache") or "/usr/bin/carbon-cache"
WHISPER_FETCH = shutil.which("whisper-fetch") or "/usr/bin/whisper-fetch"
SYSTEM_PYTHON = "/usr/bin/python3"
_FETCH_SCRIPT = ("import sys, whisper\n"
                 "(start, end, step), values = whisper.fetch(sys.argv[1], int(sys.argv[2]))\n"
                 "for i, v in enumerate(values):\n"
                 "    print('%d\\t%s' % (start + i * step, 'None' if v is None else repr(v)))\n")


def require_carbon() -> None:
    """Fail (never skip) when carbon-cache is not installed."""
    if not os.access(CARBON_CACHE, os.X_OK):
        pytest.fail("carbon-cache is not installed; the graphite publisher must be tested against a real"
                    " carbon: apt-get install graphite-carbon (CI installs it)", pytrace=False)


class CarbonCache:
    """One carbon-cache process; ``start``/``stop`` may be repeated (same ports, same data)."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.whisper_dir = workdir / "storage" / "whisper"
        self.line_port, self.pickle_port, self.query_port = free_port(), free_port(), free_port()
        self.config = workdir / "carbon.conf"
        self.logfile = workdir / "carbon.log"
        for sub in ("storage", "storage/whisper", "log", "pid"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)
        self.config.write_text(f"""[cache]
STORAGE_DIR = {workdir}/storage/
LOCAL_DATA_DIR = {self.whisper_dir}/
WHISPER_DIR = {self.whisper_dir}/
CONF_DIR = {workdir}/
LOG_DIR = {workdir}/log/
PID_DIR = {workdir}/pid/
USER =
DATABASE = whisper
MAX_CACHE_SIZE = inf
MAX_UPDATES_PER_SECOND = 100000
MAX_CREATES_PER_MINUTE = inf
LINE_RECEIVER_INTERFACE = 127.0.0.1
LINE_RECEIVER_PORT = {self.line_port}
ENABLE_UDP_LISTENER = False
PICKLE_RECEIVER_INTERFACE = 127.0.0.1
PICKLE_RECEIVER_PORT = {self.pickle_port}
CACHE_QUERY_INTERFACE = 127.0.0.1
CACHE_QUERY_PORT = {self.query_port}
LOG_CREATES = True
LOG_LISTENER_CONNECTIONS = True
WHISPER_AUTOFLUSH = True
ENABLE_TAGS = True
GRAPHITE_URL = http://127.0.0.1:{free_port()}
""")
        (workdir / "storage-schemas.conf").write_text("[all]\npattern = .*\nretentions = 1s:1h\n")
        self.proc: subprocess.Popen | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.line_port}"

    async def start(self, timeout: float = 30.0) -> CarbonCache:
        """Spawn carbon-cache and wait until its line receiver accepts connections."""
        require_carbon()
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                [CARBON_CACHE, f"--config={self.config}", "--nodaemon",
                 f"--pidfile={self.dir / 'pid' / 'carbon-cache.pid'}", "start"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)

        async def listening() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"carbon-cache exited {self.proc.returncode}:\n{self.log()}")
            try:
                proto = await TCP4ClientEndpoint(reactor, "127.0.0.1", self.line_port, timeout=1).connect(
                    Factory.forProtocol(Protocol))
            except Exception:  # noqa: BLE001 - not listening yet
                return False
            proto.transport.loseConnection()
            return True

        try:
            await until(listening, timeout, interval=0.1,
                        what=lambda: f"carbon-cache listening on {self.line_port}:\n{self.log()}")
        except AssertionError:
            await self.stop()
            raise
        return self

    async def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (carbon writes its cache out), wait; SIGKILL after ``timeout``."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await until(lambda: proc.poll() is not None, timeout, interval=0.05,
                        what=lambda: f"carbon-cache stopping:\n{self.log()}")
        except AssertionError:
            proc.kill()
            proc.wait()
            raise

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def whisper_path(self, name: str) -> Path:
        """Where carbon stores ``name``: dots are directories; a tagged name (``a.b;k=v``,
        tags sorted) goes to ``_tagged/<sha256[:3]>/<sha256[3:6]>/<sha256>.wsp``."""
        if ";" in name:
            digest = hashlib.sha256(name.encode()).hexdigest()
            return self.whisper_dir / "_tagged" / digest[:3] / digest[3:6] / f"{digest}.wsp"
        return self.whisper_dir.joinpath(*name.split(".")).with_suffix(".wsp")

    async def fetch(self, name: str, since: int) -> dict[int, float]:
        """{timestamp: value} stored for ``name`` from ``since`` on (empty if no file yet)."""
        path = self.whisper_path(name)
        if not path.exists():
            return {}
        if os.access(WHISPER_FETCH, os.X_OK):
            cmd, args = WHISPER_FETCH, [f"--from={since}", str(path)]  # no --drop: it renumbers the times
        else:
            cmd, args = SYSTEM_PYTHON, ["-c", _FETCH_SCRIPT, str(path), str(since)]
        out, err, code = await getProcessOutputAndValue(cmd, args, env=dict(os.environ))
        if code != 0:
            raise AssertionError(f"{cmd} failed ({code}): {err.decode(errors='replace')}")
        found: dict[int, float] = {}
        for line in out.decode().splitlines():
            ts, _, value = line.partition("\t")
            if value.strip() not in ("", "None"):
                found[int(ts)] = float(value)
        return found
