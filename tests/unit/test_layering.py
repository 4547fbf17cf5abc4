"""The import structure of issue 15: no layer imports upward.

Read from the source (ast), so a lazy import inside a function counts too. The layers,
bottom first: the common modules (`taskd/*.py`: config, logging, stats, the routing
rule, outcomes), then `db/` and `wire/`, then `server/` and `agent/` (which share only
`wire/` and the bottom), with `server/api/` (HTTP) above the server's logic.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "taskd"

# package (as a dotted prefix) -> prefixes it must not import
FORBIDDEN = {
    "taskd.db": ("taskd.server", "taskd.agent", "taskd.wire"),
    "taskd.wire": ("taskd.server", "taskd.agent", "taskd.db"),
    "taskd.agent": ("taskd.server", "taskd.db"),
    "taskd.server": ("taskd.agent",),
}
# The server's composition root wires every layer, the HTTP one included.
ASSEMBLY = ("taskd.server.assembly", "taskd.server.plugin")
BOTTOM_FORBIDDEN = ("taskd.server", "taskd.agent", "taskd.db", "taskd.wire")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations() -> list[str]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        if "migrations" in path.parts:
            continue
        mod = module_name(path)
        bottom = mod.count(".") == 1  # taskd/<name>.py
        rules = BOTTOM_FORBIDDEN if bottom else next(
            (banned for pkg, banned in FORBIDDEN.items() if under(mod, pkg)), ())
        if under(mod, "taskd.server") and not under(mod, "taskd.server.api") and mod not in ASSEMBLY:
            rules = (*rules, "taskd.server.api")
        for name in sorted(imports_of(path)):
            for banned in rules:
                if under(name, banned):
                    out.append(f"{mod} imports {name} ({banned} is above it)")
    return out


def test_no_module_imports_upward():
    assert violations() == []


def test_only_the_database_layer_runs_jobs_in_the_pool():
    """`pool.do` is private to taskd/db: the rest calls the connector's stores."""
    outside = [f"{module_name(p)} line {n}"
               for p in sorted(ROOT.rglob("*.py")) if "db" not in p.relative_to(ROOT).parts[:1]
               for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\bpool\.do\(", line)]
    assert outside == []


@pytest.mark.parametrize("source, banned", [
    ("from taskd.server.settings import load_server_settings\n", "taskd.server"),
    ("import taskd.wire.framing\n", "taskd.wire"),
])
def test_the_check_sees_an_upward_import(tmp_path, monkeypatch, source, banned):
    # The checker itself: a db module importing upward is reported.
    fake_root = tmp_path / "taskd"
    (fake_root / "db").mkdir(parents=True)
    (fake_root / "db" / "bad.py").write_text(source)
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", fake_root)
    assert any(f"taskd.db.bad imports" in v and banned in v for v in violations())
