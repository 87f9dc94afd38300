"""A SMART Backend Services authorisation server in front of a FHIR server, for integration tests.

HAPI's JPA server has no OAuth of its own, so the end-to-end tests put this in front of it: it serves
``/.well-known/smart-configuration`` and ``/token`` (client_credentials with a ``private_key_jwt``
assertion, checked against the registered public key exactly as an EHR would: signature, ``iss`` =
``sub`` = client id, ``aud`` = token URL, ``exp`` at most 5 minutes ahead, ``jti`` never reused), and
forwards every other request to the FHIR server only with a valid, unexpired access token. Links in
the FHIR server's answers (next links, bulk status URLs, file URLs) are rewritten to point at the proxy.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import httpx
import jwt
import orjson

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No request log on stderr."""


@dataclass
class SmartProxy:
    """Run with ``start()``; ``base_url`` is the FHIR base behind the authorisation check."""

    upstream: str
    client_id: str
    public_key_pem: bytes
    token_lifetime: int = 300
    host: str = "127.0.0.1"
    #: False: forward without asking for a token (a plain FHIR server, for fault injection only).
    require_auth: bool = True
    #: Answer this many of the next forwarded requests with 503 (an EHR outage), then forward again.
    fail_next: int = 0
    failed: int = 0
    tokens: dict[str, float] = field(default_factory=dict)
    seen_jti: set[str] = field(default_factory=set)
    token_requests: int = 0
    rejected: int = 0

    def __post_init__(self) -> None:
        self.upstream = self.upstream.rstrip("/")
        self._http = httpx.Client(timeout=120)
        self._server: WSGIServer = make_server(self.host, 0, self._app, handler_class=_Quiet)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._lock = threading.Lock()

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self._server.server_port}"

    @property
    def base_url(self) -> str:
        return f"{self.origin}/fhir"

    @property
    def token_url(self) -> str:
        return f"{self.origin}/token"

    def start(self) -> SmartProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._http.close()

    # -- WSGI -------------------------------------------------------------------------------------

    def _app(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/fhir/.well-known/smart-configuration":
            return self._json(
                start_response,
                200,
                {
                    "token_endpoint": self.token_url,
                    "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                    "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
                    "grant_types_supported": ["client_credentials"],
                    "capabilities": ["client-confidential-asymmetric"],
                },
            )
        if path == "/token" and environ["REQUEST_METHOD"] == "POST":
            return self._token(environ, start_response)
        if path.startswith("/fhir"):
            return self._forward(environ, start_response, path)
        return self._json(start_response, 404, {"error": "not_found"})

    def _json(self, start_response: Any, status: int, body: dict[str, Any]) -> list[bytes]:
        start_response(
            f"{status} {'OK' if status < 400 else 'Error'}", [("Content-Type", "application/json")]
        )
        return [orjson.dumps(body)]

    def _token(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        form = {k: v[0] for k, v in parse_qs(environ["wsgi.input"].read(length).decode()).items()}
        with self._lock:
            self.token_requests += 1
        if (
            form.get("grant_type") != "client_credentials"
            or form.get("client_assertion_type") != ASSERTION_TYPE
        ):
            return self._json(start_response, 400, {"error": "invalid_request"})
        try:
            claims = jwt.decode(
                form.get("client_assertion", ""),
                self.public_key_pem,
                algorithms=["RS384", "ES384"],
                audience=self.token_url,
                issuer=self.client_id,
                options={"require": ["exp", "jti", "iss", "sub", "aud"]},
            )
        except jwt.PyJWTError as exc:
            return self._json(start_response, 401, {"error": "invalid_client", "error_description": str(exc)})
        with self._lock:
            if claims["sub"] != self.client_id or claims["exp"] > time.time() + 300 + 5:
                return self._json(
                    start_response, 401, {"error": "invalid_client", "error_description": "claims"}
                )
            if claims["jti"] in self.seen_jti:
                return self._json(
                    start_response, 401, {"error": "invalid_client", "error_description": "jti reused"}
                )
            self.seen_jti.add(claims["jti"])
            access = secrets.token_urlsafe(24)
            self.tokens[access] = time.time() + self.token_lifetime
        return self._json(
            start_response,
            200,
            {
                "access_token": access,
                "token_type": "bearer",
                "expires_in": self.token_lifetime,
                "scope": form.get("scope", ""),
            },
        )

    def _authorised(self, environ: dict[str, Any]) -> bool:
        header = environ.get("HTTP_AUTHORIZATION", "")
        if not header.startswith("Bearer "):
            return False
        with self._lock:
            expires = self.tokens.get(header[len("Bearer ") :])
        return expires is not None and expires > time.time()

    def _forward(self, environ: dict[str, Any], start_response: Any, path: str) -> list[bytes]:
        with self._lock:
            outage = self.fail_next > 0
            if outage:
                self.fail_next -= 1
                self.failed += 1
        if outage:
            start_response("503 Service Unavailable", [("Content-Type", "text/plain"), ("Retry-After", "0")])
            return [b"down for maintenance"]
        if self.require_auth and not self._authorised(environ):
            with self._lock:
                self.rejected += 1
            start_response(
                "401 Unauthorized", [("Content-Type", "application/json"), ("WWW-Authenticate", "Bearer")]
            )
            return [b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"login"}]}']
        upstream_origin = self.upstream[: -len("/fhir")] if self.upstream.endswith("/fhir") else self.upstream
        url = upstream_origin + path
        if environ.get("QUERY_STRING"):
            url += "?" + environ["QUERY_STRING"]
        headers = {
            key[5:].replace("_", "-").title(): value
            for key, value in environ.items()
            if key.startswith("HTTP_")
            and key[5:].lower().replace("_", "-") not in _HOP_BY_HOP
            and key != "HTTP_AUTHORIZATION"
        }
        if environ.get("CONTENT_TYPE"):
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else None
        response = self._http.request(environ["REQUEST_METHOD"], url, headers=headers, content=body)
        content = response.content.replace(upstream_origin.encode(), self.origin.encode())
        out_headers = [
            (k, v.replace(upstream_origin, self.origin))
            for k, v in response.headers.items()
            if k.lower() not in _HOP_BY_HOP
        ]
        start_response(f"{response.status_code} {response.reason_phrase}", out_headers)
        return [content]
