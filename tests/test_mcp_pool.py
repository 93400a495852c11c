"""The pool of open upstream sessions (integrations/mcp_pool.py): what reaches the upstream
server when calls run one after another in one event loop, as in the web process."""

import asyncio
import contextlib
import json
import threading

import httpx2
import mcp_types
import pytest
from django.utils import timezone
from mcp.server import Server

from approvals.models import DecidedBy, Status, ToolCall
from integrations import mcp_client, mcp_pool, netguard
from integrations.models import Agent, ApprovalMode, McpServer
from tests.conftest import wait_until
from tests.mcp_live import add_server, rich_server, toolgate  # noqa: F401 - a fixture
from tests.mcp_servers import (
    _asgi_app_for,
    _HandshakeOnly,
    demo_server,
    legacy_only_server,
    start,
)


class Recording:
    """`inner` served with the JSON-RPC method of every POST recorded in `methods`; while
    `drop_calls` is set, a `tools/call` is counted and its connection dropped mid-answer."""

    def __init__(self, inner=None):
        self.inner = inner if inner is not None else demo_server()
        self.methods = []
        self.drop_calls = False

    def count(self, method):
        return self.methods.count(method)

    def build_asgi_app(self, transport):
        app = _asgi_app_for(self.inner, transport)

        async def record(scope, receive, send):
            if scope["type"] != "http" or scope["method"] != "POST":
                return await app(scope, receive, send)
            messages = [await receive()]
            while messages[-1].get("more_body"):
                messages.append(await receive())
            body = b"".join(message.get("body", b"") for message in messages)
            method = json.loads(body).get("method") if body.startswith(b"{") else None
            self.methods.append(method)
            if self.drop_calls and method == "tools/call":
                start = {"type": "http.response.start", "status": 200}
                await send({**start, "headers": [(b"content-type", b"text/event-stream")]})
                await send({"type": "http.response.body", "body": b": ok\n\n", "more_body": True})
                raise ConnectionResetError("dropped mid-call on purpose")
            replay = iter(messages)

            async def receive_again():
                return next(replay, None) or await receive()

            await app(scope, receive_again, send)

        return record


