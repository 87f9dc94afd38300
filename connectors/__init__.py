"""EHR connectors: pull FHIR R4 resources from hospital EHRs (search, incremental, Bulk Data)."""

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
