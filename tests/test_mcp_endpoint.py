"""Toolgate as an MCP server: real SDK clients (Streamable HTTP in both protocol eras, SSE)
against a live Toolgate (tests/mcp_live.py) in front of real upstream servers."""

import asyncio
import contextlib
import hashlib
import json
import threading
import time
from datetime import timedelta
from typing import Any, Literal

import anyio
import httpx2
import mcp
import mcp_types as types
import pytest
from cryptography.fernet import Fernet
from django.contrib.auth.models import User
from django.test import Client as DjangoClient
from django.utils import timezone
from mcp.client.extension import ClientExtension, ResultClaim
from mcp.shared.exceptions import MCPError
from pydantic import TypeAdapter

from approvals.mcp import sessions, tools
from approvals.models import Status, ToolCall, request_tool_call
from integrations.models import Agent, McpServer, ToolApproval
from tests.conftest import before_migration, migrate_to_latest, wait_until
from tests.mcp_live import (
    PNG,
    add_server,
    approve_when_pending,
    http_transport,
    in_thread,
    rich_server,
    sse_transport,
)
from tests.mcp_servers import _HandshakeOnly, demo_server, mutable_server

pytestmark = pytest.mark.django_db(transaction=True)

CLIENTS = ["legacy", "modern", "sse"]


@pytest.fixture
def demo(mcp_factory):
    return add_server("demo", mcp_factory(demo_server()).url)


@pytest.fixture
def agent(demo):
    agent, token = Agent.create_with_token("bot", servers=[demo])
    agent.token = token
    return agent


@contextlib.asynccontextmanager
async def connect(url, token, kind="legacy", **options):
    """An SDK client on a Toolgate endpoint: Streamable HTTP (handshake or 2026-07-28) or SSE."""
    async with contextlib.AsyncExitStack() as stack:
        if kind == "sse":
            transport, mode = sse_transport(url.rstrip("/") + "/sse", token), "legacy"
        else:
            transport = http_transport(url, token, stack=stack)
            mode = "legacy" if kind == "legacy" else "2026-07-28"
        options.setdefault("read_timeout_seconds", 90)
        async with mcp.Client(transport, mode=mode, **options) as client:
            yield client


def run(coroutine_function, *args):
    """Run a client coroutine; a hang fails the test instead of stalling the run."""

    async def bounded():
        with anyio.fail_after(120):
            return await coroutine_function(*args)

    return anyio.run(bounded)


def text_of(result):
    return "\n".join(block.text for block in result.content if block.type == "text")


@pytest.mark.parametrize("kind", CLIENTS)
def test_it_lists_and_calls_a_servers_tools_under_their_own_names(toolgate, agent, kind):
    async def go():
        async with connect(f"{toolgate.base_url}/mcp/demo/", agent.token, kind) as client:
            listed = await client.list_tools()
            result = await client.call_tool("echo", {"text": "hi"})
            return client.protocol_version, listed, result

    era, listed, result = run(go)
    assert (era == "2026-07-28") == (kind == "modern")
    echo = next(tool for tool in listed.tools if tool.name == "echo")
    assert echo.annotations.read_only_hint is True
    assert echo.meta["toolgate/approval"] == "auto"
    assert text_of(result) == "hi" and result.is_error is False
    assert ToolCall.objects.get().status == Status.SUCCEEDED


@pytest.mark.parametrize("kind", CLIENTS)
def test_it_serves_every_server_of_the_agent_on_one_endpoint(toolgate, agent, mcp_factory, kind):
    rich = add_server("rich", mcp_factory(rich_server()).url)
    agent.servers.add(rich)

    async def go():
        async with connect(f"{toolgate.base_url}/mcp/", agent.token, kind) as client:
            listed = await client.list_tools()
            return {tool.name for tool in listed.tools}, await client.call_tool(
                "demo__add", {"a": 2, "b": 3}
            )

    names, result = run(go)
    assert {"demo__echo", "demo__add", "rich__everything"} <= names
    assert text_of(result) == "5"
    call = ToolCall.objects.get()
    assert (call.server_name, call.tool_name) == ("demo", "add")


def test_the_tool_list_is_the_json_apis(toolgate, agent):
    api = httpx2.get(
        f"{toolgate.base_url}/api/v1/tools", headers={"Authorization": f"Bearer {agent.token}"}
    )

    async def go():
        async with connect(f"{toolgate.base_url}/mcp/", agent.token) as client:
            return await client.list_tools()

    listed = run(go)
    assert sorted(f"{t['server']}__{t['name']}" for t in api.json()["tools"]) == sorted(
        tool.name for tool in listed.tools
    )


def test_names_on_the_combined_endpoint_stay_valid_and_distinct():
    served = [
        {"server": "a__b", "name": "c"},  # "a__b__c" twice: both hashed
        {"server": "a", "name": "b__c"},
        {"server": "crm", "name": "find contact"},  # a space: hashed
        {"server": "s", "name": "x" * 200},  # too long: cut and hashed
        {"server": "crm", "name": "search"},
    ]
    named = tools._combined_names(served)
    assert len(named) == 5 and "crm__search" in named
    assert all(tools.TOOL_NAME_REGEX.match(name) for name in named)
    assert "a__b__c" not in named
    assert named == tools._combined_names(list(reversed(served)))  # order doesn't matter


@pytest.mark.parametrize("kind", ["legacy", "modern"])
def test_every_content_type_comes_back_intact(toolgate, mcp_factory, kind):
    rich = add_server("rich", mcp_factory(rich_server()).url)
    _, token = Agent.create_with_token("bot", servers=[rich])

    async def go():
        async with connect(f"{toolgate.base_url}/mcp/rich/", token, kind) as client:
            return await client.call_tool("everything", {})

    result = run(go)
    kinds = [block.type for block in result.content]
    assert kinds == ["text", "image", "audio", "resource_link", "resource"]
    assert result.content[1].data == PNG and result.content[2].mime_type == "audio/wav"
    assert str(result.content[3].uri) == "file:///r.txt"
    assert result.content[4].resource.text == "inside"
    assert result.structured_content == {"answer": 42} and result.is_error is True


