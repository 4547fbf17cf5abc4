"""A private, real Prometheus (Debian's `prometheus` package) for the tests that check
what taskd serves to it: started on a free loopback port with the test's scrape
configuration and its own storage in tmp_path, stopped by the test."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import treq

from tests.integration.daemons import free_port


class Prometheus:
    def __init__(self, tmp_path: Path, config: str) -> None:
        exe = shutil.which("prometheus")
        assert exe, "Debian's prometheus package is needed (.ci/run installs it)"
        self.config = tmp_path / "prometheus.yml"
        self.config.write_text(config)
        self.logfile = tmp_path / "prometheus.log"
        self.base = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [exe, f"--config.file={self.config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address={self.base.removeprefix('http://')}"],
            stdout=subprocess.DEVNULL, stderr=open(self.logfile, "wb"))

    async def get(self, path: str, **params: str) -> dict[str, Any]:
        """The JSON answer of the HTTP API, or {} while it is not up."""
        try:
            return await (await treq.get(self.base + path, params=params, timeout=2)).json()
        except Exception:
            return {}

    async def query(self, expr: str) -> list:
        body = await self.get("/api/v1/query", query=expr)
        return body.get("data", {}).get("result", []) if body.get("status") == "success" else []

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)
