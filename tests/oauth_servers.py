"""A real OAuth 2.1 authorization server and an MCP server it protects, on loopback.

`AuthServer` is built on the MCP SDK's server-side OAuth support (`mcp.server.auth`): its
authorization, token, registration and revocation handlers do the protocol work against an
in-memory `OAuthAuthorizationServerProvider` defined here. Added on top, as a real server
would have them: a consent page (Approve / Deny), the client-credentials grant (the SDK's
token handler has none), Client ID Metadata Documents (fetched through a callable the test
gives), rotating refresh tokens with reuse detection, and knobs for misbehaviour (a wrong
`iss`, a token endpoint elsewhere, no PKCE).

`ProtectedMcp` puts `demo_server()` behind bearer tokens of that server: protected resource
metadata (RFC 9728, the SDK's model), a 401 challenge naming it and the scope, tokens checked
for their resource (RFC 8707) and expiry, and a per-tool scope (`delete_file` needs
`files:write`) answered with 403 `insufficient_scope` for step-up.

    auth = AuthServer()
    auth_running = mcp_factory(auth)          # then: auth.issuer == auth_running.base_url
    mcp = mcp_factory(ProtectedMcp(auth))
"""

from __future__ import annotations

import base64
import html
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx2
from mcp.server.auth.handlers.authorize import AuthorizationHandler
from mcp.server.auth.handlers.register import RegistrationHandler
from mcp.server.auth.handlers.revoke import RevocationHandler
from mcp.server.auth.handlers.token import TokenHandler
from mcp.server.auth.middleware.client_auth import AuthenticationError, ClientAuthenticator
from mcp.server.auth.provider import (
    AccessToken,
    AuthorizationCode,
    AuthorizationParams,
    RefreshToken,
    construct_redirect_uri,
)
from mcp.server.auth.settings import ClientRegistrationOptions
from mcp.shared.auth import (
    OAuthClientInformationFull,
    OAuthMetadata,
    OAuthToken,
    ProtectedResourceMetadata,
)
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.mcp_servers import Transport, _asgi_app_for, demo_server

SCOPES = ("files:read", "files:write")
READ, WRITE = SCOPES


@dataclass
class TokenRequest:
    grant_type: str
    form: dict[str, str]
    authorization: str  # the Authorization header (client_secret_basic), "" if none


@dataclass
class _Grant:
    """What one consent (or one client-credentials request) granted; tokens share it."""

    client_id: str
    scopes: list[str]
    resource: str | None
    revoked: bool = False