def test_a_poisoned_result_reaches_the_agent_with_a_warning(toolgate, mcp_factory):
    rich = add_server("rich", mcp_factory(rich_server()).url)
    _, token = Agent.create_with_token("bot", servers=[rich])

    async def go():
        async with connect(f"{toolgate.base_url}/mcp/rich/", token) as client:
            return await client.call_tool("inject", {})

    result = run(go)
    assert "Ignore all previous instructions" in result.content[0].text
    assert result.content[-1].text.startswith("Toolgate warning:")
    assert result.meta["toolgate/warnings"]


def test_upstream_progress_and_logs_reach_the_agent(toolgate, mcp_factory):
    rich = add_server("rich", mcp_factory(rich_server()).url)
    _, token = Agent.create_with_token("bot", servers=[rich])
    progress, logs = [], []

    async def on_progress(value, total, message):
        progress.append((value, total, message))

    async def on_log(params):
        logs.append(params.data)

    async def go():
        async with connect(
            f"{toolgate.base_url}/mcp/rich/", token, logging_callback=on_log
        ) as client:
            await client.set_logging_level("info")
            return await client.call_tool("progress", {}, progress_callback=on_progress)

    assert text_of(run(go)) == "done"
    assert progress == [(1, 2, "half way")]
    assert logs == ["upstream log line"]


@pytest.mark.parametrize("tool", ["sample", "elicit"])
def test_upstream_sampling_and_elicitation_are_declined_and_audited(toolgate, mcp_factory, tool):
    # A handshake-era upstream: only there may a server send requests back during a call.
    rich = add_server("rich", mcp_factory(_HandshakeOnly(rich_server())).url)
    _, token = Agent.create_with_token("bot", servers=[rich])

    async def go():
        async with connect(f"{toolgate.base_url}/mcp/rich/", token) as client:
            return await client.call_tool(tool, {})

    answer = text_of(run(go))
    assert answer == (
        "elicitation decline"
        if tool == "elicit"
        else "refused: Declined: Toolgate does not let MCP servers sample the agent's model."
    )
    declined = ToolCall.objects.get().declined_requests
    assert [entry["method"] for entry in declined] == [
        "elicitation/create" if tool == "elicit" else "sampling/createMessage"
    ]


def test_it_refuses_a_missing_or_wrong_token_with_401(toolgate, agent):
    for headers in ({}, {"Authorization": "Bearer tg_wrong"}, {"Authorization": "Basic x"}):
        response = httpx2.post(f"{toolgate.base_url}/mcp/demo/", headers=headers, json={})
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer ")
        assert "agent token" in response.json()["error"]["message"]


def test_an_sdk_client_with_a_bad_token_cannot_connect(toolgate, agent):
    async def go():
        async with connect(f"{toolgate.base_url}/mcp/demo/", "tg_not-a-token"):
            pass

    with pytest.raises(ExceptionGroup):  # the SDK folds the 401 into a generic MCPError
        run(go)
    assert not Agent.objects.filter(last_used_at__isnull=False).exists()


def test_an_inactive_agent_is_refused_like_a_wrong_token(toolgate, agent):
    Agent.objects.filter(pk=agent.pk).update(is_active=False)
    response = httpx2.post(
        f"{toolgate.base_url}/mcp/demo/",
        headers={"Authorization": f"Bearer {agent.token}"},
        json={},
    )
    assert response.status_code == 401


def test_a_server_not_assigned_looks_exactly_like_no_server(toolgate, agent, mcp_factory):
    add_server("other", mcp_factory(demo_server()).url)
    headers = {"Authorization": f"Bearer {agent.token}"}
    theirs = httpx2.post(f"{toolgate.base_url}/mcp/other/", headers=headers, json={})
    missing = httpx2.post(f"{toolgate.base_url}/mcp/nothing/", headers=headers, json={})
    assert theirs.status_code == missing.status_code == 404
    assert theirs.content == missing.content


def test_it_refuses_a_foreign_origin(toolgate, agent):
    body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    response = httpx2.post(
        f"{toolgate.base_url}/mcp/demo/",
        headers={"Authorization": f"Bearer {agent.token}", "Origin": "http://evil.example",
                 "Accept": "application/json, text/event-stream"},
        json=body,
    )  # fmt: skip
    assert response.status_code == 403


def test_the_rate_limit_applies(toolgate, agent, settings):
    settings.AGENT_RATE_LIMIT = 2
    headers = {"Authorization": f"Bearer {agent.token}"}
    responses = [
        httpx2.post(f"{toolgate.base_url}/mcp/demo/", headers=headers, json={}) for _ in range(3)
    ]
    assert [response.status_code for response in responses][-1] == 429
    assert 1 <= int(responses[-1].headers["Retry-After"]) <= 60
    error = responses[-1].json()["error"]
    assert error["data"] == {"code": "rate_limited", "retry_after": int(
        responses[-1].headers["Retry-After"]
    )}  # fmt: skip


@pytest.mark.parametrize("kind", ["legacy", "modern"])
def test_a_rate_limited_call_tells_the_agent_how_long_to_wait(toolgate, agent, settings, kind):
    # The client's requests before the call (handshake, list) count too; the call is over it.
    settings.AGENT_RATE_LIMIT = 3 if kind == "legacy" else 1

    async def go():
        async with connect(f"{toolgate.base_url}/mcp/demo/", agent.token, kind) as client:
            with pytest.raises(MCPError) as limited:
                for _ in range(5):
                    await client.call_tool("add", {"a": 1, "b": 2})
            return limited.value

    error = run(go)
    assert "Too many requests from this agent; retry after" in str(error)
    assert error.error.data["code"] == "rate_limited"
    assert 1 <= error.error.data["retry_after"] <= 60


