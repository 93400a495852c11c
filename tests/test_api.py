"""The agent API: tools, tool calls, waiting, cancelling, and every error it answers with."""

import json

import pytest
from django.utils import timezone

from approvals.models import Status, ToolCall
from integrations.models import Agent, ApprovalMode, McpServer, Tool, ToolApproval, fingerprint

pytestmark = pytest.mark.django_db

ECHO = {
    "name": "echo",
    "description": "Echo text back.",
    "inputSchema": {
        "type": "object",
        "properties": {"text": {"type": "string", "maxLength": 100}},
        "required": ["text"],
    },
    "annotations": {"readOnlyHint": True},
}
DELETE = {
    "name": "delete_file",
    "inputSchema": {"type": "object", "properties": {"path": {"type": "string"}}},
    "annotations": {"destructiveHint": True},
}


def make_server(name="demo", mode=ApprovalMode.ALWAYS_ASK, **kwargs):
    server = McpServer.objects.create(
        name=name, url="https://mcp.example.com/mcp", approval_mode=mode, **kwargs
    )
    now = timezone.now()
    for definition in (ECHO, DELETE):
        Tool.objects.create_from_definition(server, definition, now)
    return server


def make_agent(*servers, name="bot"):
    return Agent.create_with_token(name, servers)


@pytest.fixture
def server():
    return make_server()


@pytest.fixture
def agent_token(server):
    return make_agent(server)[1]


def post(client, token, body, path="/api/v1/tool-calls", raw=None):
    data = raw if raw is not None else json.dumps(body)
    return client.post(
        path, data, content_type="application/json", headers={"Authorization": f"Bearer {token}"}
    )


def get(client, token, path):
    return client.get(path, headers={"Authorization": f"Bearer {token}"})


def call_body(**overrides):
    return {"server": "demo", "tool": "echo", "arguments": {"text": "hi"}, **overrides}


def test_it_lists_the_tools_the_agent_may_call(client, server, agent_token):
    Tool.objects.filter(name="delete_file").update(approval=ToolApproval.DISABLED)
    other = make_server("other")
    assert other.tools.count() == 2
    response = get(client, agent_token, "/api/v1/tools")
    assert response.status_code == 200
    tools = response.json()["tools"]
    assert [(t["server"], t["name"], t["approval"]) for t in tools] == [
        ("demo", "echo", "requires_approval")
    ]
    assert tools[0]["input_schema"] == ECHO["inputSchema"]
    assert tools[0]["annotations"] == {"readOnlyHint": True}


def test_tool_list_shows_the_effective_policy(client):
    server = make_server(mode=ApprovalMode.FINE_GRAINED)
    Tool.objects.filter(name="echo").update(approval=ToolApproval.AUTO_APPROVED)
    _, token = make_agent(server)
    approvals = {
        t["name"]: t["approval"] for t in get(client, token, "/api/v1/tools").json()["tools"]
    }
    assert approvals == {"echo": "auto", "delete_file": "requires_approval"}


def test_removed_tools_are_left_out(client, server, agent_token):
    Tool.objects.filter(name="echo").update(removed_at=timezone.now())
    names = [t["name"] for t in get(client, agent_token, "/api/v1/tools").json()["tools"]]
    assert names == ["delete_file"]


def test_a_call_needing_approval_is_pending(client, agent_token):
    response = post(client, agent_token, call_body())
    assert response.status_code == 201
    call = response.json()
    assert call["status"] == "pending_approval"
    assert (call["server"], call["tool"], call["arguments"]) == ("demo", "echo", {"text": "hi"})
    assert call["decision"] is None and call["result"] is None and call["error"] is None
    assert call["expires_at"] is not None
    assert set(call) == {
        "id", "status", "server", "tool", "arguments", "decision", "reasons", "result",
        "warnings", "error", "created_at", "started_at", "finished_at", "expires_at",
    }  # fmt: skip
    assert call["reasons"] == [
        {"code": "always_ask", "message": "The server's mode is Always Ask."}
    ]


def test_no_approval_mode_approves_at_once(client, django_capture_on_commit_callbacks):
    server = make_server(mode=ApprovalMode.NO_APPROVAL)
    _, token = make_agent(server)
    with django_capture_on_commit_callbacks() as callbacks:
        call = post(client, token, call_body()).json()
    assert call["status"] == "approved"
    assert call["decision"]["by"] == "auto"
    assert len(callbacks) == 1  # enqueued after commit


def test_fine_grained_follows_the_tool_setting(client):
    server = make_server(mode=ApprovalMode.FINE_GRAINED)
    Tool.objects.filter(name="echo").update(approval=ToolApproval.AUTO_APPROVED)
    _, token = make_agent(server)
    assert post(client, token, call_body()).json()["status"] == "approved"
    delete = call_body(tool="delete_file", arguments={"path": "/tmp/x"})
    assert post(client, token, delete).json()["status"] == "pending_approval"