class _Provider:
    """In-memory storage behind the SDK's handlers (its `OAuthAuthorizationServerProvider`)."""

    def __init__(self, server: AuthServer) -> None:
        self.server = server
        self.clients: dict[str, OAuthClientInformationFull] = {}
        self.pending: dict[str, tuple[OAuthClientInformationFull, AuthorizationParams]] = {}
        self.codes: dict[str, AuthorizationCode] = {}
        self.access: dict[str, tuple[AccessToken, _Grant]] = {}
        self.refresh: dict[str, tuple[RefreshToken, _Grant]] = {}
        self.spent_refresh: dict[str, _Grant] = {}
        self.lock = threading.Lock()

    async def get_client(self, client_id: str) -> OAuthClientInformationFull | None:
        if client_id in self.clients:
            return self.clients[client_id]
        if self.server.metadata_documents and client_id.startswith("https://"):
            return self._client_from_document(client_id)
        return None

    def _client_from_document(self, url: str) -> OAuthClientInformationFull | None:
        document = self.server.fetch_document(url)
        self.server.documents_fetched.append(url)
        if document is None or document.get("client_id") != url:
            return None
        return OAuthClientInformationFull(
            client_id=url,
            redirect_uris=document["redirect_uris"],
            token_endpoint_auth_method="none",
            grant_types=document.get("grant_types", ["authorization_code"]),
            scope=" ".join(self.server.scopes),
            client_name=document.get("client_name"),
        )

    async def register_client(self, client_info: OAuthClientInformationFull) -> None:
        self.server.registrations.append(client_info)
        self.clients[client_info.client_id] = client_info

    async def authorize(
        self, client: OAuthClientInformationFull, params: AuthorizationParams
    ) -> str:
        request_id = secrets.token_urlsafe(16)
        self.pending[request_id] = (client, params)
        self.server.authorize_requests.append(params)
        return f"{self.server.issuer}/consent?request={request_id}"

    def consent(self, request_id: str, approve: bool) -> str:
        client, params = self.pending.pop(request_id)
        state = params.state
        iss = {"right": self.server.issuer, "wrong": "https://evil.example"}.get(self.server.iss)
        if not approve:
            return construct_redirect_uri(
                str(params.redirect_uri), error="access_denied", state=state, iss=iss
            )
        code = "code-" + secrets.token_urlsafe(24)
        self.codes[code] = AuthorizationCode(
            code=code,
            scopes=params.scopes or [],
            expires_at=time.time() + 300,
            client_id=client.client_id,
            code_challenge=params.code_challenge,
            redirect_uri=params.redirect_uri,
            redirect_uri_provided_explicitly=params.redirect_uri_provided_explicitly,
            resource=params.resource,
        )
        return construct_redirect_uri(str(params.redirect_uri), code=code, state=state, iss=iss)

    async def load_authorization_code(self, client, authorization_code):
        return self.codes.get(authorization_code)

    async def exchange_authorization_code(self, client, authorization_code):
        del self.codes[authorization_code.code]
        grant = _Grant(client.client_id, authorization_code.scopes, authorization_code.resource)
        return self.issue(grant, refresh=True)

    async def load_refresh_token(self, client, refresh_token):
        with self.lock:
            if refresh_token in self.spent_refresh:
                # A rotated-out refresh token used again: someone else has a copy. OAuth 2.1
                # §4.3.1: revoke the whole grant.
                self.spent_refresh[refresh_token].revoked = True
                self.server.reuse_detected += 1
                return None
            found = self.refresh.get(refresh_token)
            if found is None or found[1].revoked:
                return None
            return found[0]

    async def exchange_refresh_token(self, client, refresh_token, scopes):
        with self.lock:
            _, grant = self.refresh[refresh_token.token]
            if self.server.rotate_refresh:
                del self.refresh[refresh_token.token]
                self.spent_refresh[refresh_token.token] = grant
            return self.issue(grant, refresh=self.server.rotate_refresh, keep=refresh_token.token)

    async def load_access_token(self, token: str) -> AccessToken | None:
        found = self.access.get(token)
        if found is None or found[1].revoked:
            return None
        return found[0]

    async def revoke_token(self, token) -> None:
        for table in (self.access, self.refresh):
            if token.token in table:
                table[token.token][1].revoked = True

    def issue(self, grant: _Grant, refresh: bool, keep: str | None = None) -> OAuthToken:
        lifetime = self.server.access_lifetime
        access = "at-" + secrets.token_urlsafe(24)
        self.access[access] = (
            AccessToken(
                token=access,
                client_id=grant.client_id,
                scopes=grant.scopes,
                expires_at=int(time.time() + lifetime),
                resource=grant.resource,
            ),
            grant,
        )
        new_refresh = None
        if refresh and self.server.issue_refresh:
            new_refresh = "rt-" + secrets.token_urlsafe(24)
            self.refresh[new_refresh] = (
                RefreshToken(
                    token=new_refresh,
                    client_id=grant.client_id,
                    scopes=grant.scopes,
                    resource=grant.resource,
                ),
                grant,
            )
        self.server.issued_access_tokens.append(access)
        if new_refresh:
            self.server.issued_refresh_tokens.append(new_refresh)
        return OAuthToken(
            access_token=access,
            expires_in=lifetime,
            scope=" ".join(grant.scopes),
            refresh_token=new_refresh,
        )