@pytest.mark.parametrize("kind", ["legacy", "modern"])
def test_unknown_tools_and_bad_arguments_are_invalid_params(toolgate, agent, kind):
    async def go():
        errors = []
        async with connect(f"{toolgate.base_url}/mcp/demo/", agent.token, kind) as client:
            for name, arguments in [("nope", {}), ("add", {"a": "two"})]:
                with pytest.raises(MCPError) as refused:
                    await client.call_tool(name, arguments)
                errors.append(refused.value.error)
        return errors

    unknown, invalid = run(go)
    assert (unknown.code, unknown.message) == (types.INVALID_PARAMS, "Unknown tool: nope")
    assert invalid.code == types.INVALID_PARAMS and invalid.data["details"]
    # Both refused requests stay in the audit as blocked calls.
    assert list(ToolCall.objects.values_list("status", flat=True)) == [Status.BLOCKED] * 2


@pytest.mark.integration  # repeated on PostgreSQL, which refuses NUL in text columns
def test_names_and_arguments_the_json_api_would_refuse_are_invalid_params(toolgate, agent):
    async def go():
        errors = []
        async with connect(f"{toolgate.base_url}/mcp/demo/", agent.token) as client:
            for name, arguments in [("ec\x00ho", {}), ("echo", {"text": "a\x00b"})]:
                with pytest.raises(MCPError) as refused:
                    await client.call_tool(name, arguments)
                errors.append(refused.value.error)
        return errors

    nul_name, nul_text = run(go)
    assert nul_name.code == nul_text.code == types.INVALID_PARAMS
    assert "\\u0000" in nul_name.message and "\\u0000" in nul_text.message
    assert not ToolCall.objects.exists()


def _raw_call(toolgate, agent, arguments_json):
    """A 2026-07-28 `tools/call` of echo as raw JSON (what no SDK client would serialise)."""
    body = (
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":'
        + arguments_json
        + ',"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28",'
        '"io.modelcontextprotocol/clientInfo":{"name":"raw","version":"1"},'
        '"io.modelcontextprotocol/clientCapabilities":{}}}}'
    )
    headers = {
        "Authorization": f"Bearer {agent.token}", "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call", "Mcp-Name": "echo",
    }  # fmt: skip
    response = httpx2.post(f"{toolgate.base_url}/mcp/demo/", headers=headers, content=body)
    data = [line for line in response.text.splitlines() if line.startswith("data:")]
    return json.loads(data[-1][5:] if data else response.text)


def test_huge_numbers_surrogates_and_deep_nesting_are_invalid_params(toolgate, agent):
    deep = '{"text":"x","more":' + "[" * 300 + "]" * 300 + "}"
    for arguments in ('{"text":"x","n":1e999}', '{"text":"\\ud800"}', deep):
        answer = _raw_call(toolgate, agent, arguments)
        assert answer["error"]["code"] == types.INVALID_PARAMS, answer
        assert "can't be used" in answer["error"]["message"]
    assert not ToolCall.objects.exists()


def _routed(mcp_factory, tool_approval=None):
    """An upstream whose `route` tool mirrors its `region` argument into `Mcp-Param-Region`
    (2026-07-28 `x-mcp-header`), and an agent of it."""
    upstream = mutable_server()
    upstream.add_tool("route", input_schema={
        "type": "object",
        "properties": {"region": {"type": "string", "x-mcp-header": "Region"}},
        "required": ["region"],
    })  # fmt: skip
    server = add_server("routed", mcp_factory(upstream).url)
    if tool_approval:
        server.tools.filter(name="route").update(approval=tool_approval)
    agent, token = Agent.create_with_token("router", servers=[server])
    agent.token = token
    return agent


def _raw_route(toolgate, agent, headers, endpoint="routed/"):
    name = "route" if endpoint else "routed__route"
    body = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
        "name": name, "arguments": {"region": "eu"}, "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
            "io.modelcontextprotocol/clientCapabilities": {}}}})  # fmt: skip
    headers = {
        "Authorization": f"Bearer {agent.token}", "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call", "Mcp-Name": name, **headers,
    }  # fmt: skip
    return httpx2.post(f"{toolgate.base_url}/mcp/{endpoint}", headers=headers, content=body)


@pytest.mark.parametrize("endpoint", ["routed/", ""])
def test_mcp_param_headers_must_match_the_listed_schema(toolgate, mcp_factory, endpoint):
    agent = _routed(mcp_factory)
    name = "route" if endpoint else "routed__route"

    async def go():
        async with connect(f"{toolgate.base_url}/mcp/{endpoint}", agent.token, "modern") as client:
            return await client.call_tool(name, {"region": "eu"})  # mirrors the header

    assert text_of(run(go)) == 'called route with {"region": "eu"}'
    assert _raw_route(toolgate, agent, {"Mcp-Param-Region": "eu"}, endpoint).status_code == 200
    for headers, problem in [({}, "is missing"), ({"Mcp-Param-Region": "us"}, "does not match")]:
        response = _raw_route(toolgate, agent, headers, endpoint)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == types.HEADER_MISMATCH and problem in error["message"], error
    assert ToolCall.objects.count() == 2  # the refused requests stored no call


