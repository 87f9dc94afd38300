"""Mappers are pure: they import nothing of ``connectors`` or ``sync``, and no module in ``mappers/`` uses
a file, network, environment or clock API. Reading files happens at the edge (``sync.inputs``, the CLI).

Two checks: a static one over every module's AST (imports from an allow-list; no call of ``open``,
``print``, file methods, ``datetime.now`` / ``utcnow`` / ``today``, ``time.time`` and friends, no
``os.environ``), and a dynamic one that maps real data while files, sockets and the clock raise.
The one sanctioned read is the rule table shipped inside the package, through ``importlib.resources``.
"""

from __future__ import annotations

import ast
import builtins
import io
import socket
import time
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

from mappers.episode_of_care import episode_of_care
from mappers.episodes import map_episodes
from mappers.referrals import map_referrals
from mappers.rules import default_rules
from sync.journeys import build_resources, parse_book

ROOT = Path(__file__).resolve().parents[3]
MAPPERS = ROOT / "mappers"

#: Top-level modules a mapper may import: the standard library's pure parts, the data libraries, ours.
ALLOWED_IMPORTS = frozenset(
    {
        "__future__", "abc", "bisect", "collections", "contextlib", "copy", "dataclasses", "datetime",
        "decimal", "enum", "functools",
        "gc",  # only to pause the cyclic collector during one mapping (mappers.episodes)
        "hashlib", "heapq", "itertools", "json", "math", "operator", "re", "statistics",
        "string", "textwrap", "tomllib", "types", "typing", "uuid", "zoneinfo",
        "fhir", "msgspec", "orjson", "pydantic", "structlog",
        "importlib",  # only ``importlib.resources``, for the rule table shipped in the package (below)
        "mappers", "schemas",
    }
)  # fmt: skip
FORBIDDEN_CALLS = frozenset({"open", "input", "print", "exec", "eval", "__import__", "getenv", "breakpoint"})
FILE_METHODS = frozenset(
    {"read_text", "read_bytes", "write_text", "write_bytes", "open", "unlink", "mkdir", "touch", "iterdir",
     "glob", "rglob", "exists", "is_file", "is_dir", "stat", "rename", "rmdir", "urlopen"}
)  # fmt: skip
#: ``datetime.now()`` / ``date.today()``…, on whatever name they are reached through.
CLOCK_METHODS = frozenset({"now", "utcnow", "today"})
#: Functions of the ``time`` module (a ``datetime`` value's ``.time()`` is not the clock).
TIME_FUNCTIONS = frozenset({"time", "time_ns", "monotonic", "monotonic_ns", "perf_counter", "process_time"})
FORBIDDEN_ATTRIBUTES = frozenset({"environ", "environb", "stdin", "stdout", "stderr"})


@dataclass(frozen=True)
class Finding:
    where: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.where}:{self.line}: {self.what}"


def _chain_root(node: ast.expr) -> ast.expr:
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


def _is_package_resource(node: ast.Attribute) -> bool:
    """``resources.files("mappers")....read_text(...)``: the package's own data, not an input."""
    current: ast.expr = node.value
    while isinstance(current, (ast.Attribute, ast.Call)):
        if isinstance(current, ast.Call):
            func = current.func
            if (
                isinstance(func, ast.Attribute)
                and func.attr == "files"
                and isinstance(func.value, ast.Name)
                and func.value.id == "resources"
                and [a.value for a in current.args if isinstance(a, ast.Constant)] == ["mappers"]
            ):
                return True
            current = func
        else:
            current = current.value
    return False


