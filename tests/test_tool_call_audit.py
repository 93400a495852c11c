"""The tool-call audit in the admin: a read-only view of each call ("Tool call #12") with its
reasons, decision, result and timeline, and a list whose status and deciders stand out."""

import re
from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth.models import User

from approvals.models import Status, ToolCall
from integrations.models import Agent, McpServer

pytestmark = pytest.mark.django_db

REQUESTED = datetime(2026, 11, 21, 9, 30, 5, tzinfo=UTC)


@pytest.fixture
def call(admin_user):
    server = McpServer.objects.create(name="shop", url="https://mcp.example.com/mcp")
    agent, _ = Agent.create_with_token("support-bot", [server])
    return ToolCall.objects.create(
        agent=agent, server=server, server_name="shop", tool_name="refund_order",
        arguments={"order_id": "A-1001", "amount": 25}, status=Status.SUCCEEDED,
        decided_by="human", decided_by_user=admin_user, note="customer called",
        requested_at=REQUESTED, decided_at=REQUESTED + timedelta(seconds=42),
        started_at=REQUESTED + timedelta(seconds=43), finished_at=REQUESTED + timedelta(seconds=44),
        result_content=[{"type": "text", "text": "Refunded 25.00 EUR on order A-1001."}],
        is_error=False, attempts=1,
    )  # fmt: skip


def test_the_audit_page_is_a_view_titled_by_the_call(admin_client, call):
    response = admin_client.get(f"/admin/approvals/toolcall/{call.pk}/change/")
    assert response.status_code == 200
    html = response.content.decode()
    assert f"<h1>Tool call #{call.pk}</h1>" in html
    assert "Change tool call" not in html and "View tool call" not in html
    for button in ('name="_save"', 'name="_continue"', 'name="_addanother"'):
        assert button not in html
    form = html.split('id="toolcall_form"')[1].split("</form>")[0]
    controls = re.findall(r"<(?:input|select|textarea)\b[^>]*>", form)
    assert [c for c in controls if 'type="hidden"' not in c] == []  # nothing to edit


def test_the_audit_page_shows_decision_result_and_timeline_with_seconds(admin_client, call):
    html = admin_client.get(f"/admin/approvals/toolcall/{call.pk}/change/").content.decode()
    assert "<code>shop / refund_order</code>" in html
    assert "&quot;order_id&quot;: &quot;A-1001&quot;" in html  # the arguments, as JSON
    assert "Human: boss" in html and "customer called" in html
    assert "tg-status-succeeded" in html
    assert "Refunded 25.00 EUR on order A-1001." in html
    for line in (
        "Requested: 2026-11-21 09:30:05",
        "Decided: 2026-11-21 09:30:47",
        "Started: 2026-11-21 09:30:48",
        "Finished: 2026-11-21 09:30:49",
    ):
        assert line in html


def test_the_audit_page_shows_the_policy_reasons_stored_on_the_call(admin_client, call):
    reasons = [
        {"code": "tool_changed", "message": "The tool changed since it was reviewed."},
        {"code": "always_ask", "message": "The server is in Always Ask mode."},
    ]
    ToolCall.objects.filter(pk=call.pk).update(reasons=reasons)
    html = admin_client.get(f"/admin/approvals/toolcall/{call.pk}/change/").content.decode()
    assert "The tool changed since it was reviewed. <code>tool_changed</code>" in html
    assert "The server is in Always Ask mode. <code>always_ask</code>" in html


def test_arguments_an_approver_edited_show_both_versions(admin_client, call):
    ToolCall.objects.filter(pk=call.pk).update(
        requested_arguments={"order_id": "A-1001", "amount": 2500}
    )
    html = admin_client.get(f"/admin/approvals/toolcall/{call.pk}/change/").content.decode()
    ran, asked = html.split("Edited by the approver; the agent asked for:")
    assert "&quot;amount&quot;: 25," in ran.split("Arguments")[-1]
    assert "&quot;amount&quot;: 2500," in asked.split("</pre>")[0]


def test_a_failed_call_shows_its_error_and_a_purged_one_says_so(admin_client, call):
    ToolCall.objects.filter(pk=call.pk).update(
        status=Status.FAILED, error_code="connect_failed", error_message="Could not connect.",
        result_content=None, arguments={}, purged_at=REQUESTED + timedelta(days=30),
    )  # fmt: skip
    html = admin_client.get(f"/admin/approvals/toolcall/{call.pk}/change/").content.decode()
    assert "Could not connect.</span> <code>connect_failed</code>" in html
    assert "Removed after the retention period (2026-12-21 09:30:05)." in html


def test_nothing_can_be_changed_by_posting_to_the_audit_page(admin_client, call):
    response = admin_client.post(
        f"/admin/approvals/toolcall/{call.pk}/change/", {"status": "failed", "note": "edited"}
    )
    assert response.status_code == 403
    call.refresh_from_db()
    assert (call.status, call.note) == (Status.SUCCEEDED, "customer called")


def test_the_list_shows_status_and_who_decided_with_seconds(admin_client, call):
    html = admin_client.get("/admin/approvals/toolcall/").content.decode()
    assert '<span class="tg-status tg-status-succeeded">Succeeded</span>' in html
    assert "Human: boss<br><small>2026-11-21 09:30:47</small>" in html
    assert "2026-11-21 09:30:05" in html  # requested, to the second


def test_approvers_without_admin_rights_can_still_decide_from_the_list(call):
    from django.contrib.auth.models import Permission
    from django.test import Client

    pending = ToolCall.objects.create(
        agent=call.agent, server=call.server, server_name="shop", tool_name="refund_order",
        status=Status.PENDING_APPROVAL, expires_at=REQUESTED + timedelta(days=9999),
    )  # fmt: skip
    user = User.objects.create_user("ann", password="pw-ann-12345", is_staff=True)
    user.user_permissions.add(
        Permission.objects.get(codename="view_toolcall"),
        Permission.objects.get(codename="decide_toolcall"),
    )
    client = Client()
    client.force_login(user)
    client.post("/admin/approvals/toolcall/", {"action": "deny", "_selected_action": [pending.pk]})
    pending.refresh_from_db()
    assert (pending.status, pending.decided_by_user) == (Status.DENIED, user)


def test_the_audit_page_links_to_the_approvers_page_of_the_call(admin_client, call):
    html = admin_client.get(f"/admin/approvals/toolcall/{call.pk}/change/").content.decode()
    assert f'<a href="/approvals/{call.pk}/">/approvals/{call.pk}/</a>' in html
