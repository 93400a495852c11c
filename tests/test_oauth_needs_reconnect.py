"""An OAuth server whose grant was refused ("needs reconnecting") in the policy: calls to it are
refused with `needs_reconnect` (503) and nothing is sent; its tools stay listed, marked
unavailable, in the JSON API and the MCP `_meta`; a pending call stays pending, its card says
why, and an approval is refused until an admin reconnects the server."""

import json

import pytest
from django.contrib.auth.models import Group, User
from django.utils import timezone

from approvals.mcp.tools import mcp_tool, served_tools
from approvals.models import DecidedBy, Status, ToolCall
from integrations.models import Agent, ApprovalMode, McpServer, Tool
from integrations.oauth import OAuthCredential

pytestmark = pytest.mark.django_db

REASON = "The token endpoint refused (HTTP 400): invalid_grant (refresh token revoked)."
LOOKUP = {"name": "lookup", "inputSchema": {"type": "object"}}


@pytest.fixture
def files():
    """An OAuth server with one reviewed tool, connected; `refuse(files)` breaks its grant."""
    server = McpServer.objects.create(
        name="files", url="https://files.example/mcp", auth_kind="oauth",
        approval_mode=ApprovalMode.NO_APPROVAL,
    )  # fmt: skip
    OAuthCredential.objects.create(server=server, access_token="at-1", refresh_token="rt-1")
    Tool.objects.create_from_definition(server, LOOKUP, timezone.now())
    return server


@pytest.fixture
def token(files):
    return Agent.create_with_token("bot", [files])[1]


def refuse(server):
    OAuthCredential.objects.get(server=server).mark_needs_reconnect(REASON)


def api(client, token, path, body=None):
    headers = {"Authorization": f"Bearer {token}"}
    if body is None:
        return client.get(path, headers=headers)
    return client.post(path, json.dumps(body), content_type="application/json", headers=headers)


def test_a_call_is_refused_with_the_reason_and_kept_for_the_audit(client, files, token):
    refuse(files)
    body = {"server": "files", "tool": "lookup", "arguments": {}}
    response = api(client, token, "/api/v1/tool-calls", body)
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "needs_reconnect"
    assert "'files' needs reconnecting by an admin" in error["message"]
    assert REASON in error["message"]
    call = ToolCall.objects.get()
    assert call.status == Status.BLOCKED and call.error_code == "needs_reconnect"
    assert [r["code"] for r in call.reasons] == ["needs_reconnect", "no_approval"]


def test_its_tools_stay_listed_and_are_marked_unavailable(client, files, token):
    (listed,) = api(client, token, "/api/v1/tools").json()["tools"]
    assert listed["unavailable"] is None and listed["approval"] == "auto"
    refuse(files)
    (listed,) = api(client, token, "/api/v1/tools").json()["tools"]
    assert listed["name"] == "lookup"
    assert listed["unavailable"]["code"] == "needs_reconnect"
    assert REASON in listed["unavailable"]["message"]
    assert listed["approval"] == "auto"  # what it does again once reconnected

    agent = Agent.objects.get()
    (name, served), *_ = served_tools(agent, "").items()
    meta = mcp_tool(name, served)["_meta"]
    assert meta["toolgate/unavailable"] == listed["unavailable"]


def test_an_mcp_tool_of_a_working_server_has_no_unavailable_mark(files, token):
    (name, served), *_ = served_tools(Agent.objects.get(), "files").items()
    assert "toolgate/unavailable" not in mcp_tool(name, served)["_meta"]


def pending_call(server):
    agent = Agent.objects.get()
    tool = server.tools.get()
    return ToolCall.objects.create(
        agent=agent, server=server, tool=tool, server_name=server.name, tool_name=tool.name,
        tool_fingerprint=tool.fingerprint, arguments={}, status=Status.PENDING_APPROVAL,
        expires_at=timezone.now() + timezone.timedelta(minutes=10),
    )  # fmt: skip


def test_a_pending_call_stays_pending_and_its_card_says_why(client, files, token, admin_user):
    call = pending_call(files)
    refuse(files)
    client.force_login(admin_user)
    page = client.get("/approvals/").content.decode()
    assert 'data-reason="needs_reconnect"' in page and REASON in page
    assert f'href="/admin/integrations/mcpserver/{files.pk}/change/">Reconnect it' in page

    response = client.post(f"/approvals/{call.pk}/decide", {"decision": "approve"}, follow=True)
    assert "needs reconnecting by an admin" in response.content.decode()
    call.refresh_from_db()
    assert call.status == Status.PENDING_APPROVAL  # not cancelled: a reconnect is the way out

    OAuthCredential.objects.filter(server=files).update(reconnect_reason="")  # reconnected
    assert call.approve(admin_user) is True


def test_an_approver_who_may_not_reconnect_is_told_to_ask_an_admin(client, files, token):
    pending_call(files)
    refuse(files)
    alice = User.objects.create_user("alice")
    alice.groups.add(Group.objects.get(name="Approvers"))
    client.force_login(alice)
    page = client.get("/approvals/").content.decode()
    assert "Ask an admin to reconnect it." in page and "/admin/integrations/" not in page


def test_an_admin_action_approval_is_refused_and_leaves_the_call_pending(
    admin_client, files, token
):
    call = pending_call(files)
    refuse(files)
    response = admin_client.post(
        "/admin/approvals/toolcall/",
        {"action": "approve", "_selected_action": [call.pk]},
        follow=True,
    )
    assert "needs reconnecting by an admin" in response.content.decode()
    assert ToolCall.objects.get(pk=call.pk).status == Status.PENDING_APPROVAL


def test_an_approved_call_fails_at_once_without_a_request(files, token):
    call = pending_call(files)
    ToolCall.objects.filter(pk=call.pk).update(status=Status.APPROVED, decided_by=DecidedBy.AUTO)
    refuse(files)
    call.refresh_from_db()
    assert call.run() is False  # not retried; files.example is never asked
    call.refresh_from_db()
    assert call.status == Status.FAILED and call.error_code == "needs_reconnect"
    assert call.attempts == 1


def test_the_admin_labels_say_what_happens_once_reconnected(admin_client, files):
    refuse(files)
    page = admin_client.get(f"/admin/integrations/mcpserver/{files.pk}/change/").content.decode()
    assert "Needs reconnecting, then runs without asking" in page
    assert "Reconnect" in page
