"""``iop-bridge explain-encounter``: why one Encounter has its level of care, or none.

    iop-bridge explain-encounter INPUT... --encounter ID [--rules FILE] [--config FILE] [--json]
    iop-bridge explain-encounter --config FILE [--ehr NAME] --encounter ID ...   (the service's replica)

The inputs and rules are those of ``coverage`` (``sync.commands.coverage``), whose table names an example
Encounter id per signature: this command takes it. A separate command, not a ``map`` flag: ``map``
writes episodes, and an Encounter of no level is in none of them. Output: the level, the rule that fired
(id and source), the behavioral-health qualifier evidence (codes only), and every rule that matched
something of the Encounter with why it did not decide. Exit 0 when found; 2 when the id is not there.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from mappers.explain import explain_encounter_in
from sync.commands.coverage import (
    SHARED_TYPES,
    add_source_arguments,
    ehr_name,
    resource_batches,
    rules_and_settings,
)
from sync.config import Settings, open_store
from sync.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "explain-encounter",
        help="explain why one Encounter has its level of care (or none)",
        description="Which rule gave one Encounter its level, with the qualifier evidence; or why none did.",
    )
    add_source_arguments(parser)
    parser.add_argument("--encounter", required=True, help="the Encounter id (as coverage's example)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    parser.set_defaults(handler=run, by_location=False)


def run(args: argparse.Namespace) -> int:
    rules, settings = rules_and_settings(args)
    encounter_id = str(args.encounter).removeprefix("Encounter/")
    explanation = None
    for batch in _batches(args, settings, encounter_id):
        explanation = explain_encounter_in(batch, encounter_id, rules)
        if explanation is not None:
            break
    if explanation is None:
        raise ConfigError(f"Encounter/{encounter_id} is not in the input (or is entered-in-error)")
    if args.json:
        sys.stdout.write(orjson.dumps(explanation.to_dict()).decode() + "\n")
    else:
        sys.stdout.write("\n".join(explanation.lines()) + "\n")
    return 0


def _batches(args: argparse.Namespace, settings: Settings | None, encounter_id: str) -> Any:
    """From the store only the Encounter's patient is read; from files, every batch until it is found."""
    if args.inputs or (args.store is None and settings is None):
        return resource_batches(args, settings)
    url = args.store if args.store is not None else settings.store.url  # type: ignore[union-attr]
    ehr = ehr_name(args, settings)
    store = open_store(url)
    try:
        row = store.replica_row(ehr, "Encounter", encounter_id)
        if row is None or row.patient_id is None or row.deleted:
            return []
        return [[*store.resources_of_type(ehr, SHARED_TYPES), *store.patient_resources(ehr, row.patient_id)]]
    finally:
        store.close()
