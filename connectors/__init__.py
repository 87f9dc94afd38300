"""EHR connectors: pull FHIR R4 resources from hospital EHRs (search, incremental, Bulk Data)."""

from connectors.config import AuthConfig, EhrConfig, PanelConfig
from connectors.errors import AuthError, BulkExportError, ConnectorError, EhrError, TemporaryEhrError

__all__ = [
    "AuthConfig",
    "AuthError",
    "BulkExportError",
    "ConnectorError",
    "EhrConfig",
    "EhrError",
    "PanelConfig",
    "TemporaryEhrError",
]
