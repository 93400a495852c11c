"""Connecting an OAuth 2.1 MCP server from the admin: discovery, the client Toolgate signs in
as (dynamic registration, its metadata document, a pre-registered client), the sign-in's
`state` and `iss`, and the connection guard on the authorization server's endpoints.

The authorization server and the MCP server are real (tests/oauth_servers.py); the admin's
browser at the authorization server is played by an HTTP client (`sign_in`), and its visit
to Toolgate's callback by the Django test client with the admin's session.
"""

from urllib.parse import parse_qsl, urlsplit

import pytest
from django.test import Client

from integrations.models import McpServer
from integrations.oauth import OAuthAuthorization, OAuthCredential
from tests.oauth_servers import (
    CALLBACK,
    READ,
    SCOPES,
    add_form,
    add_server,
    authorization_url,
    basic_credentials,
    come_back,
    connect,
    sign_in,
    start_oauth_world,
)  # fmt: skip

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _toolgate_site(settings):
    settings.SITE_URL = "http://testserver"


def test_it_connects_with_dynamic_registration_and_syncs_with_the_token(admin_client, mcp_factory):
    auth, mcp = start_oauth_world(mcp_factory)
    authorization_url = add_server(admin_client, mcp.url)
    assert McpServer.objects.get().sync_state == "idle"  # no sync before the sign-in

    query = dict(parse_qsl(urlsplit(authorization_url).query))
    assert authorization_url.startswith(f"{auth.issuer}/authorize?")
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
    assert query["resource"] == mcp.url  # RFC 8707: the token is for this server only
    assert query["scope"] == READ  # what the server's 401 challenge asked for
    assert query["redirect_uri"] == CALLBACK
    assert len(query["state"]) >= 43
    assert [r.redirect_uris[0].unicode_string() for r in auth.registrations] == [CALLBACK]

    response = come_back(admin_client, sign_in(authorization_url))
    server = McpServer.objects.get(name="files")
    assert response.status_code == 302
    assert response["Location"] == f"/admin/integrations/mcpserver/{server.pk}/change/"
    credential = OAuthCredential.objects.get(server=server)
    assert credential.is_connected and credential.granted_scope == READ
    assert credential.client_source == "dynamic"
    (exchange,) = auth.grants("authorization_code")
    assert exchange.form["code_verifier"] and exchange.form["resource"] == mcp.url
    assert server.sync_state == "queued"

    assert server.sync_tools().ok
    assert server.tools.count() == 5
    assert mcp.tokens_seen[-1] == credential.access_token

    page = admin_client.get(response["Location"]).content.decode()
    assert "Connected" in page and "by boss" in page and READ in page
    assert "Registered dynamically" in page and auth.issuer in page
    for secret in auth.all_secrets():
        assert secret not in page


def test_it_reuses_its_registration_on_reconnect(admin_client, mcp_factory):
    auth, mcp = start_oauth_world(mcp_factory)
    server, _ = connect(admin_client, mcp)
    response = admin_client.post(f"/admin/integrations/mcpserver/{server.pk}/oauth-connect/")
    come_back(admin_client, sign_in(authorization_url(response)))
    assert len(auth.registrations) == 1
    assert len(auth.grants("authorization_code")) == 2
    assert OAuthCredential.objects.get(server=server).version == 2


def test_it_signs_in_as_a_pre_registered_client(admin_client, mcp_factory):
    auth, mcp = start_oauth_world(mcp_factory)
    auth.preregister("toolgate-prod", "pre-secret-123", redirect_uri=CALLBACK)
    server, _ = connect(
        admin_client, mcp, oauth_client_id="toolgate-prod", oauth_client_secret="pre-secret-123"
    )
    assert auth.registrations == []
    (exchange,) = auth.grants("authorization_code")
    assert basic_credentials(exchange.authorization) == ("toolgate-prod", "pre-secret-123")
    assert auth.authorize_requests[0].redirect_uri.unicode_string() == CALLBACK
    credential = OAuthCredential.objects.get(server=server)
    assert credential.is_connected and credential.client_source == "pre_registered"
    page = admin_client.get(f"/admin/integrations/mcpserver/{server.pk}/change/").content.decode()
    assert "pre-secret-123" not in page and "A client secret is stored" in page


