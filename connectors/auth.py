"""Authentication to an EHR: SMART Backend Services, a static bearer token, or none.

SMART Backend Services (``client_credentials`` with a ``private_key_jwt`` assertion, RS384 or ES384):
the token endpoint comes from ``[base]/.well-known/smart-configuration`` unless configured; the access
token is cached and renewed a margin before ``expires_in`` runs out. Keys and tokens never reach a log
or a ``repr``.

Token requests go through the EHR's own pooled client. A refusal by the token endpoint raises
``AuthError`` with the OAuth ``error``/``error_description``; a temporary failure (429, 5xx) raises
``TemporaryEhrError`` and transport errors propagate, so the caller's retry policy covers them.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import jwt
import orjson
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from connectors.config import EhrConfig, is_loopback_url
from connectors.errors import AuthError, TemporaryEhrError

__all__ = ["Authenticator", "BearerAuth", "NoAuth", "SmartBackendAuth", "authenticator_for"]

log = structlog.get_logger()

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# The spec allows exp at most 5 minutes ahead; stay under it so a clock ahead of the server's still passes.
ASSERTION_LIFETIME = 240.0
# Renew this long before the token expires (at most a fifth of its lifetime, for very short tokens).
RENEW_MARGIN = 60.0
# Used when a token response omits expires_in (SMART recommends tokens of at most 300 s).
DEFAULT_EXPIRES_IN = 300.0
_TEMPORARY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# A token or discovery answer is a few kB; a larger one is refused, never buffered.
ANSWER_MAX = 1024 * 1024


class Authenticator(Protocol):
    """Supplies the headers that authorise a request to the EHR."""

    def auth_headers(self) -> dict[str, str]: ...

    def invalidate(self) -> None: ...


class NoAuth:
    """Open sandboxes: no credentials."""

    def auth_headers(self) -> dict[str, str]:
        return {}

    def invalidate(self) -> None:
        return None


class BearerAuth:
    """A static bearer token (sandboxes, tokens issued out of band)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __repr__(self) -> str:
        return "BearerAuth(token=**********)"

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    def invalidate(self) -> None:
        return None


class SmartBackendAuth:
    """SMART Backend Services: signed client assertion, cached access token."""

    def __init__(
        self,
        *,
        ehr_name: str,
        base_url: str,
        client_id: str,
        private_key_pem: bytes,
        http: httpx.Client,
        scopes: str,
        token_url: str | None = None,
        allow_insecure_http: bool = False,
        kid: str | None = None,
        alg: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ehr_name = ehr_name
        self.client_id = client_id
        self.token_url = token_url
        self.scopes = scopes
        self._base_url = base_url.rstrip("/")
        self._allow_insecure_http = allow_insecure_http
        self._http = http
        self._clock = clock
        self._key, self.alg = _load_key(private_key_pem, alg, ehr_name)
        self.kid = kid or _thumbprint(self._key)
        self._lock = threading.Lock()
        self._token: str | None = None
        self._renew_at = 0.0

    def __repr__(self) -> str:
        return (
            f"SmartBackendAuth(ehr={self.ehr_name!r}, client_id={self.client_id!r}, "
            f"token_url={self.token_url!r}, alg={self.alg!r}, kid={self.kid!r})"
        )

    def auth_headers(self) -> dict[str, str]:
        with self._lock:
            if self._token is None or self._clock() >= self._renew_at:
                self._authorize()
            assert self._token is not None
            return {"Authorization": f"Bearer {self._token}"}

    def invalidate(self) -> None:
        with self._lock:
            self._token = None

    def client_assertion(self) -> str:
        """A freshly signed assertion (``aud`` = the token URL, unique ``jti``, short ``exp``)."""
        token_url = self._token_endpoint()
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": token_url,
            "jti": uuid.uuid4().hex,
            "exp": int(self._clock() + ASSERTION_LIFETIME),
        }
        return jwt.encode(claims, self._key, algorithm=self.alg, headers={"kid": self.kid, "typ": "JWT"})

    def _authorize(self) -> None:
        token_url = self._token_endpoint()
        form = {
            "grant_type": "client_credentials",
            "scope": self.scopes,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": self.client_assertion(),
        }
        started = self._clock()
        request = self._http.build_request(
            "POST", token_url, data=form, headers={"Accept": "application/json"}
        )
        response = self._send_capped(request, "token endpoint")
        body = _json_object(response)
        if response.status_code in _TEMPORARY_STATUSES:
            raise TemporaryEhrError(
                f"{self.ehr_name}: token endpoint answered {response.status_code}",
                ehr=self.ehr_name,
                status=response.status_code,
                response=response,
            )
        token = body.get("access_token")
        if response.status_code != 200 or not isinstance(token, str) or not token:
            raise AuthError(f"{self.ehr_name}: token endpoint refused: {_oauth_reason(response, body)}")
        expires_in = _seconds(body.get("expires_in"))
        self._token = token
        self._renew_at = started + expires_in - min(RENEW_MARGIN, expires_in / 5)
        log.info("ehr_token_issued", ehr=self.ehr_name, expires_in=expires_in, scope=body.get("scope"))

    def _send_capped(self, request: httpx.Request, what: str) -> httpx.Response:
        """Send ``request`` and read at most ``ANSWER_MAX`` bytes of its answer (decompressed)."""
        response = self._http.send(request, stream=True)
        try:
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > ANSWER_MAX:
                    raise AuthError(f"{self.ehr_name}: {what} answer is over {ANSWER_MAX} bytes: refused")
            # No public httpx way to give a streamed response the body read: set what read() sets.
            response._content = bytes(body)
        finally:
            response.close()
        return response

    def _token_endpoint(self) -> str:
        if self.token_url is None:
            self.token_url = self._discover()
        return self.token_url

    def _discover(self) -> str:
        url = f"{self._base_url}/.well-known/smart-configuration"
        request = self._http.build_request("GET", url, headers={"Accept": "application/json"})
        response = self._send_capped(request, "SMART discovery")
        if response.status_code in _TEMPORARY_STATUSES:
            raise TemporaryEhrError(
                f"{self.ehr_name}: SMART discovery answered {response.status_code}",
                ehr=self.ehr_name,
                status=response.status_code,
                response=response,
            )
        endpoint = _json_object(response).get("token_endpoint")
        if response.status_code != 200 or not isinstance(endpoint, str) or not endpoint:
            raise AuthError(
                f"{self.ehr_name}: no token_endpoint in {url} (HTTP {response.status_code}); "
                "configure auth.token_url"
            )
        refusal = token_endpoint_refusal(endpoint, self._base_url, self._allow_insecure_http)
        if refusal is not None:
            raise AuthError(f"{self.ehr_name}: {url}: token_endpoint refused: {refusal}")
        log.info("ehr_token_endpoint_discovered", ehr=self.ehr_name, host=urlsplit(endpoint).hostname)
        return endpoint


