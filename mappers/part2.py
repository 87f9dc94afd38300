"""One 42 CFR Part 2 predicate for episodes and referrals: any SUD code or inbound Part 2 label.

A record is Part 2 when any resource that feeds it carries substance-use-disorder evidence, in any
position (principal or secondary diagnosis, service line, type, reason), or a security label the EHR set:

- ICD-10-CM F10-F16, F18, F19 (alcohol, opioid, cannabis, sedative, cocaine, other stimulant,
  hallucinogen, inhalant, other/polysubstance related disorders). F17 (nicotine) is excluded: the Part 2
  definition of "substance use disorder" leaves out tobacco (42 CFR 2.11).
- HCPCS SUD-specific services (``SUD_HCPCS``): the "alcohol and/or drug services" H-codes and the
  "alcohol and/or substance abuse services" T-codes of the HCPCS Level II file (CMS). The general
  behavioral-health codes (H0004, H0017-H0019, H0035, H2012…) are not SUD evidence alone.
- NUBC revenue codes 0906 (IOP, chemical dependency), 0944 (drug rehabilitation), 0945 (alcohol
  rehabilitation), 1002 (residential, chemical dependency).
- SNOMED CT substance-use-disorder concepts (``SUD_SNOMED``) and the SUD referral types.
- Labels in ``meta.security``: ActUSPrivacyLaw ``42CFRPart2``, or an ActCode SUD sensitivity
  (``ETH`` substance abuse information, ``SUD``, ``ETHUD`` alcohol, ``OPIOIDUD`` opioid use disorder).
  Confidentiality ``R``/``V`` alone does not: it also marks HIV, psychotherapy and other restrictions.

Pure: reads only the resources given (and referenced Conditions in ``shared``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from mappers.codes import codings, icd10_f_range, system_key
from mappers.index import resolve

#: F10-F16, F18, F19: substance use disorders (F17 nicotine is not Part 2, 42 CFR 2.11).
SUD_F_RANGES: Final = frozenset({10, 11, 12, 13, 14, 15, 16, 18, 19})
#: HCPCS Level II (CMS HCPCS release file) codes whose descriptor names alcohol/drug (substance) services.
SUD_HCPCS: Final = frozenset(
    {
        "H0001",  # alcohol and/or drug assessment
        "H0003",  # alcohol and/or drug screening; laboratory analysis
        "H0005",  # alcohol and/or drug services; group counseling by a clinician
        "H0006",  # alcohol and/or drug services; case management
        "H0007",  # alcohol and/or drug services; crisis intervention (outpatient)
        "H0008",  # alcohol and/or drug services; sub-acute detoxification (hospital inpatient)
        "H0009",  # alcohol and/or drug services; acute detoxification (hospital inpatient)
        "H0010",  # alcohol and/or drug services; sub-acute detoxification (residential)
        "H0011",  # alcohol and/or drug services; acute detoxification (residential)
        "H0012",  # alcohol and/or drug services; sub-acute detoxification (residential, outpatient)
        "H0013",  # alcohol and/or drug services; acute detoxification (residential, outpatient)
        "H0014",  # alcohol and/or drug services; ambulatory detoxification
        "H0015",  # alcohol and/or drug services; intensive outpatient
        "H0016",  # alcohol and/or drug services; medical/somatic
        "H0020",  # alcohol and/or drug services; methadone administration and/or service
        "H0022",  # alcohol and/or drug intervention service
        "H0047",  # alcohol and/or other drug abuse services, not otherwise specified
        "H0049",  # alcohol and/or drug screening
        "H0050",  # alcohol and/or drug services, brief intervention, per 15 minutes
        "T1006",  # alcohol and/or substance abuse services, family/couple counseling
        "T1007",  # alcohol and/or substance abuse services, treatment plan development
        "T1008",  # day treatment for individual alcohol and/or substance abuse services
        "T1009",  # child sitting services for children of the individual receiving SUD services
        "T1010",  # meals for individuals receiving alcohol and/or substance abuse services
        "T1011",  # alcohol and/or substance abuse services, not otherwise classified
        "T1012",  # alcohol and/or substance abuse services, skills development
        "G0396",  # alcohol and/or substance abuse structured assessment and intervention, 15-30 min
        "G0397",  # alcohol and/or substance abuse structured assessment and intervention, > 30 min
    }
)
#: CPT: alcohol and/or substance abuse structured screening and brief intervention (SBIRT).
SUD_CPT: Final = frozenset({"99408", "99409"})
#: NUBC revenue codes of chemical-dependency care.
SUD_REVENUE: Final = frozenset({"0906", "0944", "0945", "1002"})
#: SNOMED CT substance-use-disorder concepts (and the SUD referral types 4266003, 38670004).
SUD_SNOMED: Final = frozenset(
    {
        "66214007",  # substance abuse
        "26416006",  # drug abuse
        "191816009",  # drug dependence
        "7200002",  # alcoholism
        "15167005",  # alcohol abuse
        "66590003",  # alcohol dependence
        "5602001",  # opioid abuse
        "75544000",  # opioid dependence
        "37344009",  # cannabis abuse
        "85005007",  # cannabis dependence
        "78267003",  # cocaine abuse
        "28368009",  # cocaine dependence
        "4266003",  # patient referral for drug addiction rehabilitation
        "38670004",  # patient referral for alcoholism rehabilitation
    }
)
#: Inbound labels that make a record Part 2: (normalised system, code).
_PRIVACY_LAW: Final = (
    "terminology.hl7.org/codesystem/v3-actusprivacylaw",
    "urn:oid:2.16.840.1.113883.5.1138",
)
_SUD_SENSITIVITY: Final = frozenset({"ETH", "SUD", "ETHUD", "OPIOIDUD"})


def is_sud_code(key: str, code: str) -> bool:
    """Whether a ``(system key, normalised code)`` (``mappers.codes.codings``) is SUD evidence."""
    if key == "icd10cm":
        return icd10_f_range(code) in SUD_F_RANGES
    if key == "hcpcs":
        return code in SUD_HCPCS
    if key == "cpt":
        return code in SUD_CPT
    if key == "revenue":
        return code in SUD_REVENUE
    if key == "snomed":
        return code in SUD_SNOMED
    return False


def has_part2_label(resource: Mapping[str, Any]) -> bool:
    """A ``meta.security`` label saying 42 CFR Part 2 or SUD information sensitivity."""
    meta = resource.get("meta")
    labels = meta.get("security") if isinstance(meta, (dict, Mapping)) else None
    if not isinstance(labels, list):
        return False
    for label in labels:
        if not isinstance(label, (dict, Mapping)) or not isinstance(label.get("code"), str):
            continue
        code = label["code"].strip()
        key = system_key(label.get("system"))
        if code.upper() == "42CFRPART2" and key in ("", *_PRIVACY_LAW):
            return True
        if code.upper() in _SUD_SENSITIVITY and key in ("", "actcode"):
            return True
    return False


#: Elements never walked: labels (read apart), narrative, and status / category value sets that hold no
#: SUD codes (and that the lean projection, ``mappers.projection``, does not keep).
_NOT_CODED: Final = frozenset({"meta", "text", "category", "clinicalStatus", "verificationStatus"})


def _has_sud_code(value: Any) -> bool:
    """Any SUD coding anywhere in a resource (every CodeableConcept / Coding), ``meta`` and text aside."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, (dict, Mapping)):
            code = item.get("code")
            if isinstance(code, str) and code and any(is_sud_code(k, c) for k, c in codings(item)):
                return True
            stack.extend(v for k, v in item.items() if k not in _NOT_CODED and isinstance(v, (list, dict)))
    return False


