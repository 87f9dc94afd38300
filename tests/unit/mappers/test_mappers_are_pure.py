"""Mappers do no I/O and never read the clock: files are read at the edge, the as-of time is an input."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

MAPPERS = Path(__file__).resolve().parents[3] / "mappers"
FORBIDDEN_MODULES = {"httpx", "socket", "requests", "urllib", "sqlalchemy", "kafka", "subprocess", "shutil"}
FORBIDDEN_CALLS = {
    "open",
    "now",
    "utcnow",
    "today",
    "getenv",
    "read_text",
    "write_text",
    "Path",
    "perf_counter",
}
# The shipped rule table is package data, read through importlib.resources: the one permitted read.
ALLOWED = {("rules.py", "read_text")}


def _modules() -> list[Path]:
    return sorted(MAPPERS.rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.name)
def test_module_does_no_io(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            problems.extend(f"imports {n}" for n in names if n.split(".")[0] in FORBIDDEN_MODULES)
        if isinstance(node, ast.Call):
            func = node.func
            name = (
                func.attr
                if isinstance(func, ast.Attribute)
                else func.id
                if isinstance(func, ast.Name)
                else ""
            )
            clock = (
                isinstance(func, ast.Attribute)
                and isinstance(func.value, ast.Name)
                and func.value.id == "time"
            )
            if (name in FORBIDDEN_CALLS or clock) and (path.name, name) not in ALLOWED:
                problems.append(f"calls {name}() on line {node.lineno}")
        if isinstance(node, ast.Attribute) and node.attr == "environ":
            problems.append(f"reads os.environ on line {node.lineno}")
    assert problems == []


def test_the_scan_sees_the_engine() -> None:
    names = {p.name for p in _modules()}
    assert {"episodes.py", "levels.py", "rules.py"} <= names
