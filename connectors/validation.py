"""Validation on the way in: parse every pulled resource with ``fhir.resources.R4B``.

Real EHR payloads break the spec in a few recurring ways a strict parser rejects. Each such problem falls
in a *deviation class*; when the vendor profile tolerates the class, the resource is kept with a warning
naming it (and normalised where that is safe). Anything else makes the resource unusable and yields an
error naming the field path and the problem, never the value (values may be PHI).

    id-format         an ``id`` with characters outside [A-Za-z0-9-.] or longer than 64 (kept as is)
    code-whitespace   a ``code`` with leading/trailing/double spaces (normalised: spaces collapsed)
    uuid-version      a ``uuid`` that is not version 4 (kept as is)
    base64-padding    ``base64Binary`` without its ``=`` padding (normalised: padding added)
    number-as-string  a JSON number where a string belongs, e.g. ``versionId: 94`` (normalised: "94")
    string-as-number  a JSON string holding a number where a number belongs, e.g. ``rank: "1"``
                      (normalised: 1; ``fhir.resources`` would coerce it silently, so it is found first)

The names and their texts are ``schemas.deviations``', shared with the lean reader (``mappers.projection``).

The happy path is one ``model_validate``: the pull runs this in a process pool beside the download.
The kept resource is the input JSON (plus normalisations), not a re-serialised model.
"""

from __future__ import annotations

import base64
import binascii
import copy
import decimal
import re
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from schemas.deviations import collapsed_code, not_tolerated, number_from_text, number_text
from schemas.identifiers import bad_id_reason, is_path_safe_id

__all__ = ["Checked", "check_resource"]

_ID_MAX = 64
_ID_PATTERN = r"[A-Za-z0-9\-.]"
_NOT_ID_CHAR = re.compile(r"[^A-Za-z0-9\-.]")
_CODE_PATTERN = r"^[^\s]+(\s[^\s]+)*$"
_V4_UUID = "00000000-0000-4000-8000-000000000000"
_MAX_ROUNDS = 4  # normalising can reveal errors pydantic did not reach; a few rounds settle it
_MAX_REASONS = 3

_Loc = tuple[str | int, ...]
_TYPE_NAME = re.compile(r"[A-Z][A-Za-z]{0,63}")  # a resource type's shape (any other text is not shown)


@dataclass
class Checked:
    """The outcome for one resource: kept (``resource`` set, maybe with warnings) or ``error``."""

    resource: dict[str, Any] | None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Fix:
    deviation: str
    loc: _Loc
    value: object
    normalised: bool  # True: the kept resource gets the value; False: only the copy we validate


def check_resource(raw: object, *, tolerate: frozenset[str]) -> Checked:
    """Validate one resource, keeping tolerated deviations (see the module docstring)."""
    if not isinstance(raw, dict):
        return Checked(None, error=f"not a FHIR resource: a JSON {_json_kind(raw)}, not an object")
    resource_type = raw.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        return Checked(None, error="not a FHIR resource: resourceType is missing")
    try:
        model = get_fhir_model_class(resource_type)
    except (ValueError, KeyError, AttributeError, ImportError):
        shown = f" {resource_type!r}" if _TYPE_NAME.fullmatch(resource_type) else ""
        return Checked(None, error=f"unknown resourceType{shown}")
    if "id" in raw and not is_path_safe_id(raw["id"]):
        # Never tolerated: an id like ``..`` or ``p1?x`` would reach a URL path (the value may be PHI).
        return Checked(None, error=f"{resource_type}: id: {bad_id_reason(raw['id'])}")
    label = _label(raw)
    warnings: list[str] = []
    kept: dict[str, Any] = raw
    placeholders: list[_Fix] = []
    long_id = _long_id(raw)
    if long_id is not None:
        if "id-format" not in tolerate:
            return Checked(
                None,
                error=f"{label}: id: {not_tolerated('id-format')}",
            )
        warnings.append(f"id-format at id (longer than {_ID_MAX} characters)")
        placeholders.append(long_id)
    numbers: list[_Fix] = []
    for loc, number in _numbers_in_strings(model, raw, ()):
        if "string-as-number" not in tolerate:
            where = f"{_path(loc)}: {not_tolerated('string-as-number')}"
            return Checked(None, error=f"{label}: {where}")
        numbers.append(_Fix("string-as-number", loc, number, normalised=True))
    if numbers:
        kept = _with(kept, numbers)
        warnings.extend(_warning(f) for f in numbers)
    candidate = _with(kept, placeholders) if placeholders else kept
    for _ in range(_MAX_ROUNDS):
        try:
            model.model_validate(candidate)
        except ValidationError as exc:
            problems = exc.errors(include_url=False, include_context=True)
        except Exception as exc:  # the model's own validators can fail on odd shapes
            return Checked(None, error=f"{label}: cannot be parsed ({type(exc).__name__})")
        else:
            return Checked(kept, warnings=warnings)
        fixes: list[_Fix] = []
        reasons: list[str] = []
        for problem in problems:
            loc = tuple(problem["loc"])
            fix = _classify(problem, loc)
            if fix is None or fix.deviation not in tolerate or not _reachable(candidate, loc):
                if fix is None:
                    reasons.append(f"{_path(loc)}: {_message(problem)}")
                else:
                    reasons.append(f"{_path(loc)}: {not_tolerated(fix.deviation)}")
            else:
                fixes.append(fix)
        if reasons:
            more = f" (+{len(reasons) - _MAX_REASONS} more)" if len(reasons) > _MAX_REASONS else ""
            return Checked(None, error=f"{label}: " + "; ".join(reasons[:_MAX_REASONS]) + more)
        normalising = [f for f in fixes if f.normalised]
        if normalising:
            kept = _with(kept, normalising)
        placeholders.extend(f for f in fixes if not f.normalised)
        candidate = _with(kept, placeholders) if placeholders else kept
        warnings.extend(_warning(f) for f in fixes)
    return Checked(None, error=f"{label}: still invalid after normalising {len(warnings)} deviations")