def test_mcp_param_headers_are_not_checked_when_no_tool_declares_them(toolgate, agent):
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "echo", "arguments": {"text": "hi"}, "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
            "io.modelcontextprotocol/clientCapabilities": {}}}}  # fmt: skip
    headers = {
        "Authorization": f"Bearer {agent.token}", "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": "echo",
        "Mcp-Param-Text": "not the argument",
    }  # fmt: skip
    response = httpx2.post(f"{toolgate.base_url}/mcp/demo/", headers=headers, json=body)
    assert response.status_code == 200
    assert response.json()["result"]["content"][0]["text"] == "hi"


def test_mcp_param_headers_of_a_tool_not_listed_are_not_checked(toolgate, mcp_factory):
    agent = _routed(mcp_factory, tool_approval=ToolApproval.DISABLED)
    response = _raw_route(toolgate, agent, {"Mcp-Param-Region": "us"})
    error = response.json()["error"]  # the call is refused, not the header
    assert (error["code"], error["message"]) == (types.INVALID_PARAMS, "Unknown tool: route")


def test_a_body_over_the_json_apis_limit_is_refused_with_413(toolgate, agent, settings):
    headers = {"Authorization": f"Bearer {agent.token}",
               "Accept": "application/json, text/event-stream"}  # fmt: skip
    body = b"x" * (settings.API_MAX_BODY_BYTES + 1)  # the SDK's own limit is 4 MiB
    for path in ("/mcp/demo/", "/mcp/demo/messages/?session_id=0"):
        response = httpx2.post(f"{toolgate.base_url}{path}", headers=headers, content=body)
        assert response.status_code == 413, path


def test_a_disabled_tool_is_absent_and_refused(toolgate, agent, demo):
    demo.approval_mode = "fine_grained"
    demo.save()
    demo.tools.filter(name="delete_file").update(approval=ToolApproval.DISABLED)

    async def go():
        async with connect(f"{toolgate.base_url}/mcp/demo/", agent.token) as client:
            names = {tool.name for tool in (await client.list_tools()).tools}
            with pytest.raises(MCPError) as refused:
                await client.call_tool("delete_file", {"path": "/x"})
            return names, refused.value.error.code

    names, code = run(go)
    assert "delete_file" not in names and code == types.INVALID_PARAMS


def test_a_session_hears_when_its_tool_list_changes(toolgate, agent, demo, settings):
    settings.MCP_LIST_CHANGED_INTERVAL = 0.2
    demo.approval_mode = "fine_grained"
    demo.save()
    changed = anyio.Event()

    async def on_message(message):
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    async def go():
        async with connect(
            f"{toolgate.base_url}/mcp/demo/", agent.token, message_handler=on_message
        ) as client:
            before = {tool.name for tool in (await client.list_tools()).tools}
            await in_thread(
                lambda: demo.tools.filter(name="echo").update(approval=ToolApproval.DISABLED)
            )
            with anyio.fail_after(20):
                await changed.wait()
            return before, {tool.name for tool in (await client.list_tools()).tools}

    before, after = run(go)
    assert "echo" in before and "echo" not in after


# --- Calls that wait for a human ---------------------------------------------------------


@pytest.fixture
def ask(demo):
    demo.approval_mode = "always_ask"
    demo.save()
    return demo


@pytest.mark.integration
@pytest.mark.parametrize("kind", CLIENTS)
def test_a_held_call_returns_the_result_once_approved(toolgate, agent, ask, celery_worker, kind):
    progress = []

    async def on_progress(value, total, message):
        progress.append(message)

    async def go():
        async with connect(f"{toolgate.base_url}/mcp/demo/", agent.token, kind) as client:
            async with anyio.create_task_group() as group:
                group.start_soon(in_thread, approve_when_pending)
                result = await client.call_tool(
                    "echo", {"text": "hello"}, progress_callback=on_progress
                )
            return result

    result = run(go)
    assert text_of(result) == "hello"
    assert ToolCall.objects.get().decided_by_user.username == "alice"
    if kind != "modern":  # 2026-07-28 has no client-requested progress for tool calls
        assert progress and progress[0].startswith("Waiting for approval by a human since")


def test_a_denied_call_says_so_with_the_note(toolgate, agent, ask):
    async def go():
        url = f"{toolgate.base_url}/mcp/demo/"
        async with connect(url, agent.token) as client, anyio.create_task_group() as group:
            group.start_soon(in_thread, approve_when_pending, "deny", "not today")
            return await client.call_tool("delete_file", {"path": "/etc"})

    result = run(go)
    assert result.is_error is True
    assert text_of(result) == (
        "Denied by alice: not today. The tool was not run. "
        "Why it needed a human: The server's mode is Always Ask."
    )
    call = result.meta["toolgate/call"]
    assert call["decision"]["user"] == "alice" and call["decision"]["note"] == "not today"
    assert call["reasons"] == ToolCall.objects.get().reasons


def approve_with_edits_and_run(arguments):
    """An approver edits the arguments and approves; the call then runs here, as a worker would."""
    call = wait_until(lambda: ToolCall.objects.filter(status=Status.PENDING_APPROVAL).first(), 30)
    browser = DjangoClient()
    browser.force_login(User.objects.create_superuser("alice", password="pw-alice-123"))
    response = browser.post(
        f"/approvals/{call.pk}/decide", {"decision": "approve", "arguments": json.dumps(arguments)}
    )
    assert response.status_code == 302
    ToolCall.objects.get(pk=call.pk).run()


def test_an_edited_approval_tells_the_agent_what_ran(toolgate, agent, ask):
    async def go():
        url = f"{toolgate.base_url}/mcp/demo/"
        async with connect(url, agent.token) as client, anyio.create_task_group() as group:
            group.start_soon(in_thread, approve_with_edits_and_run, {"text": "edited"})
            return await client.call_tool("echo", {"text": "as sent"})

    result = run(go)
    assert result.is_error is False
    ran, note = [block.text for block in result.content]
    assert ran == "edited"
    assert note.startswith("Toolgate: alice edited the arguments before approving.")
    assert note.endswith('not the ones you sent: {"text": "edited"}')
    call = result.meta["toolgate/call"]
    assert call["edited"] is True and call["decision"]["edited"] is True
    assert call["arguments"] == {"text": "edited"}
    assert call["reasons"] == ToolCall.objects.get().reasons