class Loop:
    """One event loop on a thread of its own, like the web process's."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout=30):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call(self, endpoint, tool="echo", arguments=None, **options):
        arguments = {"text": "hi"} if arguments is None else arguments
        return self.run(mcp_client.acall_tool(endpoint, tool, arguments, **options))

    def failure(self, endpoint, **options):
        with pytest.raises(mcp_client.McpError) as failed:
            self.call(endpoint, **options)
        return failed.value

    @property
    def pool(self):
        async def current():
            return mcp_pool.pool()

        return self.run(current())

    def close(self):
        async def cancel_all():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def endpoint_of(running, **fields):
    return mcp_client.Endpoint(
        url=running.url, transport="streamable_http", allow_private_network=True, **fields
    )


def test_calls_reuse_one_open_session(loop, upstream):
    endpoint = endpoint_of(upstream)
    results = [loop.call(endpoint, arguments={"text": f"hi {i}"}) for i in range(4)]
    assert [r.content[0]["text"] for r in results] == [f"hi {i}" for i in range(4)]
    methods = upstream.recording
    assert methods.count("server/discover") == 1  # the era, once
    assert methods.count("tools/list") == 0  # the SDK's output check is not run (mcp_client)
    assert methods.count("tools/call") == 4
    assert (loop.pool.opened, loop.pool.idle_count()) == (1, 1)


def test_without_the_pool_every_call_opens_a_session(loop, upstream, settings):
    settings.MCP_POOL_SESSIONS = 0
    for _ in range(3):
        loop.call(endpoint_of(upstream))
    assert upstream.recording.count("server/discover") == 3


def test_a_handshake_era_server_is_initialized_once(loop):
    recording = Recording(legacy_only_server())
    with start(recording) as running:
        for _ in range(3):
            assert loop.call(endpoint_of(running)).content[0]["text"] == "hi"
    assert recording.count("initialize") == 1
    assert recording.count("tools/call") == 3


def test_another_connection_gets_its_own_session(loop, upstream):
    loop.call(endpoint_of(upstream))
    loop.call(endpoint_of(upstream, headers={"X-Tenant": "other"}))
    loop.call(endpoint_of(upstream))
    assert (loop.pool.opened, loop.pool.idle_count()) == (2, 2)


def test_a_restarted_upstream_is_reached_again_without_a_new_probe(loop):
    recording = Recording()
    running = start(recording)
    endpoint = endpoint_of(running)
    loop.call(endpoint)
    running.stop()
    failed = loop.failure(endpoint)
    assert (failed.code, failed.reached_server) == ("unreachable", False)
    with start(recording, port=running.port):
        assert loop.call(endpoint).content[0]["text"] == "hi"
        assert loop.call(endpoint).content[0]["text"] == "hi"
    assert recording.count("server/discover") == 1  # the era was learned once
    assert recording.count("tools/call") == 3  # the refused one never arrived
    assert loop.pool.opened == 2


def test_a_restart_between_calls_goes_unnoticed(loop):
    recording = Recording()
    running = start(recording)
    endpoint = endpoint_of(running)
    loop.call(endpoint)
    running.stop()
    with start(recording, port=running.port):
        assert loop.call(endpoint).content[0]["text"] == "hi"
    assert recording.count("tools/call") == 2


def test_the_guard_checks_every_new_connection_of_a_pooled_session(loop, settings, monkeypatch):
    settings.MCP_EXTRA_BLOCKED_NETWORKS = ["127.0.0.2/32"]
    recording = Recording()
    running = start(recording)
    answers = ["127.0.0.1"]

    async def resolve(host, port):
        return [netguard.parse_ip_literal(answers[0])]

    monkeypatch.setattr(netguard, "resolve_host", resolve)
    endpoint = mcp_client.Endpoint(
        url=f"http://localhost:{running.port}/mcp", allow_private_network=True,
        transport="streamable_http",
    )  # fmt: skip
    loop.call(endpoint)
    running.stop()  # its connection closes: the next call connects again
    answers[0] = "127.0.0.2"  # the name now points somewhere refused (DNS rebinding)
    with start(recording, port=running.port):
        failed = loop.failure(endpoint)
    assert (failed.code, failed.reached_server) == ("refused", False)
    assert recording.count("tools/call") == 1
    assert loop.pool.idle_count() == 0  # a refused session is not kept


def test_secrets_are_redacted_on_a_pooled_session(loop, upstream):
    secret = "tenant-key-5b1d9c3a7e"
    endpoint = endpoint_of(upstream, headers={"X-Api-Key": secret})
    texts = [loop.call(endpoint, arguments={"text": f"key={secret}"}) for _ in range(3)]
    assert [r.content[0]["text"] for r in texts] == ["key=[redacted]"] * 3
    assert loop.pool.opened == 1


def test_progress_logs_and_declines_reach_only_their_own_call(loop):
    heard = {"first": [], "second": []}

    def listeners(name):
        async def on_progress(progress, total, message):
            heard[name].append(("progress", message))

        async def on_log(level, data, logger):
            heard[name].append(("log", data))

        return {"on_progress": on_progress, "on_log": on_log, "on_declined": heard[name].append}

    with start(_HandshakeOnly(rich_server())) as running:  # requests back need that era
        endpoint = endpoint_of(running)
        first = loop.call(endpoint, "progress", {}, **listeners("first"))
        second = loop.call(endpoint, "elicit", {}, **listeners("second"))
    assert (first.content[0]["text"], second.content[0]["text"]) == ("done", "elicitation decline")
    assert loop.pool.opened == 1
    assert heard["first"] == [("progress", "half way"), ("log", "upstream log line")]
    assert [entry["method"] for entry in heard["second"]] == ["elicitation/create"]


def test_the_pool_keeps_at_most_its_bound_of_idle_sessions(loop, upstream, settings):
    settings.MCP_POOL_SESSIONS = 2
    endpoint = endpoint_of(upstream)

    async def five_at_once():
        calls = [mcp_client.acall_tool(endpoint, "slow", {"seconds": 0.3}) for _ in range(5)]
        return await asyncio.gather(*calls)

    assert len(loop.run(five_at_once())) == 5
    assert (loop.pool.opened, loop.pool.idle_count()) == (5, 2)


def test_idle_sessions_are_closed_after_the_idle_timeout(loop, upstream, settings):
    settings.MCP_POOL_IDLE_TIMEOUT = 0.2
    loop.call(endpoint_of(upstream))
    assert loop.pool.idle_count() == 1
    wait_until(lambda: loop.pool.idle_count() == 0, timeout=10)


def test_a_pooled_call_past_its_timeout_fails_and_its_session_is_closed(loop, upstream):
    endpoint = endpoint_of(upstream)
    loop.call(endpoint)
    failed = loop.failure(endpoint, tool="slow", arguments={"seconds": 5}, timeout=0.3)
    assert (failed.code, failed.reached_server) == ("timeout", True)
    assert loop.pool.idle_count() == 0  # never handed to the next call
    assert loop.call(endpoint).content[0]["text"] == "hi"
    assert loop.pool.opened == 2


def test_calls_back_to_back_share_one_idle_reaper(loop, upstream):
    endpoint = endpoint_of(upstream)
    reapers = []

    def record(event_loop, coroutine, **options):
        if coroutine.__qualname__ == "Pool._reap":
            reapers.append(coroutine)
        return asyncio.Task(coroutine, loop=event_loop, **options)

    async def three_in_a_row():
        asyncio.get_running_loop().set_task_factory(record)
        try:
            for _ in range(3):
                await mcp_client.acall_tool(endpoint, "echo", {"text": "hi"})
        finally:
            asyncio.get_running_loop().set_task_factory(None)

    loop.run(three_in_a_row())
    assert len(reapers) == 1  # not one per call: the session was leased again before it looked
    assert loop.pool.idle_count() == 1


# With the database ----------------------------------------------------------------------


def add_demo(running, **fields):
    server = McpServer.objects.create(
        name="demo", url=running.url, allow_private_network=True, allow_http=True,
        approval_mode=ApprovalMode.NO_APPROVAL, transport="streamable_http", **fields,
    )  # fmt: skip
    assert server.sync_tools().ok
    return server


@pytest.mark.django_db
def test_editing_or_disabling_a_server_drops_its_sessions(loop, upstream):
    server = add_demo(upstream)
    loop.call(server.endpoint())
    loop.call(server.endpoint())
    assert loop.pool.idle_count() == 1
    McpServer.objects.get(pk=server.pk).save(update_fields=["last_error"])  # a sync's write
    assert loop.pool.idle_count() == 1
    server.description = "edited"
    server.save()
    wait_until(lambda: loop.pool.idle_count() == 0)
    loop.call(server.endpoint())
    assert loop.pool.opened == 2
    server.enabled = False
    server.save()
    wait_until(lambda: loop.pool.idle_count() == 0)
    server.delete()


@pytest.mark.django_db(transaction=True)
def test_a_call_dropped_mid_answer_fails_and_is_never_run_again(loop, upstream):
    server = add_demo(upstream)
    agent, _ = Agent.create_with_token("bot", [server])
    loop.call(server.endpoint())  # an open session in the pool
    upstream.recording.drop_calls = True
    tool = server.tools.get(name="echo")
    call = ToolCall.objects.create(
        agent=agent, server=server, tool=tool, server_name="demo", tool_name="echo",
        tool_fingerprint=tool.fingerprint, arguments={"text": "once"}, status=Status.APPROVED,
        decided_by=DecidedBy.AUTO, decided_at=timezone.now(),
    )  # fmt: skip
    before = upstream.recording.count("tools/call")
    loop.run(call.arun())
    call.refresh_from_db()
    assert (call.status, call.error_code) == (Status.FAILED, "protocol")
    assert upstream.recording.count("tools/call") == before + 1
    assert ToolCall.sweep()["requeued"] == 0
    assert loop.pool.idle_count() == 0  # the broken session was not kept


def chatty_server():
    """Each call sends 5 KB of notifications not tied to it, which a handshake-era session
    receives on its own GET stream, open from call to call."""

    async def list_tools(ctx, params):
        return mcp_types.ListToolsResult(
            tools=[mcp_types.Tool(name="chatty", input_schema={"type": "object"})]
        )

    async def call_tool(ctx, params):
        await ctx.session.send_log_message("info", "x" * 5000, logger="chatty")
        return mcp_types.CallToolResult(content=[mcp_types.TextContent(type="text", text="ok")])

    return _HandshakeOnly(Server("chatty", on_list_tools=list_tools, on_call_tool=call_tool))


def test_a_session_s_own_stream_reaching_the_response_cap_fails_no_call(loop, settings):
    """The cap counted the GET stream's bytes over the session's life: every tenth call here
    failed `too_large` (after it had run on the server) for what earlier calls were sent."""
    settings.MCP_MAX_RESPONSE_BYTES = 50_000
    with start(chatty_server()) as running:
        endpoint = endpoint_of(running)
        results = [loop.call(endpoint, "chatty", {}) for _ in range(25)]
        assert [result.content[0]["text"] for result in results] == ["ok"] * 25
        assert loop.pool.opened == 1


def rebinding_midcall_server(ran, answers):
    """While a call runs, points its name at a refused address (DNS rebinding) and asks the
    client for input: Toolgate's answer goes out on a new connection, which the guard
    refuses, after the call itself reached the server. `ran` counts the calls."""

    async def list_tools(ctx, params):
        schema = {"type": "object", "properties": {}}
        return mcp_types.ListToolsResult(tools=[mcp_types.Tool(name="once", input_schema=schema)])

    async def call_tool(ctx, params):
        ran.append(params.name)
        answers[0] = "127.0.0.2"
        with contextlib.suppress(Exception):
            await ctx.session.elicit_form("Sure?", {"type": "object", "properties": {}})
        return mcp_types.CallToolResult(content=[mcp_types.TextContent(type="text", text="ran")])

    return _HandshakeOnly(Server("rebinding", on_list_tools=list_tools, on_call_tool=call_tool))


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("where", ["web process, pooled", "worker, fresh session"])
def test_a_call_refused_after_it_reached_the_server_is_never_run_again(
    loop, settings, monkeypatch, where
):
    """A refused connection proves only that its own request never left: the call was put
    back to `approved` for a worker to run again, as if it had never reached the server."""
    settings.MCP_EXTRA_BLOCKED_NETWORKS = ["127.0.0.2/32"]
    ran, answers = [], ["127.0.0.1"]

    async def resolve(host, port):
        return [netguard.parse_ip_literal(answers[0])]

    monkeypatch.setattr(netguard, "resolve_host", resolve)
    with start(rebinding_midcall_server(ran, answers)) as running:
        server = McpServer.objects.create(
            name="rebinding", url=f"http://localhost:{running.port}/mcp",
            allow_private_network=True, allow_http=True, transport="streamable_http",
            approval_mode=ApprovalMode.NO_APPROVAL,
        )  # fmt: skip
        assert server.sync_tools().ok
        agent, _ = Agent.create_with_token("bot", [server])
        tool = server.tools.get(name="once")
        call = ToolCall.objects.create(
            agent=agent, server=server, tool=tool, server_name="rebinding", tool_name="once",
            tool_fingerprint=tool.fingerprint, arguments={}, status=Status.APPROVED,
            decided_by=DecidedBy.AUTO, decided_at=timezone.now(),
        )  # fmt: skip
        if where.startswith("web"):
            loop.run(call.arun())
        else:
            settings.MCP_POOL_SESSIONS = 0
            call.run()
    call.refresh_from_db()
    assert (call.status, call.error_code) == (Status.FAILED, "refused")
    assert ran == ["once"]
    assert ToolCall.sweep()["requeued"] == 0


@pytest.mark.integration
def test_api_calls_that_wait_share_one_upstream_session(toolgate, upstream):  # noqa: F811
    add_server("demo", upstream.url)
    _, token = Agent.create_with_token("bot", [McpServer.objects.get(name="demo")])
    body = {"server": "demo", "tool": "echo", "arguments": {"text": "hi"}}
    headers = {"Authorization": f"Bearer {token}"}
    with httpx2.Client(base_url=toolgate.base_url, headers=headers, timeout=30) as http:
        for _ in range(3):
            answer = http.post("/api/v1/tool-calls", params={"wait": 10}, json=body).json()
            assert (answer["status"], answer["result"]["content"][0]["text"]) == ("succeeded", "hi")
    assert upstream.recording.count("tools/call") == 3
    assert upstream.recording.count("server/discover") == 2  # the sync's, then the pool's
