"""The approvers' queue page and history, through the test client."""

from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.test import TestCase
from django.utils import timezone

from approvals.models import DecidedBy, Status, ToolCall
from approvals.rules import PolicyRule
from integrations.models import Agent, ApprovalMode, McpServer, Tool

pytestmark = pytest.mark.django_db


def make_world(mode=ApprovalMode.ALWAYS_ASK):
    server = McpServer.objects.create(name="crm", url="https://crm.example/mcp", approval_mode=mode)
    definition = {
        "name": "send_email",
        "title": "Send e-mail",
        "description": "Sends an e-mail to a customer.",
        "inputSchema": {"type": "object"},
        "annotations": {"destructiveHint": True, "openWorldHint": True},
    }
    tool = Tool.objects.create_from_definition(server, definition, timezone.now())
    agent, _ = Agent.create_with_token("support-bot", [server])
    return server, tool, agent


def pending(agent, server, tool, arguments=None, **kwargs):
    return ToolCall.objects.create(
        agent=agent, server=server, tool=tool, server_name=server.name, tool_name=tool.name,
        tool_fingerprint=tool.fingerprint, arguments=arguments or {"to": "x"},
        status=Status.PENDING_APPROVAL, expires_at=timezone.now() + timedelta(minutes=10),
        **kwargs,
    )  # fmt: skip


def test_anonymous_users_are_sent_to_the_login_page(client):
    response = client.get("/approvals/")
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_users_without_the_permission_get_403(client):
    client.force_login(User.objects.create_user("bob"))
    assert client.get("/approvals/").status_code == 403
    assert client.get("/approvals/history/").status_code == 403


def test_the_login_page_logs_an_approver_in_and_out(client):
    User.objects.create_user("alice", password="pw-alice-123").groups.add(
        Group.objects.get(name="Approvers")
    )
    response = client.post("/accounts/login/", {"username": "alice", "password": "pw-alice-123"})
    assert response["Location"] == "/approvals/"
    assert client.get("/approvals/").status_code == 200
    client.post("/accounts/logout/")
    assert client.get("/approvals/").status_code == 302


def test_superusers_may_decide(admin_client):
    assert admin_client.get("/approvals/").status_code == 200


def test_a_pending_call_shows_everything_needed_to_judge_it(client, approver):
    server, tool, agent = make_world()
    long_value = "y" * 5000
    call = pending(
        agent, server, tool, {"to": "jane.doe@example.com", "body": long_value, "html": "<b>hi</b>"}
    )
    html = client.get("/approvals/").content.decode()
    assert f'data-call-id="{call.pk}"' in html
    for text in (
        "support-bot",
        "crm / send_email",
        "Send e-mail",
        "Sends an e-mail to a customer.",
    ):
        assert text in html
    assert "destructive" in html and "open-world" in html and "Server claims" in html
    assert long_value in html  # nothing truncated
    assert "&lt;b&gt;hi&lt;/b&gt;" in html and "<b>hi</b>" not in html  # escaped
    assert "E-mail address" in html  # personal data warning
    assert "(1) Pending approvals" in html
    assert ">Approve</button>" in html and ">Deny</button>" in html


def test_changed_and_flagged_tools_are_warned_about(client, approver):
    server, tool, agent = make_world()
    Tool.objects.filter(pk=tool.pk).update(
        fingerprint="new",
        warnings=[
            {"code": "hidden_instructions", "message": "Hidden instructions in the description."}
        ],
    )
    pending(agent, server, Tool.objects.get(pk=tool.pk))
    html = client.get("/approvals/").content.decode()
    assert "changed since it was last reviewed" in html
    assert "Hidden instructions in the description." in html


def test_oldest_first_and_filters(client, approver):
    server, tool, agent = make_world()
    other_agent = Agent.objects.create(name="other-bot", token_hash="x" * 64)
    old = pending(agent, server, tool, requested_at=timezone.now() - timedelta(minutes=5))
    new = pending(other_agent, server, tool)
    html = client.get("/approvals/").content.decode()
    assert html.index(f'data-call-id="{old.pk}"') < html.index(f'data-call-id="{new.pk}"')
    filtered = client.get("/approvals/?agent=other-bot").content.decode()
    assert f'data-call-id="{new.pk}"' in filtered and f'data-call-id="{old.pk}"' not in filtered
    assert f'data-call-id="{old.pk}"' not in client.get("/approvals/?tool=nope").content.decode()