def test_it_identifies_itself_with_its_client_metadata_document(
    admin_client, mcp_factory, settings
):
    settings.SITE_URL = "https://toolgate.example"
    settings.ALLOWED_HOSTS = ["toolgate.example", "testserver"]
    document_url = "https://toolgate.example/oauth/client-metadata.json"

    def fetch(url):  # the authorization server fetching Toolgate's document over HTTPS
        assert url == document_url
        response = Client().get(urlsplit(url).path, secure=True, HTTP_HOST="toolgate.example")
        return response.json() if response.status_code == 200 else None

    auth, mcp = start_oauth_world(mcp_factory, metadata_documents=True, fetch_document=fetch)
    authorization_url = add_server(admin_client, mcp.url)
    assert dict(parse_qsl(urlsplit(authorization_url).query))["client_id"] == document_url
    callback = urlsplit(sign_in(authorization_url))
    assert f"https://{callback.netloc}{callback.path}" == "https://toolgate.example/oauth/callback/"
    response = admin_client.get(
        f"{callback.path}?{callback.query}", secure=True, HTTP_HOST="toolgate.example"
    )
    assert response.status_code == 302
    assert auth.registrations == [] and auth.documents_fetched
    credential = OAuthCredential.objects.get()
    assert credential.is_connected and credential.client_source == "metadata_document"
    assert credential.client_id == document_url


def test_it_serves_its_client_metadata_document(client, settings):
    settings.SITE_URL = "https://toolgate.example/"
    document = client.get("/oauth/client-metadata.json").json()
    assert document == {
        "client_id": "https://toolgate.example/oauth/client-metadata.json",
        "client_name": "Toolgate",
        "client_uri": "https://toolgate.example/",
        "redirect_uris": ["https://toolgate.example/oauth/callback/"],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
        "application_type": "web",
    }


def test_it_refuses_an_unknown_state_and_changes_nothing(admin_client, mcp_factory):
    auth, mcp = start_oauth_world(mcp_factory)
    callback = urlsplit(sign_in(add_server(admin_client, mcp.url)))
    query = dict(parse_qsl(callback.query))
    query["state"] = "x" * 43
    response = admin_client.get(callback.path, query)
    assert response.status_code == 400
    assert "unknown, was already used, or has expired" in response.content.decode()
    assert auth.grants("authorization_code") == []
    assert not OAuthCredential.objects.get().access_token
    assert OAuthAuthorization.objects.get().status == "pending"  # the real one still works
    assert come_back(admin_client, callback.geturl()).status_code == 302
    assert OAuthCredential.objects.get().is_connected


def test_a_state_works_once(admin_client, mcp_factory):
    auth, mcp = start_oauth_world(mcp_factory)
    callback = sign_in(add_server(admin_client, mcp.url))
    assert come_back(admin_client, callback).status_code == 302
    again = come_back(admin_client, callback)
    assert again.status_code == 400
    assert len(auth.grants("authorization_code")) == 1


def test_it_refuses_a_callback_in_another_session(admin_client, admin_user, mcp_factory):
    auth, mcp = start_oauth_world(mcp_factory)
    callback = sign_in(add_server(admin_client, mcp.url))
    other = Client()
    other.force_login(admin_user)  # the same admin, another browser
    response = come_back(other, callback)
    assert response.status_code == 403
    assert "another browser session" in response.content.decode()
    assert come_back(Client(), callback).status_code == 403  # nobody logged in
    assert auth.grants("authorization_code") == []
    assert come_back(admin_client, callback).status_code == 302  # the admin's own still works