def test_a_changed_tool_needs_a_human_even_without_approval_mode(client):
    server = make_server(mode=ApprovalMode.NO_APPROVAL)
    Tool.objects.filter(name="echo").update(fingerprint="changed")
    _, token = make_agent(server)
    assert post(client, token, call_body()).json()["status"] == "pending_approval"


def test_a_flagged_tool_needs_a_human_in_every_mode(client):
    server = make_server(mode=ApprovalMode.NO_APPROVAL)
    Tool.objects.filter(name="echo").update(warnings=[{"code": "hidden_instructions"}])
    _, token = make_agent(server)
    assert post(client, token, call_body()).json()["status"] == "pending_approval"


def test_the_same_idempotency_key_returns_the_existing_call(client, agent_token):
    first = post(client, agent_token, call_body(idempotency_key="k1"))
    second = post(client, agent_token, call_body(idempotency_key="k1"))
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"]
    assert ToolCall.objects.count() == 1


def test_idempotency_keys_are_per_agent(client, server, agent_token):
    _, other_token = make_agent(server, name="other")
    one = post(client, agent_token, call_body(idempotency_key="k")).json()["id"]
    two = post(client, other_token, call_body(idempotency_key="k")).json()["id"]
    assert one != two


def test_an_agent_sees_only_its_own_calls(client, server, agent_token):
    _, other_token = make_agent(server, name="other")
    call_id = post(client, agent_token, call_body()).json()["id"]
    assert get(client, agent_token, f"/api/v1/tool-calls/{call_id}").status_code == 200
    response = get(client, other_token, f"/api/v1/tool-calls/{call_id}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_cancel_while_pending(client, agent_token):
    call_id = post(client, agent_token, call_body()).json()["id"]
    response = post(client, agent_token, {}, path=f"/api/v1/tool-calls/{call_id}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    again = post(client, agent_token, {}, path=f"/api/v1/tool-calls/{call_id}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "wrong_state"


def test_a_deny_note_reaches_the_agent(client, agent_token, admin_user):
    call_id = post(client, agent_token, call_body()).json()["id"]
    ToolCall.objects.get(pk=call_id).deny(admin_user, "not today")
    call = get(client, agent_token, f"/api/v1/tool-calls/{call_id}").json()
    assert call["status"] == "denied"
    assert call["decision"] == {
        "by": "human", "user": "boss", "note": "not today", "at": call["decision"]["at"],
        "edited": False,
    }  # fmt: skip


def test_wait_returns_at_once_for_a_final_call(client, agent_token, admin_user):
    call_id = post(client, agent_token, call_body()).json()["id"]
    ToolCall.objects.get(pk=call_id).deny(admin_user)
    assert (
        get(client, agent_token, f"/api/v1/tool-calls/{call_id}?wait=30").json()["status"]
        == "denied"
    )


def test_wait_gives_up_and_answers_with_the_call_as_it_is(client, agent_token):
    call = post(client, agent_token, call_body()).json()
    response = get(client, agent_token, f"/api/v1/tool-calls/{call['id']}?wait=0.3")
    assert response.json()["status"] == "pending_approval"


@pytest.mark.parametrize("wait", ["-1", "61", "soon", "nan"])
def test_a_bad_wait_is_refused(client, agent_token, wait):
    response = get(client, agent_token, f"/api/v1/tool-calls/1?wait={wait}")
    assert response.status_code == 400
    assert "wait must be" in response.json()["error"]["message"]


# Errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "Bearer nope", "Bearer tg_wrong", "Basic abc", "Bearer "])
def test_a_missing_or_bad_token_is_401(client, server, header):
    headers = {"Authorization": header} if header else {}
    response = client.get("/api/v1/tools", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


def test_an_inactive_agent_is_401(client, server):
    agent, token = make_agent(server)
    Agent.objects.filter(pk=agent.pk).update(is_active=False)
    assert get(client, token, "/api/v1/tools").status_code == 401


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"server": "demo", "tool": "echo", "arguments": NaN}', "not valid JSON"),
        (json.dumps({"server": 1, "tool": "echo"}), "server must be"),
        (json.dumps({"server": "demo"}), "tool must be"),
        (json.dumps({"server": "demo", "tool": "echo", "arguments": [1]}), "arguments must be"),
        (json.dumps({"server": "demo", "tool": "echo", "extra": 1}), "Unknown field"),
        (json.dumps({"server": "demo", "tool": "echo", "idempotency_key": 5}), "idempotency_key"),
        ("[" * 100000 + "]" * 100000, "not valid JSON"),
    ],
)
def test_malformed_requests_are_400_and_change_nothing(client, agent_token, raw, message):
    response = post(client, agent_token, None, raw=raw)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]
    assert not ToolCall.objects.exists()


