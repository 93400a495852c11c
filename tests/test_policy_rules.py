"""Policy rules: CEL conditions on a call's arguments that allow, ask or deny; their precedence,
expiry, what they can never loosen, and their compile and evaluation errors. Through the agent
API, the admin and `manage.py policy_rule`."""

import io
import json
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from approvals.models import ToolCall
from approvals.rules import PolicyRule
from integrations.models import Agent, ApprovalMode, McpServer, Tool, ToolApproval

pytestmark = pytest.mark.django_db

REFUND = {
    "name": "refund_order",
    "inputSchema": {
        "type": "object",
        "properties": {"amount": {"type": "number"}, "currency": {"type": "string"}},
    },
}
SEND_EMAIL = {
    "name": "send_email",
    "inputSchema": {"type": "object", "properties": {"to": {"type": "string"}}},
}


@pytest.fixture
def shop():
    server = McpServer.objects.create(
        name="shop", url="https://shop.example/mcp", approval_mode=ApprovalMode.ALWAYS_ASK,
        personal_data_needs_approval=False,
    )  # fmt: skip
    for definition in (REFUND, SEND_EMAIL):
        Tool.objects.create_from_definition(server, definition, timezone.now())
    return server


@pytest.fixture
def token(shop):
    return Agent.create_with_token("bot", [shop])[1]


def rule(server, condition, action, **kwargs):
    made = PolicyRule(server=server, condition=condition, action=action, **kwargs)
    made.full_clean()
    made.save()
    return made


def ask(client, token, tool, arguments):
    body = {"server": "shop", "tool": tool, "arguments": arguments}
    return client.post(
        "/api/v1/tool-calls", json.dumps(body), content_type="application/json",
        headers={"Authorization": f"Bearer {token}"},
    )  # fmt: skip


def status(client, token, tool, arguments):
    response = ask(client, token, tool, arguments)
    return response.json().get("status") or response.json()["error"]["code"]


def test_the_readme_refund_example_runs_small_euro_refunds_without_asking(client, shop, token):
    refund = shop.tools.get(name="refund_order")
    rule(shop, 'args.amount <= 50 && args.currency == "EUR"', "allow", tool=refund)
    assert status(client, token, "refund_order", {"amount": 20, "currency": "EUR"}) == "approved"
    assert status(client, token, "refund_order", {"amount": 20.5, "currency": "EUR"}) == "approved"
    waits = ("pending_approval", "pending_approval")
    assert (
        status(client, token, "refund_order", {"amount": 51, "currency": "EUR"}),
        status(client, token, "refund_order", {"amount": 20, "currency": "USD"}),
    ) == waits
    answer = ask(client, token, "refund_order", {"amount": 5, "currency": "EUR"}).json()
    assert answer["reasons"][0]["code"] == "rule_allow"
    assert f"rule #{PolicyRule.objects.get().pk}" in answer["reasons"][0]["message"]


def test_the_readme_send_email_example_denies_other_domains(client, shop, token):
    send = shop.tools.get(name="send_email")
    made = rule(
        shop, '!args.to.endsWith("@example.com")', "deny", tool=send, note="Only our own domain"
    )
    assert status(client, token, "send_email", {"to": "ann@example.com"}) == "pending_approval"
    response = ask(client, token, "send_email", {"to": "x@evil.example"})
    assert response.status_code == 403
    assert response.json()["error"] == {
        "code": "rule_denied",
        "message": f"Denied by rule #{made.pk} “Only our own domain”.",
    }
    assert ToolCall.objects.filter(status="blocked", error_code="rule_denied").count() == 1


def test_deny_beats_ask_beats_allow(client, shop, token):
    rule(shop, "true", "allow")
    assert status(client, token, "refund_order", {"amount": 1}) == "approved"
    rule(shop, "args.amount > 10", "ask")
    assert status(client, token, "refund_order", {"amount": 1}) == "approved"
    assert status(client, token, "refund_order", {"amount": 11}) == "pending_approval"
    rule(shop, "args.amount > 100", "deny")
    assert status(client, token, "refund_order", {"amount": 101}) == "rule_denied"


def test_an_ask_rule_tightens_no_approval_mode(client, shop, token):
    McpServer.objects.filter(pk=shop.pk).update(approval_mode=ApprovalMode.NO_APPROVAL)
    rule(shop, "args.amount >= 1000", "ask", note="Big refunds")
    assert status(client, token, "refund_order", {"amount": 999}) == "approved"
    answer = ask(client, token, "refund_order", {"amount": 1000}).json()
    assert answer["status"] == "pending_approval"
    assert answer["reasons"][0]["message"].startswith("Needs a human by rule #")


