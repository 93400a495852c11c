"""Upstream MCP servers this project didn't write, synced and called through Toolgate: the
reference server `@modelcontextprotocol/server-everything` (npm, Streamable HTTP and SSE), a
FastMCP server of the Python SDK 1.x (tests/mcp_py1/server.py), a low-level SDK 2.x server
with odd but valid features (`odd_server`), and their calls through the JSON API and the MCP
endpoint."""

import contextlib
import json
import os
import socket
import time
from pathlib import Path

import anyio
import httpx2
import mcp
import mcp_types as types
import pytest
from mcp.client.streamable_http import streamable_http_client
from mcp.server import Server

from approvals.models import Status, ToolCall
from integrations.models import Agent, McpServer
from tests.mcp_live import PNG, WAV, approve_when_pending
from tests.mcp_servers import _HandshakeOnly
from tests.test_mcp_compat_python1 import HERE as PY1
from tests.thirdparty import events_of, npm_folder, python_venv, start

pytestmark = pytest.mark.django_db(transaction=True)
NODE_TOOLS = Path(__file__).parent / "mcp_node_tools"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port, process, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args[:3]} exited: {process.stderr.read()[-2000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    pytest.fail(f"{process.args[:3]} did not listen on {port}")


@pytest.fixture(scope="session")
def node_tools():
    return npm_folder(NODE_TOOLS, "@modelcontextprotocol/server-everything")


@pytest.fixture(params=["streamableHttp", "sse"])
def everything(request, node_tools):
    """The reference server in one of its HTTP modes: (its URL, the transport to name)."""
    port = free_port()
    script = node_tools / "node_modules/@modelcontextprotocol/server-everything/dist/index.js"
    process = start(["node", str(script), request.param], env={**_env(), "PORT": str(port)})
    wait_for_port(port, process)
    yield (f"http://127.0.0.1:{port}/mcp" if request.param == "streamableHttp"
           else f"http://127.0.0.1:{port}/sse"), request.param  # fmt: skip
    process.terminate()


def _env():
    return {key: value for key, value in os.environ.items() if not key.startswith("TOOLGATE_")}


def add(name, url, transport="auto", mode="no_approval"):
    server = McpServer.objects.create(
        name=name, url=url, transport=transport, approval_mode=mode,
        allow_private_network=True, allow_http=True,
    )  # fmt: skip
    server.sync_tools()
    server.refresh_from_db()
    return server


@pytest.fixture(scope="session")
def sdk1():
    return python_venv(PY1 / "requirements.txt")


@pytest.fixture(params=["streamable-http", "sse", "stateless-http"])
def fastmcp1(request, sdk1):
    """A FastMCP 1.x server in one of its HTTP modes: its URL (`.mode` says which)."""
    port = free_port()
    process = start([sdk1, str(PY1 / "server.py"), str(port), request.param])
    wait_for_port(port, process)
    yield Url(f"http://127.0.0.1:{port}/" + ("sse" if request.param == "sse" else "mcp"),
              request.param)  # fmt: skip
    process.terminate()


class Url(str):
    def __new__(cls, url, mode):
        self = super().__new__(cls, url)
        self.mode = mode
        return self


def api_call(toolgate, token, server, tool, arguments, wait=30):
    """`POST /api/v1/tool-calls?wait=` as an agent: the call as the JSON API answers it."""
    response = httpx2.post(
        f"{toolgate.base_url}/api/v1/tool-calls?wait={wait}",
        headers={"Authorization": f"Bearer {token}"},
        json={"server": server, "tool": tool, "arguments": arguments},
        timeout=wait + 30,
    )
    assert response.status_code in (200, 201, 202), response.text
    return response.json()


def mcp_calls(toolgate, token, path, calls):
    """[(result in wire form, [progress], [log data])] for each (tool, arguments), on one
    session of the SDK 2.x client."""

    async def go():
        answers = []
        async with contextlib.AsyncExitStack() as stack:
            logs = []

            async def on_log(params):
                logs.append(params.data)

            http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60)
            stack.push_async_callback(http.aclose)
            transport = streamable_http_client(f"{toolgate.base_url}{path}", http_client=http)
            client = await stack.enter_async_context(
                mcp.Client(
                    transport, mode="legacy", read_timeout_seconds=60, logging_callback=on_log
                )
            )
            await client.set_logging_level("info")
            for tool, arguments in calls:
                progress, logs[:] = [], []

                async def on_progress(value, total, message, progress=progress):
                    progress.append((value, total, message))

                result = await client.call_tool(tool, arguments, progress_callback=on_progress)
                answers.append((_wire(result), progress, list(logs)))
        return answers

    return anyio.run(go)


def _wire(result):
    return result.model_dump(mode="json", by_alias=True, exclude_none=True)


def types_of(result):
    return [block["type"] for block in result["content"]]


def test_the_reference_server_syncs_with_every_tool(everything):
    server = add("everything", everything[0])
    assert not server.last_error and server.server_info["name"] == "mcp-servers/everything"
    assert server.server_info["transport"] == (
        "sse" if everything[1] == "sse" else "streamable_http"
    )
    tools = {tool.name: tool for tool in server.tools.all()}
    assert {"echo", "get-sum", "get-tiny-image", "get-structured-content"} <= set(tools)
    assert tools["get-structured-content"].output_schema["type"] == "object"
    assert tools["echo"].annotations["readOnlyHint"] is True


def test_the_reference_servers_results_come_back_intact(everything, toolgate):
    server = add("everything", everything[0])
    _, token = Agent.create_with_token("bot", servers=[server])
    echoed = api_call(toolgate, token, "everything", "echo", {"message": "hi"})
    assert echoed["status"] == "succeeded"
    assert echoed["result"]["content"] == [{"type": "text", "text": "Echo: hi"}]
    image, structured, links, annotated, embedded, progress = mcp_calls(
        toolgate, token, "/mcp/everything/", [
            ("get-tiny-image", {}),
            ("get-structured-content", {"location": "New York"}),
            ("get-resource-links", {"count": 2}),
            ("get-annotated-message", {"messageType": "error", "includeImage": True}),
            ("get-resource-reference", {"resourceType": "Text", "resourceId": 1}),
            ("trigger-long-running-operation", {"duration": 1, "steps": 3}),
        ],
    )  # fmt: skip
    assert types_of(image[0]) == ["text", "image", "text"]
    assert image[0]["content"][1]["mimeType"] == "image/png"
    assert structured[0]["structuredContent"]["temperature"] == 33
    assert types_of(links[0]) == ["text", "resource_link", "resource_link"]
    assert annotated[0]["content"][0]["annotations"]["priority"] == 1.0
    assert embedded[0]["content"][1]["resource"]["uri"] == "demo://resource/dynamic/text/1"
    assert [step[:2] for step in progress[1]] == [(1, 3), (2, 3), (3, 3)]
    assert set(ToolCall.objects.values_list("status", flat=True)) == {Status.SUCCEEDED}


@pytest.mark.integration
def test_a_reference_server_call_approved_by_a_human_runs_on_the_worker(
    everything, toolgate, celery_worker
):
    server = add("everything", everything[0], mode="always_ask")
    _, token = Agent.create_with_token("bot", servers=[server])
    pending = api_call(toolgate, token, "everything", "get-sum", {"a": 2, "b": 3}, wait=0)
    assert pending["status"] == "pending_approval"
    approve_when_pending()
    response = httpx2.get(
        f"{toolgate.base_url}/api/v1/tool-calls/{pending['id']}?wait=30",
        headers={"Authorization": f"Bearer {token}"}, timeout=60,
    )  # fmt: skip
    call = response.json()
    assert call["status"] == "succeeded", call
    assert "5" in call["result"]["content"][0]["text"]


def test_a_fastmcp_1x_server_syncs_its_typed_tools(fastmcp1):
    server = add("fast", fastmcp1)
    assert not server.last_error, server.last_error
    tools = {tool.name: tool for tool in server.tools.all()}
    assert {"add", "weather.lookup", "picture", "slow_count", "ask_user", "fail"} == set(tools)
    assert tools["add"].input_schema["required"] == ["a", "b"]
    assert tools["weather.lookup"].output_schema["properties"]["celsius"]["type"] == "number"
    assert tools["weather.lookup"].annotations["readOnlyHint"] is True


def test_a_fastmcp_1x_servers_calls_come_back_intact(fastmcp1, toolgate):
    server = add("fast", fastmcp1)
    _, token = Agent.create_with_token("bot", servers=[server])
    assert api_call(toolgate, token, "fast", "add", {"a": 2, "b": 40})["result"]["content"] == [
        {"type": "text", "text": "42"}
    ]
    weather, picture, counted, failed = mcp_calls(
        toolgate, token, "/mcp/", [
            ("fast__weather.lookup", {"city": "Oslo"}),
            ("fast__picture", {}),
            ("fast__slow_count", {"steps": 2}),
            ("fast__fail", {"reason": "on purpose"}),
        ],
    )  # fmt: skip
    assert weather[0]["structuredContent"] == {"city": "Oslo", "celsius": 21.5}
    assert picture[0]["content"] == [
        {"type": "image", "data": "iVBORw0KGgo=", "mimeType": "image/png"}
    ]
    assert counted[0]["content"][0]["text"] == "counted to 2"
    assert [step[2] for step in counted[1]] == ["step 1", "step 2"]  # progress passed on
    assert counted[2] == ["counted 1", "counted 2"]  # and the log lines the agent asked for
    assert failed[0]["isError"] is True and "on purpose" in failed[0]["content"][0]["text"]


def test_a_fastmcp_1x_elicitation_is_declined_and_audited(fastmcp1, toolgate):
    server = add("fast", fastmcp1)
    _, token = Agent.create_with_token("bot", servers=[server])
    ((answer, _, _),) = mcp_calls(toolgate, token, "/mcp/fast/", [("ask_user", {})])
    if fastmcp1.mode == "stateless-http":
        # A stateless server sends its request on the call's response stream but has no
        # session to take the answer back: the call runs out of time, and says so.
        assert answer["isError"] is True
        assert answer["content"][0]["text"].endswith("over Streamable HTTP: no answer in time.")
    else:
        assert answer["content"][0]["text"] == "elicitation decline"
    declined = ToolCall.objects.get().declined_requests
    assert [(entry["method"], entry["message"]) for entry in declined] == [
        ("elicitation/create", "Really?")
    ]


LONG = "Reads a file. " + "It reads the whole file, however long, and says how big it was. " * 400
SIZE_SCHEMA = {"type": "object", "properties": {"size": {"type": "integer"}}, "required": ["size"]}


def odd_server():
    """A low-level SDK 2.x server with odd but valid features: tools listed two a page with
    cursors, names with dots and dashes, a very long description, output schemas and
    structured content (one with no other content), annotations on tools and on content,
    every content type, progress and log messages, and an `isError` result."""
    schema = {"type": "object", "properties": {"path": {"type": "string"}}}
    tools = [
        types.Tool(name="files.read-v2", title="Read a file", description=LONG,
                   input_schema=schema, output_schema=SIZE_SCHEMA,
                   annotations=types.ToolAnnotations(read_only_hint=True, idempotent_hint=True)),
        types.Tool(name="size-only", input_schema=schema, output_schema=SIZE_SCHEMA),
        types.Tool(name="media", input_schema={"type": "object"}),
        types.Tool(name="report", input_schema={"type": "object"}),
        types.Tool(name="broken", input_schema={"type": "object"}),
    ]  # fmt: skip

    async def list_tools(ctx, params):
        first = int(params.cursor) if params and params.cursor else 0
        following = str(first + 2) if first + 2 < len(tools) else None
        return types.ListToolsResult(tools=tools[first : first + 2], next_cursor=following)

    async def call_tool(ctx, params):
        text = types.TextContent
        if params.name == "files.read-v2":
            return types.CallToolResult(content=[text(type="text", text='{"size": 3}')],
                                        structured_content={"size": 3})  # fmt: skip
        if params.name == "size-only":
            return types.CallToolResult(content=[], structured_content={"size": 7})
        if params.name == "media":
            audience = types.Annotations(audience=["user"], priority=0.5)
            return types.CallToolResult(content=[
                text(type="text", text="for the user", annotations=audience),
                types.ImageContent(type="image", data=PNG, mime_type="image/png"),
                types.AudioContent(type="audio", data=WAV, mime_type="audio/wav"),
                types.EmbeddedResource(type="resource", resource=types.BlobResourceContents(
                    uri="file:///b.bin", blob=PNG, mime_type="application/octet-stream")),
                types.ResourceLink(type="resource_link", uri="https://example.com/r", name="r",
                                   annotations=audience),
            ])  # fmt: skip
        if params.name == "report":
            for step in (1, 2):
                await ctx.session.report_progress(step, 2, f"part {step}")
                await ctx.session.send_log_message("info", {"part": step},
                                                   related_request_id=ctx.request_id)  # fmt: skip
            return types.CallToolResult(content=[text(type="text", text="reported")])
        return types.CallToolResult(content=[text(type="text", text="it broke")], is_error=True)

    return Server("odd", on_list_tools=list_tools, on_call_tool=call_tool)


@pytest.fixture(params=["streamable_http", "sse", "handshake-only"])
def odd(request, mcp_factory):
    """The odd server as an upstream: over each transport, and as a server that speaks only
    the older `initialize` handshake."""
    if request.param == "handshake-only":
        return add("odd", mcp_factory(_HandshakeOnly(odd_server())).url)
    return add("odd", mcp_factory(odd_server(), request.param).url, request.param)


def test_the_odd_servers_tools_sync_from_every_page(odd):
    assert not odd.last_error, odd.last_error
    tools = {tool.name: tool for tool in odd.tools.all()}
    assert set(tools) == {"files.read-v2", "size-only", "media", "report", "broken"}
    read = tools["files.read-v2"]
    assert read.description == LONG and read.title == "Read a file"
    assert read.output_schema == SIZE_SCHEMA and read.annotations["readOnlyHint"] is True


def test_the_odd_servers_calls_come_back_through_the_api(odd, toolgate):
    _, token = Agent.create_with_token("bot", servers=[odd])
    read = api_call(toolgate, token, "odd", "files.read-v2", {"path": "/x"})
    assert read["result"]["structured_content"] == {"size": 3}
    assert api_call(toolgate, token, "odd", "size-only", {})["result"] == {
        "content": [], "structured_content": {"size": 7}, "is_error": False,
    }  # fmt: skip
    broken = api_call(toolgate, token, "odd", "broken", {})
    assert broken["status"] == "succeeded" and broken["result"]["is_error"] is True


def test_the_odd_servers_calls_come_back_through_the_endpoint(odd, toolgate):
    _, token = Agent.create_with_token("bot", servers=[odd])
    read, size, media, report = mcp_calls(toolgate, token, "/mcp/", [
        ("odd__files.read-v2", {"path": "/x"}), ("odd__size-only", {}), ("odd__media", {}),
        ("odd__report", {}),
    ])  # fmt: skip
    assert read[0]["structuredContent"] == {"size": 3}
    assert size[0]["structuredContent"] == {"size": 7} and size[0]["content"] == []
    blocks = media[0]["content"]
    assert [block["type"] for block in blocks] == [
        "text", "image", "audio", "resource", "resource_link",
    ]  # fmt: skip
    assert blocks[0]["annotations"] == {"audience": ["user"], "priority": 0.5}
    assert blocks[3]["resource"]["blob"] == PNG and blocks[4]["annotations"]["priority"] == 0.5
    assert [step[2] for step in report[1]] == ["part 1", "part 2"]
    assert report[2] == [{"part": 1}, {"part": 2}]


def test_the_odd_servers_tools_reach_sdk_1x_agents_which_check_the_output_schema(
    odd, toolgate, sdk1
):
    _, token = Agent.create_with_token("bot", servers=[odd])
    steps = ["list", {"call": "files.read-v2", "arguments": {"path": "/x"}},
             {"call": "size-only"}]  # fmt: skip
    spec = {"url": f"{toolgate.base_url}/mcp/odd/", "token": token, "transport": "http",
            "protocol": None, "steps": steps}  # fmt: skip
    events = events_of(start([sdk1, str(PY1 / "client.py"), json.dumps(spec)]))
    assert "error" not in events[-1], events[-1]
    listed = {tool["name"]: tool for tool in events[1]["tools"]}
    assert listed["files.read-v2"]["outputSchema"] == SIZE_SCHEMA
    assert listed["files.read-v2"]["description"] == LONG
    results = [event["result"] for event in events if "result" in event]
    assert [result["structuredContent"] for result in results] == [{"size": 3}, {"size": 7}]