def test_an_oversized_body_is_413(client, agent_token, settings):
    settings.API_MAX_BODY_BYTES = 1000
    response = post(client, agent_token, call_body(arguments={"text": "x" * 2000}))
    assert response.status_code == 413
    assert not ToolCall.objects.exists()


def test_wrong_method_is_405(client, agent_token):
    assert get(client, agent_token, "/api/v1/tool-calls").status_code == 405


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (call_body(server="nope"), 404, "unknown_server"),
        (call_body(tool="nope"), 404, "unknown_tool"),
        (call_body(arguments={"text": 5}), 422, "invalid_arguments"),
        (call_body(arguments={}), 422, "invalid_arguments"),
    ],
)
def test_refusals_leave_only_an_audit_record(client, agent_token, body, status, code):
    response = post(client, agent_token, body)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    call = ToolCall.objects.get()
    assert (call.status, call.decided_by, call.error_code) == (Status.BLOCKED, "policy", code)


def test_schema_failures_carry_the_validation_messages(client, agent_token):
    response = post(client, agent_token, call_body(arguments={"text": "x" * 101}))
    details = response.json()["error"]["details"]
    assert any("arguments.text" in message and "too long" in message for message in details)


def test_a_disabled_tool_is_403_in_every_mode(client):
    for mode in ApprovalMode.values:
        server = make_server(name=mode, mode=mode)
        Tool.objects.filter(server=server, name="echo").update(approval=ToolApproval.DISABLED)
        _, token = make_agent(server, name=mode)
        response = post(client, token, call_body(server=mode))
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "tool_disabled"


def test_a_server_not_assigned_to_the_agent_is_answered_like_one_that_does_not_exist(
    client, agent_token
):
    before = post(client, agent_token, call_body(server="other"))
    make_server("other")  # exists now, but is not this agent's
    after = post(client, agent_token, call_body(server="other"))
    assert (after.status_code, after.content) == (before.status_code, before.content)
    assert before.status_code == 404
    assert before.json()["error"] == {
        "code": "unknown_server", "message": "This agent has no MCP server named 'other'."
    }  # fmt: skip
    first, second = ToolCall.objects.order_by("pk")  # the audit records are alike too
    assert (first.server, first.reasons) == (second.server, second.reasons) == (None, first.reasons)


def test_a_disabled_server_is_403(client, server, agent_token):
    McpServer.objects.filter(pk=server.pk).update(enabled=False)
    response = post(client, agent_token, call_body())
    assert (response.status_code, response.json()["error"]["code"]) == (403, "server_disabled")


def test_schema_refs_to_urls_are_not_fetched(client, server, agent_token):
    schema = {"type": "object", "properties": {"text": {"$ref": "https://evil.example/s.json"}}}
    Tool.objects.filter(name="echo").update(input_schema=schema)
    response = post(client, agent_token, call_body())
    assert response.status_code == 422
    assert "not fetched" in response.json()["error"]["details"][0]


def test_deeply_nested_arguments_are_refused(client, agent_token):
    nested = {}
    for _ in range(200):
        nested = {"a": nested}
    response = post(client, agent_token, call_body(arguments={"text": "x", "n": nested}))
    assert response.status_code == 422
    assert "nested deeper" in response.json()["error"]["details"][0]


def test_too_many_requests_is_429_with_retry_after(client, agent_token, settings):
    settings.AGENT_RATE_LIMIT = 3
    statuses = [get(client, agent_token, "/api/v1/tools").status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    response = get(client, agent_token, "/api/v1/tools")
    assert 1 <= int(response["Retry-After"]) <= 60


def test_the_token_is_stored_only_as_a_hash(server):
    agent, token = make_agent(server)
    assert token.startswith("tg_")
    assert token not in json.dumps(list(Agent.objects.values()), default=str)
    assert Agent.authenticate(token) == agent


def test_fingerprint_is_recorded_with_the_call(client, server, agent_token):
    call_id = post(client, agent_token, call_body()).json()["id"]
    assert ToolCall.objects.get(pk=call_id).tool_fingerprint == fingerprint(ECHO)


@pytest.mark.parametrize("method", ["get", "post", "delete"])
def test_unknown_api_paths_get_a_json_404(client, method):
    response = getattr(client, method)("/api/v1/tool-calls/abc/", content_type="application/json")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    "body, message",
    [
        ({"server": "demo", "tool": "a" * 129}, "tool must be at most 128 characters"),
        ({"server": "d" * 101, "tool": "echo"}, "server must be at most 100 characters"),
    ],
)
def test_an_overlong_name_is_refused_without_cutting_it_or_storing_a_row(
    client, agent_token, body, message
):
    response = post(client, agent_token, body)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]
    assert not ToolCall.objects.exists()
