"""Every change to the policy is in Django's admin log with the user who made it, in words a
person can read: server mode and options, tool settings (single, list, bulk), "mark reviewed",
"always allow", rules and agent grants; from the admin, the queue and the commands."""

import io

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Group, Permission, User
from django.core.management import call_command
from django.utils import timezone

from approvals.models import request_tool_call
from approvals.rules import PolicyRule
from integrations.models import Agent, McpServer, Tool
from tests.test_server_admin import form_data

pytestmark = pytest.mark.django_db


@pytest.fixture
def server():
    server = McpServer.objects.create(
        name="crm", url="https://crm.example/mcp/KEY-IN-PATH", secret_token="TOKEN-SECRET"
    )
    for name in ("lookup", "delete"):
        Tool.objects.create_from_definition(
            server, {"name": name, "inputSchema": {}}, timezone.now()
        )
    return server


def messages_about(obj):
    entries = LogEntry.objects.filter(
        object_id=str(obj.pk), content_type__model=obj._meta.model_name
    )
    return [(entry.user.username, entry.get_change_message()) for entry in entries.order_by("pk")]


def run(*args):
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=out)
    return out.getvalue()


def test_changing_a_servers_mode_and_options_is_logged_with_old_and_new_values(
    admin_client, server
):
    admin_client.post(
        f"/admin/integrations/mcpserver/{server.pk}/change/",
        form_data(
            name="crm", url="https://crm.example/mcp/NEW-KEY", secret_token="NEW-TOKEN",
            headers_text="", approval_mode="no_approval", personal_data_needs_approval=None,
        ),
    )  # fmt: skip
    ((user, message),) = messages_about(server)
    assert user == "boss"
    assert "Changed approval mode: Always Ask (Recommended) → No Approval." in message
    assert "Changed personal data needs approval: on → off." in message
    assert "Set server url (not shown)." in message and "Set secret token" in message
    for secret in ("NEW-KEY", "NEW-TOKEN", "KEY-IN-PATH", "TOKEN-SECRET"):
        assert secret not in message


def test_a_tool_setting_changed_on_its_page_in_the_list_and_in_bulk_is_logged(admin_client, server):
    lookup, delete = server.tools.get(name="lookup"), server.tools.get(name="delete")
    admin_client.post(f"/admin/integrations/tool/{lookup.pk}/change/", {"approval": "disabled"})
    admin_client.post(
        "/admin/integrations/tool/",
        {
            "form-TOTAL_FORMS": "2", "form-INITIAL_FORMS": "2", "form-0-id": delete.pk,
            "form-0-approval": "auto_approved", "form-1-id": lookup.pk,
            "form-1-approval": "disabled", "_save": "Save",
        },
    )  # fmt: skip
    admin_client.post(
        "/admin/integrations/tool/",
        {"action": "set_requires_approval", "_selected_action": [lookup.pk, delete.pk]},
    )
    assert messages_about(lookup) == [
        ("boss", "Changed approval setting: Requires approval → Disabled."),
        ("boss", "Changed approval setting: Disabled → Requires approval."),
    ]
    assert messages_about(delete) == [
        ("boss", "Changed approval setting: Requires approval → Auto-approved."),
        ("boss", "Changed approval setting: Auto-approved → Requires approval."),
    ]


def test_marking_reviewed_is_logged(admin_client, server):
    tool = server.tools.get(name="lookup")
    Tool.objects.filter(pk=tool.pk).update(fingerprint="f" * 64)
    admin_client.post(
        "/admin/integrations/tool/", {"action": "mark_reviewed", "_selected_action": [tool.pk]}
    )
    assert messages_about(tool) == [("boss", "Marked reviewed (definition ffffffffffff).")]


def test_always_allow_is_logged_as_the_approvers(client, server):
    agent, _ = Agent.create_with_token("bot", [server])
    call, _ = request_tool_call(agent, "crm", "lookup", {})
    alice = User.objects.create_user("alice")
    alice.groups.add(Group.objects.get(name="Approvers"))
    alice.user_permissions.add(Permission.objects.get(codename="add_policyrule"))
    client.force_login(alice)
    client.post(
        f"/approvals/{call.pk}/decide", {"decision": "approve_always", "scope_duration": "day"}
    )
    rule = PolicyRule.objects.get()
    assert messages_about(rule) == [
        ("alice", f"Added by approving call #{call.pk}: allow for agent bot, any arguments, "
         "for a day."),
    ]  # fmt: skip


