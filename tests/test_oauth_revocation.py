"""Deleting an OAuth server (or switching it away from OAuth) revokes its tokens at the
authorization server (RFC 7009), best effort: after the delete has committed, in a worker
task that carries only a primary key, and never in the way of the delete."""

import logging

import httpx2
import pytest

from integrations import tasks
from integrations.models import McpServer
from integrations.oauth import OAuthCredential, OAuthRevocation
from tests.oauth_servers import connect, start_oauth_world

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _toolgate_site(settings, monkeypatch):
    settings.SITE_URL = "http://testserver"
    # The revocation a worker would run after commit, run here (and only its pk is queued).
    monkeypatch.setattr(tasks.revoke_oauth_tokens, "delay", tasks.revoke_oauth_tokens)


def refused(mcp, access_token):
    response = httpx2.post(mcp.url, headers={"Authorization": f"Bearer {access_token}"}, json={})
    return response.status_code == 401


def test_deleting_the_server_revokes_its_tokens(
    admin_client, mcp_factory, django_capture_on_commit_callbacks, caplog
):
    caplog.set_level(logging.INFO)
    auth, mcp = start_oauth_world(mcp_factory)
    server, _ = connect(admin_client, mcp)
    credential = OAuthCredential.objects.get(server=server)
    tokens = (credential.access_token, credential.refresh_token)
    assert not refused(mcp, tokens[0])

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            f"/admin/integrations/mcpserver/{server.pk}/delete/", {"post": "yes"}
        )
    assert response.status_code == 302 and not McpServer.objects.exists()
    assert auth.provider.refresh[tokens[1]][1].revoked
    hints = [request["token_type_hint"] for request in auth.revocation_requests]
    assert hints == ["refresh_token", "access_token"]
    assert {request["client_id"] for request in auth.revocation_requests} == {credential.client_id}
    assert refused(mcp, tokens[0])
    assert not OAuthRevocation.objects.exists()  # nothing of the tokens is kept
    assert "Revoked the refresh_token of deleted server files" in caplog.text
    for token in tokens:
        assert token not in caplog.text


def test_switching_away_from_oauth_revokes_the_tokens(
    admin_client, mcp_factory, django_capture_on_commit_callbacks
):
    _auth, mcp = start_oauth_world(mcp_factory)
    server, _ = connect(admin_client, mcp)
    access = OAuthCredential.objects.get(server=server).access_token
    with django_capture_on_commit_callbacks(execute=True):
        OAuthCredential.objects.filter(server=server).delete()
    assert refused(mcp, access)


def test_an_authorization_server_that_fails_never_stops_the_delete(
    admin_client, mcp_factory, django_capture_on_commit_callbacks, caplog
):
    _auth, mcp = start_oauth_world(mcp_factory)
    server, _ = connect(admin_client, mcp)
    credential = OAuthCredential.objects.get(server=server)
    metadata = {**credential.metadata, "revocation_endpoint": "http://127.0.0.1:9/revoke"}
    OAuthCredential.objects.filter(pk=credential.pk).update(metadata=metadata)

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            f"/admin/integrations/mcpserver/{server.pk}/delete/", {"post": "yes"}
        )
    assert response.status_code == 302 and not McpServer.objects.exists()
    assert "Could not revoke the refresh token of deleted server files" in caplog.text
    assert credential.refresh_token not in caplog.text
    assert not OAuthRevocation.objects.exists()


def test_without_a_revocation_endpoint_nothing_is_kept(admin_client, mcp_factory):
    _auth, mcp = start_oauth_world(mcp_factory)
    server, _ = connect(admin_client, mcp)
    credential = OAuthCredential.objects.get(server=server)
    metadata = {k: v for k, v in credential.metadata.items() if k != "revocation_endpoint"}
    OAuthCredential.objects.filter(pk=credential.pk).update(metadata=metadata)
    server.delete()
    assert not OAuthRevocation.objects.exists()
