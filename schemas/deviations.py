"""The named deviations from FHIR R4 that real vendors send, and how each one is normalised.

Both readers of FHIR resources use this table: the strict one (``connectors.validation``, the whole
resource through ``fhir.resources.R4B``) and the lean one (``mappers.projection``, the fields the
mappers read). A vendor profile (``connectors.vendors``) lists which deviations it tolerates; a tolerated
one keeps the resource (normalised where that is safe) and is counted by its name, an untolerated one
rejects it with a reason naming the resource type, id, field path and the deviation, never the value.

Pure data and pure functions; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

__all__ = [
    "DEVIATIONS",
    "LOSSLESS",
    "Deviation",
    "collapsed_code",
    "not_tolerated",
    "number_from_text",
    "number_text",
]


@dataclass(frozen=True)
class Deviation:
    """One named deviation: what it is and what a reader that tolerates it does."""

    name: str
    what: str
    #: True: the kept resource holds the normalised value; False: it is kept as sent.
    normalised: bool


DEVIATIONS: Final[Mapping[str, Deviation]] = MappingProxyType(
    {
        d.name: d
        for d in (
            Deviation("id-format", "id with characters outside [A-Za-z0-9-.] or over 64", normalised=False),
            Deviation("code-whitespace", "code with leading, trailing or double whitespace", normalised=True),
            Deviation("uuid-version", "uuid that is not version 4", normalised=False),
            Deviation("base64-padding", "base64 without its padding", normalised=True),
            Deviation("number-as-string", "JSON number where a string belongs", normalised=True),
            Deviation("string-as-number", "JSON string holding a number where a number belongs", True),
        )
    }
)

#: Deviations whose normalisation cannot change what the value means: the generic profile's default.
LOSSLESS: Final[frozenset[str]] = frozenset({"code-whitespace", "number-as-string", "string-as-number"})


def not_tolerated(name: str) -> str:
    """The reason text of an untolerated deviation (no value in it)."""
    return f"{DEVIATIONS[name].what} ({name}, not tolerated for this EHR)"


def collapsed_code(value: str) -> str | None:
    """A code with its whitespace trimmed and collapsed (``"finished "`` -> ``"finished"``); None when
    nothing but whitespace is left."""
    words = value.split()
    return " ".join(words) if words else None


def number_text(value: int | float) -> str:
    """A JSON number as the string FHIR wanted (``906`` -> ``"906"``, ``2.0`` -> ``"2"``)."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def number_from_text(text: str, *, integer: bool) -> int | float | None:
    """The number a string holds (``" 1"`` -> ``1``), when it is a FHIR integer (``integer``) or decimal;
    None otherwise (``"one"``, ``"1.5"`` for an integer, ``"nan"``)."""
    stripped = text.strip()
    body = stripped.removeprefix("-").removeprefix("+")
    if body.isdigit() and body.isascii():
        return int(stripped)
    if integer:
        return None
    whole, dot, fraction = body.partition(".")
    if dot and whole.isdigit() and fraction.isdigit() and whole.isascii() and fraction.isascii():
        return float(stripped)
    return None