def _classify(problem: Any, loc: _Loc) -> _Fix | None:
    """The deviation class of one pydantic error, with its fix; None when it is not a known deviation."""
    kind = problem["type"]
    value = problem.get("input")
    pattern = str((problem.get("ctx") or {}).get("pattern", ""))
    if kind == "string_pattern_mismatch" and isinstance(value, str):
        if _ID_PATTERN in pattern:
            return _Fix("id-format", loc, _NOT_ID_CHAR.sub("-", value)[:_ID_MAX] or "x", normalised=False)
        if pattern == _CODE_PATTERN and (collapsed := collapsed_code(value)) is not None:
            return _Fix("code-whitespace", loc, collapsed, normalised=True)
    if kind == "uuid_version" and isinstance(value, str):
        prefix = "urn:uuid:" if value.startswith("urn:uuid:") else ""
        return _Fix("uuid-version", loc, prefix + _V4_UUID, normalised=False)
    if kind == "base64_decode" and isinstance(value, str):
        padded = value.strip() + "=" * (-len(value.strip()) % 4)
        try:
            base64.b64decode(padded, validate=True)
        except (binascii.Error, ValueError):
            return None
        return _Fix("base64-padding", loc, padded, normalised=True)
    if kind == "string_type" and isinstance(value, int | float) and not isinstance(value, bool):
        return _Fix("number-as-string", loc, number_text(value), normalised=True)
    return None


# -- string-as-number: found by walking the resource along its model's fields -------------------------

_Kind = str | type  # "integer", "decimal", or the model class of a complex element


def _numbers_in_strings(model: Any, node: object, loc: _Loc) -> Iterator[tuple[_Loc, int | float]]:
    """Each string holding a number where ``model`` declares an integer or decimal, with the number.

    ``fhir.resources`` coerces ``"1"`` into a ``positiveInt`` without a word; the lean reader sees the
    string, so the strict one must name it too. A string that holds no number is left to pydantic.
    """
    if not isinstance(node, dict):
        return
    fields = _fields_of(model)
    for key, value in node.items():
        kind = fields.get(key)
        if kind is None:
            continue
        values = enumerate(value) if isinstance(value, list) else ((None, value),)
        for index, item in values:
            where = (*loc, key) if index is None else (*loc, key, index)
            if isinstance(kind, str):
                if isinstance(item, str):
                    number = number_from_text(item, integer=kind == "integer")
                    if number is not None:
                        yield where, number
            elif isinstance(item, dict):
                target = kind
                if kind.__name__ == "Resource" and isinstance(item.get("resourceType"), str):
                    target = _model_named(item["resourceType"]) or kind
                yield from _numbers_in_strings(target, item, where)


#: Extensions are not walked: the lean reader never reads them, and every element has them (walking
#: them would visit every Coding and Reference for an Extension.valueInteger).
_NOT_WALKED: frozenset[str] = frozenset({"extension", "modifierExtension"})


@lru_cache(maxsize=1024)
def _fields_of(model: Any) -> dict[str, _Kind]:
    """The JSON names of a model's numeric and complex fields, each with what it holds."""
    fields: dict[str, _Kind] = {}
    for name, info in model.model_fields.items():
        if name in _NOT_WALKED:
            continue
        kind = _kind_of(info.annotation)
        if kind is not None and (isinstance(kind, str) or _holds_numbers(kind)):
            fields[info.alias or name] = kind
    return fields


