"""OAuth 2.1 to upstream MCP servers: a server's credential, the sign-in that connects it,
and keeping its access token fresh.

- `OAuthCredential` (one per server whose authentication is OAuth 2.1): what the admin
  configured (grant, scopes, a pre-registered client), what discovery found (the
  authorization server's metadata), the client registration, the tokens (encrypted), who
  connected it and when, and whether it needs reconnecting and why.
- `OAuthAuthorization`: one browser sign-in in progress. Its `state` is unguessable, only
  its hash is stored, it is short-lived and single-use, and it is bound either to the admin
  session that started it or to the waiting `mcp_server authorize` command.
- `BearerAuth`: the httpx2 auth `McpServer.endpoint()` hands to `mcp_client`. It sends the
  access token, renews it once when the server answers 401, and records a 403
  `insufficient_scope` challenge (step-up) for the server's page.

Tokens are renewed before they expire by whichever worker needs them. Renewal is claimed
with a conditional UPDATE on the credential row (`renewal_claim`), so two workers never both
spend a rotating refresh token: the loser waits for the winner's new token. A refused renewal
(revoked grant, unknown client) marks the server "needs reconnecting"; its calls then fail at
once with that reason and are not retried.

When a credential is deleted (its server deleted, or switched away from OAuth), its tokens
are revoked at the authorization server (RFC 7009, its `revocation_endpoint`), best effort
and never in the way of the delete: an `OAuthRevocation` row (encrypted) keeps what is
needed, and a worker sends the revocation after commit, then deletes the row.

The network side (discovery, registration, token requests) is `integrations.oauth_http`.
"""

import hashlib
import hmac
import logging
import secrets
import time
from datetime import timedelta
from urllib.parse import urlencode, urlsplit

import anyio
import httpx2
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection, models
from django.db.models import F, Q
from django.db.models.functions import Greatest
from django.db.models.signals import pre_delete
from django.dispatch import receiver
from django.utils import timezone
from mcp.client.auth import OAuthFlowError, PKCEParameters
from mcp.client.auth.utils import (
    extract_field_from_www_auth,
    extract_scope_from_www_auth,
    get_client_metadata_scopes,
    is_valid_client_metadata_url,
    issuers_match,
    should_use_client_metadata_url,
    union_scopes,
    validate_authorization_response_iss,
)
from mcp.shared.auth import (
    OAuthClientInformationFull,
    OAuthClientMetadata,
    OAuthMetadata,
    ProtectedResourceMetadata,
)

from integrations import mcp_client, oauth_http
from integrations.fields import EncryptedJSONField, EncryptedTextField

logger = logging.getLogger(__name__)

CLIENT_NAME = "Toolgate"


def redirect_uri():
    """Toolgate's OAuth redirect URI (register it with pre-registered clients)."""
    return settings.SITE_URL.rstrip("/") + "/oauth/callback/"


def client_metadata_url():
    """Where Toolgate serves its Client ID Metadata Document; it is also the client ID."""
    return settings.SITE_URL.rstrip("/") + "/oauth/client-metadata.json"


def client_metadata_document():
    """The Client ID Metadata Document: Toolgate as a public client, identified by its URL."""
    return {
        "client_id": client_metadata_url(),
        "client_name": CLIENT_NAME,
        "client_uri": settings.SITE_URL,
        "redirect_uris": [redirect_uri()],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
        "application_type": _application_type(),
    }


def _application_type():
    # OpenID's "native" allows loopback http redirect URIs, which a development setup has.
    host = urlsplit(settings.SITE_URL).hostname or ""
    return "native" if host in ("localhost", "127.0.0.1", "::1") else "web"


class NeedsReconnect(mcp_client.McpError):
    """The server's OAuth credential can't be used until an admin connects it (again). Calls
    fail with this at once, without a request to anyone, and are not retried."""

    def __init__(self, server_name, reason=""):
        how = f"on its admin page or with `manage.py mcp_server authorize {server_name}`"
        if reason:
            message = f"{server_name} needs reconnecting: {reason} Reconnect it {how}."
        else:
            message = f"{server_name} is not connected yet: connect it {how}."
        super().__init__("needs_reconnect", message, reached_server=False, retryable=False)


class Grant(models.TextChoices):
    AUTHORIZATION_CODE = "authorization_code", "Authorization code (an admin signs in once)"
    CLIENT_CREDENTIALS = "client_credentials", "Client credentials (machine to machine)"


