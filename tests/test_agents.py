"""Agents: the token is shown once, only its hash is stored; the admin and the command."""

import io

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.test import Client

from approvals.models import Status, ToolCall
from integrations.admin import TokenReveal
from integrations.models import Agent, McpServer, hash_token

pytestmark = pytest.mark.django_db


@pytest.fixture
def server():
    return McpServer.objects.create(name="demo", url="https://mcp.example.com/mcp")


def test_creating_an_agent_in_the_admin_shows_the_token_once(admin_client, server):
    response = admin_client.post(
        "/admin/integrations/agent/add/",
        {"name": "bot", "description": "", "servers": [server.pk], "is_active": "on"},
    )
    agent = Agent.objects.get(name="bot")
    # Post/redirect/get: a reload of the token page can't submit the form again.
    assert response.status_code == 302
    assert response["Location"] == f"/admin/integrations/agent/{agent.pk}/token/"
    assert agent.token_hint not in response["Location"]
    page = admin_client.get(response["Location"])
    assert "no-store" in page["Cache-Control"]
    token = page.context["token"]
    assert agent.token_hash == hash_token(token)
    assert token in page.content.decode()
    assert token not in str(admin_client.session.items())  # encrypted while it waits
    again = admin_client.get(response["Location"]).content.decode()  # a reload
    assert token not in again
    assert "was shown once" in again and "Rotate the API token" in again
    change = admin_client.get(f"/admin/integrations/agent/{agent.pk}/change/").content.decode()
    assert token not in change
    assert agent.token_hint in change
    assert Agent.objects.count() == 1


def test_the_token_page_shows_where_the_agent_connects(admin_client, server, settings):
    settings.SITE_URL = "https://toolgate.example.com"
    other = McpServer.objects.create(name="crm tools", url="https://crm.example.com/mcp")
    response = admin_client.post(
        "/admin/integrations/agent/add/",
        {"name": "bot", "servers": [server.pk, other.pk], "is_active": "on"},
    )
    html = admin_client.get(response["Location"]).content.decode()
    for url in (
        "https://toolgate.example.com/api/v1/",
        "https://toolgate.example.com/mcp/",
        "https://toolgate.example.com/mcp/demo/",
        "https://toolgate.example.com/mcp/crm%20tools/",
    ):
        assert f"<code>{url}</code>" in html
    assert 'data-copy="agent-token"' in html


def test_a_token_waits_only_in_the_session_that_made_it(admin_client, server, client):
    response = admin_client.post(
        "/admin/integrations/agent/add/", {"name": "bot", "servers": [server.pk]}
    )
    other_admin = Client()
    other_admin.force_login(User.objects.create_superuser("other", password="pw-other-123"))
    page = other_admin.get(response["Location"])
    assert page.status_code == 200 and page.context["token"] is None
    assert admin_client.get(response["Location"]).context["token"]  # still there for its maker


def test_a_token_replaced_before_it_was_shown_is_not_shown(admin_client, server):
    response = admin_client.post(
        "/admin/integrations/agent/add/", {"name": "bot", "servers": [server.pk]}
    )
    Agent.objects.get(name="bot").rotate_token()  # e.g. by another admin, or the command
    assert admin_client.get(response["Location"]).context["token"] is None


def test_rotating_shows_a_new_token_and_retires_the_old(admin_client, server):
    agent = Agent(name="bot")
    old = agent.set_new_token()
    agent.save()
    response = admin_client.post(
        "/admin/integrations/agent/", {"action": "rotate_token", "_selected_action": [agent.pk]}
    )
    assert response.status_code == 302
    new = admin_client.get(response["Location"]).context["token"]
    assert new != old
    assert Agent.authenticate(new) == agent
    assert Agent.authenticate(old) is None


def test_the_command_prints_the_token_alone_on_the_last_line(server):
    out = io.StringIO()
    call_command("agent", "create", "bot", "--server", "demo", stdout=out)
    token = out.getvalue().strip().splitlines()[-1]
    agent = Agent.authenticate(token)
    assert agent.name == "bot"
    assert list(agent.servers.all()) == [server]


def test_the_command_refuses_unknown_servers_and_changes_nothing():
    with pytest.raises(CommandError, match="No MCP server named nope"):
        call_command("agent", "create", "bot", "--server", "nope", stdout=io.StringIO())
    assert not Agent.objects.exists()


def test_admins_can_decide_pending_calls_from_the_audit_list(admin_client, server):
    agent = Agent(name="bot")
    agent.set_new_token()
    agent.save()
    call = ToolCall.objects.create(
        agent=agent, server=server, server_name="demo", tool_name="echo",
        status=Status.PENDING_APPROVAL, expires_at="2999-01-01T00:00:00Z",
    )  # fmt: skip
    admin_client.post(
        "/admin/approvals/toolcall/", {"action": "deny", "_selected_action": [call.pk]}
    )
    call.refresh_from_db()
    assert (call.status, call.decided_by) == (Status.DENIED, "human")
    page = admin_client.get(f"/admin/approvals/toolcall/{call.pk}/change/")
    assert page.status_code == 200
    assert b'name="status"' not in page.content  # the audit trail is read-only


def test_a_token_not_fetched_within_five_minutes_is_not_shown(admin_client, server, monkeypatch):
    response = admin_client.post(
        "/admin/integrations/agent/add/", {"name": "bot", "servers": [server.pk]}
    )
    monkeypatch.setattr(TokenReveal, "TTL", 0)  # as if five minutes had passed
    page = admin_client.get(response["Location"])
    assert page.context["token"] is None
    assert "was shown once" in page.content.decode()