def token_endpoint_refusal(endpoint: str, base_url: str, allow_insecure_http: bool) -> str | None:
    """Why a token endpoint named by ``.well-known/smart-configuration`` must not be used (None: usable).

    It must be an absolute http(s) URL. On the EHR's own origin the base URL's rule holds (https, or
    http:// on loopback or with ``allow_insecure_http``); on another origin (an authorization server
    of its own, as Epic and Oracle run) only https, or loopback. What goes there is the signed client
    assertion, never the access token, and the assertion's ``aud`` is that endpoint, so it cannot be
    replayed to the real one; the scheme rule keeps it off the wire in clear.
    """
    parts = urlsplit(endpoint)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return "not an absolute http(s) URL"
    if scheme == "https" or is_loopback_url(endpoint):
        return None
    base = urlsplit(base_url)
    same_origin = (base.scheme.lower(), base.netloc.lower()) == (scheme, parts.netloc.lower())
    if same_origin and allow_insecure_http:
        return None
    where = "the EHR's origin" if same_origin else "another origin"
    return f"{parts.hostname} ({where}) is not https"


_SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _load_key(pem: bytes, alg: str | None, ehr_name: str) -> tuple[_SigningKey, str]:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise AuthError(f"{ehr_name}: private key is not an unencrypted PEM private key") from exc
    if isinstance(key, rsa.RSAPrivateKey):
        natural = "RS384"
    elif isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1):
        natural = "ES384"
    else:
        raise AuthError(f"{ehr_name}: private key must be RSA (RS384) or EC P-384 (ES384)")
    if alg is not None and alg != natural:
        raise AuthError(f"{ehr_name}: auth.alg is {alg} but the private key is for {natural}")
    return key, natural


def _thumbprint(key: _SigningKey) -> str:
    """RFC 7638 JWK thumbprint of the public key: a stable ``kid`` when none is configured."""
    jwk: dict[str, Any]
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    required = ("e", "kty", "n") if jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = orjson.dumps({name: jwk[name] for name in required}, option=orjson.OPT_SORT_KEYS)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return {}
    return body if isinstance(body, dict) else {}


def _oauth_reason(response: httpx.Response, body: dict[str, Any]) -> str:
    error = body.get("error")
    description = body.get("error_description")
    if error or description:
        return f"{error or 'error'}: {description or '(no description)'} (HTTP {response.status_code})"
    return f"HTTP {response.status_code} without an OAuth error body"


def _seconds(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    if isinstance(value, str) and value.isdigit() and int(value) > 0:
        return float(value)
    return DEFAULT_EXPIRES_IN


def authenticator_for(
    ehr: EhrConfig, http: httpx.Client, *, clock: Callable[[], float] = time.time
) -> Authenticator:
    """The authenticator ``ehr.auth`` describes; token requests go through ``http``."""
    auth = ehr.auth
    if auth.kind == "bearer":
        assert auth.token is not None  # AuthConfig validates this
        return BearerAuth(auth.token.get_secret_value())
    if auth.kind == "smart":
        assert auth.client_id is not None
        try:
            pem = auth.private_key_pem()
        except OSError as exc:
            raise AuthError(f"{ehr.name}: cannot read private key file ({exc.strerror})") from exc
        return SmartBackendAuth(
            ehr_name=ehr.name,
            base_url=ehr.base_url,
            client_id=auth.client_id,
            private_key_pem=pem,
            http=http,
            scopes=auth.scopes,
            token_url=auth.token_url,
            allow_insecure_http=ehr.allow_insecure_http,
            kid=auth.kid,
            alg=auth.alg,
            clock=clock,
        )
    return NoAuth()
