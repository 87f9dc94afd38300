"""Reading a hospital's level-of-care rules file, and the FHIR ValueSet files it names, at the edge.

A rule may say ``value_set = "mh-dx.json"`` instead of listing codes (``mappers.rules``); the mappers do
no I/O, so they get a reader from here that resolves such a name against the rules file's own folder (an
absolute name is used as it is). ``map --rules``, ``coverage``, ``explain-encounter`` and the service all
load rules through this module, so a value set works the same everywhere.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from mappers.rules import Rules, RulesError, ValueSetReader, default_rules, load_rules
from sync.errors import ConfigError

__all__ = ["load_rules_file", "rules_from_text", "value_set_reader"]


def value_set_reader(folder: Path | str) -> ValueSetReader:
    """Reads a value set file by the name a rule gives it: relative names from ``folder``."""
    base = Path(folder)

    def read(name: str) -> str:
        path = Path(name)
        return (path if path.is_absolute() else base / path).read_text(encoding="utf-8")

    return read


@lru_cache(maxsize=4)
def rules_from_text(text: str | None, folder: str | None = None) -> Rules:
    """The default rules extended by ``text`` (None: the defaults), value sets read from ``folder``.

    Cached: worker processes of ``map`` rebuild the rules from the same text once each.
    """
    if text is None:
        return default_rules()
    return load_rules(text, value_sets=value_set_reader(folder) if folder is not None else None)


def read_rules_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read rules file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"rules file {path} is not UTF-8 text") from exc


def rules_folder(path: Path) -> str:
    """The folder value set names in ``path`` are resolved against (absolute, for worker processes)."""
    return str(path.resolve().parent)


def load_rules_file(path: Path | str | None) -> Rules:
    """The rules of a hospital's file (None: the defaults); a bad file is a ``ConfigError`` naming it."""
    if path is None or str(path) == "":
        return default_rules()
    path = Path(path)
    try:
        return rules_from_text(read_rules_text(path), rules_folder(path))
    except RulesError as exc:
        raise ConfigError(f"rules file {path}: {exc}") from exc
