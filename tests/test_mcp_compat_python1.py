"""The MCP endpoint with the official Python SDK 1.x as the agent (tests/mcp_py1/client.py, in
a throw-away venv: tests/thirdparty.py), on every protocol version it can ask for."""

import json
import threading
from pathlib import Path

import pytest

from approvals.models import Status, ToolCall
from integrations.models import Agent, ToolApproval
from tests.mcp_live import add_server, approve_when_pending, rich_server
from tests.mcp_servers import demo_server
from tests.thirdparty import events_of, python_venv, start

pytestmark = pytest.mark.django_db(transaction=True)
HERE = Path(__file__).parent / "mcp_py1"
HANDSHAKES = ["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"]


@pytest.fixture(scope="session")
def sdk1():
    return python_venv(HERE / "requirements.txt")


@pytest.fixture
def demo(mcp_factory):
    return add_server("demo", mcp_factory(demo_server()).url)


@pytest.fixture
def token(demo):
    return Agent.create_with_token("py1-bot", servers=[demo])[1]


def agent_run(sdk1, url, token, steps, transport="http", protocol=None):
    spec = {"url": url, "token": token, "transport": transport, "protocol": protocol}
    return start([sdk1, str(HERE / "client.py"), json.dumps({**spec, "steps": steps})])


def last(events, key):
    return next(event[key] for event in reversed(events) if key in event)


@pytest.mark.parametrize("protocol", HANDSHAKES)
def test_it_initializes_lists_and_calls_on_each_protocol_version(sdk1, toolgate, token, protocol):
    steps = ["list", "ping", {"call": "add", "arguments": {"a": 2, "b": 40}}]
    events = events_of(agent_run(sdk1, f"{toolgate.base_url}/mcp/demo/", token, steps,
                                 protocol=protocol))  # fmt: skip
    assert "error" not in events[-1], events[-1]
    initialized = events[0]["initialized"]
    assert initialized["protocolVersion"] == protocol
    assert initialized["server"]["name"] == "toolgate"
    assert "echo" in {tool["name"] for tool in last(events, "tools")}
    assert last(events, "ping") == {}
    result = last(events, "result")
    assert result["content"] == [{"type": "text", "text": "42"}] and result["isError"] is False
    assert ToolCall.objects.get().status == Status.SUCCEEDED


@pytest.mark.parametrize("protocol", ["2025-11-25", "2024-11-05"])
def test_it_works_over_the_legacy_sse_transport(sdk1, toolgate, token, protocol):
    steps = ["list", {"call": "echo", "arguments": {"text": "over sse"}}]
    url = f"{toolgate.base_url}/mcp/demo/sse"
    events = events_of(agent_run(sdk1, url, token, steps, "sse", protocol))
    assert events[0]["initialized"]["protocolVersion"] == protocol
    assert last(events, "result")["content"] == [{"type": "text", "text": "over sse"}]


def test_every_content_type_and_the_structured_content_come_back(sdk1, toolgate, mcp_factory):
    rich = add_server("rich", mcp_factory(rich_server()).url)
    _, token = Agent.create_with_token("py1-bot", servers=[rich])
    events = events_of(
        agent_run(sdk1, f"{toolgate.base_url}/mcp/", token, [{"call": "rich__everything"}])
    )
    result = last(events, "result")
    assert [block["type"] for block in result["content"]] == [
        "text", "image", "audio", "resource_link", "resource",
    ]  # fmt: skip
    assert result["structuredContent"] == {"answer": 42} and result["isError"] is True


def test_a_bad_token_is_refused(sdk1, toolgate, demo):
    events = events_of(agent_run(sdk1, f"{toolgate.base_url}/mcp/demo/", "tg_nope", ["list"]))
    assert "401" in events[-1]["error"]


@pytest.fixture
def ask(demo):
    demo.approval_mode = "always_ask"
    demo.save()
    return demo


def _decided_in_background(*decision):
    thread = threading.Thread(target=approve_when_pending, args=decision, daemon=True)
    thread.start()
    return thread


