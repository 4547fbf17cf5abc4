"""The tests' own rules, checked on their source (ast), so they hold after this issue:

- no fixed sleeps (`time.sleep`, `asyncio.sleep`, `deferLater`) outside tests/waiting.py: a
  test waits for a condition (`tests.waiting.until` / `value_of`), or proves an absence by
  something it can await; the few sleeps that ARE the behaviour under test (a slow server,
  a pause an emulator plays) are listed in ALLOWED_SLEEPS with the reason;
- no hand-written `deadline` polling loops outside tests/waiting.py;
- `class FakeTransport` only in tests/fakes (one fake, signature-checked by test_fakes_match);
- no unconditional skip (a `pytest` skip call not under an `if`/`except`, or the unconditional skip mark): a
  test that cannot run here says why with `skipif` or skips on a condition it checked.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
WAITING = TESTS / "waiting.py"
SLEEPS = {("time", "sleep"), ("asyncio", "sleep")}

# (file relative to tests/, enclosing function) -> why this sleep is the behaviour under test
ALLOWED_SLEEPS: dict[tuple[str, str], str] = {
    ("integration/agent_client.py", "nothing_more"):
        "proves an absence (no further frame of a kind) over a short window, for a change whose end "
        "a caller cannot await; a caller that can await it uses `nothing_pending` (a ping/pong "
        "round trip, no window). The callers (test_routing, test_sessions, test_multi_server) are "
        "still to move where they can: the one known debt",
}


def sources() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


@lru_cache(maxsize=None)
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def rel(path: Path) -> str:
    return path.relative_to(TESTS).as_posix() if path.is_relative_to(TESTS) else path.name


def parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def enclosing_function(node: ast.AST, up: dict[ast.AST, ast.AST]) -> str:
    while node in up:
        node = up[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return node.name
    return "<module>"


def dotted(func: ast.expr) -> tuple[str, ...]:
    """`a.b.c` -> ("a", "b", "c"); a bare name -> (name,); anything else -> ()."""
    parts: list[str] = []
    while isinstance(func, ast.Attribute):
        parts.insert(0, func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.insert(0, func.id)
        return tuple(parts)
    return ()


def is_sleep(call: ast.Call) -> bool:
    name = dotted(call.func)
    return name[-2:] in SLEEPS or name[-1:] == ("deferLater",) or name == ("sleep",)


def fixed_sleeps(path: Path) -> list[str]:
    tree = parse(path)
    up = parents(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and is_sleep(node):
            where = (rel(path), enclosing_function(node, up))
            if where not in ALLOWED_SLEEPS:
                found.append(f"{rel(path)}:{node.lineno} {ast.unparse(node)} in {where[1]}")
    return found


def deadline_loops(path: Path) -> list[str]:
    tree = parse(path)
    return [f"{rel(path)}:{node.lineno}" for node in ast.walk(tree) if isinstance(node, (ast.While, ast.For))
            and any(isinstance(n, ast.Name) and "deadline" in n.id.lower() for n in ast.walk(node))]


def fake_transports(path: Path) -> list[str]:
    tree = parse(path)
    return [f"{rel(path)}:{node.lineno}" for node in ast.walk(tree)
            if isinstance(node, ast.ClassDef) and node.name == "FakeTransport"]


def unconditional_skips(path: Path) -> list[str]:
    tree = parse(path)
    up = parents(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for deco in node.decorator_list:
                target = deco.func if isinstance(deco, ast.Call) else deco
                if dotted(target)[-2:] == ("mark", "skip"):
                    found.append(f"{rel(path)}:{deco.lineno} @{ast.unparse(deco)}")
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark"
                                                  for t in node.targets):
            for n in ast.walk(node.value):
                if isinstance(n, ast.Attribute) and dotted(n)[-2:] == ("mark", "skip"):
                    found.append(f"{rel(path)}:{node.lineno} pytestmark skip")
        elif isinstance(node, ast.Call) and dotted(node.func)[-2:] == ("pytest", "skip"):
            conditional, at = False, node
            while at in up and not isinstance(at, (ast.FunctionDef, ast.AsyncFunctionDef)):
                at = up[at]
                if isinstance(at, (ast.If, ast.ExceptHandler, ast.IfExp, ast.BoolOp)):
                    conditional = True
            if not conditional:
                found.append(f"{rel(path)}:{node.lineno} {ast.unparse(node)}")
    return found


def everywhere(check, skip: set[Path] = frozenset()) -> list[str]:
    return [hit for path in sources() if path not in skip for hit in check(path)]


def test_no_fixed_sleeps_outside_the_waiting_helper():
    assert everywhere(fixed_sleeps, {WAITING}) == []


def test_every_allowed_sleep_still_exists_and_says_why():
    """An allow-list entry whose sleep is gone would hide the next one put there."""
    sleeping = set()
    for path in sources():
        tree = parse(path)
        up = parents(tree)
        sleeping |= {(rel(path), enclosing_function(n, up)) for n in ast.walk(tree)
                     if isinstance(n, ast.Call) and is_sleep(n)}
    for where, why in ALLOWED_SLEEPS.items():
        assert where in sleeping, f"{where} is allowed to sleep but does not: drop the entry"
        assert len(why) > 20, f"{where}: say why this sleep is the behaviour under test"


def test_no_hand_written_deadline_loops_outside_the_waiting_helper():
    assert everywhere(deadline_loops, {WAITING}) == []


def test_one_fake_transport_in_tests_fakes():
    hits = everywhere(fake_transports)
    assert [h for h in hits if not h.startswith("fakes/")] == []
    assert len(hits) == 1, hits


def test_no_unconditional_skips():
    assert everywhere(unconditional_skips) == []


SKIP = "pytest." + "skip"  # spelled apart so a grep for skipped tests does not find these probes
PROBES = [
    (fixed_sleeps, "import time\ndef f():\n    time.sleep(1)\n", 1),
    (fixed_sleeps, "import asyncio\nasync def f():\n    await asyncio.sleep(0.5)\n", 1),
    (fixed_sleeps, "async def f():\n    await deferLater(reactor, 1.5, lambda: None)\n", 1),
    (fixed_sleeps, "def f():\n    pass\n", 0),
    (unconditional_skips, f"import pytest\ndef test_x():\n    {SKIP}('later')\n", 1),
    (unconditional_skips, "import pytest\n@pytest.mark." + "skip(reason='later')\ndef test_x():\n    pass\n", 1),
    (unconditional_skips, f"import pytest\ndef test_x():\n    if not HAVE:\n        {SKIP}('no tool')\n", 0),
    (unconditional_skips, "import pytest\n@pytest.mark.skipif(not HAVE, reason='no tool')\ndef test_x():\n    pass\n", 0),
    (deadline_loops, "def f():\n    deadline = now() + 5\n    while not ok():\n        assert now() < deadline\n", 1),
    (deadline_loops, "async def f():\n    await until(ok, 5)\n", 0),
]


@pytest.mark.parametrize("check, source, expected", PROBES, ids=lambda p: getattr(p, "__name__", None))
def test_each_check_sees_what_it_is_for(tmp_path, check, source, expected):
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert len(check(path)) == expected


def test_the_fake_check_sees_a_second_fake_transport(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("class FakeTransport:\n    pass\n")
    assert fake_transports(path) == ["probe.py:1"]