def test_expired_rules_are_ignored(client, shop, token):
    rule(shop, "true", "deny", expires_at=timezone.now() - timedelta(seconds=1))
    rule(shop, "true", "allow", expires_at=timezone.now() + timedelta(hours=1))
    assert status(client, token, "refund_order", {"amount": 1}) == "approved"


def test_rules_apply_only_to_their_tool_and_agent(client, shop, token):
    other_token = Agent.create_with_token("other-bot", [shop])[1]
    rule(shop, "true", "allow", tool=shop.tools.get(name="send_email"))
    rule(shop, "true", "deny", agent=Agent.objects.get(name="other-bot"))
    assert status(client, token, "send_email", {"to": "a@example.com"}) == "approved"
    assert status(client, token, "refund_order", {"amount": 1}) == "pending_approval"
    assert status(client, other_token, "send_email", {"to": "a@example.com"}) == "rule_denied"


def test_a_condition_sees_the_agent_server_tool_and_request_time(client, shop, token):
    rule(shop, 'agent == "bot" && server == "shop" && tool == "refund_order"', "allow")
    rule(shop, "now < timestamp('2000-01-01T00:00:00Z')", "deny")
    assert status(client, token, "refund_order", {"amount": 1}) == "approved"


@pytest.mark.parametrize("setting", ["disabled", "removed", "unreviewed", "flagged", "personal"])
def test_allow_can_never_loosen(client, shop, token, setting):
    rule(shop, "true", "allow")
    tool = Tool.objects.filter(server=shop, name="send_email")
    arguments = {"to": "a@example.com"}
    if setting == "disabled":
        tool.update(approval=ToolApproval.DISABLED)
    elif setting == "removed":
        tool.update(removed_at=timezone.now())
    elif setting == "unreviewed":
        tool.update(reviewed_fingerprint="", reviewed_definition=None)
    elif setting == "flagged":
        tool.update(warnings=[{"code": "hidden_instructions", "message": "Hidden text."}])
    else:
        McpServer.objects.filter(pk=shop.pk).update(personal_data_needs_approval=True)
        arguments = {"to": "jane.doe@gmail.com"}
    expected = {
        "disabled": "tool_disabled", "removed": "unknown_tool", "unreviewed": "pending_approval",
        "flagged": "pending_approval", "personal": "pending_approval",
    }  # fmt: skip
    assert status(client, token, "send_email", arguments) == expected[setting]


def test_a_condition_that_fails_to_evaluate_asks_and_says_so(client, shop, token):
    McpServer.objects.filter(pk=shop.pk).update(approval_mode=ApprovalMode.NO_APPROVAL)
    made = rule(shop, "args.note < 50", "allow")
    rule(shop, "args.code.startsWith('X')", "deny")
    answer = ask(client, token, "refund_order", {"note": "lots", "code": 7}).json()
    assert answer["status"] == "pending_approval"  # never allowed, never denied on an error
    assert [reason["code"] for reason in answer["reasons"]] == ["rule_error", "rule_error"]
    message = answer["reasons"][0]["message"]
    assert message.startswith(f"The condition of rule #{made.pk} “args.note < 50” could not")
    assert "No matching overloads" in message
    missing = ask(client, token, "refund_order", {}).json()  # a missing field
    assert (missing["status"], missing["reasons"][0]["code"]) == ("pending_approval", "rule_error")
    assert "Key not found" in missing["reasons"][0]["message"]


def test_an_evaluation_error_never_quotes_the_arguments(client, shop, token):
    rule(shop, "int(args.code) > 3", "allow")
    answer = ask(client, token, "refund_order", {"code": "TOP-SECRET-VALUE"}).json()
    assert answer["reasons"][0]["code"] == "rule_error"
    assert "TOP-SECRET-VALUE" not in json.dumps(answer["reasons"])


def test_evaluation_is_bounded_on_huge_arguments(client, shop, token):
    rule(shop, "args.items.all(a, args.items.all(b, a <= b || a > b))", "allow")
    items = list(range(20_000))  # 400 million pairs
    answer = ask(client, token, "refund_order", {"items": items}).json()
    assert answer["status"] == "pending_approval"
    assert "Iteration budget exceeded" in answer["reasons"][0]["message"]


