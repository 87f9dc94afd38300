"""Errors raised by the EHR connectors.

    ConnectorError                 base; ``exit_code`` is what the CLI exits with
     ├── AuthError                 token endpoint refused us, a 401 after re-authorising (exit 3)
     └── EhrError                  the EHR answered with an error or could not be reached (exit 4)
          ├── TemporaryEhrError    408, 429, 500/502/503/504, transport errors: worth retrying
          ├── TlsError             the server's certificate failed verification: permanent
          └── BulkExportError      a $export job failed or its manifest is unusable

Each error carries ``retriable`` (False unless said otherwise; True for ``TemporaryEhrError``): any
other EHR answer (403, 406, 413, 415, 501, ...) is permanent.

Every message names the EHR, the method and path, and the server's OperationOutcome severities and
codes (its free text only with ``log_server_text``) or OAuth ``error``; none carries PHI.
"""

from __future__ import annotations

import httpx


class ConnectorError(Exception):
    """``retriable``: whether trying the same thing again later may succeed. Set where the error is
    raised (the class's default, or per instance) and read by the write-back consumer, which pauses
    only on retriable errors and dead-letters the others at once."""

    exit_code = 1
    retriable: bool = False


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
        retriable: bool | None = None,
    ) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable
        self.ehr = ehr
        self.status = status
        self.response = response


class TemporaryEhrError(EhrError):
    """A failure that may go away by itself: retry it."""

    retriable = True


class TlsError(EhrError):
    """TLS certificate verification failed: a configuration or interception problem, never retried."""


class BulkExportError(EhrError):
    """A Bulk Data export job failed."""