@dataclass
class AuthServer:
    """The authorization server. Start it (`mcp_factory(auth)` or `start(auth)`), then set
    nothing: `issuer` is filled in by `attach` (see `start_auth_server`)."""

    scopes: tuple[str, ...] = SCOPES
    registration: bool = True
    metadata_documents: bool = False
    access_lifetime: int = 3600
    rotate_refresh: bool = True
    issue_refresh: bool = True
    # The authorization response's `iss`: "right", "wrong", "missing" (and not advertised),
    # or "promised_but_missing" (advertised in the metadata, then left out).
    iss: str = "right"
    pkce: bool = True
    token_endpoint: str | None = None  # advertise another token endpoint than our own
    fetch_document: Any = None  # url -> the JSON document at it, or None
    issuer: str = ""
    token_delay: float = 0.0  # seconds each token request takes (to make workers overlap)
    tamper_tokens: Any = None  # dict -> dict, applied to successful token responses
    openid_only: bool = False  # metadata only at /.well-known/openid-configuration

    authorize_requests: list[AuthorizationParams] = field(default_factory=list)
    token_requests: list[TokenRequest] = field(default_factory=list)
    revocation_requests: list[dict[str, str]] = field(default_factory=list)
    registrations: list[OAuthClientInformationFull] = field(default_factory=list)
    documents_fetched: list[str] = field(default_factory=list)
    issued_access_tokens: list[str] = field(default_factory=list)
    issued_refresh_tokens: list[str] = field(default_factory=list)
    reuse_detected: int = 0

    def __post_init__(self) -> None:
        self.provider = _Provider(self)

    # -- test helpers --------------------------------------------------------------------

    def preregister(
        self,
        client_id: str,
        secret: str | None,
        grant_types: list[str] | None = None,
        method: str = "client_secret_basic",
        redirect_uri: str | None = None,
    ) -> None:
        self.provider.clients[client_id] = OAuthClientInformationFull(
            client_id=client_id,
            client_secret=secret,
            token_endpoint_auth_method=method if secret else "none",
            grant_types=grant_types or ["authorization_code", "refresh_token"],
            redirect_uris=[redirect_uri] if redirect_uri else None,
            scope=" ".join(self.scopes),
        )

    def revoke_everything(self) -> None:
        """The user revoked Toolgate's access at the provider: every token stops working."""
        for _, grant in [*self.provider.access.values(), *self.provider.refresh.values()]:
            grant.revoked = True

    def forget_access_tokens(self) -> None:
        """Access tokens stop working before they expire (a key rotation); refresh still works."""
        self.provider.access.clear()

    def grants(self, grant_type: str) -> list[TokenRequest]:
        return [r for r in self.token_requests if r.grant_type == grant_type]

    def all_secrets(self) -> list[str]:
        """Every token and client secret this server ever handed out."""
        secrets_ = [*self.issued_access_tokens, *self.issued_refresh_tokens]
        secrets_ += [c.client_secret for c in self.provider.clients.values() if c.client_secret]
        return secrets_

    # -- the app ------------------------------------------------------------------------

    def build_asgi_app(self, transport: Transport) -> ASGIApp:
        provider = self.provider
        authenticator = ClientAuthenticator(provider)
        token = TokenHandler(provider, authenticator)
        options = ClientRegistrationOptions(
            enabled=True, valid_scopes=list(self.scopes), default_scopes=list(self.scopes)
        )
        metadata_path = "/.well-known/oauth-authorization-server"
        if self.openid_only:
            metadata_path = "/.well-known/openid-configuration"
        routes = [
            Route(metadata_path, self._metadata),
            Route("/authorize", AuthorizationHandler(provider).handle, methods=["GET", "POST"]),
            Route("/consent", self._consent, methods=["GET", "POST"]),
            Route("/token", self._token(token, authenticator), methods=["POST"]),
            Route(
                "/revoke",
                self._revoke(RevocationHandler(provider, authenticator)),
                methods=["POST"],
            ),
        ]
        if self.registration:
            handler = RegistrationHandler(provider, options=options)
            routes.append(Route("/register", handler.handle, methods=["POST"]))
        return Starlette(routes=routes)

    async def _metadata(self, request: Request) -> Response:
        metadata = OAuthMetadata(
            issuer=self.issuer,
            authorization_endpoint=f"{self.issuer}/authorize",
            token_endpoint=self.token_endpoint or f"{self.issuer}/token",
            registration_endpoint=f"{self.issuer}/register" if self.registration else None,
            revocation_endpoint=f"{self.issuer}/revoke",
            scopes_supported=list(self.scopes),
            grant_types_supported=["authorization_code", "refresh_token", "client_credentials"],
            token_endpoint_auth_methods_supported=["client_secret_basic", "client_secret_post"],
            code_challenge_methods_supported=["S256"] if self.pkce else None,
            client_id_metadata_document_supported=self.metadata_documents or None,
            authorization_response_iss_parameter_supported=self.iss != "missing" or None,
        )
        return JSONResponse(metadata.model_dump(mode="json", exclude_none=True))

    async def _consent(self, request: Request) -> Response:
        if request.method == "GET":
            request_id = request.query_params.get("request", "")
            if request_id not in self.provider.pending:
                return HTMLResponse("<p>Unknown request</p>", status_code=400)
            _, params = self.provider.pending[request_id]
            scopes = " ".join(params.scopes or [])
            return HTMLResponse(
                "<!doctype html><title>Consent</title><h1>Allow Toolgate?</h1>"
                f"<p>Toolgate asks for: <span id=scopes>{scopes}</span></p>"
                f'<form method=post><input type=hidden name=request value="{request_id}">'
                "<button name=answer value=approve>Approve</button>"
                "<button name=answer value=deny>Deny</button></form>"
            )
        form = await request.form()
        location = self.provider.consent(str(form["request"]), form.get("answer") == "approve")
        return RedirectResponse(location, status_code=302)

    def _revoke(self, handler: RevocationHandler):
        async def revoke(request: Request) -> Response:
            form = await request.form()
            self.revocation_requests.append({k: str(v) for k, v in form.items()})
            if "client_secret" not in form:
                # The SDK's RevocationRequest requires the field even of a public client, which
                # RFC 7009 lets send client_id alone: give its handler the empty value RFC 6749
                # §3.1 treats as omitted (Starlette caches the parsed form on the request).
                request._form = FormData([*form.multi_items(), ("client_secret", "")])
            return await handler.handle(request)

        return revoke

    def _token(self, handler: TokenHandler, authenticator: ClientAuthenticator):
        async def token(request: Request) -> Response:
            form = {k: str(v) for k, v in (await request.form()).items()}
            auth = request.headers.get("authorization", "")
            self.token_requests.append(TokenRequest(form.get("grant_type", ""), form, auth))
            if self.token_delay:
                import anyio

                await anyio.sleep(self.token_delay)
            if form.get("grant_type") == "client_credentials":
                response = await self._client_credentials(request, form, authenticator)
            else:
                response = await handler.handle(request)
            if self.tamper_tokens and response.status_code == 200:
                return JSONResponse(self.tamper_tokens(json.loads(response.body)))
            return response

        return token

    async def _client_credentials(self, request, form, authenticator) -> Response:
        try:
            client = await authenticator.authenticate_request(request)
        except AuthenticationError as exc:
            return JSONResponse({"error": "invalid_client", "error_description": exc.message}, 401)
        if "client_credentials" not in client.grant_types:
            return JSONResponse({"error": "unauthorized_client"}, 400)
        scopes = form.get("scope", "").split() or list(self.scopes)
        if not set(scopes) <= set(self.scopes):
            return JSONResponse({"error": "invalid_scope"}, 400)
        grant = _Grant(client.client_id, scopes, form.get("resource"))
        tokens = self.provider.issue(grant, refresh=False)
        return JSONResponse(
            tokens.model_dump(exclude_none=True), headers={"Cache-Control": "no-store"}
        )


