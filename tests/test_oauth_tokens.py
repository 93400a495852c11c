"""Keeping an OAuth server's tokens fresh: renewal before expiry (rotating refresh tokens), two
workers renewing at once, a token the server refuses, a revoked grant ("needs reconnecting"),
step-up on `insufficient_scope`, and no token in any page or log line.

Tests that let a call meet a 401 are transactional: the renewal runs in a thread of its own
(with its own database connection), as it does in a worker. The sync that connecting asks a
worker for is run by the test itself (`syncs_kept_here`): the session's worker, once started,
would otherwise run it in the background while the test counts renewals and requests.
"""

import logging
import threading

import pytest
from django.db import connection

from approvals.models import ToolCall
from integrations.models import Agent, ApprovalMode, McpServer
from integrations.oauth import OAuthCredential, credential_for
from tests.conftest import wait_until
from tests.oauth_servers import (
    READ,
    WRITE,
    authorization_url,
    come_back,
    connect,
    sign_in,
    start_oauth_world,
)  # fmt: skip


@pytest.fixture(autouse=True)
def _toolgate_site(settings, syncs_kept_here):
    settings.SITE_URL = "http://testserver"
    settings.OAUTH_REFRESH_MARGIN = 120


def connected(admin_client, mcp_factory, **auth_options):
    auth, mcp = start_oauth_world(mcp_factory, **auth_options)
    server, _ = connect(admin_client, mcp, approval_mode="no_approval")
    assert server.sync_tools().ok  # the sync the callback asked a worker for
    return auth, mcp, McpServer.objects.get(pk=server.pk)


def approved_call(server, tool="echo", arguments=None):
    agent = Agent.objects.filter(name="bot").first() or Agent.create_with_token("bot", [server])[0]
    tool = server.tools.get(name=tool)
    return ToolCall.objects.create(
        agent=agent, server=server, tool=tool, server_name=server.name, tool_name=tool.name,
        tool_fingerprint=tool.fingerprint, arguments=arguments or {"text": "hi"},
        status="approved", decided_by="auto",
    )  # fmt: skip


@pytest.mark.django_db
def test_it_renews_an_expiring_token_before_using_it(admin_client, mcp_factory):
    # Tokens live 60 s and are renewed 120 s before they expire: every use renews.
    auth, mcp, server = connected(admin_client, mcp_factory, access_lifetime=60)
    first = OAuthCredential.objects.get(server=server)
    # Connecting made version 1; the sync right after found it expiring and renewed it.
    assert first.version == 2 and first.last_refreshed_at is not None
    (first_refresh,) = auth.grants("refresh_token")
    assert first_refresh.form["refresh_token"] == auth.issued_refresh_tokens[0]
    assert first_refresh.form["resource"] == mcp.url

    assert server.sync_tools().ok
    renewed = OAuthCredential.objects.get(server=server)
    assert renewed.version == 3 and renewed.last_refreshed_at is not None
    # The rotated refresh token was kept and spent next; the old ones were never reused.
    assert auth.grants("refresh_token")[1].form["refresh_token"] == auth.issued_refresh_tokens[1]
    assert renewed.refresh_token == auth.issued_refresh_tokens[2]
    assert auth.reuse_detected == 0
    assert mcp.tokens_seen[-1] == renewed.access_token == auth.issued_access_tokens[-1]


@pytest.mark.django_db
def test_a_fresh_token_is_used_as_it_is(admin_client, mcp_factory):
    auth, _mcp, server = connected(admin_client, mcp_factory)
    assert server.sync_tools().ok
    assert auth.grants("refresh_token") == []
    assert OAuthCredential.objects.get(server=server).version == 1


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_two_workers_renewing_at_once_spend_the_refresh_token_once(admin_client, mcp_factory):
    auth, _mcp, server = connected(admin_client, mcp_factory)
    OAuthCredential.objects.filter(server=server).update(expires_at="2000-01-01T00:00:00Z")
    auth.token_delay = 1.0  # the winner is still renewing when the other one arrives
    start, results, errors = threading.Barrier(2), [], []

    def worker():
        try:
            start.wait()
            results.append(credential_for(server).usable().access_token)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(auth.grants("refresh_token")) == 1
    assert auth.reuse_detected == 0
    assert results == [auth.issued_access_tokens[-1]] * 2
    credential = OAuthCredential.objects.get(server=server)
    assert credential.version == 2 and not credential.needs_reconnect
    assert credential.renewal_claim == ""


@pytest.mark.django_db(transaction=True)
def test_a_token_the_server_refuses_is_renewed_and_the_call_runs(admin_client, mcp_factory):
    auth, mcp, server = connected(admin_client, mcp_factory)
    auth.forget_access_tokens()  # valid for another hour by its expiry, refused by the server
    call = approved_call(server)
    assert call.run() is False
    call.refresh_from_db()
    assert call.status == "succeeded" and call.result_content[0]["text"] == "hi"
    assert len(auth.grants("refresh_token")) == 1
    assert mcp.tokens_seen[-1] == OAuthCredential.objects.get(server=server).access_token