def test_a_call_the_policy_cancelled_says_why(toolgate, agent, ask):
    def deactivate_when_pending():
        wait_until(lambda: ToolCall.objects.filter(status=Status.PENDING_APPROVAL).exists(), 30)
        agent.is_active = False
        agent.save()  # cancels the agent's pending calls, with the reason

    async def go():
        url = f"{toolgate.base_url}/mcp/demo/"
        async with connect(url, agent.token) as client, anyio.create_task_group() as group:
            group.start_soon(in_thread, deactivate_when_pending)
            return await client.call_tool("echo", {"text": "x"})

    result = run(go)
    assert result.is_error is True
    assert text_of(result) == (
        "Cancelled by Toolgate's policy: The agent 'bot' has been deactivated. The tool was not "
        "run. Why it needed a human: The server's mode is Always Ask."
    )
    assert result.meta["toolgate/call"]["decision"]["by"] == "policy"


def test_the_hold_ends_as_still_pending_and_a_retry_reattaches(toolgate, agent, ask, settings):
    settings.MCP_APPROVAL_HOLD = 1.0
    settings.MCP_PROGRESS_INTERVAL = 0.3

    async def go():
        async with connect(f"{toolgate.base_url}/mcp/demo/", agent.token) as client:
            first = await client.call_tool("echo", {"text": "again"})
            second = await client.call_tool("echo", {"text": "again"})
            return first, second

    first, second = run(go)
    assert first.is_error and "still waiting for a human" in text_of(first)
    assert "make the same call again" in text_of(first)
    assert first.meta["toolgate/call"] == second.meta["toolgate/call"]
    assert ToolCall.objects.count() == 1


def decide_and_run(decision="approve", arguments=None):
    """An approver decides the one call that waits; an approved call then runs here, as a
    worker would."""
    call = ToolCall.objects.get(status=Status.PENDING_APPROVAL)
    approver = User.objects.create_superuser("alice", password="pw-alice-123")
    if decision == "deny":
        return call.deny(approver, "no")
    assert call.approve(approver, arguments=arguments)
    ToolCall.objects.get(pk=call.pk).run()


def test_a_retry_after_the_call_finished_gets_its_outcome_once(toolgate, agent, ask, settings):
    settings.MCP_APPROVAL_HOLD = 1.0
    settings.MCP_PROGRESS_INTERVAL = 0.3

    async def go():
        async with connect(f"{toolgate.base_url}/mcp/demo/", agent.token) as client:
            pending = await client.call_tool("echo", {"text": "once"})
            await in_thread(decide_and_run)
            outcome = await client.call_tool("echo", {"text": "once"})
            later = await client.call_tool("echo", {"text": "once"})
            return pending, outcome, later

    pending, outcome, later = run(go)
    assert "still waiting for a human" in text_of(pending)
    assert (outcome.is_error, text_of(outcome)) == (False, "once")
    assert outcome.meta["toolgate/call"]["id"] == pending.meta["toolgate/call"]["id"]
    # The outcome went to the one repeat: a later call is a new request, for a human again.
    assert "still waiting for a human" in text_of(later)
    assert later.meta["toolgate/call"]["id"] != pending.meta["toolgate/call"]["id"]
    assert list(ToolCall.objects.order_by("id").values_list("status", flat=True)) == [
        Status.SUCCEEDED, Status.PENDING_APPROVAL,
    ]  # fmt: skip


def test_a_retry_with_the_requested_arguments_reattaches_after_an_edit(
    toolgate, agent, ask, settings
):
    settings.MCP_APPROVAL_HOLD = 1.0
    settings.MCP_PROGRESS_INTERVAL = 0.3

    async def go():
        async with connect(f"{toolgate.base_url}/mcp/demo/", agent.token) as client:
            await client.call_tool("echo", {"text": "as sent"})
            await in_thread(decide_and_run, "approve", {"text": "edited"})
            return await client.call_tool("echo", {"text": "as sent"})

    outcome = run(go)
    assert outcome.content[0].text == "edited"
    assert outcome.meta["toolgate/call"]["edited"] is True
    assert ToolCall.objects.count() == 1


def test_a_retry_long_after_the_outcome_is_a_new_call(toolgate, agent, ask, settings):
    settings.MCP_APPROVAL_HOLD = 1.0
    settings.MCP_PROGRESS_INTERVAL = 0.3

    def deny_long_ago():
        decide_and_run("deny")
        ago = timezone.now() - timedelta(seconds=settings.MCP_REATTACH_WINDOW + 1)
        ToolCall.objects.update(finished_at=ago)

    async def go():
        async with connect(f"{toolgate.base_url}/mcp/demo/", agent.token) as client:
            await client.call_tool("echo", {"text": "x"})
            await in_thread(deny_long_ago)
            return await client.call_tool("echo", {"text": "x"})

    late = run(go)
    assert "still waiting for a human" in text_of(late)
    assert ToolCall.objects.count() == 2


def test_a_retry_is_matched_without_decrypting_other_calls(agent, ask, settings):
    arguments = {"text": "x" * 1000}
    call, _ = request_tool_call(agent, "demo", "echo", arguments)
    request_tool_call(agent, "demo", "echo", {"text": "other"})
    # With only a new key, no stored arguments can be read: matching must not need them.
    settings.FIELD_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]
    assert ToolCall.twin_to_reattach(agent, "demo", "echo", dict(arguments)).pk == call.pk
    assert ToolCall.twin_to_reattach(agent, "demo", "echo", {"text": "y"}) is None
    assert ToolCall.twin_to_reattach(agent, "demo", "add", arguments) is None