@dataclass
class ProtectedMcp:
    """`demo_server()` behind `auth`'s tokens (see the module docstring). `url` is set by
    `start_protected` to the MCP endpoint, which is also the token's required resource."""

    auth: AuthServer
    base_scope: str = READ
    hint_metadata: bool = True  # name the resource metadata URL in the 401 challenge
    tool_scopes: dict[str, str] = field(default_factory=lambda: {"delete_file": WRITE})
    url: str = ""
    tokens_seen: list[str] = field(default_factory=list)

    @property
    def metadata_url(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}/.well-known/oauth-protected-resource{parts.path}"

    def build_asgi_app(self, transport: Transport) -> ASGIApp:
        inner = _asgi_app_for(demo_server(), transport)

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                return await inner(scope, receive, send)
            if scope["path"].startswith("/.well-known/oauth-protected-resource"):
                return await self._resource_metadata(scope, receive, send)
            await self._guard(inner, scope, receive, send)

        return app

    async def _resource_metadata(self, scope, receive, send) -> None:
        parts = urlsplit(self.url)
        if scope["path"] != f"/.well-known/oauth-protected-resource{parts.path}":
            return await Response(status_code=404)(scope, receive, send)
        metadata = ProtectedResourceMetadata(
            resource=self.url,
            authorization_servers=[self.auth.issuer],
            scopes_supported=list(self.auth.scopes),
        )
        body = metadata.model_dump(mode="json", exclude_none=True)
        await JSONResponse(body)(scope, receive, send)

    async def _guard(self, inner, scope, receive, send) -> None:
        header = Request(scope).headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if token:
            self.tokens_seen.append(token)
        access = await self.auth.provider.load_access_token(token) if token else None
        valid = (
            access is not None
            and (access.expires_at or 0) > time.time()
            and (access.resource or "").rstrip("/") == self.url.rstrip("/")
        )
        if not valid:
            return await self._challenge(401, "invalid_token", self.base_scope)(
                scope, receive, send
            )
        body, receive = await _buffered(receive)
        needed = {self.base_scope, *self._tool_scope(body)}
        if not needed <= set(access.scopes):
            wanted = " ".join(dict.fromkeys([*access.scopes, *sorted(needed)]))
            return await self._challenge(403, "insufficient_scope", wanted)(scope, receive, send)
        await inner(scope, receive, send)

    def _tool_scope(self, body: bytes) -> list[str]:
        try:
            message = json.loads(body or b"{}")
        except ValueError:
            return []
        if not isinstance(message, dict) or message.get("method") != "tools/call":
            return []
        name = (message.get("params") or {}).get("name")
        return [self.tool_scopes[name]] if name in self.tool_scopes else []

    def _challenge(self, status: int, error: str, scope: str) -> Response:
        value = f'Bearer error="{error}", scope="{scope}"'
        if self.hint_metadata:
            value += f', resource_metadata="{self.metadata_url}"'
        body = {"error": error}
        return JSONResponse(body, status_code=status, headers={"WWW-Authenticate": value})


