"""Agents: the token is shown once, only its hash is stored; the admin and the command."""

import io

import pytest
from django.core.management import CommandError, call_command

from approvals.models import Status, ToolCall
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
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    token = response.context["token"]
    agent = Agent.objects.get(name="bot")
    assert agent.token_hash == hash_token(token)
    assert token in response.content.decode()
    page = admin_client.get(f"/admin/integrations/agent/{agent.pk}/change/").content.decode()
    assert token not in page
    assert agent.token_hint in page


def test_rotating_shows_a_new_token_and_retires_the_old(admin_client, server):
    agent = Agent(name="bot")
    old = agent.set_new_token()
    agent.save()
    response = admin_client.post(
        "/admin/integrations/agent/", {"action": "rotate_token", "_selected_action": [agent.pk]}
    )
    new = response.context["token"]
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