def test_the_arguments_digest_is_keyed(agent, ask, settings):
    call, _ = request_tool_call(agent, "demo", "echo", {"text": "guessable"})
    canonical = b'["demo", "echo"]\x00{"text":"guessable"}'
    assert call.arguments_digest not in (
        hashlib.sha256(canonical).hexdigest(), hashlib.sha256(b'{"text":"guessable"}').hexdigest()
    )  # fmt: skip
    settings.SECRET_KEY = "another-" + "k" * 50
    again, _ = request_tool_call(agent, "demo", "echo", {"text": "guessable"})
    assert again.arguments_digest != call.arguments_digest


@pytest.mark.integration
def test_the_migration_digests_the_calls_a_retry_can_still_reattach_to():
    calls, _, agent = before_migration("0010_encrypt_warnings")
    expires = timezone.now() + timedelta(minutes=5)
    fields = {"agent": agent, "server_name": "s", "tool_name": "t", "expires_at": expires}
    edited = calls.create(
        **fields, status="approved", arguments={"q": 2}, requested_arguments={"q": 1}
    )
    calls.create(**fields, status="denied", arguments={"q": 3}, finished_at=timezone.now())
    migrate_to_latest()

    agent = Agent.objects.get(pk=agent.pk)
    assert ToolCall.twin_to_reattach(agent, "s", "t", {"q": 1}).pk == edited.pk
    assert ToolCall.twin_to_reattach(agent, "s", "t", {"q": 2}) is None
    assert ToolCall.objects.filter(arguments_digest="").count() == 1  # the finished one


def test_cancelling_a_held_call_cancels_the_request(toolgate, agent, ask):
    async def go():
        async with connect(f"{toolgate.base_url}/mcp/demo/", agent.token) as client:
            with anyio.move_on_after(2):
                await client.call_tool("echo", {"text": "never mind"})

    run(go)
    call = ToolCall.objects.get()
    wait_until(lambda: ToolCall.objects.get(pk=call.pk).status == Status.CANCELLED, 20)


class _CreatedTask(types.Result):
    result_type: Literal["task"]
    task_id: str
    status: str
    status_message: str | None = None
    poll_interval_ms: int | None = None


async def task_request(session, request_type, task_id):
    params = request_type.model_fields["params"].annotation(task_id=task_id)
    return await session.send_request(request_type(params=params), TypeAdapter(dict[str, Any]))


class Tasks(ClientExtension):
    """The client side of the 2026-07-28 tasks extension, on the SDK's extension hooks: a
    `resultType: "task"` answer is followed with `tasks/get` until the task is done."""

    identifier = "io.modelcontextprotocol/tasks"

    def __init__(self):
        self.seen = []

    def claims(self):
        return [ResultClaim(result_type="task", model=_CreatedTask, resolve=self.resolve)]

    async def resolve(self, created, ctx):
        self.seen.append((created.status, created.status_message))
        while True:
            state = await task_request(ctx.session, types.GetTaskRequest, created.task_id)
            self.seen.append((state["status"], state.get("statusMessage")))
            if state["status"] != "working":
                return types.CallToolResult.model_validate(state.get("result") or {"content": []})
            await anyio.sleep(0.2)


@pytest.mark.integration
def test_a_task_client_gets_a_task_and_then_the_approved_result(
    toolgate, agent, ask, celery_worker
):
    extension = Tasks()

    async def go():
        async with (
            connect(
                f"{toolgate.base_url}/mcp/demo/", agent.token, "modern", extensions=[extension]
            ) as client,
            anyio.create_task_group() as group,
        ):
            group.start_soon(in_thread, approve_when_pending)
            return await client.call_tool("echo", {"text": "by task"})

    result = run(go)
    assert text_of(result) == "by task"
    statuses = [status for status, _ in extension.seen]
    assert statuses[0] == "working" and statuses[-1] == "completed"
    assert extension.seen[0][1].startswith("Waiting for approval by a human since")


def test_a_task_can_be_cancelled(toolgate, agent, ask):
    async def go():
        async with connect(
            f"{toolgate.base_url}/mcp/demo/", agent.token, "modern", extensions=[Tasks()]
        ) as client:
            created = await client.session.call_tool("echo", {"text": "x"}, allow_claimed=True)
            await task_request(client.session, types.CancelTaskRequest, created.task_id)
            return created, await task_request(
                client.session, types.GetTaskRequest, created.task_id
            )

    created, state = run(go)
    assert created.status == "working"
    assert state["status"] == "cancelled"
    assert ToolCall.objects.get().status == Status.CANCELLED


def test_a_task_the_policy_cancelled_says_why(toolgate, agent, ask, mcp_factory):
    other = add_server("other", mcp_factory(demo_server()).url)
    agent.servers.add(other)  # the agent keeps a server, so its token still opens /mcp/

    async def go():
        async with connect(
            f"{toolgate.base_url}/mcp/", agent.token, "modern", extensions=[Tasks()]
        ) as client:
            created = await client.session.call_tool(
                "demo__echo", {"text": "x"}, allow_claimed=True
            )
            await in_thread(agent.servers.remove, ask)  # cancels its pending calls there
            return await task_request(client.session, types.GetTaskRequest, created.task_id)

    state = run(go)
    assert state["status"] == "cancelled"
    assert state["statusMessage"].startswith("Cancelled by Toolgate's policy: The agent 'bot' ")