def test_it_refuses_an_answer_from_another_issuer(admin_client, mcp_factory):
    auth, mcp = start_oauth_world(mcp_factory, iss="wrong")
    _server, response = connect(admin_client, mcp)
    assert auth.grants("authorization_code") == []  # the code never went anywhere
    assert not OAuthCredential.objects.get().access_token
    messages = admin_client.get(response["Location"]).content.decode()
    assert "its `iss` does not match" in messages
    assert OAuthAuthorization.objects.get().status == "failed"


def test_it_refuses_a_missing_iss_the_server_promised(admin_client, mcp_factory):
    auth, mcp = start_oauth_world(mcp_factory, iss="promised_but_missing")
    connect(admin_client, mcp)
    assert auth.grants("authorization_code") == []
    assert OAuthAuthorization.objects.get().status == "failed"


def test_a_missing_iss_is_fine_when_the_server_never_promised_one(admin_client, mcp_factory):
    _auth, mcp = start_oauth_world(mcp_factory, iss="missing")
    server, _ = connect(admin_client, mcp)  # RFC 9207 §2.4
    assert OAuthCredential.objects.get(server=server).is_connected


def test_a_denied_consent_says_so(admin_client, mcp_factory):
    _auth, mcp = start_oauth_world(mcp_factory)
    callback = sign_in(add_server(admin_client, mcp.url), approve=False)
    response = come_back(admin_client, callback)
    page = admin_client.get(response["Location"]).content.decode()
    assert "did not grant access: access_denied" in page
    assert not OAuthCredential.objects.get().access_token


def test_it_refuses_a_token_endpoint_on_a_private_address(admin_client, mcp_factory, settings):
    # The MCP and authorization servers stand for public hosts (127.0.0.1 is allowed as if it
    # were one); the token endpoint the metadata names is on another loopback address.
    settings.MCP_EXTRA_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    auth, mcp = start_oauth_world(mcp_factory, token_endpoint="http://127.0.0.2:8765/token")
    server, response = connect(admin_client, mcp, allow_private_network=None)
    assert not server.allow_private_network
    page = admin_client.get(response["Location"]).content.decode()
    assert "Refused to connect to the token endpoint at 127.0.0.2" in page
    assert auth.token_requests == []
    assert not OAuthCredential.objects.get().access_token


def test_it_refuses_an_authorization_server_without_pkce(admin_client, mcp_factory):
    auth, mcp = start_oauth_world(mcp_factory, pkce=False)
    response = admin_client.post("/admin/integrations/mcpserver/add/", add_form(mcp.url))
    page = admin_client.get(response["Location"]).content.decode()
    assert "PKCE" in page
    assert auth.authorize_requests == []


def test_it_refuses_an_authorization_server_named_by_another_issuer(admin_client, mcp_factory):
    auth, mcp = start_oauth_world(mcp_factory)
    response = admin_client.post(
        "/admin/integrations/mcpserver/add/",
        add_form(mcp.url, oauth_issuer="https://login.example.com"),
    )
    page = admin_client.get(response["Location"]).content.decode()
    assert "not the one configured (https://login.example.com)" in page
    assert auth.authorize_requests == []


def test_the_connect_button_needs_a_post_with_csrf(admin_user, mcp_factory):
    auth, mcp = start_oauth_world(mcp_factory)
    server = McpServer.objects.create(name="files", url=mcp.url, auth_kind="oauth")
    OAuthCredential.objects.create(server=server)
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(admin_user)
    url = f"/admin/integrations/mcpserver/{server.pk}/oauth-connect/"
    assert browser.get(url).status_code == 405
    assert browser.post(url).status_code == 403
    assert auth.authorize_requests == []