async def _buffered(receive: Receive) -> tuple[bytes, Receive]:
    """Read a request body, and a `receive` that hands it on again to the app behind."""
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body, sent = b"".join(chunks), False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


def start_oauth_world(
    factory, transport: Transport = "streamable_http", hint_metadata=True, **auth_options
):
    """An `AuthServer` and a `ProtectedMcp` behind it, both running. Returns (auth, mcp)."""
    auth = AuthServer(**auth_options)
    auth.issuer = factory(auth).base_url
    protected = ProtectedMcp(auth, hint_metadata=hint_metadata)
    running = factory(protected, transport)
    protected.url = running.url
    protected.running = running
    return auth, protected


def sign_in(authorization_url: str, approve: bool = True) -> str:
    """Play the admin's browser at the authorization server: open the URL, answer the consent
    page, and return where the server sends the browser back (Toolgate's callback URL)."""
    with httpx2.Client(follow_redirects=False, timeout=10) as browser:
        response = browser.get(authorization_url)
        assert response.status_code == 302, response.text
        consent = response.headers["location"]
        request_id = dict(parse_qsl(urlsplit(consent).query))["request"]
        answer = {"request": request_id, "answer": "approve" if approve else "deny"}
        response = browser.post(consent.split("?")[0], data=answer)
        assert response.status_code == 302, response.text
        return response.headers["location"]


# --------------------------------------------------------------------------------------------
# Connecting through Toolgate's admin (with the Django test client; SITE_URL=http://testserver)
# --------------------------------------------------------------------------------------------

CALLBACK = "http://testserver/oauth/callback/"


def add_form(url: str, **overrides: Any) -> dict[str, str]:
    """The admin's add form for an OAuth server at `url`; an override of None leaves a field out."""
    data = {
        "name": "files",
        "description": "",
        "url": url,
        "transport": "streamable_http",
        "auth_kind": "oauth",
        "oauth_grant": "authorization_code",
        "oauth_client_id": "",
        "oauth_client_secret": "",
        "oauth_scope": "",
        "oauth_issuer": "",
        "secret_token": "",
        "headers_text": "",
        "approval_mode": "always_ask",
        "personal_data_needs_approval": "on",
        "enabled": "on",
        "allow_private_network": "on",
        "allow_http": "on",
        "tools-TOTAL_FORMS": "0",
        "tools-INITIAL_FORMS": "0",
    }
    data.update(overrides)
    return {key: value for key, value in data.items() if value is not None}


def add_server(admin_client, url: str, **overrides: Any) -> str:
    """Save a new OAuth server in the admin; the authorization server's URL it sends you to."""
    response = admin_client.post("/admin/integrations/mcpserver/add/", add_form(url, **overrides))
    return authorization_url(response)


def authorization_url(response) -> str:
    """Where the admin's "connecting" page sends the browser (a meta refresh and a link)."""
    assert response.status_code == 200, response.status_code
    link = re.search(
        r'id="oauth-continue" class="button" href="([^"]+)"', response.content.decode()
    )
    assert link, response.content.decode()[:2000]
    return html.unescape(link[1])


def come_back(client, callback_url):
    parts = urlsplit(callback_url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == CALLBACK
    return client.get(f"{parts.path}?{parts.query}")


def connect(admin_client, mcp, **overrides):
    """Add the server in the admin and sign in: (the server, the callback's response)."""
    from integrations.models import McpServer

    authorization_url = add_server(admin_client, mcp.url, **overrides)
    response = come_back(admin_client, sign_in(authorization_url))
    return McpServer.objects.get(name=overrides.get("name", "files")), response


def basic_credentials(header: str) -> tuple[str, str]:
    client_id, _, secret = base64.b64decode(header.removeprefix("Basic ")).decode().partition(":")
    return client_id, secret