def test_another_agents_task_is_not_found(toolgate, agent, ask):
    _, other = Agent.create_with_token("other", servers=[ask])

    async def go():
        async with connect(
            f"{toolgate.base_url}/mcp/demo/", agent.token, "modern", extensions=[Tasks()]
        ) as client:
            created = await client.session.call_tool("echo", {"text": "x"}, allow_claimed=True)
        async with connect(
            f"{toolgate.base_url}/mcp/demo/", other, "modern", extensions=[Tasks()]
        ) as client:
            with pytest.raises(MCPError) as missing:
                await task_request(client.session, types.GetTaskRequest, created.task_id)
            return missing.value.error

    error = run(go)
    assert error.code == types.INVALID_PARAMS and "no task" in error.message


@pytest.mark.parametrize("kind", ["legacy", "sse"])
def test_a_session_is_tracked_while_open_and_forgotten_after(toolgate, agent, kind):
    async def go():
        async with connect(f"{toolgate.base_url}/mcp/demo/", agent.token, kind) as client:
            await client.list_tools()
            return [mark for mark in list(sessions._by_id.values()) if mark.agent_id == agent.pk]

    marks = run(go)
    assert len(marks) == 1 and marks[0].scope == "demo"
    wait_until(lambda: not any(m.agent_id == agent.pk for m in list(sessions._by_id.values())), 10)


def test_the_agents_admin_page_shows_its_mcp_urls(admin_client, agent, settings):
    settings.SITE_URL = "https://toolgate.example.com"
    page = admin_client.get(f"/admin/integrations/agent/{agent.pk}/change/").content.decode()
    assert "https://toolgate.example.com/mcp/</code>" in page
    assert "https://toolgate.example.com/mcp/demo/</code>" in page


def test_a_session_belongs_to_its_agent_and_endpoint(toolgate, agent, demo):
    _, other = Agent.create_with_token("other", servers=[demo])
    accept = {"Accept": "application/json, text/event-stream"}
    initialize = {
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "raw", "version": "1"}},
    }  # fmt: skip
    with httpx2.Client(base_url=toolgate.base_url, headers=accept) as http:
        opened = http.post(
            "/mcp/demo/", json=initialize, headers={"Authorization": f"Bearer {agent.token}"}
        )
        session = {
            "Mcp-Session-Id": opened.headers["mcp-session-id"],
            "MCP-Protocol-Version": "2025-06-18",
        }
        listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
        unknown = {**session, "Mcp-Session-Id": "f" * 32, "Authorization": f"Bearer {agent.token}"}
        assert http.post("/mcp/demo/", json=listing, headers=unknown).status_code == 404
        elsewhere = http.post(
            "/mcp/", json=listing, headers={**session, "Authorization": f"Bearer {agent.token}"}
        )
        stranger = http.post(
            "/mcp/demo/", json=listing, headers={**session, "Authorization": f"Bearer {other}"}
        )
    assert elsewhere.status_code == stranger.status_code == 404
    assert "f" * 32 not in sessions._by_id  # an unknown id is not remembered


def test_approvers_hear_of_held_calls_and_not_of_auto_approved_ones(
    toolgate, agent, demo, settings
):
    from approvals.notifications import Delivery, NotificationChannel

    settings.MCP_APPROVAL_HOLD = 0.5
    NotificationChannel.objects.create(
        name="hook", kind="webhook", secret="s" * 20, url="https://hooks.example/x"
    )

    async def go():
        async with connect(f"{toolgate.base_url}/mcp/demo/", agent.token) as client:
            await client.call_tool("echo", {"text": "auto"})
            await in_thread(
                lambda: McpServer.objects.filter(pk=demo.pk).update(approval_mode="always_ask")
            )
            await client.call_tool("echo", {"text": "held"})

    run(go)
    auto, held = ToolCall.objects.order_by("pk")
    assert (auto.status, held.status) == (Status.SUCCEEDED, Status.PENDING_APPROVAL)
    assert list(Delivery.objects.values_list("event", "object_id")) == [("call.pending", held.pk)]


def test_a_rug_pull_upstream_is_held_for_a_human_through_the_endpoint(
    toolgate, mcp_factory, settings
):
    """The scanner's poisoned `add` appearing on a No Approval server after review: the agent
    is told the tool waits for a human, and a call to it does wait."""
    from tests.test_tool_scanner import POISONED_ADD

    settings.MCP_APPROVAL_HOLD = 0.5
    upstream = mutable_server()
    upstream.add_tool("add", "Adds two numbers.", POISONED_ADD["inputSchema"])
    server = add_server("math", mcp_factory(upstream).url)
    upstream.change_tool("add", description=POISONED_ADD["description"])
    server.sync_tools()
    _, token = Agent.create_with_token("bot", servers=[server])

    async def go():
        async with connect(f"{toolgate.base_url}/mcp/math/", token) as client:
            listed = (await client.list_tools()).tools
            return listed, await client.call_tool("add", {"a": 1, "b": 2, "sidenote": "x"})

    listed, result = run(go)
    assert listed[0].meta["toolgate/approval"] == "requires_approval"
    assert listed[0].meta["toolgate/awaiting_review"] is True
    assert listed[0].description == "Adds two numbers."  # the reviewed text, not the poison
    assert result.is_error and "still waiting for a human" in text_of(result)
    assert ToolCall.objects.get().status == Status.PENDING_APPROVAL


@pytest.mark.parametrize("kind", ["legacy", "sse"])
def test_a_restart_of_toolgate_leaves_a_held_call_pending(toolgate, agent, ask, settings, kind):
    settings.MCP_APPROVAL_HOLD = 60
    failures = []

    async def go():
        async with connect(f"{toolgate.base_url}/mcp/demo/", agent.token, kind) as client:
            await client.call_tool("echo", {"text": "across a restart"})

    def agent_side():
        try:
            run(go)
        except BaseException as exc:  # the server went away under the client
            failures.append(exc)

    client = threading.Thread(target=agent_side, daemon=True)
    client.start()
    wait_until(lambda: ToolCall.objects.filter(status=Status.PENDING_APPROVAL).exists(), 30)
    toolgate.stop()
    client.join(60)
    assert failures and ToolCall.objects.get().status == Status.PENDING_APPROVAL


