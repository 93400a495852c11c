"""Approve with edits: the approver corrects the arguments on the card; the edit is checked
against the tool's input schema and the policy, the call runs with it, the audit keeps both,
and the agent sees what ran. (The same in a real browser: tests/test_queue_browser.py.)"""

import json

import pytest

from approvals.models import Status, ToolCall, request_tool_call
from approvals.rules import PolicyRule
from integrations.models import Agent, ApprovalMode, McpServer
from tests.mcp_servers import MutableServer

pytestmark = pytest.mark.django_db

REFUND_SCHEMA = {
    "type": "object",
    "properties": {"order": {"type": "string"}, "amount": {"type": "number", "maximum": 500}},
    "required": ["order", "amount"],
}


@pytest.fixture
def world(mcp_factory):
    remote = MutableServer()
    remote.add_tool("refund", description="Refund an order.", input_schema=REFUND_SCHEMA)
    running = mcp_factory(remote)
    server = McpServer.objects.create(
        name="shop", url=running.url, allow_private_network=True,
        approval_mode=ApprovalMode.ALWAYS_ASK,
    )  # fmt: skip
    assert server.sync_tools().ok
    agent, token = Agent.create_with_token("bot", [server])
    call, _ = request_tool_call(agent, "shop", "refund", {"order": "A-1", "amount": 400})
    return server, token, call


def approve(client, call, arguments, **fields):
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, indent=2)
    return client.post(
        f"/approvals/{call.pk}/decide",
        {"decision": "approve", "arguments": text, **fields},
        headers={"Accept": "application/json"},
    )


def test_the_card_has_an_editor_with_the_pretty_printed_arguments(client, world, approver):
    page = client.get("/approvals/").content.decode()
    expected = "{\n  &quot;amount&quot;: 400,\n  &quot;order&quot;: &quot;A-1&quot;\n}"
    assert 'name="arguments" class="arguments-editor"' in page
    assert f">{expected}</textarea>" in page


def test_an_edited_approval_runs_with_the_edit_and_keeps_both(client, world, approver):
    _, token, call = world
    response = approve(client, call, {"order": "A-1", "amount": 40})
    assert response.status_code == 200
    body = response.json()
    assert body["message"] == "Approved with edited arguments; running…"
    assert '-  "amount": 400,' in body["diff"] and '+  "amount": 40,' in body["diff"]
    stored = ToolCall.objects.get(pk=call.pk)
    assert stored.requested_arguments == {"order": "A-1", "amount": 400}
    assert stored.arguments == {"order": "A-1", "amount": 40}
    stored.run()  # what the worker does
    stored.refresh_from_db()
    assert stored.status == Status.SUCCEEDED
    assert stored.result_content[0]["text"] == 'called refund with {"amount": 40, "order": "A-1"}'

    seen = client.get(
        f"/api/v1/tool-calls/{call.pk}", headers={"Authorization": f"Bearer {token}"}
    ).json()
    assert seen["arguments"] == {"order": "A-1", "amount": 40}
    assert seen["decision"]["edited"] is True and seen["decision"]["user"] == "alice"

    history = client.get("/approvals/history/").content.decode()
    assert "Arguments edited by the approver" in history
    assert "-  &quot;amount&quot;: 400," in history and "+  &quot;amount&quot;: 40," in history


def test_unchanged_or_reformatted_arguments_are_not_an_edit(client, world, approver):
    _, _, call = world
    approve(client, call, '{"amount":400,   "order":"A-1"}')
    stored = ToolCall.objects.get(pk=call.pk)
    assert (stored.status, stored.edited) == (Status.APPROVED, False)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"order": "A-1", "amount": }', "not valid JSON (line 1, column 28"),
        ("[1, 2]", "must be a JSON object"),
        ('{"order": "A-1", "amount": NaN}', "not valid JSON"),
        ('{"order": "A-1", "amount": 4000}', "do not match the tool's input schema"),
        ('{"amount": 4}', "do not match the tool's input schema"),
        ('{"order": "A-1\\u0000", "amount": 4}', "can't be stored"),
    ],
)
def test_a_bad_edit_is_refused_and_the_call_stays_pending(client, world, approver, text, message):
    _, _, call = world
    response = approve(client, call, text)
    assert response.status_code == 422
    body = response.json()
    assert (body["ok"], body["retry"]) == (False, True)
    assert message in body["message"]
    stored = ToolCall.objects.get(pk=call.pk)
    assert (stored.status, stored.arguments, stored.edited) == (
        Status.PENDING_APPROVAL,
        {"order": "A-1", "amount": 400},
        False,
    )


def test_the_schema_says_what_is_wrong_with_the_edit(client, world, approver):
    _, _, call = world
    details = approve(client, call, {"order": "A-1", "amount": 4000}).json()["details"]
    assert any("arguments.amount" in detail and "500" in detail for detail in details)


def test_an_edit_a_deny_rule_refuses_is_not_accepted(client, world, approver):
    server, _, call = world
    PolicyRule.objects.create(server=server, condition='args.order.startsWith("Z")', action="deny")
    response = approve(client, call, {"order": "Z-9", "amount": 4})
    assert response.status_code == 422
    assert response.json()["message"].startswith("Denied by rule #")
    assert ToolCall.objects.get(pk=call.pk).status == Status.PENDING_APPROVAL


def test_personal_data_in_an_edit_is_recorded_as_a_reason(client, world, approver):
    _, _, call = world
    approve(client, call, {"order": "A-1 for jane.doe@example.com", "amount": 4})
    stored = ToolCall.objects.get(pk=call.pk)
    assert stored.status == Status.APPROVED
    assert [reason["code"] for reason in stored.reasons] == ["always_ask", "personal_data"]


def test_retention_purges_both_argument_sets(client, world, approver):
    _, _, call = world
    approve(client, call, {"order": "A-1", "amount": 40})
    ToolCall.objects.filter(pk=call.pk).update(
        status=Status.SUCCEEDED, finished_at=call.requested_at
    )
    ToolCall.purge_old_data(days=0)
    stored = ToolCall.objects.get(pk=call.pk)
    assert (stored.arguments, stored.requested_arguments) == ({}, None)