def test_approving_enqueues_the_call(client, approver, django_capture_on_commit_callbacks):
    server, tool, agent = make_world()
    call = pending(agent, server, tool)
    with django_capture_on_commit_callbacks() as callbacks:
        response = client.post(
            f"/approvals/{call.pk}/decide", {"decision": "approve", "note": "ok"}
        )
    assert response.status_code == 302
    call.refresh_from_db()
    assert (call.status, call.decided_by_user, call.note) == (Status.APPROVED, approver, "ok")
    assert len(callbacks) == 1


def test_a_deny_note_is_kept(client, approver):
    server, tool, agent = make_world()
    call = pending(agent, server, tool)
    response = client.post(
        f"/approvals/{call.pk}/decide", {"decision": "deny", "note": "wrong customer"},
        headers={"Accept": "application/json"},
    )  # fmt: skip
    assert response.json() == {
        "ok": True, "status": "denied", "final": True, "message": "Denied.", "diff": ""
    }  # fmt: skip
    call.refresh_from_db()
    assert call.note == "wrong customer"


def test_a_second_decision_sees_who_decided(client, approver):
    server, tool, agent = make_world()
    call = pending(agent, server, tool)
    bob = User.objects.create_user("bob")
    call.deny(bob, "no")
    response = client.post(
        f"/approvals/{call.pk}/decide",
        {"decision": "approve"},
        headers={"Accept": "application/json"},
    )
    assert response.status_code == 409
    at = timezone.localtime(ToolCall.objects.get(pk=call.pk).decided_at).strftime("%H:%M:%S")
    assert response.json()["message"] == f"Denied by bob at {at}: no."
    assert ToolCall.objects.get(pk=call.pk).status == Status.DENIED


