"""The HTTP side of OAuth 2.1 to MCP servers: discovery, client registration, token requests.

`integrations/oauth.py` keeps the state and calls the coroutines here (through `anyio.run`).
What to ask, in which order, and how to judge the answers comes from the MCP SDK's own OAuth
client (`mcp.client.auth.utils`, `mcp.shared.auth`): the discovery URLs (RFC 9728, RFC 8414,
then OpenID discovery), the metadata models, the issuer and resource checks, scope selection,
registration checks and token-request client authentication. This module only sends the
requests, because Toolgate's browser step spans two web requests and the SDK's provider
expects to await the browser inside one (see docs/architecture.md).

Every request goes through `netguard` with the MCP server's own permissions: HTTPS unless the
server allows plain HTTP, private addresses only where it allows them, no redirect followed,
responses capped. Nothing here sends an MCP server's token anywhere: discovery requests carry
no credentials, and client secrets and refresh tokens go only to the token endpoint.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpx2
from django.conf import settings
from mcp.client.auth import OAuthFlowError, OAuthRegistrationError
from mcp.client.auth.oauth2 import OAuthContext, check_registration_usable
from mcp.client.auth.utils import (
    build_oauth_authorization_server_metadata_discovery_urls,
    build_protected_resource_metadata_discovery_urls,
    create_client_registration_request,
    create_oauth_metadata_request,
    extract_resource_metadata_from_www_auth,
    extract_scope_from_www_auth,
    handle_auth_metadata_response,
    handle_protected_resource_response,
    handle_registration_response,
    issuers_match,
    validate_metadata_issuer,
)
from mcp.shared.auth import (
    OAuthClientMetadata,
    OAuthMetadata,
    OAuthToken,
    ProtectedResourceMetadata,
)
from mcp.shared.auth_utils import check_resource_allowed
from pydantic import ValidationError

from integrations import netguard

# What a bearer token may look like (RFC 6750 §2.1 b64token), and how long Toolgate keeps one.
BEARER_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
MAX_TOKEN_LENGTH = 16384
# A token endpoint that answers with one of these is saying "no", not "not now".
REFUSALS = {"invalid_grant", "invalid_client", "unauthorized_client", "invalid_scope"}
REFUSAL_STATUSES = {400, 401, 403}


class OAuthProblem(Exception):
    """Talking to an authorization server failed; the message is fit for an admin page.

    `refused` is True when the server gave a definitive no (a revoked grant, an unknown
    client, an endpoint Toolgate may not use): retrying won't help, a human must reconnect.
    """

    def __init__(self, message, *, refused=False):
        super().__init__(message)
        self.message = message
        self.refused = refused


@dataclass(frozen=True)
class Network:
    """The MCP server's network permissions, which apply to its authorization server too."""

    allow_private_network: bool
    allow_http: bool


@dataclass
class Discovery:
    metadata: OAuthMetadata
    resource_metadata: ProtectedResourceMetadata | None
    challenged_scope: str | None  # the `scope` of the server's 401 challenge

    @property
    def issuer(self):
        return str(self.metadata.issuer)


def resource_for(server_url, resource_metadata=None):
    """The RFC 8707 resource indicator for an MCP server: the resource its metadata names when
    that covers the server's URL, else the URL itself, without query or fragment (RFC 8707
    §2: a resource "SHOULD NOT include a query component"; a query may hold a key)."""
    parts = urlsplit(server_url)
    resource = urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path, "", ""))
    if resource_metadata is not None:
        advertised = str(resource_metadata.resource)
        if check_resource_allowed(requested_resource=resource, configured_resource=advertised):
            return advertised
    return resource