def test_scopes_the_admin_gives_are_the_ones_asked_for(admin_client, mcp_factory):
    _auth, mcp = start_oauth_world(mcp_factory)
    authorization_url = add_server(admin_client, mcp.url, oauth_scope="  files:read   files:write ")
    assert dict(parse_qsl(urlsplit(authorization_url).query))["scope"] == " ".join(SCOPES)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda body: {**body, "token_type": "DPoP"}, "not a Bearer token response"),
        (lambda body: {**body, "access_token": "bad token\r\nX-Evil: 1"}, "cannot use"),
        (lambda body: {**body, "expires_in": -5}, "impossible expiry"),
    ],
)
def test_it_refuses_tokens_it_could_not_use_safely(admin_client, mcp_factory, tamper, message):
    _auth, mcp = start_oauth_world(mcp_factory, tamper_tokens=tamper)
    _server, response = connect(admin_client, mcp)
    assert message in admin_client.get(response["Location"]).content.decode()
    assert not OAuthCredential.objects.get().access_token


def test_it_connects_and_syncs_a_server_over_sse(admin_client, mcp_factory):
    _auth, mcp = start_oauth_world(mcp_factory, "sse")
    server, _ = connect(admin_client, mcp, transport="sse")
    assert server.sync_tools().ok
    assert server.server_info["transport"] == "sse"
    # The opening GET and every message POST carried the token.
    assert set(mcp.tokens_seen) == {OAuthCredential.objects.get().access_token}
    assert len(mcp.tokens_seen) >= 3


def test_someone_who_may_only_view_sees_the_state_without_the_button(
    admin_client, django_user_model, mcp_factory
):
    from django.contrib.auth.models import Permission

    auth, mcp = start_oauth_world(mcp_factory)
    server, _ = connect(admin_client, mcp)
    viewer = django_user_model.objects.create_user(
        "viewer", password="pw-viewer-123", is_staff=True
    )
    viewer.user_permissions.add(Permission.objects.get(codename="view_mcpserver"))
    browser = Client()
    browser.force_login(viewer)
    page = browser.get(f"/admin/integrations/mcpserver/{server.pk}/change/").content.decode()
    assert "Connected" in page and f"Scopes granted: {READ}" in page
    assert "Reconnect" not in page and 'id="oauth-connect"' not in page
    assert (
        browser.post(f"/admin/integrations/mcpserver/{server.pk}/oauth-connect/").status_code == 403
    )
    for secret in auth.all_secrets():
        assert secret not in page


def test_it_finds_the_metadata_at_the_well_known_paths(admin_client, mcp_factory):
    # No resource_metadata in the challenge: RFC 9728's path-based URL, then OpenID discovery
    # for an authorization server that publishes only that.
    auth, mcp = start_oauth_world(mcp_factory, hint_metadata=False, openid_only=True)
    server, _ = connect(admin_client, mcp)
    assert OAuthCredential.objects.get(server=server).is_connected
    paths = [request.path for request in mcp.running.requests]
    assert "/.well-known/oauth-protected-resource/mcp" in paths
    assert auth.grants("authorization_code")


def test_a_server_without_oauth_metadata_gets_a_clear_error(admin_client, mcp_demo_http):
    response = admin_client.post("/admin/integrations/mcpserver/add/", add_form(mcp_demo_http.url))
    page = admin_client.get(response["Location"]).content.decode()
    assert "No OAuth authorization server metadata found for http://127.0.0.1:" in page
    assert "does not seem to support OAuth" in page


def test_the_admin_log_names_the_client_secret_without_showing_it(admin_client, mcp_factory):
    from django.contrib.admin.models import LogEntry

    auth, mcp = start_oauth_world(mcp_factory)
    auth.preregister("toolgate-prod", "pre-secret-123", redirect_uri=CALLBACK)
    connect(
        admin_client, mcp, oauth_client_id="toolgate-prod", oauth_client_secret="pre-secret-123"
    )
    (entry,) = LogEntry.objects.all()
    assert "client secret (optional) (not shown)" in entry.change_message.lower()
    assert "toolgate-prod" in entry.change_message
    assert "pre-secret-123" not in entry.change_message