def test_an_oauth_upstream_is_called_with_its_token_through_the_endpoint(
    toolgate, admin_client, mcp_factory, settings
):
    from integrations.oauth import OAuthCredential
    from tests.oauth_servers import connect as connect_oauth
    from tests.oauth_servers import start_oauth_world

    settings.SITE_URL = "http://testserver"
    _, upstream = start_oauth_world(mcp_factory)
    server, _ = connect_oauth(admin_client, upstream, approval_mode="no_approval")
    wait_until(lambda: server.sync_tools().ok or McpServer.objects.get(pk=server.pk).last_synced_at)
    _, token = Agent.create_with_token("bot", servers=[server])

    async def go():
        async with connect(f"{toolgate.base_url}/mcp/{server.name}/", token) as client:
            return await client.call_tool("echo", {"text": "with oauth"})

    assert text_of(run(go)) == "with oauth"
    assert upstream.tokens_seen[-1] == OAuthCredential.objects.get(server=server).access_token


@contextlib.contextmanager
def web_process_work():
    """What the web process's threads do meanwhile: SQL statements, and hops from its event loop
    to a thread (a GIL hand-over and a wake-up of the loop each; issue 11), counted where every
    loop's `run_in_executor` hands its work over, uvloop's too. The clients run in this thread,
    the app on threads of its own."""
    from concurrent.futures import ThreadPoolExecutor

    from django.db.backends.utils import CursorWrapper

    work = {"sql": [], "hops": []}
    test_thread = threading.current_thread()
    execute, submit = CursorWrapper.execute, ThreadPoolExecutor.submit

    def counted_execute(self, sql, *args, **kwargs):
        work["sql"].append(sql.split(" ", 1)[0])
        return execute(self, sql, *args, **kwargs)

    def counted_hop(self, func, *args, **kwargs):
        if threading.current_thread() is not test_thread:
            work["hops"].append(func)
        return submit(self, func, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CursorWrapper, "execute", counted_execute)
        patch.setattr(ThreadPoolExecutor, "submit", counted_hop)
        yield work


@pytest.mark.parametrize("kind", ["legacy", "modern"])
@pytest.mark.usefixtures("roomy_budget")
def test_an_auto_approved_call_costs_the_json_apis_queries_and_hops_and_a_look_for_a_twin(
    toolgate, agent, kind
):
    """The agent and the call's tool (with its server, the endpoint's check) in one hop before
    the SDK reads the request; the decision (provably cheap: `decide_here`) and the insert,
    after a look for a twin to re-attach to, in one hop; the result. The JSON API's 4 queries
    (tests/test_hot_path.py) and the twin's query: no second lookup of the server or of its
    tools' `Mcp-Param-*` headers, no hop of its own for the call's lookup, none to a
    validation thread."""

    result, work = run(_work_of_a_call, f"{toolgate.base_url}/mcp/demo/", agent, kind, "echo")
    assert text_of(result) == "hi"
    assert work["sql"] == ["SELECT", "SELECT", "SELECT", "INSERT", "UPDATE"], work["sql"]
    assert len(work["hops"]) == 3, work["hops"]


@pytest.mark.parametrize("kind", ["legacy", "modern"])
@pytest.mark.usefixtures("roomy_budget")
def test_a_call_on_the_combined_endpoint_is_looked_up_in_the_agents_hop_too(toolgate, agent, kind):
    """On `/mcp/` the tool as listed (which names its server) is looked up in the agent's hop
    as well: the hops of a call on a server's endpoint."""
    url = f"{toolgate.base_url}/mcp/"
    result, work = run(_work_of_a_call, url, agent, kind, "demo__echo")
    assert text_of(result) == "hi"
    assert len(work["hops"]) == 3, work["hops"]
    assert work["sql"][-2:] == ["INSERT", "UPDATE"]


async def _work_of_a_call(url, agent, kind, name):
    async with connect(url, agent.token, kind) as client:
        await client.call_tool(name, {"text": "warm"})  # the agent's last use, a session
        with web_process_work() as work:
            result = await client.call_tool(name, {"text": "hi"})
            await _runs_done()  # a small result goes out before its record (approvals/running.py)
        return result, work


async def _runs_done(timeout=5):
    """Until the web process's runs of calls have finished, records included (it runs on
    threads of this process)."""
    from approvals import running

    deadline = time.monotonic() + timeout
    while running._runs and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert not running._runs


@pytest.mark.parametrize("pieces", [1, 3])
def test_a_call_whose_body_arrives_in_pieces_is_answered_as_one_sent_whole(toolgate, agent, pieces):
    """A body of a declared length up to `app.PARSE_FIRST_BYTES` is read before the agent is
    looked up (its `tools/call` with it), however it is split on the way."""
    import socket

    params = {"name": "echo", "arguments": {"text": "in pieces"}, "_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": {}}}  # fmt: skip
    body = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": params})
    body = body.encode()
    head = (
        f"POST /mcp/demo/ HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {agent.token}\r\n"
        "Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
        "MCP-Protocol-Version: 2026-07-28\r\nMcp-Method: tools/call\r\nMcp-Name: echo\r\n"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    step = -(-len(body) // pieces)
    with socket.create_connection(("127.0.0.1", toolgate.port), timeout=30) as sock:
        sock.sendall(head)
        for start in range(0, len(body), step):
            time.sleep(0.1)  # each piece its own read on the server's side
            sock.sendall(body[start : start + step])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status, _, content = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200")
    message = json.loads(content)
    assert (message["id"], message["result"]["content"][0]["text"]) == (7, "in pieces")