@pytest.mark.django_db(transaction=True)
def test_a_revoked_grant_needs_reconnecting_and_fails_calls_at_once(admin_client, mcp_factory):
    auth, mcp, server = connected(admin_client, mcp_factory)
    auth.revoke_everything()
    call = approved_call(server)
    assert call.run() is False  # not to be retried
    call.refresh_from_db()
    assert call.status == "failed" and call.error_code == "needs_reconnect"
    assert call.error_message.startswith("files needs reconnecting: The token endpoint refused")
    assert "invalid_grant" in call.error_message
    credential = OAuthCredential.objects.get(server=server)
    assert credential.needs_reconnect and credential.state_label == "Needs reconnecting"

    seen = len(mcp.running.requests)
    second = approved_call(server)
    assert second.run() is False
    second.refresh_from_db()
    assert second.error_code == "needs_reconnect" and second.attempts == 1
    assert len(mcp.running.requests) == seen  # nothing was sent to the server
    result = server.sync_tools()
    assert not result.ok and "needs reconnecting" in result.error

    page = admin_client.get(f"/admin/integrations/mcpserver/{server.pk}/change/").content.decode()
    assert "Needs reconnecting" in page and "Reconnect" in page
    listing = admin_client.get("/admin/integrations/mcpserver/").content.decode()
    assert "Needs reconnecting" in listing

    response = admin_client.post(f"/admin/integrations/mcpserver/{server.pk}/oauth-connect/")
    come_back(admin_client, sign_in(authorization_url(response)))
    assert OAuthCredential.objects.get(server=server).is_connected
    assert approved_call(server).run() is False
    assert ToolCall.objects.order_by("-pk").first().status == "succeeded"


@pytest.mark.django_db
def test_an_expired_token_without_a_refresh_token_needs_reconnecting(admin_client, mcp_factory):
    auth, _mcp, server = connected(admin_client, mcp_factory, issue_refresh=False)
    OAuthCredential.objects.filter(server=server).update(expires_at="2000-01-01T00:00:00Z")
    result = server.sync_tools()
    assert not result.ok and "gave no refresh token" in result.error
    assert auth.grants("refresh_token") == []


@pytest.mark.django_db
def test_an_unreachable_authorization_server_fails_the_attempt_only(admin_client, mcp_factory):
    _auth, _mcp, server = connected(admin_client, mcp_factory)
    credential = OAuthCredential.objects.get(server=server)
    metadata = {**credential.metadata, "token_endpoint": "http://127.0.0.1:9/token"}
    OAuthCredential.objects.filter(pk=credential.pk).update(
        metadata=metadata, expires_at="2000-01-01T00:00:00Z"
    )
    call = approved_call(server)
    assert call.run() is True  # the request never left Toolgate: retried later
    call.refresh_from_db()
    assert call.status == "approved" and call.attempts == 1
    credential.refresh_from_db()
    assert not credential.needs_reconnect and credential.renewal_claim == ""


@pytest.mark.django_db(transaction=True)
def test_insufficient_scope_asks_for_a_reconnect_with_the_wider_scope(admin_client, mcp_factory):
    auth, _mcp, server = connected(admin_client, mcp_factory)
    assert OAuthCredential.objects.get(server=server).granted_scope == READ
    call = approved_call(server, "delete_file", {"path": "/tmp/x"})
    assert call.run() is False
    call.refresh_from_db()
    assert call.status == "failed" and call.error_code == "insufficient_scope"
    assert f"({READ} {WRITE})" in call.error_message
    credential = OAuthCredential.objects.get(server=server)
    assert credential.step_up_scope == f"{READ} {WRITE}" and credential.is_connected

    page = admin_client.get(f"/admin/integrations/mcpserver/{server.pk}/change/").content.decode()
    assert "The server asks for a wider scope" in page and f"{READ} {WRITE}" in page

    response = admin_client.post(f"/admin/integrations/mcpserver/{server.pk}/oauth-connect/")
    come_back(admin_client, sign_in(authorization_url(response)))
    assert auth.authorize_requests[-1].scopes == [READ, WRITE]
    credential.refresh_from_db()
    assert credential.granted_scope == f"{READ} {WRITE}" and credential.step_up_scope == ""
    again = approved_call(server, "delete_file", {"path": "/tmp/x"})
    again.run()
    again.refresh_from_db()
    assert again.status == "succeeded" and again.result_content[0]["text"] == "deleted /tmp/x"