def impurities(source: str, where: str) -> list[Finding]:
    """Every I/O, environment or clock use, and every import outside the allow-list, in ``source``."""
    found: list[Finding] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top not in ALLOWED_IMPORTS or (top == "importlib" and alias.name != "importlib.resources"):
                    found.append(Finding(where, node.lineno, f"imports {alias.name}"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            top = node.module.split(".")[0]
            only_resources = node.module == "importlib" and [a.name for a in node.names] == ["resources"]
            if top not in ALLOWED_IMPORTS or (top == "importlib" and not only_resources):
                found.append(Finding(where, node.lineno, f"imports from {node.module}"))
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
                found.append(Finding(where, node.lineno, f"calls {func.id}()"))
            elif isinstance(func, ast.Attribute):
                if func.attr in FILE_METHODS and not _is_package_resource(func):
                    found.append(Finding(where, node.lineno, f"calls .{func.attr}() (file I/O)"))
                elif func.attr in CLOCK_METHODS or func.attr in TIME_FUNCTIONS:
                    root = _chain_root(func)
                    name = root.id if isinstance(root, ast.Name) else "?"
                    if func.attr in CLOCK_METHODS or name == "time":
                        found.append(Finding(where, node.lineno, f"calls {name}….{func.attr}() (clock)"))
                elif func.attr in FORBIDDEN_CALLS:
                    found.append(Finding(where, node.lineno, f"calls .{func.attr}()"))
        elif isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_ATTRIBUTES:
            found.append(Finding(where, node.lineno, f"uses .{node.attr}"))
    return found


MODULES = sorted(MAPPERS.rglob("*.py"))


def test_there_are_mapper_modules_to_check() -> None:
    names = {p.name for p in MODULES}
    assert {"episodes.py", "referrals.py", "episode_of_care.py", "rules.py"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_mapper_module_is_pure(path: Path) -> None:
    findings = impurities(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert [str(f) for f in findings] == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_mapper_module_imports_nothing_from_connectors_or_sync(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {
        n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.level == 0
    }
    assert {m for m in imported if m.split(".")[0] in {"connectors", "sync"}} == set()


@pytest.mark.parametrize(
    ("source", "what"),
    [
        ("data = open('x.ndjson').read()", "calls open()"),
        ("from pathlib import Path\nPath('x').read_text()", "imports from pathlib"),
        ("def f(p):\n    return p.read_text()", "calls .read_text() (file I/O)"),
        ("import socket", "imports socket"),
        ("import httpx", "imports httpx"),
        ("import os\nos.environ['X']", "imports os"),
        ("def f(os):\n    return os.environ.get('X')", "uses .environ"),
        ("from datetime import datetime\ndatetime.now()", "calls datetime….now() (clock)"),
        ("import datetime\ndatetime.datetime.utcnow()", "calls datetime….utcnow() (clock)"),
        ("from datetime import date\ndate.today()", "calls date….today() (clock)"),
        ("import time\ntime.time()", "imports time"),
        ("def f(time):\n    return time.time()", "calls time….time() (clock)"),
        ("def f(moment):\n    return moment.astimezone().now()", "calls moment….now() (clock)"),
        ("from connectors.http import EhrClient", "imports from connectors.http"),
        ("import sync.cli", "imports sync.cli"),
        ("from importlib import import_module", "imports from importlib"),
        ("print('episode', 1)", "calls print()"),
        ("from importlib import resources\nresources.files('sync').joinpath('x').read_text()", "file I/O"),
    ],
)
def test_the_checker_finds_each_kind_of_impurity(source: str, what: str) -> None:
    findings = impurities(source, "example.py")
    assert any(what in f.what for f in findings), findings


def test_the_shipped_rule_table_read_is_the_one_sanctioned_exception() -> None:
    source = "from importlib import resources\nresources.files('mappers').joinpath('levels.toml').read_text()"
    assert impurities(source, "example.py") == []


def _refuse(*_: Any, **__: Any) -> NoReturn:
    raise AssertionError("a mapper tried to do I/O or read the clock")


def test_mapping_real_data_touches_no_file_socket_or_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    book = parse_book(yaml.safe_load((ROOT / "examples" / "journeys.yaml").read_text(encoding="utf-8")))
    resources = list(build_resources(book, anchor=date(2026, 9, 1), timezone="America/New_York", seed=7))
    rules = default_rules()  # the shipped table, read once (cached) before the mappers run
    as_of = datetime.fromisoformat("2026-09-02T08:00:00-04:00")

    def run() -> tuple[Any, ...]:
        episodes = map_episodes(resources, ehr="demo", as_of=as_of, rules=rules, timezone="America/New_York")
        referrals = map_referrals(resources, ehr="demo", rules=rules, timezone="America/New_York")
        return episodes.episodes, referrals.referrals, [episode_of_care(e) for e in episodes.episodes]

    expected = run()  # warm: lazy imports and time-zone data are loaded here
    for target, name in ((builtins, "open"), (io, "open"), (socket, "socket"), (socket, "create_connection"),
                         (time, "time"), (time, "time_ns"), (time, "monotonic")):  # fmt: skip
        monkeypatch.setattr(target, name, _refuse)
    assert run() == expected
    assert expected[0]
    assert expected[1]


@pytest.mark.parametrize(
    "source",
    [
        "def f(moment):\n    return moment.time()",  # a datetime's time of day, not the clock
        "def f(text):\n    return text.replace('.', '')",
        "from datetime import datetime\ndatetime.fromisoformat('2026-01-01T00:00:00+00:00')",
    ],
)
def test_the_checker_lets_pure_code_through(source: str) -> None:
    assert impurities(source, "example.py") == []