class ClientSource(models.TextChoices):
    PRE_REGISTERED = "pre_registered", "Pre-registered client"
    METADATA_DOCUMENT = "metadata_document", "Toolgate's client metadata document"
    DYNAMIC = "dynamic", "Registered dynamically"


def token_request_timeout():
    """How long one token request may take (oauth_http bounds it the same way)."""
    return settings.MCP_CONNECT_TIMEOUT + settings.MCP_READ_TIMEOUT


def _hash(value):
    return hashlib.sha256(value.encode()).hexdigest()


class OAuthCredential(models.Model):
    server = models.OneToOneField(
        "integrations.McpServer", on_delete=models.CASCADE, related_name="oauth"
    )
    # What the admin configured.
    grant = models.CharField(max_length=30, choices=Grant, default=Grant.AUTHORIZATION_CODE)
    scope = models.CharField("requested scopes", max_length=1000, blank=True)
    expected_issuer = models.CharField("authorization server", max_length=500, blank=True)
    # The client Toolgate is at the authorization server.
    client_source = models.CharField(max_length=20, choices=ClientSource, blank=True)
    client_id = models.CharField(max_length=500, blank=True)
    client_secret = EncryptedTextField(blank=True)
    client_registration = EncryptedJSONField(null=True, blank=True)  # the RFC 7591 answer
    # What discovery found.
    issuer = models.CharField(max_length=500, blank=True)
    metadata = models.JSONField(default=dict, blank=True)  # the authorization server's
    resource_metadata = EncryptedJSONField(null=True, blank=True)  # names the server's URL
    # The grant.
    access_token = EncryptedTextField(blank=True)
    refresh_token = EncryptedTextField(blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    granted_scope = models.TextField(blank=True)
    connected_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    connected_at = models.DateTimeField(null=True, blank=True)
    last_refreshed_at = models.DateTimeField(null=True, blank=True)
    # Bumped whenever the tokens change: with the pk, the identity of a connection.
    version = models.PositiveIntegerField(default=0)
    renewal_claim = models.CharField(max_length=64, blank=True)
    renewal_claimed_at = models.DateTimeField(null=True, blank=True)
    reconnect_reason = models.TextField(blank=True)
    step_up_scope = models.TextField(blank=True)  # what a 403 insufficient_scope asked for
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "OAuth credential"

    def __str__(self):
        return f"OAuth credential of {self.server}"

    # ----------------------------------------------------------------------- state

    @property
    def needs_reconnect(self):
        return bool(self.reconnect_reason)

    @property
    def is_connected(self):
        return bool(self.access_token) and not self.needs_reconnect

    @property
    def needs_sign_in(self):
        """An authorization-code server nobody has connected yet: syncing would only fail."""
        return self.grant == Grant.AUTHORIZATION_CODE and not self.access_token

    @property
    def state_label(self):
        if self.needs_reconnect:
            return "Needs reconnecting"
        if self.is_connected:
            return "Connected"
        if self.grant == Grant.CLIENT_CREDENTIALS:
            return "Not connected yet (connects at the next sync)"
        return "Not connected"

    @property
    def network(self):
        return oauth_http.Network(self.server.allow_private_network, self.server.allow_http)

    def _metadata(self):
        return OAuthMetadata.model_validate(self.metadata) if self.metadata else None

    def _resource_metadata(self):
        prm = self.resource_metadata
        return ProtectedResourceMetadata.model_validate(prm) if prm else None

    def _resource(self):
        return oauth_http.resource_for(self.server.url, self._resource_metadata())

    def _expiring(self):
        if self.expires_at is None:
            return False
        margin = timedelta(seconds=settings.OAUTH_REFRESH_MARGIN)
        return self.expires_at - margin <= timezone.now()

    # ----------------------------------------------------------------------- use

    def bearer(self):
        """The auth for the server's requests, with a token renewed first when it is due."""
        credential = self.usable()
        return BearerAuth(credential)

    def usable(self):
        """This credential with an access token that is not about to expire; renews it when
        needed. Raises `NeedsReconnect` when only an admin can make it usable again."""
        if self.needs_reconnect:
            raise NeedsReconnect(self.server.name, self.reconnect_reason)
        if self.needs_sign_in:
            raise NeedsReconnect(self.server.name)
        if self.access_token and not self._expiring():
            return self
        return self.renew(self.version)

    def renew(self, seen_version):
        """Replace the access token of `seen_version`, unless another worker already did.

        The refresh token may rotate, so only the worker that claims the row spends it; the
        others wait for its result. Definitive refusals need a human; anything else (the
        authorization server unreachable, a 5xx) fails this attempt only.
        """
        while True:
            claim = self._claim_renewal(seen_version)
            if claim:
                break
            waited = self._wait_for_renewal(seen_version)
            if waited is not None:
                return waited
        try:
            tokens = self._new_tokens()
        except oauth_http.OAuthProblem as problem:
            if problem.refused:
                self.mark_needs_reconnect(problem.message)
                raise NeedsReconnect(self.server.name, problem.message) from None
            self._release_claim(claim)
            raise mcp_client.McpError("oauth", problem.message, reached_server=False) from None
        except BaseException:
            self._release_claim(claim)
            raise
        now = timezone.now()
        # The first client-credentials token connects the server; later ones renew it.
        when = {"last_refreshed_at": now} if self.connected_at else {"connected_at": now}
        self._store_tokens(tokens, self.granted_scope, where={"renewal_claim": claim}, **when)
        self.refresh_from_db()
        return self

    def _claim_renewal(self, seen_version):
        now = timezone.now()
        abandoned = now - timedelta(seconds=token_request_timeout() * 2)
        claim = secrets.token_hex(16)
        claimed = (
            OAuthCredential.objects.filter(pk=self.pk, version=seen_version, reconnect_reason="")
            .filter(Q(renewal_claim="") | Q(renewal_claimed_at__lt=abandoned))
            .update(renewal_claim=claim, renewal_claimed_at=now)
        )
        if claimed:
            self.refresh_from_db()
        return claim if claimed else None

    def _wait_for_renewal(self, seen_version):
        """Wait while another worker renews; this credential once it did, None to try to
        claim again (the other worker gave up), NeedsReconnect if it was refused."""
        deadline = time.monotonic() + token_request_timeout() * 2
        while time.monotonic() < deadline:
            self.refresh_from_db()
            if self.needs_reconnect:
                raise NeedsReconnect(self.server.name, self.reconnect_reason)
            if self.version != seen_version:
                return self
            if not self.renewal_claim:
                return None
            time.sleep(0.1)
        return None

    def _release_claim(self, claim):
        OAuthCredential.objects.filter(pk=self.pk, renewal_claim=claim).update(renewal_claim="")

    def _new_tokens(self):
        if self.grant == Grant.CLIENT_CREDENTIALS:
            return self._client_credentials_tokens()
        if not self.refresh_token:
            raise oauth_http.OAuthProblem(
                "the access token expired and the authorization server gave no refresh token.",
                refused=True,
            )
        data = {
            "grant_type": "refresh_token",
            "refresh_token": self.refresh_token,
            "client_id": self.client_id,
            "resource": self._resource(),
        }
        return self._token_request(data)

    def _client_credentials_tokens(self):
        if not self.metadata:
            self._rediscover()
        # client_id in the body as well, as the SDK's other grants send it: some servers
        # look the client up by it before reading the Basic credentials.
        data = {
            "grant_type": "client_credentials",
            "client_id": self.client_id,
            "resource": self._resource(),
        }
        scope = self._scope_to_request(self._metadata(), None, self._resource_metadata())
        if scope:
            data["scope"] = scope
        return self._token_request(data)

    def _token_request(self, data):
        token_endpoint = str(self._metadata().token_endpoint)
        client = self._client_info()
        return anyio.run(oauth_http.request_token, token_endpoint, data, client, self.network)

    def _store_tokens(self, tokens, granted, where=None, **fields):
        """Write new tokens (and `fields`) in one UPDATE, if the row still matches `where`."""
        expires_at = None
        if tokens.expires_in is not None:
            expires_at = timezone.now() + timedelta(seconds=int(tokens.expires_in))
        fields.update(
            access_token=tokens.access_token,
            expires_at=expires_at,
            granted_scope=tokens.scope or granted,  # RFC 6749: omitted means as requested
            version=F("version") + 1,
            renewal_claim="",
            renewal_claimed_at=None,
        )
        if tokens.refresh_token:  # a refresh answer without one keeps the old one (RFC 6749 §6)
            fields["refresh_token"] = tokens.refresh_token
        changed = OAuthCredential.objects.filter(pk=self.pk, **(where or {})).update(**fields)
        if not changed:
            logger.warning("OAuth tokens of server %s changed while renewing", self.server_id)

    def mark_needs_reconnect(self, reason):
        """Only an admin can fix this credential now: record why, and tell people (once: the
        conditional UPDATE lets only the first of several workers announce it)."""
        reason = reason.strip()
        reason = reason[:1].upper() + reason[1:]
        fields = {"reconnect_reason": reason, "renewal_claim": "", "renewal_claimed_at": None}
        first = OAuthCredential.objects.filter(pk=self.pk, reconnect_reason="").update(**fields)
        if not first:
            OAuthCredential.objects.filter(pk=self.pk).update(**fields)
        self.reconnect_reason = reason
        logger.warning("MCP server %s needs reconnecting: %s", self.server.name, reason)
        if first:
            self._announce_needs_reconnect()

    def _announce_needs_reconnect(self):
        from approvals.notifications import notify
        from integrations.models import McpServer

        server = self.server
        # The server's page and the notice show `last_error`. Counting this as reaching the
        # failed-syncs threshold keeps the syncs that fail until a reconnect from announcing
        # the same thing again; the next successful sync resets the count.
        McpServer.objects.filter(pk=server.pk).update(
            last_error=NeedsReconnect(server.name, self.reconnect_reason).message,
            sync_failures=Greatest("sync_failures", settings.NOTIFY_SYNC_FAILURES),
        )
        server.refresh_from_db(fields=["last_error", "sync_failures"])
        notify("server.sync_failing", server)

    def forget_grant(self, reason):
        """Drop the tokens (they belong to another URL or client now) until a reconnect."""
        OAuthCredential.objects.filter(pk=self.pk).update(
            access_token="", refresh_token="", expires_at=None, version=F("version") + 1,
            renewal_claim="", renewal_claimed_at=None,
        )  # fmt: skip
        self.refresh_from_db()
        self.mark_needs_reconnect(reason)

    def record_step_up(self, challenged_scope):
        """A 403 insufficient_scope asked for more: remember it so the page asks for a reconnect
        with the wider scope (the union of what was granted and what was asked, SEP-2350)."""
        wanted = union_scopes(self.step_up_scope or None, challenged_scope or None) or ""
        granted = set(self.granted_scope.split())
        if wanted and not set(wanted.split()) <= granted:
            OAuthCredential.objects.filter(pk=self.pk).update(step_up_scope=wanted)
            self.step_up_scope = wanted

    # ----------------------------------------------------------------------- connecting

    def start_sign_in(self, *, user=None, session_key="", for_command=False, timeout=None):
        """Prepare a browser sign-in: the pending `OAuthAuthorization`, whose `url` (not
        stored) is the authorization server's page to open.

        Discovers the authorization server, chooses the scope and the client (pre-registered,
        Toolgate's metadata document, or dynamic registration), and stores the pending sign-in.
        Raises `oauth_http.OAuthProblem` with a message for the admin.
        """
        discovery = self._rediscover()
        methods = discovery.metadata.code_challenge_methods_supported or []
        if "S256" not in methods:
            raise oauth_http.OAuthProblem(
                "The authorization server does not say it supports PKCE with S256, which "
                "OAuth 2.1 and the MCP spec require; Toolgate won't sign in there."
            )
        scope = self._scope_to_request(
            discovery.metadata, discovery.challenged_scope, discovery.resource_metadata
        )
        client = self._ensure_client(discovery, scope)
        return OAuthAuthorization.begin(
            self, discovery, client, scope, user, session_key, for_command, timeout
        )

    def connect_client_credentials(self, user=None):
        """Machine to machine: discover and get a token now, no browser."""
        self._rediscover()
        tokens = self._client_credentials_tokens()
        requested = self._scope_to_request(self._metadata(), None, self._resource_metadata())
        self._store_connection(tokens, user, requested)

    def _rediscover(self):
        server = self.server
        discovery = anyio.run(
            oauth_http.discover, server.url, server.transport, self.network, self.expected_issuer
        )
        self.issuer = discovery.issuer
        self.metadata = discovery.metadata.model_dump(mode="json", exclude_none=True)
        prm = discovery.resource_metadata
        self.resource_metadata = prm.model_dump(mode="json", exclude_none=True) if prm else None
        self.save(update_fields=["issuer", "metadata", "resource_metadata", "updated_at"])
        return discovery

    def _scope_to_request(self, metadata, challenged, resource_metadata):
        """The admin's scopes, else the challenge's, else the server's `scopes_supported`
        (the MCP spec's order; the SDK adds `offline_access` where the server offers it),
        widened by a pending step-up."""
        grants = ["client_credentials"] if self.grant == Grant.CLIENT_CREDENTIALS else None
        grants = grants or ["authorization_code", "refresh_token"]
        scope = get_client_metadata_scopes(
            self.scope or challenged, resource_metadata, metadata, grants
        )
        if self.step_up_scope:
            scope = union_scopes(scope, self.granted_scope or None)
            scope = union_scopes(scope, self.step_up_scope)
        return scope or ""

    def _ensure_client(self, discovery, scope):
        """The client to sign in as, in the MCP spec's order of preference."""
        if self.client_source == ClientSource.PRE_REGISTERED:
            return self._client_info()
        document_url = client_metadata_url()
        if is_valid_client_metadata_url(document_url) and should_use_client_metadata_url(
            discovery.metadata, document_url
        ):
            self._set_client(ClientSource.METADATA_DOCUMENT, document_url, "", None)
            return self._client_info()
        if self._registration_fits(discovery, scope):
            return self._client_info()
        if discovery.metadata.registration_endpoint is None:
            raise oauth_http.OAuthProblem(
                "The authorization server accepts neither Toolgate's client metadata document "
                "nor dynamic registration: register Toolgate there (redirect URI "
                f"{redirect_uri()}) and enter the client ID in the server's settings."
            )
        registered = anyio.run(
            oauth_http.register, discovery.metadata, self._registration_request(scope),
            self.network,
        )  # fmt: skip
        registered.issuer = discovery.issuer  # the binding the SDK records (SEP-2352)
        record = registered.model_dump(mode="json", exclude_none=True)
        self._set_client(
            ClientSource.DYNAMIC, registered.client_id, registered.client_secret or "", record
        )
        return self._client_info()

    def _registration_fits(self, discovery, scope):
        record = self.client_registration
        if self.client_source != ClientSource.DYNAMIC or not record:
            return False
        info = OAuthClientInformationFull.model_validate(record)
        same_server = info.issuer is not None and issuers_match(info.issuer, discovery.issuer)
        redirects = [str(uri) for uri in info.redirect_uris or []]
        covers = info.scope is None or set(scope.split()) <= set(info.scope.split())
        expiry = info.client_secret_expires_at
        fresh = not expiry or expiry > time.time() + 60
        return same_server and redirect_uri() in redirects and covers and fresh

    def _registration_request(self, scope):
        methods = self._metadata().token_endpoint_auth_methods_supported or []
        secret_methods = ("client_secret_basic", "client_secret_post")
        method = next((m for m in secret_methods if m in methods), None)
        return OAuthClientMetadata(
            redirect_uris=[redirect_uri()],
            client_name=CLIENT_NAME,
            grant_types=["authorization_code", "refresh_token"],
            token_endpoint_auth_method=method or "none",
            scope=scope or None,
            software_id="toolgate",
            application_type=_application_type(),
        )

    def _set_client(self, source, client_id, client_secret, registration):
        self.client_source, self.client_id = source, client_id
        self.client_secret, self.client_registration = client_secret, registration
        fields = ["client_source", "client_id", "client_secret", "client_registration"]
        self.save(update_fields=[*fields, "updated_at"])

    def _client_info(self):
        if self.client_source == ClientSource.DYNAMIC and self.client_registration:
            return OAuthClientInformationFull.model_validate(self.client_registration)
        method = "none"
        if self.client_secret:
            supported = self._metadata().token_endpoint_auth_methods_supported or []
            # RFC 8414: a server that lists nothing supports client_secret_basic.
            post_only = supported == ["client_secret_post"]
            method = "client_secret_post" if post_only else "client_secret_basic"
        return OAuthClientInformationFull(
            client_id=self.client_id,
            client_secret=self.client_secret or None,
            token_endpoint_auth_method=method,
            redirect_uris=[redirect_uri()],
        )

    def _store_connection(self, tokens, user, requested):
        """A new grant (a sign-in, or client credentials): it replaces whatever was there."""
        granted = tokens.scope or requested
        step_up = self.step_up_scope
        if step_up and set(step_up.split()) <= set(granted.split()):
            step_up = ""
        self._store_tokens(
            tokens,
            granted,
            refresh_token=tokens.refresh_token or "",
            connected_by=user if user and user.pk else None,
            connected_at=timezone.now(),
            last_refreshed_at=None,
            reconnect_reason="",
            step_up_scope=step_up,
        )
        self.refresh_from_db()


class AuthorizationStatus(models.TextChoices):
    PENDING = "pending", "Waiting for the browser"
    SUCCEEDED = "succeeded", "Connected"
    FAILED = "failed", "Failed"
    EXPIRED = "expired", "Expired"


class SignInFailed(Exception):
    pass


class OAuthAuthorization(models.Model):
    """One browser sign-in: from "Connect" (or `mcp_server authorize`) to Toolgate's callback."""

    credential = models.ForeignKey(
        OAuthCredential, on_delete=models.CASCADE, related_name="authorizations"
    )
    state_hash = models.CharField(max_length=64, unique=True)
    code_verifier = EncryptedTextField()
    scope = models.TextField(blank=True)
    client_id = models.CharField(max_length=500)
    metadata = models.JSONField()  # of the authorization server the browser was sent to
    started_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    session_hash = models.CharField(max_length=64, blank=True)
    for_command = models.BooleanField(default=False)
    status = models.CharField(
        max_length=10, choices=AuthorizationStatus, default=AuthorizationStatus.PENDING
    )
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "OAuth sign-in"

    def __str__(self):
        return f"Sign-in to {self.credential.server} ({self.status})"

    @classmethod
    def begin(cls, credential, discovery, client, scope, user, session_key, for_command, timeout):
        """Store a pending sign-in; its `url` starts it at the authorization server: PKCE
        S256, the RFC 8707 resource, a fresh `state` (only its hash is stored)."""
        cls.objects.filter(credential=credential).exclude(
            status=AuthorizationStatus.PENDING, expires_at__gt=timezone.now()
        ).delete()  # finished or stale sign-ins of this server: nothing left to keep them for
        state, pkce = secrets.token_urlsafe(32), PKCEParameters.generate()
        timeout = timeout or settings.OAUTH_SIGN_IN_TIMEOUT
        authorization = cls.objects.create(
            credential=credential,
            state_hash=_hash(state),
            code_verifier=pkce.code_verifier,
            scope=scope,
            client_id=client.client_id,
            metadata=discovery.metadata.model_dump(mode="json", exclude_none=True),
            started_by=user if user and user.pk else None,
            session_hash=_hash(session_key) if session_key else "",
            for_command=for_command,
            expires_at=timezone.now() + timedelta(seconds=timeout),
        )
        params = {
            "response_type": "code",
            "client_id": client.client_id,
            "redirect_uri": redirect_uri(),
            "state": state,
            "code_challenge": pkce.code_challenge,
            "code_challenge_method": "S256",
            "resource": credential._resource(),
        }
        if scope:
            params["scope"] = scope
            if "offline_access" in scope.split():
                params["prompt"] = "consent"  # OpenID asks for it with offline_access
        endpoint = str(discovery.metadata.authorization_endpoint)
        query = ("&" if urlsplit(endpoint).query else "?") + urlencode(params)
        authorization.url = endpoint + query
        return authorization

    @classmethod
    def pending(cls, state):
        """The sign-in this `state` belongs to, if it is still waiting; None otherwise."""
        if not isinstance(state, str) or not 20 <= len(state) <= 200:
            return None
        found = cls.objects.select_related("credential__server").filter(
            state_hash=_hash(state), status=AuthorizationStatus.PENDING, used_at__isnull=True
        )
        authorization = found.first()
        if authorization is None or authorization.expires_at <= timezone.now():
            return None
        return authorization

    def belongs_to(self, request):
        """Whether this browser may finish the sign-in: the admin's own session when it
        started in the admin; any browser for the waiting command, which holds the state."""
        if self.for_command:
            return True
        key = request.session.session_key or ""
        same_session = bool(key) and hmac.compare_digest(self.session_hash, _hash(key))
        same_user = request.user.is_authenticated and request.user.pk == self.started_by_id
        return same_session and same_user

    def claim(self):
        """Use the state once: True for the one request that gets it."""
        now = timezone.now()
        return (
            OAuthAuthorization.objects.filter(
                pk=self.pk, status=AuthorizationStatus.PENDING, used_at__isnull=True,
                expires_at__gt=now,
            ).update(used_at=now)
            == 1
        )  # fmt: skip

    def complete(self, params):
        """Finish the sign-in with the authorization server's answer (the callback's query).
        True when the server is connected; otherwise the reason is in `error`."""
        try:
            code = self._checked_code(params)
            self._exchange(code)
        except (SignInFailed, oauth_http.OAuthProblem) as exc:
            self._finish(AuthorizationStatus.FAILED, str(exc))
            return False
        self._finish(AuthorizationStatus.SUCCEEDED)
        if self.credential.server.enabled:
            self.credential.server.request_sync()
        return True

    def _checked_code(self, params):
        if params.get("error"):
            said = oauth_http._short(
                f"{params.get('error')} ({params.get('error_description', '')})", [], 200
            )
            raise SignInFailed(f"The authorization server did not grant access: {said}.")
        try:
            # RFC 9207: the answer must come from the server the browser was sent to.
            validate_authorization_response_iss(
                params.get("iss"), OAuthMetadata.model_validate(self.metadata)
            )
        except OAuthFlowError:
            raise SignInFailed(
                "The answer did not come from the authorization server the sign-in was sent to "
                "(its `iss` does not match); nothing was exchanged. Connect again."
            ) from None
        code = params.get("code") or ""
        if not code or len(code) > 4096 or not code.isprintable():
            raise SignInFailed("The authorization server sent no usable authorization code.")
        return code

    def _exchange(self, code):
        credential = OAuthCredential.objects.select_related("server").get(pk=self.credential_id)
        if credential.client_id != self.client_id:
            raise SignInFailed("The server's OAuth client changed during the sign-in; try again.")
        data = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri(),
            "client_id": self.client_id,
            "code_verifier": self.code_verifier,
            "resource": credential._resource(),
        }
        token_endpoint = str(OAuthMetadata.model_validate(self.metadata).token_endpoint)
        client = credential._client_info()
        tokens = anyio.run(
            oauth_http.request_token, token_endpoint, data, client, credential.network
        )
        credential._store_connection(tokens, self.started_by, self.scope)
        self.credential = credential

    def _finish(self, status, error=""):
        OAuthAuthorization.objects.filter(pk=self.pk).update(
            status=status, error=error, finished_at=timezone.now()
        )
        self.status, self.error = status, error

    def give_up(self, reason):
        """The waiting command stops: a later callback must not connect anything. False when
        the browser came back just before and the sign-in is being finished."""
        unused = OAuthAuthorization.objects.filter(
            pk=self.pk, status=AuthorizationStatus.PENDING, used_at__isnull=True
        )
        now = timezone.now()
        return unused.update(status=AuthorizationStatus.EXPIRED, error=reason, finished_at=now) == 1