async def discover(server_url, transport, network, issuer=""):
    """Find the authorization server of an MCP server, as the MCP spec describes: its `401`
    challenge, its protected resource metadata, then the authorization server's metadata,
    whose issuer must be the one named (and `issuer`, when the admin pinned one)."""
    async with _client(network) as client, _deadline(settings.MCP_SYNC_TIMEOUT):
        challenge = await _challenge(client, server_url, transport, network)
        prm = await _resource_metadata(client, server_url, challenge, network)
        auth_server = _pick_authorization_server(prm, issuer) if prm else None
        metadata = await _server_metadata(client, auth_server, server_url, network)
    if issuer and not issuers_match(str(metadata.issuer), issuer):
        raise OAuthProblem(
            f"The server's authorization server is {metadata.issuer}, not the one configured "
            f"({issuer}).",
            refused=True,
        )
    for label, url in _endpoints(metadata):
        _check_url(url, network, f"The authorization server's {label}")
    scope = extract_scope_from_www_auth(challenge) if challenge is not None else None
    return Discovery(metadata=metadata, resource_metadata=prm, challenged_scope=scope)


async def register(metadata, client_metadata, network):
    """Dynamic client registration (RFC 7591) at the authorization server's endpoint."""
    if metadata.registration_endpoint is None:
        raise OAuthProblem("The authorization server offers no dynamic client registration.")
    _check_url(str(metadata.registration_endpoint), network, "The registration endpoint")
    request = create_client_registration_request(metadata, client_metadata, "")
    async with _client(network) as client, _deadline(settings.MCP_SYNC_TIMEOUT):
        response = await _send(client, request, "the registration endpoint")
    _refuse_redirect(response, "the registration endpoint")
    try:
        info = await handle_registration_response(response)
        check_registration_usable(info)
    except OAuthRegistrationError as exc:
        raise OAuthProblem(f"Client registration failed: {_short(str(exc), [])}") from None
    return info


async def request_token(token_endpoint, data, client_info, network):
    """POST a token request (any grant) with the client's authentication; the new tokens.

    The values in `data` (a code, a refresh token) and the client secret never appear in
    an error message, whatever the server echoes back.
    """
    _check_url(token_endpoint, network, "The token endpoint")
    secrets = [*data.values(), client_info.client_secret or ""]
    response = await _post_as_client(token_endpoint, data, client_info, network, "token")
    if response.status_code in (200, 201):
        return _checked_tokens(response)
    raise _token_error(response, secrets)


async def revoke_token(endpoint, token, hint, client_info, network):
    """RFC 7009: ask the authorization server to revoke `token`, with the client's
    authentication, through the same guard as every other request. 200 is success (also
    for a token it no longer knows); anything else raises `OAuthProblem`, without the token."""
    _check_url(endpoint, network, "The revocation endpoint")
    data = {"token": token, "token_type_hint": hint, "client_id": client_info.client_id}
    secrets = [token, client_info.client_secret or ""]
    response = await _post_as_client(endpoint, data, client_info, network, "revocation")
    if response.status_code != 200:
        raise _token_error(response, secrets, "revocation")


async def _post_as_client(endpoint, data, client_info, network, which):
    """POST the form `data` to the authorization server's `which` endpoint, authenticated as
    the client the way the SDK's own flow does it (client_secret_basic, _post or none)."""
    context = OAuthContext(
        server_url=endpoint,
        client_metadata=OAuthClientMetadata(redirect_uris=None),
        storage=None,
        redirect_handler=None,
        callback_handler=None,
        client_info=client_info,
    )
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
    data, headers = context.prepare_token_auth(dict(data), headers)
    request = httpx2.Request("POST", endpoint, data=data, headers=headers)
    timeout = settings.MCP_CONNECT_TIMEOUT + settings.MCP_READ_TIMEOUT  # token_request_timeout()
    async with _client(network) as client, _deadline(timeout):
        response = await _send(client, request, f"the {which} endpoint")
    _refuse_redirect(response, f"the {which} endpoint")
    return response