def _referenced(
    resource: Mapping[str, Any], shared: Mapping[str, Mapping[str, Any]]
) -> Iterable[Mapping[str, Any]]:
    """Conditions a resource points at (diagnosis, reasonReference, addresses), from ``shared``/contained."""
    contained = (
        {f"#{c.get('id')}": c for c in resource.get("contained") or [] if isinstance(c, (dict, Mapping))}
        if isinstance(resource.get("contained"), list)
        else {}
    )
    targets: list[Any] = []
    for name in ("diagnosis",):
        for entry in resource.get(name) or [] if isinstance(resource.get(name), list) else []:
            if isinstance(entry, (dict, Mapping)):
                targets.append(entry.get("condition"))
    for name in ("reasonReference", "addresses"):
        value = resource.get(name)
        targets.extend(value if isinstance(value, list) else [value])
    for target in targets:
        key = resolve(target, shared)
        if key is None:
            continue
        found = contained.get(key) or shared.get(key)
        if found is not None:
            yield found


def is_part2(resources: Iterable[Mapping[str, Any]], shared: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether any of ``resources`` (or a Condition they reference) has SUD evidence or a Part 2 label."""
    for resource in resources:
        if not isinstance(resource, (dict, Mapping)):
            continue
        if has_part2_label(resource) or _has_sud_code(resource):
            return True
        for condition in _referenced(resource, shared):
            if has_part2_label(condition) or _has_sud_code(condition):
                return True
    return False
