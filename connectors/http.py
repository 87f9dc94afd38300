"""One pooled HTTP client per EHR: auth, vendor headers, retry policy, error classification.

Retry policy (tenacity): only the temporary class is retried (connect/read errors, timeouts, 408, 429,
500, 502, 503, 504); every other status is fatal at once. Backoff is exponential with jitter; a
``Retry-After`` (seconds or HTTP date) replaces it, capped by ``RETRY_AFTER_CAP``.

The budget is small on purpose: at most ``MAX_ATTEMPTS`` tries and ``SLEEP_BUDGET`` seconds of waiting
per request. A server still failing after that is down, not hiccuping; every pull resumes from its
cursor, so giving up and re-running later loses nothing, whereas long waits inside one request hold a
worker, outlive the (5-minute) access token and hide an outage from the operator.

POST and PATCH are resent only when the server surely did not act on them (no connection, 429, 503):
resending a create after a read timeout or a 502 could create it twice.

A 401 invalidates the access token and re-authorises once, without spending a retry.
"""

from __future__ import annotations

import email.utils
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import structlog
import tenacity

from connectors.auth import Authenticator, authenticator_for
from connectors.config import EhrConfig
from connectors.errors import AuthError, EhrError, TemporaryEhrError, TlsError
from connectors.vendors import VendorProfile, profile_for

__all__ = [
    "MAX_ATTEMPTS",
    "RETRY_AFTER_CAP",
    "SLEEP_BUDGET",
    "TEMPORARY_STATUSES",
    "EhrClient",
    "RequestStats",
    "outcome_codes",
    "outcome_diagnostics",
    "parse_retry_after",
]

log = structlog.get_logger()

MAX_ATTEMPTS = 5  # one try and four retries
SLEEP_BUDGET = 180.0  # seconds of waiting per request, all retries together
RETRY_AFTER_CAP = 60.0  # a server asking for longer (Oracle has asked for hours) gets this much
TEMPORARY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_TEMPORARY_TRANSPORT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
# Idempotent methods (RFC 9110) are resent after any temporary failure. POST and PATCH are resent only
# when the server surely did not act: the connection never opened, or it answered 429/503.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_NOT_ACTED_ON = frozenset({429, 503})
_FHIR_JSON = "application/fhir+json"
_NOT_RESENT_NOTE = " (not resent: the server may have acted on it)"
Params = Mapping[str, str] | Sequence[tuple[str, str]] | None


@dataclass
class RequestStats:
    """What one EHR client did: HTTP requests sent, retries after temporary failures, search pages."""

    requests: int = 0
    retries: int = 0
    pages: int = 0


class _NotResent(TemporaryEhrError):
    """A temporary failure of a non-idempotent request the server may have acted on: never resent."""


