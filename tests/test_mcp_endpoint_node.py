"""The MCP endpoint with a client this project didn't write: the TypeScript MCP SDK from npm
(tests/mcp_node_client/, installed from its lockfile on first use), run by Node."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from approvals.models import Status, ToolCall
from integrations.models import Agent
from tests.conftest import track, wait_until
from tests.mcp_live import add_server, approve_when_pending, rich_server
from tests.mcp_servers import demo_server

pytestmark = pytest.mark.django_db(transaction=True)
CLIENT = Path(__file__).parent / "mcp_node_client"


@pytest.fixture(scope="session")
def node_client():
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.fail("Node.js and npm are needed for the TypeScript client tests.")
    if not (CLIENT / "node_modules" / "@modelcontextprotocol" / "sdk").exists():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=CLIENT, check=True, timeout=300)
    return node


def start_client(node, url, token, transport, action, tool="", arguments=None):
    command = [node, str(CLIENT / "client.mjs"), url, token, transport, action, tool]
    command.append(json.dumps(arguments or {}))
    return track(
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    )


def events_of(process, timeout=120):
    out, err = process.communicate(timeout=timeout)
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert events, err
    return events


@pytest.fixture
def demo(mcp_factory):
    return add_server("demo", mcp_factory(demo_server()).url)


@pytest.fixture
def token(demo):
    return Agent.create_with_token("node-bot", servers=[demo])[1]


@pytest.mark.parametrize("transport", ["http", "sse"])
def test_the_typescript_client_lists_and_calls(node_client, toolgate, token, transport):
    url = f"{toolgate.base_url}/mcp/demo/" + ("sse" if transport == "sse" else "")
    events = events_of(
        start_client(node_client, url, token, transport, "call", "add", {"a": 2, "b": 40})
    )
    assert events[0]["server"]["name"] == "toolgate"
    result = events[-1]["result"]
    assert result["content"] == [{"type": "text", "text": "42"}] and result["isError"] is False


def test_the_typescript_client_gets_every_content_type(node_client, toolgate, mcp_factory):
    rich = add_server("rich", mcp_factory(rich_server()).url)
    _, token = Agent.create_with_token("node-bot", servers=[rich])
    url = f"{toolgate.base_url}/mcp/"
    result = events_of(start_client(node_client, url, token, "http", "call", "rich__everything"))[
        -1
    ]
    kinds = [block["type"] for block in result["result"]["content"]]
    assert kinds == ["text", "image", "audio", "resource_link", "resource"]
    assert result["result"]["structuredContent"] == {"answer": 42}


def test_the_typescript_client_is_refused_a_bad_token(node_client, toolgate, demo):
    events = events_of(
        start_client(node_client, f"{toolgate.base_url}/mcp/demo/", "tg_x", "http", "list")
    )
    assert "Missing or invalid agent token" in events[-1]["error"]


def decided(node_client, toolgate, token, action, tool, arguments, *decision):
    """What the client saw of a call that waited for a human, who decided `decision`."""
    process = start_client(
        node_client, f"{toolgate.base_url}/mcp/demo/", token, "http", action, tool, arguments
    )
    approve_when_pending(*decision)
    return events_of(process)


@pytest.fixture
def ask(demo):
    demo.approval_mode = "always_ask"
    demo.save()


def test_a_held_typescript_call_gets_progress_and_the_denial(node_client, toolgate, token, ask):
    events = decided(
        node_client,
        toolgate,
        token,
        "call",
        "delete_file",
        {"path": "/tmp/x"},
        "deny",
        "no deleting",
    )
    assert events[1]["progress"]["message"].startswith("Waiting for approval by a human since")
    result = events[-1]["result"]
    assert result["isError"] is True
    assert result["content"][0]["text"] == (
        "Denied by alice: no deleting. The tool was not run. "
        "Why it needed a human: The server's mode is Always Ask."
    )


@pytest.mark.integration
def test_a_typescript_task_is_approved_and_returns_the_result(
    node_client, toolgate, token, ask, celery_worker
):
    events = decided(node_client, toolgate, token, "task", "echo", {"text": "tasked"})
    created = next(event["taskCreated"] for event in events if "taskCreated" in event)
    assert created["status"] == "working" and created["taskId"].startswith("toolcall-")
    assert events[-1]["result"]["content"] == [{"type": "text", "text": "tasked"}]
    assert ToolCall.objects.get().status == Status.SUCCEEDED


def test_a_typescript_task_that_is_denied_completes_with_the_note(
    node_client, toolgate, token, ask
):
    events = decided(node_client, toolgate, token, "task", "echo", {"text": "no"}, "deny", "nope")
    assert any("taskCreated" in event for event in events)
    result = events[-1]["result"]
    assert result["isError"] is True and "nope" in result["content"][0]["text"]
    wait_until(lambda: ToolCall.objects.get().status == Status.DENIED)