@lru_cache(maxsize=1024)
def _holds_numbers(model: Any) -> bool:
    """Whether a model has an integer or decimal field anywhere inside (Coding, Reference, Period…
    have none, so the walk skips them): any model reachable from it with one of its own."""
    seen, todo = {model}, [model]
    while todo:
        current = todo.pop()
        if current.__name__ == "Resource":
            return True  # contained resources: their own type decides
        for name, info in current.model_fields.items():
            if name in _NOT_WALKED:
                continue
            kind = _kind_of(info.annotation)
            if isinstance(kind, str):
                return True
            if kind is not None and kind not in seen:
                seen.add(kind)
                todo.append(kind)
    return False


def _kind_of(annotation: Any) -> _Kind | None:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        base = typing.get_args(annotation)[0]
        if base is decimal.Decimal:
            return "decimal"
        return "integer" if base is int else None
    if origin is not None:  # Optional[...], Union[...], List[...]: the first argument that says
        for argument in typing.get_args(annotation):
            kind = _kind_of(argument)
            if kind is not None:
                return kind
        return None
    resolve = getattr(annotation, "get_model_klass", None)
    if callable(resolve):
        try:
            return typing.cast(type, resolve())
        except (AttributeError, ImportError, KeyError, ValueError):
            return None
    return None


def _model_named(resource_type: str) -> Any:
    try:
        return get_fhir_model_class(resource_type)
    except (ValueError, KeyError, AttributeError, ImportError):
        return None


#: An element name shown in a reason: FHIR's are lowerCamelCase ASCII (a key of another shape, a name
#: sent as a key, is not shown).
_ELEMENT_NAME = re.compile(r"[a-z][A-Za-z0-9_]{0,63}")


def _message(problem: Any) -> str:
    """pydantic's message for one error, unless it quotes something from the input (a value, a type
    named in the data): then only the error's kind (``string_pattern_mismatch``...)."""
    message = str(problem["msg"]).removeprefix("Value error, ").rstrip(".")
    if any(text in message for text in _texts_of(problem.get("input"))):
        return f"invalid ({problem['type']})"
    return message


def _texts_of(value: object, limit: int = 256) -> Iterator[str]:
    """The strings and numbers inside ``value`` (at most ``limit`` of them), as text of 3+ characters."""
    stack, seen = [value], 0
    while stack and seen < limit:
        item = stack.pop()
        seen += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str | int | float) and not isinstance(item, bool):
            text = str(item).strip()
            if len(text) >= 3:
                yield text


def _long_id(raw: dict[str, Any]) -> _Fix | None:
    value = raw.get("id")
    if isinstance(value, str) and len(value) > _ID_MAX:
        return _Fix("id-format", ("id",), _NOT_ID_CHAR.sub("-", value)[:_ID_MAX], normalised=False)
    return None


def _reachable(document: object, loc: _Loc) -> bool:
    node = document
    for step in loc:
        if isinstance(node, dict) and isinstance(step, str):
            found = step in node
        else:
            found = isinstance(node, list) and isinstance(step, int) and -len(node) <= step < len(node)
        if not found:
            return False
        node = node[step]  # type: ignore[index]
    return True


def _with(document: dict[str, Any], fixes: Sequence[_Fix]) -> dict[str, Any]:
    """A deep copy of ``document`` with each fix's value set at its location."""
    result = copy.deepcopy(document)
    for fix in fixes:
        node: Any = result
        for step in fix.loc[:-1]:
            node = node[step]
        node[fix.loc[-1]] = fix.value
    return result


def _warning(fix: _Fix) -> str:
    action = "normalised" if fix.normalised else "kept as sent"
    return f"{fix.deviation} at {_path(fix.loc)} ({action})"


def _path(loc: _Loc) -> str:
    text = ""
    for step in loc:
        if isinstance(step, str) and not _ELEMENT_NAME.fullmatch(step):
            step = "(field)"  # a key the data made up (an extra input): it may be a name
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else step)
    return text or "(resource)"


def _label(raw: dict[str, Any]) -> str:
    resource_id = raw.get("id")
    shown = resource_id[:_ID_MAX] if isinstance(resource_id, str) and resource_id else "?"
    return f"{raw['resourceType']}/{shown}"


def _json_kind(raw: object) -> str:
    kinds = {
        list: "array",
        str: "string",
        int: "number",
        float: "number",
        bool: "boolean",
        type(None): "null",
    }
    return kinds.get(type(raw), type(raw).__name__)
