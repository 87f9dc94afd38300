"""EHR connectors: pull FHIR R4 resources from hospital EHRs (search, incremental, Bulk Data).

The names below load their submodule on first use (PEP 562), so importing ``connectors.config`` (as the
settings do in every process, map workers included) does not also import the HTTP client, SQLAlchemy
and fhir.resources.
"""

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from connectors.auth import Authenticator, authenticator_for
    from connectors.bulk import BulkResult, bulk_export
    from connectors.config import AuthConfig, EhrConfig, PanelConfig
    from connectors.errors import AuthError, BulkExportError, ConnectorError, EhrError, TemporaryEhrError
    from connectors.http import EhrClient, RequestStats
    from connectors.pull import PullError, PullSummary
    from connectors.search import SearchPage, SearchQuery, search_pages
    from connectors.store import StateStore
    from connectors.validation import Checked, check_resource
    from connectors.vendors import VendorProfile, profile_for

#: Public name -> the submodule that defines it.
_HOMES = {
    "Authenticator": "auth",
    "authenticator_for": "auth",
    "BulkResult": "bulk",
    "bulk_export": "bulk",
    "AuthConfig": "config",
    "EhrConfig": "config",
    "PanelConfig": "config",
    "AuthError": "errors",
    "BulkExportError": "errors",
    "ConnectorError": "errors",
    "EhrError": "errors",
    "TemporaryEhrError": "errors",
    "EhrClient": "http",
    "RequestStats": "http",
    "PullError": "pull",
    "PullSummary": "pull",
    "SearchPage": "search",
    "SearchQuery": "search",
    "search_pages": "search",
    "StateStore": "store",
    "Checked": "validation",
    "check_resource": "validation",
    "VendorProfile": "vendors",
    "profile_for": "vendors",
}


def __getattr__(name: str) -> _typing.Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'connectors' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f"connectors.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


# ``pull`` itself stays in connectors.pull: re-exporting it here would hide the submodule of that name.
__all__ = [
    "AuthConfig",
    "AuthError",
    "Authenticator",
    "BulkExportError",
    "BulkResult",
    "Checked",
    "ConnectorError",
    "EhrClient",
    "EhrConfig",
    "EhrError",
    "PanelConfig",
    "PullError",
    "PullSummary",
    "RequestStats",
    "SearchPage",
    "SearchQuery",
    "StateStore",
    "TemporaryEhrError",
    "VendorProfile",
    "authenticator_for",
    "bulk_export",
    "check_resource",
    "profile_for",
    "search_pages",
]