class OAuthRevocation(models.Model):
    """Tokens of a deleted credential, to revoke at the authorization server (RFC 7009). Made in
    the delete's transaction; `revoke_oauth_tokens` sends them after commit and deletes it."""

    server_name = models.CharField(max_length=200)  # for the log: the server is gone
    endpoint = models.CharField(max_length=2000)
    client = EncryptedJSONField()  # the client's information, its secret included
    tokens = EncryptedJSONField()  # [[token, token_type_hint], ...], refresh token first
    allow_private_network = models.BooleanField(default=False)
    allow_http = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self):
        return f"Revocation of the tokens of {self.server_name}"

    @classmethod
    def schedule(cls, credential):
        """Keep the credential's tokens for a revocation after commit (nothing if the authorization
        server offers no revocation endpoint, or there is no token)."""
        from integrations.queueing import enqueue_on_commit
        from integrations.tasks import revoke_oauth_tokens

        endpoint = (credential.metadata or {}).get("revocation_endpoint")
        tokens = [
            [token, hint]
            for token, hint in [
                (credential.refresh_token, "refresh_token"),  # RFC 7009: ends the whole grant
                (credential.access_token, "access_token"),
            ]
            if token
        ]
        if not endpoint or not tokens:
            return None
        server = credential.server
        revocation = cls.objects.create(
            server_name=server.name,
            endpoint=endpoint,
            client=credential._client_info().model_dump(mode="json", exclude_none=True),
            tokens=tokens,
            allow_private_network=server.allow_private_network,
            allow_http=server.allow_http,
        )
        enqueue_on_commit(revoke_oauth_tokens, revocation.pk)
        return revocation

    def send(self):
        """Revoke each token once, log what happened (never a token), and forget them."""
        client = OAuthClientInformationFull.model_validate(self.client)
        network = oauth_http.Network(self.allow_private_network, self.allow_http)
        for token, hint in self.tokens:
            try:
                anyio.run(oauth_http.revoke_token, self.endpoint, token, hint, client, network)
            except oauth_http.OAuthProblem as problem:
                logger.warning(
                    "Could not revoke the %s of deleted server %s: %s",
                    hint.replace("_", " "), self.server_name, problem.message,
                )  # fmt: skip
            else:
                logger.info("Revoked the %s of deleted server %s", hint, self.server_name)
        self.delete()


