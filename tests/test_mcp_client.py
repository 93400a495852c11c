"""The MCP client against real servers on loopback, both transports, good and misbehaving."""

import mcp_types
import pytest
from mcp.server import Server

from integrations.mcp_client import Endpoint, McpError, acall_tool, call_tool, list_tools
from tests.mcp_servers import (
    PROTECTED_HEADER,
    PROTECTED_TOKEN,
    broken_stream_server,
    error_500_server,
    garbage_server,
    hanging_server,
    huge_reply_server,
    legacy_only_server,
    not_mcp_server,
    paginated_server,
    protected_server,
    redirect_server,
)


def endpoint(server, transport="auto", **kwargs):
    return Endpoint(url=server.url, transport=transport, allow_private_network=True, **kwargs)


def test_it_lists_tools_over_each_transport(mcp_demo):
    listing = list_tools(endpoint(mcp_demo, mcp_demo.transport))
    names = [tool["name"] for tool in listing.tools]
    assert names == ["echo", "add", "delete_file", "fail", "slow"]
    echo = listing.tools[0]
    assert echo["annotations"]["readOnlyHint"] is True
    assert echo["inputSchema"]["required"] == ["text"]
    assert listing.transport == mcp_demo.transport
    assert listing.server_info["name"] == "demo"


def test_auto_falls_back_to_sse(mcp_demo_sse):
    listing = list_tools(endpoint(mcp_demo_sse, "auto"))
    assert listing.transport == "sse"
    assert len(listing.tools) == 5


def test_auto_prefers_streamable_http(mcp_demo_http):
    assert list_tools(endpoint(mcp_demo_http, "auto")).transport == "streamable_http"


@pytest.mark.parametrize("transport", ["streamable_http", "sse"])
def test_it_follows_pagination_to_the_end(mcp_factory, transport):
    server = mcp_factory(paginated_server(count=250, page_size=40), transport)
    listing = list_tools(endpoint(server, transport))
    assert len(listing.tools) == 250
    assert listing.tools[-1]["name"] == "tool_249"


def test_it_refuses_more_tools_than_the_limit(mcp_factory, settings):
    settings.MCP_MAX_TOOLS = 100
    server = mcp_factory(paginated_server(count=250, page_size=40))
    with pytest.raises(McpError, match="more than 100 tools") as error:
        list_tools(endpoint(server))
    assert error.value.code == "too_large"


def test_it_speaks_the_2026_protocol(mcp_demo):
    assert list_tools(endpoint(mcp_demo, mcp_demo.transport)).protocol_version == "2026-07-28"


@pytest.mark.parametrize("transport", ["streamable_http", "sse"])
def test_it_falls_back_to_the_older_handshake(mcp_factory, transport):
    server = mcp_factory(legacy_only_server(), transport)
    listing = list_tools(endpoint(server, transport))
    assert listing.protocol_version != "2026-07-28"
    assert [tool["name"] for tool in listing.tools][:1] == ["echo"]


@pytest.mark.parametrize("transport", ["streamable_http", "sse"])
def test_it_sends_the_token_and_extra_headers(mcp_factory, transport):
    server = mcp_factory(protected_server(), transport)
    name, value = PROTECTED_HEADER
    headers = {"Authorization": f"Bearer {PROTECTED_TOKEN}", name: value}
    listing = list_tools(endpoint(server, transport, headers=headers))
    assert len(listing.tools) == 5
    assert all(
        r.headers.get("authorization") == f"Bearer {PROTECTED_TOKEN}" for r in server.requests
    )
    assert all(r.headers.get(name.lower()) == value for r in server.requests)


@pytest.mark.parametrize("transport", ["streamable_http", "sse"])
def test_a_missing_token_is_reported_as_refused_credentials(mcp_factory, transport):
    server = mcp_factory(protected_server(), transport)
    with pytest.raises(McpError) as error:
        list_tools(endpoint(server, transport))
    assert error.value.code == "unauthorized"
    assert "HTTP 401" in error.value.message


def test_it_calls_a_tool(mcp_demo):
    result = call_tool(endpoint(mcp_demo, mcp_demo.transport), "add", {"a": 2, "b": 3})
    assert result.is_error is False
    assert result.content == [{"type": "text", "text": "5"}]
    assert result.structured_content == {"result": 5}


def test_a_tool_error_is_a_result_not_a_failure(mcp_demo_http):
    result = call_tool(endpoint(mcp_demo_http), "fail", {"message": "nope"})
    assert result.is_error is True
    assert "nope" in result.content[0]["text"]


def output_pattern_server():
    """A tool whose output schema holds a pattern its structured content does not match; as
    listed on the session, so a server can change it after review."""
    output = {"type": "object", "properties": {"x": {"type": "string", "pattern": "^(a|a)*$"}}}
    tool = mcp_types.Tool(name="patterned", input_schema={"type": "object"}, output_schema=output)

    async def list_tools(ctx, params):
        return mcp_types.ListToolsResult(tools=[tool])

    async def call_tool(ctx, params):
        text = mcp_types.TextContent(type="text", text="done")
        return mcp_types.CallToolResult(content=[text], structured_content={"x": "a" * 20 + "!"})

    return Server("patterned", on_list_tools=list_tools, on_call_tool=call_tool)