def _checked_tokens(response):
    try:
        tokens = OAuthToken.model_validate_json(response.content)
    except ValidationError:
        raise OAuthProblem("The token endpoint's answer is not a Bearer token response.") from None
    refresh = tokens.refresh_token or ""
    access = tokens.access_token
    usable = BEARER_TOKEN.match(access) and len(access) <= MAX_TOKEN_LENGTH
    if not usable or len(refresh) > MAX_TOKEN_LENGTH or not refresh.isprintable():
        raise OAuthProblem("The token endpoint sent a token Toolgate cannot use.")
    if tokens.expires_in is not None and not 0 <= int(tokens.expires_in) <= 10 * 365 * 86400:
        raise OAuthProblem("The token endpoint sent an impossible expiry (expires_in).")
    if tokens.scope is not None and len(tokens.scope) > 1000:
        raise OAuthProblem("The token endpoint sent an oversized scope.")
    return tokens


def _token_error(response, secrets, which="token"):
    error, description = "", ""
    try:
        body = json.loads(response.content)
        error, description = str(body.get("error", "")), str(body.get("error_description", ""))
    except (ValueError, AttributeError):
        pass
    said = _short(f"{error} ({description})" if description else error, secrets)
    status = response.status_code
    refused = status in REFUSAL_STATUSES and (error in REFUSALS or not error)
    if error in ("server_error", "temporarily_unavailable"):
        refused = False
    detail = f": {said}" if said else ""
    return OAuthProblem(f"The {which} endpoint refused (HTTP {status}){detail}.", refused=refused)


def _short(text, secrets, limit=300):
    for secret in sorted((s for s in secrets if s and len(s) > 3), key=len, reverse=True):
        text = text.replace(secret, "[redacted]")
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return text[:limit]


# --------------------------------------------------------------------------- discovery steps


async def _challenge(client, server_url, transport, network):
    """The server's answer to an unauthenticated request, if it is a 401/403 challenge."""
    _check_url(server_url, network, "The server URL")
    methods = {"sse": ["GET"], "streamable_http": ["POST"]}.get(transport, ["POST", "GET"])
    for method in methods:
        response = await _probe(client, method, server_url)
        if response is not None and response.status_code in (401, 403):
            return response
    return None


_PROBE_BODY = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "toolgate", "version": "0.1.0"},
    },
}


async def _probe(client, method, url):
    headers = {"Accept": "application/json, text/event-stream"}
    body = json.dumps(_PROBE_BODY).encode() if method == "POST" else None
    if body:
        headers["Content-Type"] = "application/json"
    try:
        # Only the status and headers matter: the body (an event stream, perhaps) is not read.
        async with client.stream(method, url, headers=headers, content=body) as response:
            return response
    except httpx2.HTTPError as exc:
        raise _network_problem(exc, "the MCP server") from None


async def _resource_metadata(client, server_url, challenge, network):
    advertised = extract_resource_metadata_from_www_auth(challenge) if challenge else None
    failed_status = None
    for url in build_protected_resource_metadata_discovery_urls(advertised, server_url):
        if not _url_allowed(url, network):
            continue
        response = await _send(client, create_oauth_metadata_request(url), "the MCP server")
        if response.status_code >= 500 or response.status_code == 429:
            failed_status = response.status_code
        prm = await handle_protected_resource_response(response)
        if prm is not None:
            _check_resource(prm, server_url)
            return prm
    if failed_status is not None:
        raise OAuthProblem(
            f"The server's protected resource metadata could not be read (HTTP {failed_status})."
        )
    return None


def _check_resource(prm, server_url):
    resource, advertised = resource_for(server_url), str(prm.resource)
    if not check_resource_allowed(requested_resource=resource, configured_resource=advertised):
        origin = _origin(str(prm.resource))
        raise OAuthProblem(
            f"The server's protected resource metadata is for another resource ({origin}/…), "
            "not this server.",
            refused=True,
        )


def _pick_authorization_server(prm, issuer):
    advertised = [str(url) for url in prm.authorization_servers]
    if issuer:
        for server in advertised:
            if issuers_match(server, issuer):
                return server
    return advertised[0]