@receiver(pre_delete, sender=OAuthCredential, dispatch_uid="integrations.revoke_deleted_tokens")
def revoke_deleted_tokens(sender, instance, **kwargs):
    """Best effort: a problem reading the credential must not stop the delete."""
    try:
        OAuthRevocation.schedule(instance)
    except Exception:
        logger.exception("Could not schedule the revocation of the tokens of %s", instance)


def credential_for(server):
    """The server's credential as stored now (not a cached relation), or None."""
    return OAuthCredential.objects.select_related("server").filter(server_id=server.pk).first()


class BearerAuth(httpx2.Auth):
    """Sends the credential's access token on every request of one MCP session.

    On a 401 it renews the token once (in a thread: the renewal reads and writes the
    database and may wait for another worker) and sends the same request again; a request
    the server refused never ran, so that is safe. On a 403 `insufficient_scope` it records
    the scope the server asked for. Why a request failed is left in `failure` for
    `mcp_client` to report.
    """

    requires_request_body = True

    def __init__(self, credential):
        self.pk, self.server_name = credential.pk, credential.server.name
        self.version, self._token = credential.version, credential.access_token
        self._others = [credential.refresh_token, credential.client_secret]
        self.failure = None
        self._lock = anyio.Lock()

    @property
    def identity(self):
        """What defines the connection (for a session pool): never the token itself."""
        return f"oauth:{self.pk}:{self.version}"

    @property
    def secrets(self):
        """Everything of this credential a server must never get to echo back to anyone."""
        return [self._token, *self._others]

    def sync_auth_flow(self, request):
        raise RuntimeError("BearerAuth only works with the async MCP client")

    async def async_auth_flow(self, request):
        sent = self._token
        request.headers["Authorization"] = f"Bearer {sent}"
        response = yield request
        if response.status_code == 401 and await self._renewed(sent):
            request.headers["Authorization"] = f"Bearer {self._token}"
            response = yield request
            if response.status_code == 401:
                await self._refused_fresh_token()
        if response.status_code == 403 and _insufficient_scope(response):
            await self._step_up(extract_scope_from_www_auth(response) or "")
        elif response.status_code < 400:
            self.failure = None  # explains only the request that just failed

    async def _renewed(self, sent):
        async with self._lock:
            if self._token != sent:
                return True  # another request of this session renewed it meanwhile
            try:
                credential = await _in_thread(_renew_rejected, self.pk, self.version)
            except mcp_client.McpError as exc:
                self.failure = exc
                return False
            self.version, self._token = credential.version, credential.access_token
            self._others.append(sent)
            return True

    async def _refused_fresh_token(self):
        reason = "the server refused a freshly renewed access token (HTTP 401)."
        await _in_thread(_mark_needs_reconnect, self.pk, reason)
        self.failure = NeedsReconnect(self.server_name, reason)

    async def _step_up(self, scope):
        await _in_thread(_record_step_up, self.pk, scope)
        wanted = f" ({scope})" if scope else ""
        self.failure = mcp_client.McpError(
            "insufficient_scope",
            f"{self.server_name} needs a wider OAuth scope for this{wanted}: reconnect it on its "
            "admin page to grant it.",
        )