def test_rules_added_and_changed_in_the_admin_are_logged(admin_client, server):
    admin_client.post(
        "/admin/approvals/policyrule/add/",
        {"server": server.pk, "condition": "args.amount > 100", "action": "ask"},
    )
    rule = PolicyRule.objects.get()
    admin_client.post(
        f"/admin/approvals/policyrule/{rule.pk}/change/",
        {"server": server.pk, "condition": "args.amount > 10", "action": "deny"},
    )
    (added, changed) = messages_about(rule)
    assert "condition: args.amount > 100" in added[1] and "action: Ask a human" in added[1]
    assert changed[1] == (
        "Changed action: Ask a human → Deny (never run). "
        "Changed condition: args.amount > 100 → args.amount > 10."
    )


def test_agent_grants_in_the_admin_are_logged_with_server_names(admin_client, server):
    other = McpServer.objects.create(name="billing", url="https://b.example/mcp")
    agent, _ = Agent.create_with_token("bot", [server])
    admin_client.post(
        f"/admin/integrations/agent/{agent.pk}/change/",
        {"name": "bot", "description": "", "servers": [other.pk], "is_active": "on"},
    )
    assert messages_about(agent) == [("boss", "Changed servers: crm → billing.")]


def test_commands_log_as_the_named_user_or_as_manage_py(server):
    User.objects.create_user("ops")
    run("mcp_tool", "approval", "crm", "lookup", "auto_approved", "--user", "ops")
    Tool.objects.filter(name="delete").update(fingerprint="e" * 64)
    run("mcp_tool", "review", "crm", "delete")
    run("policy_rule", "add", "--server", "crm", "--when", "true", "--action", "deny")
    rule = PolicyRule.objects.get()
    run("policy_rule", "remove", str(rule.pk), "--user", "ops")
    run("agent", "create", "bot", "--server", "crm")
    run("agent", "revoke", "bot", "--server", "crm", "--user", "ops")
    run("agent", "grant", "bot", "--server", "crm")
    run("agent", "deactivate", "bot")
    assert messages_about(server.tools.get(name="lookup")) == [
        ("ops", "Changed approval setting: Requires approval → Auto-approved.")
    ]
    assert messages_about(server.tools.get(name="delete")) == [
        ("manage.py", "Marked reviewed (definition eeeeeeeeeeee).")
    ]
    rule_log = LogEntry.objects.filter(content_type__model="policyrule").order_by("pk")
    assert [(e.user.username, e.get_change_message()) for e in rule_log] == [
        ("manage.py", "Added: deny when true."),
        ("ops", "Deleted: deny when true."),
    ]
    assert messages_about(Agent.objects.get(name="bot")) == [
        ("manage.py", "Added with MCP servers: crm."),
        ("ops", "Revoked MCP servers: crm."),
        ("manage.py", "Granted MCP servers: crm."),
        ("manage.py", "Changed active: on → off."),
    ]
    system = User.objects.get(username="manage.py")
    assert not system.is_active and not system.has_usable_password()


def test_adding_a_server_with_the_command_is_logged_without_its_secrets(mcp_demo_http, monkeypatch):
    monkeypatch.setenv("T", "TOKEN-SECRET-9")
    run(
        "mcp_server", "add", "--name", "demo", "--url", mcp_demo_http.url + "?k=URL-SECRET",
        "--allow-private-network", "--allow-http", "--token-env", "T",
    )  # fmt: skip
    ((user, message),) = messages_about(McpServer.objects.get(name="demo"))
    assert user == "manage.py"
    assert "approval mode: Always Ask (Recommended)" in message
    assert "personal data needs approval: on" in message
    assert "URL-SECRET" not in message and "TOKEN-SECRET-9" not in message


def test_the_admin_shows_the_policy_history(admin_client, server):
    tool = server.tools.get(name="lookup")
    tool.set_approval(User.objects.get(username="boss"), "disabled")
    page = admin_client.get("/admin/admin/logentry/").content.decode()
    assert "Changed approval setting: Requires approval → Disabled." in page
    history = admin_client.get(f"/admin/integrations/tool/{tool.pk}/history/").content.decode()
    assert "Changed approval setting: Requires approval → Disabled." in history
    assert (
        admin_client.post(f"/admin/admin/logentry/{LogEntry.objects.get().pk}/delete/").status_code
        == 403
    )
