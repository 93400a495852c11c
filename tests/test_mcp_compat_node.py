"""The MCP endpoint with Node MCP clients this project didn't write (tests/mcp_node_tools/, from
its lockfile): the TypeScript SDK v2 client (`@modelcontextprotocol/client`, both eras, and
2025-11-25 tasks through `@modelcontextprotocol/ext-tasks`) and the MCP Inspector's CLI mode.
The v1 SDK (`@modelcontextprotocol/sdk`, its Streamable HTTP and SSE client transports) is in
tests/test_mcp_endpoint_node.py."""

import json
from pathlib import Path

import pytest

from approvals.models import Status, ToolCall
from integrations.models import Agent, ToolApproval
from tests.mcp_live import add_server, approve_when_pending, rich_server
from tests.mcp_servers import demo_server
from tests.thirdparty import events_of, npm_folder, start

pytestmark = pytest.mark.django_db(transaction=True)
TOOLS = Path(__file__).parent / "mcp_node_tools"
INSPECTOR = "clients/launcher/build/index.js"  # its `inspector` bin


@pytest.fixture(scope="session")
def node_tools():
    return npm_folder(TOOLS, "@modelcontextprotocol/client")


@pytest.fixture
def demo(mcp_factory):
    return add_server("demo", mcp_factory(demo_server()).url)


@pytest.fixture
def token(demo):
    return Agent.create_with_token("ts-bot", servers=[demo])[1]


def ts_client(node_tools, url, token, steps, mode="legacy", transport="http"):
    spec = {"url": url, "token": token, "transport": transport, "mode": mode, "steps": steps}
    return start(["node", str(node_tools / "client.mjs"), json.dumps(spec)])


def last(events, key):
    return next(event[key] for event in reversed(events) if key in event)


@pytest.mark.parametrize("mode", ["legacy", "auto", "2026-07-28"])
def test_the_ts_v2_client_lists_and_calls_in_each_mode(node_tools, toolgate, token, mode):
    steps = ["list", {"call": "add", "arguments": {"a": 2, "b": 40}}]
    if mode == "legacy":
        steps.append("ping")  # 2026-07-28 has no ping
    events = events_of(ts_client(node_tools, f"{toolgate.base_url}/mcp/demo/", token, steps, mode))
    assert "error" not in events[-1], events[-1]
    connected = events[0]["connected"]
    assert connected["server"]["name"] == "toolgate"
    assert connected["protocolVersion"] == ("2025-11-25" if mode == "legacy" else "2026-07-28")
    echo = next(tool for tool in last(events, "tools") if tool["name"] == "echo")
    assert echo["_meta"]["toolgate/approval"] == "auto"
    result = last(events, "result")
    assert result["content"] == [{"type": "text", "text": "42"}] and result["isError"] is False


def test_the_ts_v2_client_works_over_sse(node_tools, toolgate, token):
    steps = ["list", {"call": "echo", "arguments": {"text": "over sse"}}]
    url = f"{toolgate.base_url}/mcp/demo/sse"
    events = events_of(ts_client(node_tools, url, token, steps, transport="sse"))
    assert last(events, "result")["content"] == [{"type": "text", "text": "over sse"}]


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
def test_the_ts_v2_client_gets_every_content_type(node_tools, toolgate, mcp_factory, mode):
    rich = add_server("rich", mcp_factory(rich_server()).url)
    _, token = Agent.create_with_token("ts-bot", servers=[rich])
    steps = [{"call": "rich__everything"}]
    result = last(events_of(ts_client(node_tools, f"{toolgate.base_url}/mcp/", token, steps, mode)),
                  "result")  # fmt: skip
    assert [block["type"] for block in result["content"]] == [
        "text", "image", "audio", "resource_link", "resource",
    ]  # fmt: skip
    assert result["structuredContent"] == {"answer": 42} and result["isError"] is True


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
def test_the_ts_v2_client_is_refused_a_bad_token(node_tools, toolgate, demo, mode):
    events = events_of(
        ts_client(node_tools, f"{toolgate.base_url}/mcp/demo/", "tg_x", ["list"], mode)
    )
    assert "401" in events[-1]["error"] or "nauthorized" in events[-1]["error"], events[-1]


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
def test_an_unknown_tool_is_invalid_params(node_tools, toolgate, token, mode):
    events = events_of(
        ts_client(node_tools, f"{toolgate.base_url}/mcp/demo/", token, [{"call": "nope"}], mode)
    )
    assert events[-1]["code"] == -32602 and "Unknown tool: nope" in events[-1]["error"]


