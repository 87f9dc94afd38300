"""Errors raised by the EHR connectors.

    ConnectorError                 base; ``exit_code`` is what the CLI exits with
     ├── AuthError                 token endpoint refused us, or no usable credentials (exit 3)
     └── EhrError                  the EHR answered with an error or could not be reached (exit 4)
          ├── TemporaryEhrError    408, 429, 5xx, transport errors: worth retrying
          └── BulkExportError      a $export job failed or its manifest is unusable

Every message names the EHR, the method and path, and the server's own diagnostics
(OperationOutcome or OAuth ``error_description``); none carries PHI.
"""

from __future__ import annotations

import httpx


class ConnectorError(Exception):
    exit_code = 1


class AuthError(ConnectorError):
    exit_code = 3


class EhrError(ConnectorError):
    """The EHR answered with an error (or never answered).

    Keeps the response (when there is one) so callers can look at the status and headers.
    """

    exit_code = 4

    def __init__(
        self,
        message: str,
        *,
        ehr: str = "",
        status: int | None = None,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(message)
        self.ehr = ehr
        self.status = status
        self.response = response


class TemporaryEhrError(EhrError):
    """A failure that may go away by itself: retry it."""


class BulkExportError(EhrError):
    """A Bulk Data export job failed."""