def test_regular_expressions_in_conditions_can_not_backtrack(client, shop, token):
    rule(shop, 'args.note.matches("^(a+)+$")', "deny")
    assert status(client, token, "refund_order", {"note": "a" * 50_000 + "!"}) == (
        "pending_approval"
    )


# Saving rules ----------------------------------------------------------------------------------


def test_the_admin_refuses_a_condition_that_does_not_compile_with_its_position(admin_client, shop):
    response = admin_client.post(
        "/admin/approvals/policyrule/add/",
        {"server": shop.pk, "condition": "args.amount <= 50 &&& true", "action": "allow"},
    )
    assert response.status_code == 200
    assert "Line 1, column 21: Syntax error" in response.content.decode()
    assert not PolicyRule.objects.exists()
    typo = admin_client.post(
        "/admin/approvals/policyrule/add/",
        {"server": shop.pk, "condition": "arg.amount <= 50", "action": "allow"},
    )
    assert "Line 1, column 4: undeclared reference to &#x27;arg.amount&#x27;" in (
        typo.content.decode()
    )
    not_bool = admin_client.post(
        "/admin/approvals/policyrule/add/",
        {"server": shop.pk, "condition": '"yes"', "action": "allow"},
    )
    assert "must be true or false, not a string" in not_bool.content.decode()


def test_the_admin_saves_a_rule_and_lists_expired_ones_as_such(admin_client, shop, admin_user):
    response = admin_client.post(
        "/admin/approvals/policyrule/add/",
        {
            "server": shop.pk, "tool": shop.tools.get(name="send_email").pk, "action": "deny",
            "condition": '!args.to.endsWith("@example.com")', "note": "Our domain only",
        },
    )  # fmt: skip
    assert response.status_code == 302
    made = PolicyRule.objects.get()
    assert made.created_by == admin_user
    rule(shop, "true", "ask", expires_at=timezone.now() - timedelta(days=1))
    page = admin_client.get("/admin/approvals/policyrule/").content.decode()
    assert page.count('alt="False"') == 1 and page.count('alt="True"') == 1  # "In force"
    expired = admin_client.get("/admin/approvals/policyrule/?expired=yes").content.decode()
    assert "Our domain only" not in expired


def test_a_tool_of_another_server_is_refused(admin_client, shop):
    other = McpServer.objects.create(name="other", url="https://o.example/mcp")
    tool = Tool.objects.create_from_definition(other, SEND_EMAIL, timezone.now())
    response = admin_client.post(
        "/admin/approvals/policyrule/add/",
        {"server": shop.pk, "tool": tool.pk, "condition": "true", "action": "allow"},
    )
    assert "belongs to another MCP server" in response.content.decode()


def run(*args):
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=out)
    return out.getvalue()


def test_the_command_adds_lists_and_removes_rules(shop):
    output = run(
        "policy_rule", "add", "--server", "shop", "--tool", "refund_order", "--action", "allow",
        "--when", 'args.amount <= 50 && args.currency == "EUR"', "--note", "small refunds",
        "--expires", "2999-01-01T00:00:00Z",
    )  # fmt: skip
    made = PolicyRule.objects.get()
    assert f"Added rule #{made.pk}" in output
    assert (made.tool.name, made.action, made.expires_at.year) == ("refund_order", "allow", 2999)
    run("policy_rule", "add", "--server", "shop", "--action", "deny", "--when", "true",
        "--expires", "2000-01-01T00:00:00Z")  # fmt: skip
    listing = run("policy_rule", "list")
    assert 'args.amount <= 50 && args.currency == "EUR"' in listing
    assert listing.count("(expired)") == 1
    run("policy_rule", "remove", str(made.pk))
    assert not PolicyRule.objects.filter(pk=made.pk).exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--when", "args.amount <= ", "--action", "allow"], "Line 1, column"),
        (["--when", "true", "--action", "allow", "--tool", "nope"], "No tool on shop named"),
        (["--when", "true", "--action", "allow", "--agent", "nobody"], "No agent named"),
        (["--when", "true", "--action", "allow", "--expires", "soon"], "not an ISO-8601"),
    ],
)
def test_the_command_refuses_bad_rules_and_adds_nothing(shop, args, message):
    with pytest.raises(CommandError) as raised:
        run("policy_rule", "add", "--server", "shop", *args)
    assert message in str(raised.value)
    assert not PolicyRule.objects.exists()


def test_removing_an_unknown_rule_is_an_error():
    with pytest.raises(CommandError, match="No rule #999"):
        run("policy_rule", "remove", "999")