class _Retryable(TemporaryEhrError):
    """A temporary failure inside the retry loop, with the server's Retry-After (seconds) if any."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date); None if unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # HTTP dates are GMT by definition
        return None
    return max(0.0, when.timestamp() - now)


def outcome_diagnostics(body: object, *, free_text: bool = False) -> str:
    """What an OperationOutcome says: severity, code and detail codes of each issue.

    Servers echo patient data in ``diagnostics`` and ``details.text`` (names, birth dates, clinical
    notes), so that free text is added only with ``free_text`` (the EHR's ``log_server_text``).
    """
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return ""
    parts = []
    for issue in body.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        details = issue.get("details")
        words = [issue.get("severity"), issue.get("code"), *outcome_codes(details)]
        if free_text:
            words.append(
                issue.get("diagnostics") or (details if isinstance(details, dict) else {}).get("text")
            )
        parts.append(" ".join(str(w) for w in words if w))
    return "; ".join(parts)


def outcome_codes(concept: object) -> list[str]:
    """The codes of a CodeableConcept (an OperationOutcome issue's ``details``)."""
    if not isinstance(concept, dict):
        return []
    return [str(c.get("code")) for c in concept.get("coding") or [] if isinstance(c, dict) and c.get("code")]


def _response_reason(response: httpx.Response, free_text: bool) -> str:
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    text = outcome_diagnostics(body, free_text=free_text)
    if text:
        return text[:500]
    snippet = " ".join(response.text[:200].split()) if free_text and not response.is_stream_consumed else ""
    return snippet or response.reason_phrase


class EhrClient:
    """The HTTP side of one EHR connection (a context manager; thread-safe)."""

    def __init__(
        self,
        ehr: EhrConfig,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ehr = ehr
        self.profile: VendorProfile = profile_for(ehr)
        self.stats = RequestStats()
        self.sleep = sleep
        self.clock = clock
        self._stats_lock = threading.Lock()
        self._origin = _origin(ehr.base_url)
        self._http = httpx.Client(
            transport=transport,
            limits=httpx.Limits(
                max_connections=ehr.concurrency + 2, max_keepalive_connections=ehr.concurrency
            ),
            timeout=httpx.Timeout(ehr.timeout_seconds, connect=min(15.0, ehr.timeout_seconds)),
            headers={"User-Agent": "iop-bridge", **self.profile.headers(ehr)},
        )
        self.auth: Authenticator = authenticator_for(ehr, self._http, clock=clock)

    def __enter__(self) -> EhrClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EhrClient(ehr={self.ehr.name!r}, vendor={self.profile.name!r})"

    def close(self) -> None:
        self._http.close()

    def count(self, field: str, n: int = 1) -> None:
        """Add ``n`` to one of the ``stats`` counters (thread-safe)."""
        with self._stats_lock:
            setattr(self.stats, field, getattr(self.stats, field) + n)

    def url(self, url: str) -> str:
        """``url`` itself when absolute (e.g. a next link), else resolved under the base URL."""
        if url.startswith(("http://", "https://")):
            return url
        return f"{self.ehr.base_url}/{url.lstrip('/')}"

    def token_refusal(self, url: str) -> str | None:
        """Why the access token must not go to ``url`` (None when it may).

        The token goes only to the EHR's own origin, or over https to a host of ``bulk_file_hosts``:
        never to whatever host a server's answer names.
        """
        target = self.url(url)
        if _origin(target) == self._origin:
            return None
        parts = urlsplit(target)
        host = (parts.hostname or "").lower()
        if parts.scheme.lower() != "https":
            return f"{host} is not https"
        allowed = self.ehr.bulk_file_hosts
        if host in allowed or parts.netloc.lower() in allowed:
            return None
        return f"{host} is neither the EHR's origin nor in bulk_file_hosts"

    def retrying(self) -> tenacity.Retrying:
        """The retry policy, for callers that retry a larger unit of work (e.g. a whole file download)."""
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception(_is_temporary),
            wait=_wait,
            stop=tenacity.stop_after_attempt(MAX_ATTEMPTS) | _StopWhenBudgetSpent(),
            sleep=self.sleep,
            before_sleep=self._before_sleep,
            reraise=True,
        )

    def request(
        self,
        method: str,
        url: str,
        *,
        params: Params = None,
        headers: Mapping[str, str] | None = None,
        json: object = None,
        content: bytes | None = None,
        authorize: bool | None = None,
        temporary: Callable[[httpx.Response], bool] | None = None,
        idempotent: bool | None = None,
    ) -> httpx.Response:
        """Send one request with retries; returns a 2xx response, raises ``EhrError`` otherwise.

        ``authorize`` None sends credentials only to the EHR's own origin (never to a foreign next link
        or file server); True/False force it. ``temporary`` overrides which error responses are retried.
        ``idempotent`` None goes by the method; True lets a POST be resent like a PUT (e.g. a
        transaction of PUTs or conditional creates).
        """
        resendable = method.upper() in _IDEMPOTENT if idempotent is None else idempotent
        target = self.url(url)
        try:
            for attempt in self.retrying():
                with attempt:
                    return self._send(
                        method, target, params, headers, json, content, authorize, temporary, resendable
                    )
        except _Retryable as exc:
            raise TemporaryEhrError(
                f"{exc} (gave up after {MAX_ATTEMPTS} attempts or {SLEEP_BUDGET:.0f}s of waiting)",
                ehr=self.ehr.name,
                status=exc.status,
                response=exc.response,
            ) from exc
        except httpx.TransportError as exc:
            raise self._transport_error(method, target, exc) from exc
        raise AssertionError("unreachable: tenacity either returns or raises")

    def get_json(self, url: str, params: Params = None) -> dict[str, Any]:
        """GET a FHIR JSON object."""
        response = self.request("GET", url, params=params, headers={"Accept": _FHIR_JSON})
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise EhrError(
                f"{self.ehr.name}: GET {_path(self.url(url))}: the response is not JSON",
                ehr=self.ehr.name,
                status=response.status_code,
                response=response,
            ) from exc
        if not isinstance(body, dict):
            raise EhrError(
                f"{self.ehr.name}: GET {_path(self.url(url))}: the response is not a JSON object",
                ehr=self.ehr.name,
                status=response.status_code,
                response=response,
            )
        return body

    @contextmanager
    def stream(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        authorize: bool | None = None,
    ) -> Iterator[httpx.Response]:
        """Open a streamed 2xx response (one attempt; 401 re-authorises once).

        No retries here: a download can also fail half-way, so the caller retries the whole unit with
        ``retrying()``. Failures raise ``TemporaryEhrError`` (retryable) or ``EhrError``.
        """
        target = self.url(url)
        for reauthorised in (False, True):
            self.count("requests")
            try:
                request = self._http.build_request(
                    method, target, headers=self._headers(target, headers, authorize)
                )
                response = self._http.send(request, stream=True)
            except httpx.TransportError as exc:
                if _is_tls_failure(exc):
                    raise self._tls_error(method, target) from exc
                if isinstance(exc, _TEMPORARY_TRANSPORT):
                    raise _Retryable(
                        f"{self.ehr.name}: {method} {_path(target)}: {type(exc).__name__}", ehr=self.ehr.name
                    ) from exc
                raise self._transport_error(method, target, exc) from exc
            try:
                if (
                    response.status_code == 401
                    and not reauthorised
                    and self._can_reauthorise(target, authorize)
                ):
                    self.auth.invalidate()
                    continue
                if not response.is_success:
                    self._read_capped(method, target, response)  # an error body: cut at the cap
                    self._raise_for_status(method, target, response)
                yield response
                return
            finally:
                response.close()

    # -- internals -------------------------------------------------------------------------------

    def _send(
        self,
        method: str,
        target: str,
        params: Params,
        headers: Mapping[str, str] | None,
        json: object,
        content: bytes | None,
        authorize: bool | None,
        temporary: Callable[[httpx.Response], bool] | None,
        resendable: bool,
    ) -> httpx.Response:
        for reauthorised in (False, True):
            self.count("requests")
            try:
                request = self._http.build_request(
                    method,
                    target,
                    params=_query(params),
                    headers=self._headers(target, headers, authorize),
                    json=json,
                    content=content,
                )
                response = self._http.send(request, stream=True)
                self._read_capped(method, target, response)
            except _TEMPORARY_TRANSPORT as exc:
                if _is_tls_failure(exc):
                    raise self._tls_error(method, target) from exc
                message = f"{self.ehr.name}: {method} {_path(target)}: {type(exc).__name__}"
                if not resendable and not isinstance(exc, _NOT_SENT):
                    raise _NotResent(message + _NOT_RESENT_NOTE, ehr=self.ehr.name) from exc
                raise _Retryable(message, ehr=self.ehr.name) from exc
            if response.status_code == 401 and not reauthorised and self._can_reauthorise(target, authorize):
                log.info("ehr_reauthorising", ehr=self.ehr.name, method=method, path=_path(target))
                self.auth.invalidate()
                continue
            if response.is_success:
                return response
            self._raise_for_status(method, target, response, temporary, resendable)
        raise AssertionError("unreachable")

    def _read_capped(self, method: str, target: str, response: httpx.Response) -> None:
        """Read a streamed body, at most ``max_page_bytes`` of it (decompressed): a larger 2xx body is
        refused as soon as it passes the cap (``Content-Length`` first), never buffered whole; a larger
        error body is cut at the cap (only its status and OperationOutcome codes matter)."""
        cap = self.ehr.max_page_bytes
        try:
            if response.is_success:
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > cap and "Content-Encoding" not in response.headers:
                    raise self._too_big(method, target, response, f"Content-Length {declared}")
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > cap:
                    if response.is_success:
                        raise self._too_big(method, target, response, f"more than {cap} bytes read")
                    del body[cap:]
                    break
            # httpx has no public way to hand a response the body read from its stream: set what
            # ``Response.read()`` would have set, so ``content``/``text``/``json()`` work as usual.
            response._content = bytes(body)
        finally:
            response.close()

    def _too_big(self, method: str, target: str, response: httpx.Response, seen: str) -> EhrError:
        return EhrError(
            f"{self.ehr.name}: {method} {_path(target)}: the response is over max_page_bytes "
            f"({self.ehr.max_page_bytes} bytes; {seen}): refused (raise max_page_bytes, or lower "
            "page_size for searches)",
            ehr=self.ehr.name,
            status=response.status_code,
            retriable=False,
        )

    def _headers(
        self, target: str, extra: Mapping[str, str] | None, authorize: bool | None
    ) -> dict[str, str]:
        headers = {"Accept": _FHIR_JSON}
        if authorize or (authorize is None and _origin(target) == self._origin):
            headers.update(self.auth.auth_headers())
        if extra:
            headers.update(extra)
        return headers

    def _can_reauthorise(self, target: str, authorize: bool | None) -> bool:
        sends_credentials = authorize or (authorize is None and _origin(target) == self._origin)
        return bool(sends_credentials) and self.ehr.auth.kind == "smart"

    def _raise_for_status(
        self,
        method: str,
        target: str,
        response: httpx.Response,
        temporary: Callable[[httpx.Response], bool] | None = None,
        resendable: bool = True,
    ) -> None:
        status = response.status_code
        reason = _response_reason(response, self.ehr.log_server_text)
        message = f"{self.ehr.name}: {method} {_path(target)} -> HTTP {status}: {reason}"
        if temporary(response) if temporary is not None else status in TEMPORARY_STATUSES:
            if not resendable and status not in _NOT_ACTED_ON:
                raise _NotResent(
                    message + _NOT_RESENT_NOTE, ehr=self.ehr.name, status=status, response=response
                )
            retry_after = parse_retry_after(response.headers.get("Retry-After"), self.clock())
            raise _Retryable(
                message, retry_after=retry_after, ehr=self.ehr.name, status=status, response=response
            )
        if status == 401:
            raise AuthError(message + " (after re-authorising)" if self.ehr.auth.kind == "smart" else message)
        raise EhrError(message, ehr=self.ehr.name, status=status, response=response)

    def _tls_error(self, method: str, target: str) -> TlsError:
        return TlsError(
            f"{self.ehr.name}: {method} {_path(target)}: TLS certificate verification failed for "
            f"{urlsplit(target).hostname}; not retried (check the server's certificate chain, or the "
            "CA bundle: SSL_CERT_FILE)",
            ehr=self.ehr.name,
        )

    def _transport_error(self, method: str, target: str, exc: httpx.TransportError) -> EhrError:
        kind = TemporaryEhrError if isinstance(exc, _TEMPORARY_TRANSPORT) else EhrError
        return kind(
            f"{self.ehr.name}: {method} {_path(target)}: {type(exc).__name__}: {exc}", ehr=self.ehr.name
        )

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        self.count("retries")
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "ehr_request_retry",
            ehr=self.ehr.name,
            attempt=state.attempt_number,
            status=getattr(exc, "status", None),
            error=type(exc).__name__,
            sleep=round(state.upcoming_sleep, 3),
        )


def _is_tls_failure(exc: BaseException) -> bool:
    """Whether a transport error is a failed certificate verification (httpx wraps ssl's error)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _is_temporary(exc: BaseException) -> bool:
    return isinstance(exc, (TemporaryEhrError, *_TEMPORARY_TRANSPORT)) and not isinstance(exc, _NotResent)


_backoff = tenacity.wait_exponential_jitter(initial=1.0, max=30.0, jitter=1.0)


def _wait(state: tenacity.RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome else None
    retry_after = getattr(exc, "retry_after", None)
    if isinstance(retry_after, float):
        return min(retry_after, RETRY_AFTER_CAP)
    return float(_backoff(state))


class _StopWhenBudgetSpent(tenacity.stop.stop_base):
    """Stop before a sleep that would take the request past ``SLEEP_BUDGET`` seconds of waiting."""

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return retry_state.idle_for + (retry_state.upcoming_sleep or 0.0) > SLEEP_BUDGET


def _query(params: Params) -> tuple[tuple[str, str], ...] | None:
    if params is None:
        return None
    items = params.items() if isinstance(params, Mapping) else params
    return tuple((str(k), str(v)) for k, v in items)


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def _path(url: str) -> str:
    """The URL's path only: queries may hold identifiers, and messages must not carry PHI."""
    return urlsplit(url).path or "/"