def test_a_decision_after_expiry_is_refused_with_a_clear_message(client, approver):
    server, tool, agent = make_world()
    call = pending(agent, server, tool)
    ToolCall.objects.filter(pk=call.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    response = client.post(f"/approvals/{call.pk}/decide", {"decision": "approve"}, follow=True)
    assert "expired before a decision" in response.content.decode()
    assert ToolCall.objects.get(pk=call.pk).status == Status.EXPIRED


def test_approve_and_always_allow_needs_the_permission_to_add_rules(client, approver):
    server, tool, agent = make_world(mode=ApprovalMode.FINE_GRAINED)
    call = pending(agent, server, tool)
    assert "always allow" not in client.get("/approvals/").content.decode()  # no permission
    assert (
        client.post(f"/approvals/{call.pk}/decide", {"decision": "approve_always"}).status_code
        == 403
    )
    approver.user_permissions.add(Permission.objects.get(codename="add_policyrule"))
    assert "Approve and always allow" in client.get("/approvals/").content.decode()
    client.post(f"/approvals/{call.pk}/decide", {"decision": "approve_always"})
    rule = PolicyRule.objects.get()
    assert (rule.tool, rule.agent, rule.condition, rule.action) == (tool, agent, "true", "allow")
    assert rule.created_by == approver and rule.created_from_call_id == call.pk
    assert ToolCall.objects.get(pk=call.pk).status == Status.APPROVED
    assert Tool.objects.get(pk=tool.pk).approval == "requires_approval"  # the rule, not the tool


def test_always_allow_is_not_offered_where_it_would_change_nothing(admin_client):
    server, tool, agent = make_world(mode=ApprovalMode.ALWAYS_ASK)
    Tool.objects.filter(pk=tool.pk).update(fingerprint="changed")  # needs review: asks anyway
    call = pending(agent, server, Tool.objects.get(pk=tool.pk))
    assert "always allow" not in admin_client.get("/approvals/").content.decode()
    response = admin_client.post(
        f"/approvals/{call.pk}/decide", {"decision": "approve_always"},
        headers={"Accept": "application/json"},
    )  # fmt: skip
    assert response.status_code == 422
    assert "would not change" in response.json()["message"]
    assert ToolCall.objects.get(pk=call.pk).status == Status.PENDING_APPROVAL
    assert not PolicyRule.objects.exists()


def test_the_page_is_csrf_protected(approver):
    from django.test import Client

    strict = Client(enforce_csrf_checks=True)
    strict.force_login(approver)
    server, tool, agent = make_world()
    call = pending(agent, server, tool)
    assert strict.post(f"/approvals/{call.pk}/decide", {"decision": "approve"}).status_code == 403
    assert ToolCall.objects.get(pk=call.pk).status == Status.PENDING_APPROVAL


def test_no_inline_script_and_a_strict_csp(client, approver):
    server, tool, agent = make_world()
    pending(agent, server, tool)
    for page in ("/approvals/", "/approvals/history/"):
        response = client.get(page)
        assert "script-src 'self'" in response["Content-Security-Policy"]
        html = response.content.decode()
        assert "<script>" not in html and "onclick" not in html and "style=" not in html


def test_the_state_endpoint_lists_pending_ids(client, approver):
    server, tool, agent = make_world()
    call = pending(agent, server, tool)
    assert client.get("/approvals/state").json() == {"pending": [call.pk], "total": 1}
    card = client.get(f"/approvals/{call.pk}/card").content.decode()
    assert f'data-call-id="{call.pk}"' in card


def test_the_call_state_shows_the_outcome(client, approver):
    server, tool, agent = make_world()
    call = pending(agent, server, tool)
    ToolCall.objects.filter(pk=call.pk).update(
        status=Status.SUCCEEDED, result_content=[{"type": "text", "text": "sent"}], is_error=False
    )
    assert client.get(f"/approvals/{call.pk}/state").json() == {
        "status": "succeeded", "final": True, "outcome": "Succeeded: sent"
    }  # fmt: skip


def test_the_call_state_of_a_denied_call_says_who_when_and_why(client, approver, settings):
    settings.TIME_ZONE = "Europe/Paris"
    server, tool, agent = make_world()
    call = pending(agent, server, tool)
    call.deny(User.objects.create_user("bob"), "not today")
    ToolCall.objects.filter(pk=call.pk).update(
        decided_at=datetime(2026, 3, 2, 11, 3, 4, tzinfo=UTC)  # 12:03:04 in Paris
    )
    outcome = client.get(f"/approvals/{call.pk}/state").json()["outcome"]
    assert outcome == "Denied by bob at 12:03:04: not today."
    assert (
        "Denied by bob at 12:03:04: not today."
        in client.get(f"/approvals/{call.pk}/").content.decode()
    )


def test_history_shows_decisions_filters_and_pages(client, approver, settings):
    settings.HISTORY_PAGE_SIZE = 2
    server, tool, agent = make_world()
    calls = []
    for i in range(5):
        call = pending(agent, server, tool)
        call.deny(approver, f"note {i}")
        calls.append(call)
    html = client.get("/approvals/history/").content.decode()
    assert "note 4" in html and "note 3" in html and "note 2" not in html
    assert "alice" in html
    older = client.get(f"/approvals/history/?before={calls[3].pk}").content.decode()
    assert "note 2" in older and "note 1" in older and "note 4" not in older
    assert (
        "note"
        not in client.get("/approvals/history/?status=succeeded")
        .content.decode()
        .split("<tbody>")[1]
    )
    assert "No calls match" in client.get("/approvals/history/?server=other").content.decode()


class QueueQueriesTest(TestCase):
    def test_the_queue_page_query_count_does_not_grow_with_pending_calls(self):
        user = User.objects.create_superuser("root", password="pw")
        self.client.force_login(user)
        server, tool, agent = make_world()
        pending(agent, server, tool)
        PolicyRule.objects.create(server=server, condition="args.to != 'x'", action="ask")
        with self.assertNumQueries(8) as first:
            self.client.get("/approvals/")
        for i in range(10):  # other servers, tools, agents and rules: still the same queries
            other = McpServer.objects.create(name=f"s{i}", url="https://s.example/mcp")
            other_tool = Tool.objects.create_from_definition(
                other, {"name": f"t{i}", "inputSchema": {}}, timezone.now()
            )
            other_agent, _ = Agent.create_with_token(f"a{i}", [other])
            PolicyRule.objects.create(server=other, tool=other_tool, action="allow")
            for _ in range(3):
                pending(other_agent, other, other_tool, {"to": "jane@example.com"})
        with self.assertNumQueries(len(first.captured_queries)):
            html = self.client.get("/approvals/").content.decode()
        assert html.count('class="card"') == 31

    def test_the_history_query_count_does_not_grow_with_rows(self):
        user = User.objects.create_superuser("root", password="pw")
        self.client.force_login(user)
        server, tool, agent = make_world()
        for _ in range(30):
            pending(agent, server, tool, decided_by=DecidedBy.HUMAN).deny(user)
        with self.assertNumQueries(6):  # 5, and the header's count of pending approvals
            self.client.get("/approvals/history/")


@pytest.mark.django_db(transaction=True)  # on_commit callbacks run only when a commit happens
def test_an_approval_stands_when_the_broker_is_down(client, approver, monkeypatch):
    """The decision is committed before the task is sent; the sweeper sends it later."""
    from kombu.exceptions import OperationalError

    from approvals.tasks import run_tool_call

    def broker_down(*args, **kwargs):
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(run_tool_call, "delay", broker_down)
    server, tool, agent = make_world()
    call = pending(agent, server, tool)
    response = client.post(f"/approvals/{call.pk}/decide", {"decision": "approve"})
    assert response.status_code == 302
    assert ToolCall.objects.get(pk=call.pk).status == Status.APPROVED