@pytest.mark.django_db(transaction=True)
def test_no_token_or_secret_reaches_a_page_or_a_log_line(admin_client, mcp_factory, caplog):
    caplog.set_level(logging.DEBUG)
    auth, _mcp, server = connected(admin_client, mcp_factory, access_lifetime=60)
    auth.preregister("other", "never-shown-secret")
    auth.forget_access_tokens()
    approved_call(server).run()
    auth.revoke_everything()
    approved_call(server).run()
    server.sync_tools()
    pages = [
        admin_client.get(f"/admin/integrations/mcpserver/{server.pk}/change/"),
        admin_client.get("/admin/integrations/mcpserver/"),
        admin_client.get(f"/admin/integrations/mcpserver/{server.pk}/sync-status/"),
        admin_client.get("/approvals/history/"),
    ]
    credential = OAuthCredential.objects.get(server=server)
    secrets = [*auth.all_secrets(), credential.client_secret]
    assert len(secrets) > 5
    text = caplog.text + "".join(p.content.decode() for p in pages)
    text += "".join(c.error_message for c in ToolCall.objects.all()) + server.last_error
    for secret in secrets:
        assert secret not in text
    assert "needs reconnecting" in caplog.text  # the logs do say what happened


@pytest.mark.django_db
@pytest.mark.parametrize("change", ["client", "url"])
def test_a_new_client_or_url_drops_the_tokens_until_a_reconnect(admin_client, mcp_factory, change):
    from tests.oauth_servers import add_form

    auth, mcp, server = connected(admin_client, mcp_factory)
    auth.preregister("new-client", "s3cr3t-value")
    url, overrides = "", {"oauth_client_id": "new-client", "oauth_client_secret": "s3cr3t-value"}
    if change == "url":
        url, overrides = mcp.url.replace("127.0.0.1", "localhost"), {}
    data = add_form(url, approval_mode=ApprovalMode.NO_APPROVAL, **overrides)
    response = admin_client.post(f"/admin/integrations/mcpserver/{server.pk}/change/", data)
    assert response.status_code == 302
    credential = OAuthCredential.objects.get(server=server)
    what = "URL" if change == "url" else "OAuth settings"
    assert credential.reconnect_reason == f"Its {what} changed."
    assert not credential.access_token and not credential.refresh_token
    seen = len(mcp.tokens_seen)
    assert not McpServer.objects.get(pk=server.pk).sync_tools().ok
    assert len(mcp.tokens_seen) == seen  # the old token went nowhere


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_the_worker_runs_calls_with_fresh_tokens_until_the_grant_is_revoked(
    celery_worker, admin_client, mcp_factory
):
    from approvals.models import request_tool_call

    # Tokens live 60 s, the worker renews 120 s ahead: each of its calls renews first.
    auth, mcp, server = connected(admin_client, mcp_factory, access_lifetime=60)
    agent = Agent.create_with_token("bot", [server])[0]
    renewals = len(auth.grants("refresh_token"))

    def final(call):
        return wait_until(lambda: ToolCall.objects.get(pk=call.pk).is_final and call, 60)

    call, _ = request_tool_call(agent, "files", "echo", {"text": "hi"})
    final(call)
    call.refresh_from_db()
    assert call.status == "succeeded" and call.result_content[0]["text"] == "hi"
    assert len(auth.grants("refresh_token")) > renewals and auth.reuse_detected == 0
    assert mcp.tokens_seen[-1] == OAuthCredential.objects.get(server=server).access_token

    auth.revoke_everything()
    call, _ = request_tool_call(agent, "files", "echo", {"text": "again"})
    final(call)
    call.refresh_from_db()
    assert call.status == "failed" and call.error_code == "needs_reconnect"
    assert call.attempts == 1  # not retried
    assert OAuthCredential.objects.get(server=server).needs_reconnect


@pytest.mark.django_db(transaction=True)
def test_needing_a_reconnect_is_announced_once(admin_client, mcp_factory):
    from approvals.notifications import Delivery, NotificationChannel

    hook = NotificationChannel.objects.create(
        name="ops", kind="webhook", url="https://hooks.example/x", secret="s" * 20
    )
    auth, _mcp, server = connected(admin_client, mcp_factory)
    auth.revoke_everything()
    for _ in range(2):
        approved_call(server).run()
    for _ in range(4):
        assert not server.sync_tools().ok
    (delivery,) = Delivery.objects.filter(channel=hook)
    assert delivery.event == "server.sync_failing" and delivery.summary == "files"
    server.refresh_from_db()
    assert server.last_error.startswith("files needs reconnecting: The token endpoint refused")

    response = admin_client.post(f"/admin/integrations/mcpserver/{server.pk}/oauth-connect/")
    come_back(admin_client, sign_in(authorization_url(response)))
    assert server.sync_tools().ok and McpServer.objects.get(pk=server.pk).sync_failures == 0