@pytest.mark.integration
@pytest.mark.parametrize("transport", ["http", "sse"])
def test_a_held_call_gets_progress_then_the_approved_result(
    sdk1, toolgate, token, ask, celery_worker, transport
):
    url = f"{toolgate.base_url}/mcp/demo/" + ("sse" if transport == "sse" else "")
    step = {"call": "echo", "arguments": {"text": "approved"}, "progress": True}
    process = agent_run(sdk1, url, token, [step], transport)
    approve_when_pending()
    events = events_of(process)
    assert last(events, "result")["content"] == [{"type": "text", "text": "approved"}]
    progress = [event["progress"] for event in events if "progress" in event]
    assert progress[0]["message"].startswith("Waiting for approval by a human since")


def test_a_denied_call_is_an_error_result_with_the_note(sdk1, toolgate, token, ask):
    step = {"call": "delete_file", "arguments": {"path": "/etc"}}
    process = agent_run(sdk1, f"{toolgate.base_url}/mcp/demo/", token, [step])
    approve_when_pending("deny", "not today")
    result = last(events_of(process), "result")
    assert result["isError"] is True
    assert result["content"][0]["text"].startswith(
        "Denied by alice: not today. The tool was not run. Why it needed a human:"
    )


def test_a_disabled_tool_is_refused_as_invalid_params(sdk1, toolgate, token, demo):
    demo.approval_mode = "fine_grained"
    demo.save()
    demo.tools.filter(name="delete_file").update(approval=ToolApproval.DISABLED)
    step = {"call": "delete_file", "arguments": {"path": "/etc"}}
    events = events_of(agent_run(sdk1, f"{toolgate.base_url}/mcp/demo/", token, [step]))
    assert events[-1]["code"] == -32602 and "Unknown tool" in events[-1]["error"]


def test_a_session_hears_that_its_tool_list_changed(sdk1, toolgate, token, demo, settings):
    settings.MCP_LIST_CHANGED_INTERVAL = 0.2
    demo.approval_mode = "fine_grained"
    demo.save()
    steps = ["list", {"wait_list_changed": 30}, "list"]
    process = agent_run(sdk1, f"{toolgate.base_url}/mcp/demo/", token, steps)
    first = process.stdout.readline()
    while '"waiting"' not in first:
        first = process.stdout.readline()
    demo.tools.filter(name="delete_file").update(approval=ToolApproval.DISABLED)
    events = events_of(process)
    assert {"notification": "tools/list_changed"} in events
    assert "delete_file" not in {tool["name"] for tool in last(events, "tools")}


@pytest.mark.integration
def test_a_task_waits_for_approval_then_returns_the_result(
    sdk1, toolgate, token, ask, celery_worker
):
    step = {"task": "echo", "arguments": {"text": "by task"}}
    process = agent_run(sdk1, f"{toolgate.base_url}/mcp/demo/", token, [step])
    approve_when_pending()
    events = events_of(process)
    created = last(events, "taskCreated")
    assert created["status"] == "working" and created["taskId"].startswith("toolcall-")
    assert created["statusMessage"].startswith("Waiting for approval by a human since")
    assert last(events, "taskStatus")["status"] == "completed"
    assert last(events, "result")["content"] == [{"type": "text", "text": "by task"}]


def test_a_denied_task_completes_with_the_note(sdk1, toolgate, token, ask):
    step = {"task": "delete_file", "arguments": {"path": "/etc"}}
    process = agent_run(sdk1, f"{toolgate.base_url}/mcp/demo/", token, [step])
    approve_when_pending("deny", "no")
    result = last(events_of(process), "result")
    assert result["isError"] is True and result["content"][0]["text"].startswith("Denied by alice")


def test_a_task_can_be_cancelled(sdk1, toolgate, token, ask):
    step = {"task": "echo", "arguments": {"text": "never"}, "cancel": True}
    events = events_of(agent_run(sdk1, f"{toolgate.base_url}/mcp/demo/", token, [step]))
    assert last(events, "taskCancelled")["status"] == "cancelled"
    assert ToolCall.objects.get().status == Status.CANCELLED
