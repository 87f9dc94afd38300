"""Reading FHIR resources from files at the edge: NDJSON, bulk-export folders, Bundles, single resources.

Accepted inputs (any mix, in the order given):

- an NDJSON file (``.ndjson``, ``.jsonl``, optionally ``.gz``): one resource per line, any types; read
  line by line, so a file larger than memory streams;
- a folder, such as a Bulk Data ``$export`` download: every ``*.ndjson`` / ``*.jsonl`` / ``*.json`` file
  in it (``Encounter.ndjson``, ``Encounter.000.ndjson``…, optionally gzipped), in name order; a bulk
  export's own ``manifest.json`` is recognised and skipped; other files are ignored;
- a JSON file holding one resource, a Bundle (searchset, collection, transaction, batch…: each
  ``entry.resource``, nested Bundles too), or a JSON array of those. A ``.json`` file that is really
  NDJSON is read as NDJSON.

A line or file that is not a FHIR resource (bad JSON, no ``resourceType``) is an ``InputReject`` naming
the file, the line and what is wrong; it never stops the run. A path that does not exist or cannot be
read raises ``InputError`` (a ``ConfigError``: the run cannot start).

How each resource is read (``mode``): ``"full"`` keeps the whole parsed JSON; ``"lean"`` keeps the lean
projection of ``mappers.projection`` (only the fields the mappers read, each type-checked; a value of the
wrong type is an ``InputReject`` naming the resource, the field path and the problem); ``"strict"``
validates the whole resource with ``fhir.resources.R4B`` (``connectors.validation``) and rejects what
fails, with the reasons. Both tolerate the same named deviations (``tolerate``: the vendor profile's,
``schemas.deviations``): a kept resource's deviations are counted by name in ``deviations``.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, Literal, cast

import orjson
import structlog

from connectors.private import open_private
from mappers.fhir import reference_id
from mappers.index import PATIENT_ELEMENT
from mappers.projection import ProjectionError, project, project_line
from sync.errors import ConfigError

__all__ = [
    "DEFAULT_LIMITS",
    "InputError",
    "InputLimits",
    "InputReject",
    "Loaded",
    "Partitions",
    "ReadMode",
    "admit",
    "input_bytes",
    "iter_resources",
    "load_resources",
    "partition_resources",
    "patient_key",
    "read_partition",
]

log = structlog.get_logger()

#: How resources are read: the whole JSON, the mappers' lean projection, or fully validated.
ReadMode = Literal["full", "lean", "strict"]

NDJSON_SUFFIXES: Final = (".ndjson", ".jsonl")
FOLDER_SUFFIXES: Final = (*NDJSON_SUFFIXES, ".json")


class InputError(ConfigError):
    """An input path does not exist or cannot be read."""


@dataclass(frozen=True)
class InputLimits:
    """How much of an input is read at once (sizes in bytes, after decompression).

    ``line_bytes``: the longest NDJSON line, and the largest Bundle entry of a streamed Bundle;
    ``document_bytes``: the largest ``.json`` document (a gzipped one is never inflated further);
    ``stream_bytes``: a Bundle larger than this (a document or an NDJSON line) is read entry by entry,
    so its parsed form is never held whole (about 6-9 times its size in Python objects).
    Anything over a cap is an ``InputReject`` naming the file, the line or entry, and the size.
    """

    line_bytes: int = 64 * 1024 * 1024
    document_bytes: int = 512 * 1024 * 1024
    stream_bytes: int = 16 * 1024 * 1024


DEFAULT_LIMITS: Final = InputLimits()


@dataclass(frozen=True)
class InputReject:
    """Something in an input that is not a FHIR resource: where it is and why."""

    source: str
    line: int | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "line": self.line, "reason": self.reason}


@dataclass
class Loaded:
    """All resources of the inputs, what could not be read, and how many files were read."""

    resources: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[InputReject] = field(default_factory=list)
    files: int = 0
    #: Resources read from the files, those the read mode then rejected included (``Partitions`` counts
    #: the same), so "inputs" means one thing whichever way ``map`` ran.
    read: int = 0
    #: Tolerated deviations of the kept resources, by name (``schemas.deviations``).
    deviations: Counter[str] = field(default_factory=Counter)


def load_resources(
    paths: Iterable[Path | str],
    *,
    mode: ReadMode = "full",
    limits: InputLimits = DEFAULT_LIMITS,
    tolerate: frozenset[str] = frozenset(),
) -> Loaded:
    """Every resource of ``paths`` in one list (see the module docstring for the accepted inputs)."""
    loaded = Loaded()
    files = _files(paths)
    loaded.files = len(files)
    for path in files:
        source = str(path)
        for resource, entry, number in _read_file_raw(path, loaded.rejects, limits):
            loaded.read += 1
            admitted = admit(
                resource, mode, source, number, loaded.rejects, entry=entry,
                tolerate=tolerate, deviations=loaded.deviations,
            )  # fmt: skip
            if admitted is not None:
                loaded.resources.append(admitted)
    log.info("inputs_read", files=loaded.files, resources=len(loaded.resources), rejects=len(loaded.rejects))
    return loaded


@dataclass
class Partitions:
    """The inputs split by patient into NDJSON files: ``parts[i]`` holds every resource of the patients
    hashed to ``i``; ``shared`` the resources of no patient (Locations, Organizations…), which every
    partition needs beside its own."""

    parts: list[Path]
    shared: Path
    rejects: list[InputReject] = field(default_factory=list)
    files: int = 0
    resources: int = 0
    #: The input files, by the index partition lines carry.
    sources: list[str] = field(default_factory=list)


#: Elements naming the patient of resource types the mappers do not group themselves (Task.for…).
_PATIENT_ELEMENTS: Final = ("subject", "patient", "beneficiary", "for")
_BOM: Final = b"\xef\xbb\xbf"
_GZIP_RATIO: Final = 8  # a gzipped NDJSON file holds about this many times its size


def patient_key(resource: Mapping[str, Any]) -> str | None:
    """The id of the patient a resource belongs to, or None for a resource of no one patient.

    The element the mappers group by (``Encounter.subject``, ``Coverage.beneficiary``…), else the usual
    patient elements; a Patient is its own.
    """
    kind = resource.get("resourceType")
    if kind == "Patient":
        own = resource.get("id")
        return own if isinstance(own, str) and own else None
    name = PATIENT_ELEMENT.get(str(kind))
    for element in (name,) if name is not None else _PATIENT_ELEMENTS:
        patient = reference_id(resource.get(element), "Patient")
        if patient:
            return patient
    return None


def input_bytes(paths: Iterable[Path | str]) -> int:
    """About how many bytes of JSON the inputs hold (gzipped files counted at a typical ratio)."""
    total = 0
    for path in _files(paths):
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise InputError(f"cannot read input {path}: {exc.strerror or exc}") from exc
        total += size * _GZIP_RATIO if path.name.lower().endswith(".gz") else size
    return total


def partition_resources(
    paths: Iterable[Path | str], folder: Path, parts: int, *, limits: InputLimits = DEFAULT_LIMITS
) -> Partitions:
    """Stream the inputs into ``parts`` files by patient (a stable hash of the patient id) plus one file
    of shared resources, under ``folder``; nothing is held in memory but one resource.

    Each line of a partition file is ``<resourceType> TAB <input index> TAB <line> TAB <Bundle entry>
    TAB <JSON>``, so the worker reading it knows the type to project and where a reject came from.
    Each line is parsed as ``load_resources`` parses it (same rejects)."""
    files = _files(paths)
    out = Partitions(
        parts=[folder / f"part-{index:04d}.ndjson" for index in range(parts)],
        shared=folder / "shared.ndjson",
        files=len(files),
        sources=[str(path) for path in files],
    )
    handles = [open_private(path, buffering=1 << 16) for path in out.parts]
    try:
        with open_private(out.shared, buffering=1 << 16) as shared:
            for index, path in enumerate(files):
                for kind, patient, number, entry, body in _partition_items(path, out.rejects, limits):
                    out.resources += 1
                    target = shared if patient is None else handles[zlib.crc32(patient.encode()) % parts]
                    target.write(b"%s\t%d\t%d\t%s\t" % (_header_kind(kind), index, number, entry))
                    target.write(body if body.endswith(b"\n") else body + b"\n")
    finally:
        for handle in handles:
            handle.close()
    log.info("inputs_partitioned", files=out.files, resources=out.resources, parts=parts)
    return out


def _partition_items(
    path: Path, rejects: list[InputReject], limits: InputLimits
) -> Iterator[tuple[str, str | None, int, bytes, bytes]]:
    """``(resourceType, patient id, line number, Bundle entry, JSON)`` of each resource of one input file.

    Every line is parsed exactly as ``load_resources`` parses it (``orjson``: the same depth limit, the
    same numbers refused, the same rejects), so the partitioned and in-process runs keep and reject the
    same resources; an escaped tab in a type stays escaped in the partition line (``_header_kind``)."""
    for resource, entry, number in _read_file_raw(path, rejects, limits):
        # Written as parsed, not as read: 2**100 reaches the worker as the float orjson made of it.
        kind, patient, body = str(resource["resourceType"]), patient_key(resource), orjson.dumps(resource)
        yield kind, patient, number or 0, (entry or "").encode(), body


def _header_kind(kind: str) -> bytes:
    """A resource type as a partition line's first field: a JSON string's escaped text, so a type with
    a tab or a newline in it cannot split the line (FHIR types are letters: they stay as they are)."""
    return kind.encode() if kind.isalnum() else orjson.dumps(kind)[1:-1]


def _kind_of_header(field: bytes) -> str:
    """The resource type ``_header_kind`` wrote."""
    return str(orjson.loads(b'"' + field + b'"')) if b"\\" in field else field.decode()


def _read_file_raw(
    path: Path, rejects: list[InputReject], limits: InputLimits = DEFAULT_LIMITS
) -> Iterator[tuple[dict[str, Any], str | None, int | None]]:
    """``_read_file``'s resources, each with its position in a Bundle (None outside one) and its line
    number (NDJSON) or position (a JSON array of resources)."""
    if not path.name.lower().removesuffix(".gz").endswith(NDJSON_SUFFIXES):
        yield from _read_document(path, rejects, limits)
        return
    with _open(path) as handle:
        yield from _read_lines_raw(handle, path, rejects, limits)


def admit(
    resource: dict[str, Any],
    mode: ReadMode,
    source: str,
    line: int | None,
    rejects: list[InputReject],
    *,
    entry: str | None = None,
    tolerate: frozenset[str] = frozenset(),
    deviations: Counter[str] | None = None,
) -> dict[str, Any] | None:
    """A parsed resource as ``mode`` reads it (None, with a reject, when it does not pass); ``entry``
    is its position in a Bundle (``"2"``, ``"2.0"`` nested), named in the reject. The deviations in
    ``tolerate`` are kept (normalised) and counted in ``deviations``."""
    if mode == "full":
        return resource
    found: list[str] = []
    if mode == "lean":
        try:
            projected = project(resource, tolerate=tolerate, deviations=found)
        except ProjectionError as exc:
            rejects.append(InputReject(source, line, _entry_reason(entry, str(exc))))
            return None
        if found and deviations is not None:
            deviations.update(found)
        return projected
    # Imported here: fhir.resources' models cost ~25 MB in every process, and only --strict needs them.
    from connectors.validation import check_resource

    checked = check_resource(resource, tolerate=tolerate)
    if checked.resource is None:
        reason = _entry_reason(entry, str(checked.error))  # names the resource and the field
        rejects.append(InputReject(source, line, reason))
    elif checked.warnings and deviations is not None:
        deviations.update(w.split(" ", 1)[0] for w in checked.warnings)  # "<name> at <path> (…)"
    return checked.resource


def _entry_reason(entry: str | None, reason: str) -> str:
    return reason if entry is None else f"Bundle entry {entry}: {reason}"


def read_partition(
    paths: Iterable[Path],
    *,
    mode: ReadMode = "full",
    rejects: list[InputReject] | None = None,
    sources: Sequence[str] = (),
    tolerate: frozenset[str] = frozenset(),
    deviations: Counter[str] | None = None,
) -> list[dict[str, Any]]:
    """The resources of partition files written by ``partition_resources``, read as ``mode`` says;
    what does not pass goes to ``rejects`` naming the input file (``sources``) and line; tolerated
    deviations are counted in ``deviations``."""
    resources: list[dict[str, Any]] = []
    found = rejects if rejects is not None else []
    named: list[str] = []
    loads = orjson.loads
    for path in paths:
        with path.open("rb") as handle:
            if mode == "lean":
                for line in handle:
                    kind, index, number, entry, body = line.split(b"\t", 4)
                    try:
                        kept = project_line(body, _kind_of_header(kind), tolerate=tolerate, deviations=named)
                        resources.append(kept)
                    except ProjectionError as exc:
                        reason = _entry_reason(entry.decode() or None, str(exc))
                        found.append(InputReject(_source(sources, index), int(number) or None, reason))
                continue
            for line in handle:
                kind, index, number, entry, body = line.split(b"\t", 4)
                resource = admit(
                    loads(body), mode, _source(sources, index), int(number) or None, found,
                    entry=entry.decode() or None, tolerate=tolerate, deviations=deviations,
                )  # fmt: skip
                if resource is not None:
                    resources.append(resource)
    if named and deviations is not None:
        deviations.update(named)
    return resources


def _source(sources: Sequence[str], index: bytes) -> str:
    position = int(index)
    return sources[position] if position < len(sources) else f"input {position}"


def iter_resources(paths: Iterable[Path | str], rejects: list[InputReject]) -> Iterator[dict[str, Any]]:
    """The resources of ``paths`` one at a time (NDJSON streams); unreadable items go to ``rejects``."""
    for path in _files(paths):
        yield from _read_file(path, rejects)


def _files(paths: Iterable[Path | str]) -> list[Path]:
    """The files to read, folders expanded; raises ``InputError`` for a missing or empty input."""
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and _is_fhir_file_name(p.name))
            if not inside:
                raise InputError(f"input folder {path} holds no .ndjson, .jsonl or .json files")
            files.extend(inside)
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise InputError(f"input {path} is neither a file nor a folder")
        else:
            raise InputError(f"input {path} does not exist")
    return files


def _is_fhir_file_name(name: str) -> bool:
    lowered = name.lower().removesuffix(".gz")
    return lowered.endswith(FOLDER_SUFFIXES)


def _open(path: Path) -> IO[bytes]:
    try:
        if path.name.lower().endswith(".gz"):
            return cast(IO[bytes], gzip.open(path, "rb"))
        return path.open("rb")
    except OSError as exc:
        raise InputError(f"cannot read input {path}: {exc.strerror or exc}") from exc


def _read_file(path: Path, rejects: list[InputReject]) -> Iterator[dict[str, Any]]:
    for resource, _, _ in _read_file_raw(path, rejects):
        yield resource


def _read_document(
    path: Path, rejects: list[InputReject], limits: InputLimits = DEFAULT_LIMITS
) -> Iterator[tuple[dict[str, Any], str | None, int | None]]:
    """The resources of a JSON file: one resource, a Bundle, an array of those (or NDJSON after all).

    At most ``limits.document_bytes`` are read (decompressed: a gzip bomb stops there); a Bundle over
    ``limits.stream_bytes`` is parsed entry by entry (``_streamed_bundle``)."""
    cap = limits.document_bytes
    with _open(path) as handle:
        try:
            data = handle.read(cap + 1)
        except (OSError, EOFError) as exc:
            raise InputError(f"cannot read input {path}: {exc}") from exc
    if len(data) > cap:
        packed = ", decompressed" if path.name.lower().endswith(".gz") else ""
        rejects.append(
            InputReject(str(path), None, f"the document is over max_document_bytes ({cap} bytes{packed})")
        )
        return
    data = data.removeprefix(_BOM)  # Windows tools write one; it is not part of the JSON
    if len(data) > limits.stream_bytes:
        text = _bundle_text(data)
        spans = _entry_spans(text) if text is not None else None
        if text is not None and spans is not None:
            del data  # the text holds it now; the parsed Bundle is never held whole
            for resource, entry in _streamed_entries(text, spans, str(path), None, rejects, limits):
                yield resource, entry, None
            return
        del text
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if _looks_like_ndjson(data):
            yield from _read_lines_raw(io.BytesIO(data), path, rejects, limits)
            return
        rejects.append(InputReject(str(path), None, f"not valid JSON: {exc}"))
        return
    if _is_bulk_manifest(document):
        rejects.extend(_missing_outputs(document, path))
        return
    items = document if isinstance(document, list) else [document]
    for index, item in enumerate(items):
        where = None if not isinstance(document, list) else index + 1
        for resource, entry in _resources_of(item, str(path), where, rejects):
            yield resource, entry, where


def _looks_like_ndjson(data: bytes) -> bool:
    """Several JSON objects, one per line (a ``.json`` file that is really NDJSON)."""
    lines = [line for line in data.splitlines() if line.strip()]
    if len(lines) < 2:
        return False
    try:
        return isinstance(orjson.loads(lines[0]), dict)
    except orjson.JSONDecodeError:
        return False


def _is_bulk_manifest(document: Any) -> bool:
    return (
        isinstance(document, dict)
        and "resourceType" not in document
        and "output" in document
        and ("transactionTime" in document or "request" in document)
    )


def _read_lines_raw(
    handle: IO[bytes], path: Path, rejects: list[InputReject], limits: InputLimits = DEFAULT_LIMITS
) -> Iterator[tuple[dict[str, Any], str | None, int | None]]:
    """Each resource of an NDJSON stream, with its Bundle entry (a line may be a Bundle) and the
    line's number; a bad line is a reject, never a crash. A UTF-8 BOM before the first line is skipped.
    A line over ``limits.line_bytes`` is a reject with its size, and is never held whole."""
    source = str(path)
    number = 0
    cap = limits.line_bytes
    try:
        for number, (line, size) in enumerate(_capped_lines(handle, cap), start=1):
            if line is None:
                rejects.append(
                    InputReject(source, number, f"line {number} is {size} bytes, over max_line_bytes ({cap})")
                )
                continue
            if number == 1:
                line = line.removeprefix(_BOM)
            for resource, entry in _parsed_line(line, source, number, rejects, limits):
                yield resource, entry, number
    except (OSError, EOFError) as exc:  # a truncated gzip file, a disk error mid-file
        rejects.append(InputReject(source, number + 1, f"cannot read further: {exc}"))


def _capped_lines(handle: IO[bytes], cap: int) -> Iterator[tuple[bytes | None, int]]:
    """``(line, size)`` of each line of ``handle``; ``line`` is None for one over ``cap`` bytes (its
    newline not counted), which is read past in pieces, never held."""
    while line := handle.readline(cap + 1):
        if len(line) <= cap or line.endswith(b"\n"):
            yield line, len(line)
            continue
        size = len(line)
        while (more := handle.readline(1 << 20)) and not more.endswith(b"\n"):
            size += len(more)
        size += len(more) - (1 if more else 0)
        yield None, size


def _parsed_line(
    line: bytes,
    source: str,
    number: int,
    rejects: list[InputReject],
    limits: InputLimits = DEFAULT_LIMITS,
) -> Iterator[tuple[dict[str, Any], str | None]]:
    """The resource(s) of one NDJSON line: itself, a Bundle's entries (with their positions), or a
    reject. A Bundle line over ``limits.stream_bytes`` is parsed entry by entry."""
    if not line.strip():
        return
    if len(line) > limits.stream_bytes:
        text = _bundle_text(line)
        spans = _entry_spans(text) if text is not None else None
        if text is not None and spans is not None:
            yield from _streamed_entries(text, spans, source, number, rejects, limits)
            return
    try:
        item = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        rejects.append(InputReject(source, number, f"not valid JSON: {exc}"))
        return
    kind = item.get("resourceType") if isinstance(item, dict) else None
    if isinstance(kind, str) and kind and kind != "Bundle":
        yield item, None
        return
    yield from _resources_of(item, source, number, rejects)


def _resources_of(
    item: Any, source: str, line: int | None, rejects: list[InputReject], entry_of: str | None = None
) -> Iterator[tuple[dict[str, Any], str | None]]:
    """The resource itself, or a Bundle's entry resources (recursively), each with its entry position
    (``entry_of``: the position of ``item`` itself, for a nested Bundle)."""
    if not isinstance(item, dict):
        reason = f"not a FHIR resource (a JSON {_kind(item)})"
        rejects.append(InputReject(source, line, _entry_reason(entry_of, reason)))
        return
    resource_type = item.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        reason = "not a FHIR resource (no resourceType)"
        rejects.append(InputReject(source, line, _entry_reason(entry_of, reason)))
        return
    if resource_type != "Bundle":
        yield item, entry_of
        return
    entries = item.get("entry") or []
    if not isinstance(entries, list):
        rejects.append(InputReject(source, line, _entry_reason(entry_of, "Bundle.entry is not a list")))
        return
    for position, entry in enumerate(entries):
        label = str(position) if entry_of is None else f"{entry_of}.{position}"
        yield from _entry_resources(entry, label, source, line, rejects)


def _entry_resources(
    entry: Any, label: str, source: str, line: int | None, rejects: list[InputReject]
) -> Iterator[tuple[dict[str, Any], str | None]]:
    """The resource(s) of one Bundle entry (at position ``label``), or a reject."""
    if not isinstance(entry, Mapping):
        rejects.append(InputReject(source, line, f"Bundle entry {label} is not an object"))
        return
    resource = entry.get("resource")
    if resource is None:
        return  # a DELETE in a transaction, a response without a body: no data
    if isinstance(resource, dict) and resource.get("resourceType") == "OperationOutcome":
        return  # searchset outcome messages are not data
    if isinstance(resource, dict) and not resource.get("id"):
        resource = _with_id_from_full_url(resource, entry.get("fullUrl"))
    yield from _resources_of(resource, source, line, rejects, label)


# -- big Bundles, entry by entry ----------------------------------------------------------------------

_SPACE: Final = re.compile(r"[ \t\n\r]*")


def _skip(text: str, at: int) -> int:
    """The position of the first character at or after ``at`` that is not JSON whitespace."""
    found = _SPACE.match(text, at)
    return found.end() if found is not None else at


def _bundle_text(data: bytes) -> str | None:
    """The document as text for ``_entry_spans``, or None when it cannot be a streamed Bundle."""
    if b'"Bundle"' not in data[:4096] and b'"Bundle"' not in data[-4096:]:
        return None  # resourceType is first or last in every Bundle we have seen; else read it whole
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _entry_spans(text: str) -> list[tuple[int, int]] | None:
    """Where each element of ``entry`` lies in ``text``, when it is one JSON object with
    ``resourceType`` "Bundle" and an ``entry`` array; None otherwise (the caller then parses it whole,
    with the usual rejects). The stdlib scanner finds the boundaries only (one element's objects at a
    time); each element is then parsed by orjson, as every other input is."""
    decoder = json.JSONDecoder()
    kind: object = None
    spans: list[tuple[int, int]] | None = None
    try:
        at = _skip(text, 0)
        if text[at : at + 1] != "{":
            return None
        at = _skip(text, at + 1)
        while text[at : at + 1] != "}":
            key, at = decoder.raw_decode(text, at)
            at = _skip(text, at)
            if not isinstance(key, str) or text[at : at + 1] != ":":
                return None
            at = _skip(text, at + 1)
            if key == "entry" and text[at : at + 1] == "[":
                spans, at = _array_spans(decoder, text, at)
            else:
                value, at = decoder.raw_decode(text, at)
                if key == "resourceType":
                    kind = value
            at = _skip(text, at)
            if text[at : at + 1] == ",":
                at = _skip(text, at + 1)
            elif text[at : at + 1] != "}":
                return None
        if _skip(text, at + 1) != len(text):
            return None
    except (ValueError, RecursionError):
        return None
    return spans if kind == "Bundle" else None


def _array_spans(decoder: json.JSONDecoder, text: str, at: int) -> tuple[list[tuple[int, int]], int]:
    """The spans of the elements of the array opening at ``at``, and the position after it."""
    spans: list[tuple[int, int]] = []
    at = _skip(text, at + 1)
    if text[at : at + 1] == "]":
        return spans, at + 1
    while True:
        _, end = decoder.raw_decode(text, at)
        spans.append((at, end))
        at = _skip(text, end)
        if text[at : at + 1] == "]":
            return spans, at + 1
        if text[at : at + 1] != ",":
            raise ValueError("entry array: expected ',' or ']'")
        at = _skip(text, at + 1)


def _streamed_entries(
    text: str,
    spans: list[tuple[int, int]],
    source: str,
    line: int | None,
    rejects: list[InputReject],
    limits: InputLimits,
) -> Iterator[tuple[dict[str, Any], str | None]]:
    """The resources of a big Bundle's entries, each parsed on its own: an entry over
    ``limits.line_bytes`` or not valid JSON is a reject naming its position; the others are read."""
    cap = limits.line_bytes
    for position, (start, end) in enumerate(spans):
        label = str(position)
        piece = text[start:end]
        size = len(piece.encode("utf-8")) if len(piece) * 4 > cap else len(piece)
        if size > cap:
            rejects.append(
                InputReject(source, line, f"Bundle entry {label}: {size} bytes, over max_line_bytes ({cap})")
            )
            continue
        try:
            entry = orjson.loads(piece)
        except orjson.JSONDecodeError as exc:
            rejects.append(InputReject(source, line, f"Bundle entry {label}: not valid JSON: {exc}"))
            continue
        yield from _entry_resources(entry, label, source, line, rejects)


def _missing_outputs(manifest: dict[str, Any], path: Path) -> Iterator[InputReject]:
    """A reject for each file a bulk export's manifest lists that its folder does not hold (a download
    that failed or was not copied): its resources would otherwise be missing without a word."""
    folder = path.parent
    present = {p.name.lower().removesuffix(".gz") for p in folder.iterdir() if p.is_file()}
    outputs = manifest.get("output")
    for position, item in enumerate(outputs if isinstance(outputs, list) else []):
        if not isinstance(item, Mapping):
            continue
        kind, url = item.get("type"), item.get("url")
        given = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] if isinstance(url, str) else ""
        name = given.lower()
        prefix = f"{kind}.".lower() if isinstance(kind, str) else None
        if name.removesuffix(".gz") in present or (
            prefix is not None and any(n.startswith(prefix) and n.endswith(NDJSON_SUFFIXES) for n in present)
        ):
            continue
        shown = given[:100] or "(no url)"
        reason = f"bulk manifest output {position} ({str(kind)[:64]}): file {shown} missing from {folder}"
        yield InputReject(str(path), None, reason)


def _with_id_from_full_url(resource: dict[str, Any], full_url: Any) -> dict[str, Any]:
    """A Bundle entry without an id takes it from ``fullUrl`` (``urn:uuid:X`` or ``…/Type/X``), so the
    other entries' references to that fullUrl resolve."""
    if not isinstance(full_url, str) or not full_url.strip():
        return resource
    text = full_url.strip().rstrip("/")
    if text.startswith("urn:uuid:"):
        return {**resource, "id": text[len("urn:uuid:") :]}
    parts = text.split("/")
    if len(parts) >= 2 and parts[-2] == resource.get("resourceType"):
        return {**resource, "id": parts[-1]}
    return resource


def _kind(value: Any) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), "null" if value is None else type(value).__name__
    )