async def _server_metadata(client, auth_server, server_url, network):
    # Without protected resource metadata (servers of the 2025-03-26 spec) the authorization
    # server is the MCP server's origin.
    expected = auth_server or _origin(server_url)
    urls = build_oauth_authorization_server_metadata_discovery_urls(auth_server, server_url)
    for url in urls:
        _check_url(url, network, "The authorization server")
        request = create_oauth_metadata_request(url)
        response = await _send(client, request, "the authorization server")
        found, metadata = await handle_auth_metadata_response(response)
        if not found:
            break
        if metadata is None:
            continue
        if auth_server is None and issuers_match(str(metadata.issuer), expected):
            expected = str(metadata.issuer)  # a root issuer written with its trailing slash
        try:
            validate_metadata_issuer(metadata, expected)
        except OAuthFlowError:
            raise OAuthProblem(
                f"The authorization server's metadata names another issuer ({metadata.issuer}) "
                f"than the one it was looked up for ({expected}).",
                refused=True,
            ) from None
        return metadata
    where = _origin(auth_server) if auth_server else _origin(server_url)
    raise OAuthProblem(
        f"No OAuth authorization server metadata found for {where}: the server does not seem "
        "to support OAuth."
    )


def _endpoints(metadata):
    yield "authorization endpoint", str(metadata.authorization_endpoint)
    yield "token endpoint", str(metadata.token_endpoint)
    if metadata.registration_endpoint is not None:
        yield "registration endpoint", str(metadata.registration_endpoint)


# --------------------------------------------------------------------------- plumbing


@contextlib.asynccontextmanager
async def _deadline(seconds):
    try:
        with anyio.fail_after(seconds):
            yield
    except TimeoutError:
        raise OAuthProblem("The authorization server did not answer in time.") from None


def _client(network):
    return netguard.guarded_client(
        allow_private_network=network.allow_private_network,
        extra_blocked=settings.MCP_EXTRA_BLOCKED_NETWORKS,
        extra_allowed=settings.MCP_EXTRA_ALLOWED_NETWORKS,
        timeout=httpx2.Timeout(settings.MCP_READ_TIMEOUT, connect=settings.MCP_CONNECT_TIMEOUT),
        max_response_bytes=settings.OAUTH_MAX_RESPONSE_BYTES,
    )


async def _send(client, request, what):
    try:
        response = await client.send(request)
        await response.aread()
        return response
    except httpx2.HTTPError as exc:
        raise _network_problem(exc, what) from None


def _network_problem(exc, what):
    if isinstance(exc, netguard.AddressRefused):
        return OAuthProblem(
            f"Refused to connect to {what} at {exc.host}: {exc.reason} ({exc.why}).",
            refused=True,
        )
    host = exc.request.url.host if _has_request(exc) else "?"
    if isinstance(exc, netguard.ResponseTooLarge):
        return OAuthProblem(f"{what.capitalize()} at {host} sent too large a response.")
    if isinstance(exc, httpx2.TimeoutException):
        return OAuthProblem(f"{what.capitalize()} at {host} did not answer in time.")
    return OAuthProblem(f"Could not connect to {what} at {host}.")


def _has_request(exc):
    try:
        return exc.request is not None
    except RuntimeError:
        return False


def _refuse_redirect(response, what):
    if 300 <= response.status_code < 400:
        raise OAuthProblem(
            f"{what.capitalize()} redirected to another location, which is not followed.",
            refused=True,
        )


def _url_allowed(url, network):
    try:
        netguard.validate_url(url, allow_http=network.allow_http)
    except netguard.UrlRefused:
        return False
    return True


def _check_url(url, network, label):
    try:
        netguard.validate_url(url, allow_http=network.allow_http)
    except netguard.UrlRefused as exc:
        message = f"{label} is not allowed ({_origin(url)}): {exc}"
        raise OAuthProblem(message, refused=True) from None


def _origin(url):
    parts = urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}"
