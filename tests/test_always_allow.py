""" "Approve and always allow" on the queue: a scoped allow rule the admin can see and remove,
offered only where it would change what happens to the same request next time."""

import json
import re

import pytest
from django.contrib.auth.models import Permission, User
from django.utils import timezone

from approvals.models import Status, ToolCall, request_tool_call
from approvals.rules import PolicyRule
from integrations.models import Agent, ApprovalMode, McpServer, Tool

pytestmark = pytest.mark.django_db

LOOKUP = {"name": "lookup", "inputSchema": {"type": "object"}}


@pytest.fixture
def world():
    server = McpServer.objects.create(
        name="crm", url="https://crm.example/mcp", approval_mode=ApprovalMode.ALWAYS_ASK
    )
    Tool.objects.create_from_definition(server, LOOKUP, timezone.now())
    bot, _ = Agent.create_with_token("bot", [server])
    other, _ = Agent.create_with_token("other-bot", [server])
    return server, bot, other


@pytest.fixture
def approver(approver):
    """The shared approver (tests/conftest.py), who may also make rules."""
    approver.user_permissions.add(Permission.objects.get(codename="add_policyrule"))
    return approver


def decide(client, call, **fields):
    return client.post(
        f"/approvals/{call.pk}/decide", {"decision": "approve_always", **fields},
        headers={"Accept": "application/json"},
    )  # fmt: skip


def status_of(agent, arguments):
    return request_tool_call(agent, "crm", "lookup", arguments)[0].status


def test_this_agent_any_arguments_until_revoked(client, world, approver):
    _, bot, other = world
    call, _ = request_tool_call(bot, "crm", "lookup", {"q": "a"})
    response = decide(client, call)
    assert (
        response.json()["ok"]
        and "allows the next calls (until revoked)" in (response.json()["message"])
    )
    assert status_of(bot, {"q": "anything else"}) == Status.APPROVED
    assert status_of(other, {"q": "a"}) == Status.PENDING_APPROVAL
    rule = PolicyRule.objects.get()
    assert (rule.agent, rule.expires_at, rule.created_from_call_id) == (bot, None, call.pk)


def test_every_agent_the_same_arguments_for_an_hour(client, world, approver):
    _, bot, other = world
    call, _ = request_tool_call(bot, "crm", "lookup", {"q": "a", "n": [1, 2.5, None]})
    decide(client, call, scope_agent="every", scope_arguments="same", scope_duration="hour")
    rule = PolicyRule.objects.get()
    assert rule.agent is None
    assert rule.condition == 'args == {"q": "a", "n": [1, 2.5, null]}'
    left = rule.expires_at - timezone.now()
    assert 3500 < left.total_seconds() <= 3600
    assert status_of(other, {"q": "a", "n": [1, 2.5, None]}) == Status.APPROVED
    assert status_of(other, {"q": "b", "n": [1, 2.5, None]}) == Status.PENDING_APPROVAL


def test_the_card_offers_the_scopes_and_not_the_same_arguments_with_personal_data(
    client, world, approver
):
    _, bot, _ = world
    McpServer.objects.update(personal_data_needs_approval=False)
    plain, _ = request_tool_call(bot, "crm", "lookup", {"q": "a"})
    personal, _ = request_tool_call(bot, "crm", "lookup", {"to": "jane.doe@example.com"})
    cards = client.get("/approvals/").content.decode().split('data-call-id="')
    plain_card = next(card for card in cards if card.startswith(f'{plain.pk}"'))
    personal_card = next(card for card in cards if card.startswith(f'{personal.pk}"'))
    for text in ("this agent (bot)", "every agent", "for an hour", "for a day", "until revoked"):
        assert text in plain_card
    assert "only these arguments" in plain_card
    assert "Approve and always allow" in personal_card
    assert "only these arguments" not in personal_card  # it would store them in clear
    response = decide(client, personal, scope_arguments="same")
    assert response.status_code == 422
    assert ToolCall.objects.get(pk=personal.pk).status == Status.PENDING_APPROVAL


def test_it_is_not_offered_where_personal_data_asks_anyway(client, world, approver):
    _, bot, _ = world
    call, _ = request_tool_call(bot, "crm", "lookup", {"card": "4111 1111 1111 1111"})
    assert "always allow" not in client.get("/approvals/").content.decode()
    assert decide(client, call).status_code == 422
    assert not PolicyRule.objects.exists()


def test_it_is_not_offered_where_an_ask_rule_would_still_ask(client, world, approver):
    server, bot, _ = world
    PolicyRule.objects.create(server=server, condition='args.q == "x"', action="ask")
    call, _ = request_tool_call(bot, "crm", "lookup", {"q": "x"})
    assert "always allow" not in client.get("/approvals/").content.decode()
    assert decide(client, call).status_code == 422


def test_a_bad_scope_is_refused_and_changes_nothing(client, world, approver):
    _, bot, _ = world
    call, _ = request_tool_call(bot, "crm", "lookup", {"q": "a"})
    response = decide(client, call, scope_duration="a-century")
    assert (response.status_code, response.json()["retry"]) == (422, True)
    assert ToolCall.objects.get(pk=call.pk).status == Status.PENDING_APPROVAL
    assert not PolicyRule.objects.exists()


def test_the_admin_shows_and_removes_the_rule(client, world, approver, admin_client):
    _, bot, _ = world
    call, _ = request_tool_call(bot, "crm", "lookup", {"q": "a"})
    decide(client, call, scope_duration="day")
    rule = PolicyRule.objects.get()
    page = admin_client.get("/admin/approvals/policyrule/").content.decode()
    assert f"“Approve and always allow” on call #{call.pk}" in page
    admin_client.post(f"/admin/approvals/policyrule/{rule.pk}/delete/", {"post": "yes"})
    assert not PolicyRule.objects.exists()
    assert status_of(bot, {"q": "a"}) == Status.PENDING_APPROVAL


def test_a_late_always_allow_creates_no_rule(client, world, approver):
    _, bot, _ = world
    call, _ = request_tool_call(bot, "crm", "lookup", {"q": "a"})
    call.deny(User.objects.create_user("bob"))
    response = decide(client, call)
    assert response.status_code == 409
    message = json.loads(response.content)["message"]
    assert re.fullmatch(r"Denied by bob at \d\d:\d\d:\d\d\.", message)
    assert not PolicyRule.objects.exists()