def _insufficient_scope(response):
    return extract_field_from_www_auth(response, "error") == "insufficient_scope"


async def _in_thread(function, *args):
    # Not thread-sensitive: a renewal may wait seconds for another worker, and must not hold
    # the thread every other sync_to_async call of the process shares.
    return await sync_to_async(_closing_connection(function), thread_sensitive=False)(*args)


def _closing_connection(function):
    def run(*args):
        try:
            return function(*args)
        finally:
            connection.close()  # this pool thread's own connection; don't keep it open

    return run


def _renew_rejected(pk, version):
    credential = OAuthCredential.objects.select_related("server").get(pk=pk)
    if credential.needs_reconnect:
        raise NeedsReconnect(credential.server.name, credential.reconnect_reason)
    if credential.version != version:
        return credential  # renewed since this session got its token
    if not credential.refresh_token and credential.grant == Grant.AUTHORIZATION_CODE:
        reason = "the server refused the access token (HTTP 401) and there is no refresh token."
        credential.mark_needs_reconnect(reason)
        raise NeedsReconnect(credential.server.name, reason)
    return credential.renew(version)


def _mark_needs_reconnect(pk, reason):
    OAuthCredential.objects.select_related("server").get(pk=pk).mark_needs_reconnect(reason)


def _record_step_up(pk, scope):
    OAuthCredential.objects.get(pk=pk).record_step_up(scope)
