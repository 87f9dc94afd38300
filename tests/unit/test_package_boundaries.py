"""The architecture's one-way dependencies and the packages' public surfaces."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("connectors", "mappers", "sync", "schemas")
# What each package may import of ours (besides itself).
ALLOWED: dict[str, set[str]] = {
    "schemas": set(),
    "connectors": {"schemas"},
    "mappers": {"schemas"},
    "sync": {"connectors", "mappers", "schemas"},
}


def _imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_dependencies_point_one_way(package: str) -> None:
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        ours = _imports_of(path) & set(PACKAGES)
        bad = ours - ALLOWED[package] - {package}
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert offenders == []


@pytest.mark.parametrize("package", PACKAGES)
def test_public_surface_is_exported(package: str) -> None:
    module = importlib.import_module(package)
    exported = set(module.__all__)
    for name in exported:
        assert hasattr(module, name), f"{package}.__all__ names {name!r}, which it does not define"
    public = {n for n in vars(module) if not n.startswith("_") and not _is_submodule(module, n)}
    assert public - exported == set(), f"{package} exposes names missing from __all__"


def _is_submodule(module: object, name: str) -> bool:
    value = getattr(module, name)
    return type(value).__name__ == "module"