@pytest.fixture
def ask(demo):
    demo.approval_mode = "always_ask"
    demo.save()
    return demo


@pytest.mark.integration
def test_a_held_ts_v2_call_gets_progress_then_the_approved_result(
    node_tools, toolgate, token, ask, celery_worker
):
    step = {"call": "echo", "arguments": {"text": "approved"}}
    process = ts_client(node_tools, f"{toolgate.base_url}/mcp/demo/", token, [step])
    approve_when_pending()
    events = events_of(process)
    assert last(events, "result")["content"] == [{"type": "text", "text": "approved"}]
    progress = [event["progress"] for event in events if "progress" in event]
    assert progress[0]["message"].startswith("Waiting for approval by a human since")


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
def test_a_denied_ts_v2_call_is_an_error_result_with_the_note(
    node_tools, toolgate, token, ask, mode
):
    step = {"call": "delete_file", "arguments": {"path": "/etc"}}
    process = ts_client(node_tools, f"{toolgate.base_url}/mcp/demo/", token, [step], mode)
    approve_when_pending("deny", "not today")
    result = last(events_of(process), "result")
    assert result["isError"] is True
    assert result["content"][0]["text"].startswith(
        "Denied by alice: not today. The tool was not run. Why it needed a human:"
    )
    assert ToolCall.objects.get().status == Status.DENIED


def test_a_ts_v2_session_hears_that_its_tool_list_changed(
    node_tools, toolgate, token, demo, settings
):
    settings.MCP_LIST_CHANGED_INTERVAL = 0.2
    demo.approval_mode = "fine_grained"
    demo.save()
    steps = ["list", {"wait_list_changed": 30}, "list"]
    process = ts_client(node_tools, f"{toolgate.base_url}/mcp/demo/", token, steps)
    while '"waiting"' not in process.stdout.readline():
        pass
    demo.tools.filter(name="delete_file").update(approval=ToolApproval.DISABLED)
    events = events_of(process)
    assert {"notification": "tools/list_changed"} in events
    assert "delete_file" not in {tool["name"] for tool in last(events, "tools")}


def inspector(node_tools, url, token, *arguments):
    """The MCP Inspector in CLI mode (headless): its JSON answer, or its error output."""
    script = (
        node_tools / "node_modules/@modelcontextprotocol/inspector/clients/launcher/build/index.js"
    )
    header = f"Authorization: Bearer {token}"
    process = start(["node", str(script), "--cli", url, "--header", header, *arguments])
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


@pytest.mark.parametrize("path", ["/mcp/demo/", "/mcp/demo/sse"])
def test_the_inspector_cli_lists_and_calls(node_tools, toolgate, token, path):
    url = f"{toolgate.base_url}{path}"
    transport = ["--transport", "sse" if path.endswith("sse") else "http"]
    code, out, err = inspector(node_tools, url, token, *transport, "--method", "tools/list")
    assert code == 0, err
    assert "echo" in {tool["name"] for tool in json.loads(out)["tools"]}
    code, out, err = inspector(node_tools, url, token, *transport, "--method", "tools/call",
                               "--tool-name", "echo", "--tool-arg", "text=inspected")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["content"] == [{"type": "text", "text": "inspected"}]


def test_the_inspector_cli_is_refused_a_bad_token(node_tools, toolgate, demo):
    code, _, err = inspector(node_tools, f"{toolgate.base_url}/mcp/demo/", "tg_x", "--transport",
                               "http", "--method", "tools/list")  # fmt: skip
    # The 401's `WWW-Authenticate: Bearer` makes it look for OAuth, which a headless run refuses.
    assert code != 0 and json.loads(err)["error"]["code"] == "auth_required"


def test_the_tasks_extension_package_gets_a_task_and_the_denial(node_tools, toolgate, token, ask):
    step = {"task": "delete_file", "arguments": {"path": "/etc"}}
    process = ts_client(node_tools, f"{toolgate.base_url}/mcp/demo/", token, ["list", step])
    approve_when_pending("deny", "no")
    events = events_of(process)
    task_id = f"toolcall-{ToolCall.objects.get().pk}"
    assert last(events, "execution") == {
        "kind": "task", "handle": {"taskId": task_id, "operation": "tools/call"},
    }  # fmt: skip
    assert last(events, "outcome")["task"]["statusMessage"].startswith("Denied by alice")
    result = last(events, "result")
    assert result["isError"] is True
    assert result["content"][0]["text"].startswith(
        "Denied by alice: no. The tool was not run. Why it needed a human:"
    )
