"""systemd/task-server.service and systemd/task-agent.service: the command line, the user,
the restart policy and the hardening, and `systemd-analyze verify` with no complaint.

verify insists that ExecStart's binary exists, and /opt/venvs/taskd/bin/twistd exists
only where the Debian package is installed; so it checks a copy of each unit whose
ExecStart points at this venv's twistd (all else unchanged). ci/package-test.sh verifies
the installed units as they are. The same command line (with --help) must also reach the
plugin in this venv.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
VENV_TWISTD = "/opt/venvs/taskd/bin/twistd"
DEV_TWISTD = str(Path(sys.executable).with_name("twistd"))
PLUGINS = {"task-server": ("taskserver", "/etc/taskd/task-server.ini"),
           "task-agent": ("taskagent", "/etc/taskd/task-agent.ini")}
HARDENING = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
             "PrivateTmp": "yes", "StateDirectory": "taskd"}


def service_section(text: str) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        keys.setdefault(f"{section}{key.strip()}", []).append(value.strip())
    return keys


@pytest.mark.parametrize("unit", sorted(PLUGINS))
def test_unit_runs_the_packaged_twistd_as_taskd_hardened(unit):
    keys = service_section((UNITS / f"{unit}.service").read_text())
    plugin, config = PLUGINS[unit]
    assert keys["[Service]ExecStart"] == [f"{VENV_TWISTD} --nodaemon --pidfile= {plugin} --config {config}"]
    assert keys["[Service]User"] == ["taskd"] and keys["[Service]Group"] == ["taskd"]
    assert keys["[Service]Restart"] == ["on-failure"]
    for key, value in HARDENING.items():
        assert keys.get(f"[Service]{key}") == [value], key
    assert keys["[Install]WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize("unit", sorted(PLUGINS))
def test_systemd_analyze_verify_is_clean(unit, tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is required and missing: run .ci/run, or apt-get install -y systemd")
    text = (UNITS / f"{unit}.service").read_text()
    assert text.count(VENV_TWISTD) == 1
    copy = tmp_path / f"{unit}.service"
    copy.write_text(text.replace(VENV_TWISTD, DEV_TWISTD))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and bad values, printing them; clean means silent.
    # It also lints every unit file installed on the machine (Debian's carbon-cache.service
    # draws "syslog is obsolete" here); only lines that are not about another unit count.
    others = re.compile(r"^/(?:lib|usr/lib|etc)/systemd/system/(?!" + re.escape(unit) + r"\.service)\S+:\d+: ")
    ours = [line for line in (result.stdout + result.stderr).splitlines() if line.strip() and not others.match(line)]
    assert result.returncode == 0 and not ours, \
        f"systemd-analyze verify {unit}.service:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("unit", sorted(PLUGINS))
def test_exec_start_names_a_real_plugin(unit):
    line = service_section((UNITS / f"{unit}.service").read_text())["[Service]ExecStart"][0]
    argv = [DEV_TWISTD if a == VENV_TWISTD else a for a in line.split()]
    # twistd's own options stay before the plugin; --help after it describes that plugin.
    result = subprocess.run(argv + ["--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"--config", result.stdout), result.stdout


@pytest.mark.parametrize("unit", sorted(PLUGINS))
def test_documentation_points_at_docs_the_package_installs(unit):
    # debian/taskd.docs installs README.md and docs/*.md, uncompressed, in /usr/share/doc/taskd.
    docs = " ".join(service_section((UNITS / f"{unit}.service").read_text())["[Unit]Documentation"]).split()
    assert docs
    for url in docs:
        name = url.removeprefix("file:/usr/share/doc/taskd/")
        assert name != url, url
        assert (REPO / name).is_file() or (REPO / "docs" / name).is_file(), url