@pytest.mark.parametrize("how", ["streamable_http", "sse", "pooled"])
def test_the_server_s_output_schema_is_not_run_on_its_result(mcp_factory, loop, how):
    """The SDK checked structured content against the output schema the server lists, with
    Python's backtracking regexes in the event loop: with `^(a|a)*$` and 40 "a"s, hours of
    the web process's loop. The result comes back as the server sent it."""
    running = mcp_factory(output_pattern_server(), "sse" if how == "sse" else "streamable_http")
    server = endpoint(running, running.transport)
    if how == "pooled":
        result = loop.run(acall_tool(server, "patterned", {}))
    else:
        result = call_tool(server, "patterned", {})
    assert result.structured_content == {"x": "a" * 20 + "!"}
    assert (result.content, result.is_error) == ([{"type": "text", "text": "done"}], False)


def test_an_unreachable_server_never_got_the_request(settings):
    dead = Endpoint(url="http://127.0.0.1:9/mcp", allow_private_network=True)
    with pytest.raises(McpError) as error:
        list_tools(dead)
    assert error.value.code == "unreachable"
    assert error.value.reached_server is False


def test_a_private_address_is_refused_unless_allowed(mcp_demo_http):
    with pytest.raises(McpError) as error:
        list_tools(Endpoint(url=mcp_demo_http.url))
    assert error.value.code == "refused"
    assert error.value.reached_server is False
    assert mcp_demo_http.requests == []


@pytest.mark.parametrize("transport", ["streamable_http", "sse"])
def test_a_hanging_server_times_out(mcp_factory, settings, transport):
    settings.MCP_READ_TIMEOUT = 1
    settings.MCP_SYNC_TIMEOUT = 2
    server = mcp_factory(hanging_server(), transport)
    with pytest.raises(McpError) as error:
        list_tools(endpoint(server, transport))
    assert error.value.code == "timeout"


def test_a_server_hanging_on_the_tool_list_times_out(mcp_factory, settings):
    settings.MCP_READ_TIMEOUT = 1
    settings.MCP_SYNC_TIMEOUT = 2
    server = mcp_factory(hanging_server("tools/list"))
    with pytest.raises(McpError) as error:
        list_tools(endpoint(server, "streamable_http"))
    assert error.value.code == "timeout"


@pytest.mark.parametrize("transport", ["streamable_http", "sse"])
def test_a_huge_reply_is_cut_off(mcp_factory, settings, transport):
    settings.MCP_MAX_RESPONSE_BYTES = 1_000_000
    server = mcp_factory(huge_reply_server(size_bytes=5_000_000), transport)
    with pytest.raises(McpError) as error:
        list_tools(endpoint(server, transport))
    assert error.value.code == "too_large"
    assert "1,000,000 byte limit" in error.value.message


@pytest.mark.parametrize(
    ("app", "code"),
    [
        (broken_stream_server, {"protocol", "server_error"}),
        (garbage_server, {"protocol"}),
        (not_mcp_server, {"not_mcp", "protocol"}),
        (error_500_server, {"server_error"}),
    ],
)
def test_a_misbehaving_server_gets_a_clear_error(mcp_factory, app, code):
    server = mcp_factory(app())
    with pytest.raises(McpError) as error:
        list_tools(endpoint(server, "streamable_http"))
    assert error.value.code in code
    assert error.value.message


def test_an_ordinary_website_is_not_an_mcp_endpoint(mcp_factory):
    server = mcp_factory(not_mcp_server(post_status=404))
    with pytest.raises(McpError) as error:
        list_tools(endpoint(server, "auto"))
    assert error.value.code == "not_mcp"


def test_redirects_to_another_origin_are_not_followed(mcp_factory, mcp_demo_http):
    server = mcp_factory(redirect_server(mcp_demo_http.url))
    headers = {"Authorization": "Bearer leak-me-not"}
    with pytest.raises(McpError) as error:
        list_tools(endpoint(server, "streamable_http", headers=headers))
    assert error.value.code == "redirect"
    assert mcp_demo_http.requests == []


def test_errors_never_carry_the_url_or_the_token(mcp_factory):
    server = mcp_factory(protected_server())
    secret_url = server.base_url + "/mcp?key=SECRET-IN-URL"
    with pytest.raises(McpError) as error:
        list_tools(
            Endpoint(
                url=secret_url,
                headers={"Authorization": "Bearer TOKEN-XYZ"},
                allow_private_network=True,
            )
        )
    assert "SECRET-IN-URL" not in error.value.message
    assert "TOKEN-XYZ" not in error.value.message
    assert server.base_url in error.value.message  # scheme and host are fine to show
