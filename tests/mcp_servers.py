"""Real MCP servers for the test suite, served by uvicorn on 127.0.0.1 in background threads.

Toolgate talks to remote MCP servers over HTTP, so its tests need real ones: the SDK's client
is the thing under test's dependency, and faking it would hide exactly the behaviour (era
negotiation, pagination, error mapping, redirect handling) the tests are about. Every server
here listens on loopback only, on a port the OS picks, and records the HTTP requests it gets
so tests can check what reached it (credentials, extra headers).

Use the fixtures (`mcp_demo`, `mcp_demo_http`, `mcp_demo_sse`, `mcp_factory`) from a conftest
with ``pytest_plugins = ["tests.mcp_servers"]``, or call `start()` with one of the builders and
`stop()` the result yourself.

Connecting with the SDK client:

- Streamable HTTP: ``mcp.Client(server.url)``. Extra headers need your own httpx2 client,
  which you also close: ``mcp.Client(streamable_http_client(url, http_client=httpx2_client))``.
- SSE: ``mcp.Client(sse_client(server.url, headers=...))``; `mcp.Client` takes any transport
  context manager.
- Whatever fails inside ``async with mcp.Client(...)`` (connecting included) mostly arrives
  wrapped in an `ExceptionGroup`, sometimes nested: match with ``except*`` or unwrap.
- ``mcp.Client(...).protocol_version`` tells the era: "2026-07-28" (``server/discover``) or a
  handshake version such as "2025-11-25" (``initialize``). ``mode="legacy"`` forces the
  handshake; the default ``mode="auto"`` probes ``server/discover`` first, with a fixed 10 s
  timeout of its own, before falling back.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import anyio
import mcp_types
import pytest
import uvicorn
from mcp.server import MCPServer, Server, ServerRequestContext
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.runner import serve_loop
from mcp.server.sse import SseServerTransport
from mcp.shared.exceptions import MCPError
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "PROTECTED_HEADER",
    "PROTECTED_TOKEN",
    "TRANSPORTS",
    "AppFactory",
    "MutableServer",
    "RecordedRequest",
    "RunningServer",
    "broken_stream_server",
    "demo_server",
    "error_500_server",
    "foreign_endpoint_sse_server",
    "garbage_server",
    "hanging_server",
    "huge_reply_server",
    "legacy_only_server",
    "mcp_demo",
    "mcp_demo_http",
    "mcp_demo_sse",
    "mcp_factory",
    "mutable_server",
    "not_mcp_server",
    "paginated_server",
    "protected_server",
    "redirect_server",
    "start",
]

Transport = Literal["streamable_http", "sse"]
TRANSPORTS: tuple[Transport, ...] = ("streamable_http", "sse")

# Where an MCP client is pointed for each transport; the SDK's apps serve these paths.
_ENDPOINT_PATHS: dict[Transport, str] = {"streamable_http": "/mcp", "sse": "/sse"}
_HOST = "127.0.0.1"
_STARTUP_TIMEOUT = 10.0
# Long enough for a clean shutdown, short enough that a server holding a request open on
# purpose (`hanging_server`) does not stall teardown: uvicorn cancels what is left after it.
_GRACEFUL_SHUTDOWN_SECONDS = 1


# --------------------------------------------------------------------------------------------
# Running servers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request as the server saw it, before any auth check or MCP handling."""

    method: str
    path: str
    headers: dict[str, str]
    """Lower-cased header names; a repeated header's values are joined with ", "."""


class _RecordRequests:
    """ASGI middleware appending every HTTP request to a list, so tests can see what arrived."""

    def __init__(self, app: ASGIApp, log: list[RecordedRequest]) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers: dict[str, str] = {}
            for raw_name, raw_value in scope["headers"]:
                name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            self.log.append(RecordedRequest(scope["method"], scope["path"], headers))
        await self.app(scope, receive, send)


@runtime_checkable
class AppFactory(Protocol):
    """Something that builds its ASGI app for a given transport (see `start`)."""

    def build_asgi_app(self, transport: Transport) -> ASGIApp: ...


Servable = MCPServer | Server | AppFactory | ASGIApp


@dataclass
class RunningServer:
    """A server listening on 127.0.0.1; `url` is what an MCP client should be given."""

    host: str
    port: int
    transport: Transport
    requests: list[RecordedRequest] = field(default_factory=list)
    """Every HTTP request received, oldest first (appended from the server thread)."""
    _uvicorn: uvicorn.Server | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _socket: socket.socket | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        return self.base_url + _ENDPOINT_PATHS[self.transport]

    def stop(self) -> None:
        """Shut the server down and wait for its thread; safe to call more than once."""
        if self._thread is None or self._uvicorn is None or not self._thread.is_alive():
            return
        self._uvicorn.should_exit = True
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            # Graceful shutdown is stuck (a lifespan that never ends); skip what is left of it.
            self._uvicorn.force_exit = True
            self._thread.join(timeout=5)
        if self._thread.is_alive():
            raise RuntimeError(f"MCP test server on port {self.port} did not stop")
        if self._socket is not None:
            self._socket.close()  # uvicorn leaves a socket it was given open: free the port

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start(
    target: Servable, transport: Transport = "streamable_http", host: str = _HOST, port: int = 0
) -> RunningServer:
    """Serve `target` on a free port of `host` (127.0.0.1, or ::1 for IPv6) in a daemon thread;
    return once it is listening. `port` picks the port instead (to restart a server where its
    clients expect it).

    `target` is an `MCPServer` or low-level `Server` (the app for `transport` is built here), an
    `AppFactory`, or a ready ASGI app, which then answers on every path whatever the transport.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; expected one of {TRANSPORTS}")
    # Binding here, not in uvicorn, hands the port over without a find-then-bind race.
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets created with it, and
    # without it every keep-alive reply waits ~40 ms for Nagle's algorithm.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    # Also for the connections it accepts (they inherit it): a restart on the same port binds
    # while clients still hold connections to the old server.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    running = RunningServer(host=host, port=sock.getsockname()[1], transport=transport)
    config = uvicorn.Config(
        _RecordRequests(_asgi_app_for(target, transport), running.requests),
        lifespan="on",  # the Streamable HTTP session manager is started by the app's lifespan
        log_level="warning",
        log_config=None,  # leave global logging alone; uvicorn's records reach pytest's caplog
        access_log=False,
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_SECONDS,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run,
        kwargs={"sockets": [sock]},
        name=f"mcp-{transport}-{running.port}",
        daemon=True,
    )
    running._uvicorn, running._thread, running._socket = server, thread, sock
    thread.start()
    deadline = time.monotonic() + _STARTUP_TIMEOUT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            running.stop()
            sock.close()
            raise RuntimeError(
                f"MCP test server ({transport}) failed to start; see the uvicorn log"
            )
        time.sleep(0.01)
    return running


def _asgi_app_for(target: Servable, transport: Transport) -> ASGIApp:
    if isinstance(target, MCPServer):
        return target.streamable_http_app() if transport == "streamable_http" else target.sse_app()
    if isinstance(target, Server):
        return (
            target.streamable_http_app()
            if transport == "streamable_http"
            else _lowlevel_sse_app(target)
        )
    if isinstance(target, AppFactory):
        return target.build_asgi_app(transport)
    return target


def _lowlevel_sse_app(server: Server[Any], *, handshake_only: bool = False) -> Starlette:
    """The SSE app `MCPServer.sse_app()` builds, for a low-level `Server`, which has none.

    `server.run` serves whichever era the client opens with; `handshake_only` serves only the
    ``initialize`` handshake instead (see `legacy_only_server`).
    """
    sse = SseServerTransport("/messages/")

    async def handle_sse(request: Request) -> Response:
        # The raw `send` is what `MCPServer.sse_app()` hands the transport too.
        async with sse.connect_sse(request.scope, request.receive, request._send) as (read, write):
            options = server.create_initialization_options()
            if handshake_only:
                async with server.lifespan(server) as state:
                    await serve_loop(
                        server, read, write, lifespan_state=state, init_options=options
                    )
            else:
                await server.run(read, write, options)
        return Response()

    return Starlette(
        routes=[
            Route("/sse", endpoint=handle_sse, methods=["GET"]),
            Mount("/messages/", app=sse.handle_post_message),
        ]
    )


# --------------------------------------------------------------------------------------------
# Well-behaved servers
# --------------------------------------------------------------------------------------------


def demo_server() -> MCPServer:
    """A small server covering what approval tests look at: annotations, tool errors, slowness.

    - ``echo(text)``: read-only and idempotent, titled "Echo" (both `Tool.title` and
      `annotations.title`, so either display rule finds it).
    - ``add(a, b)``: no annotations at all, the common case.
    - ``delete_file(path)``: destructive, closed-world; does nothing but say what it would do.
    - ``fail(message)``: a tool error, i.e. a result with ``is_error=True`` carrying `message`,
      not a protocol error.
    - ``slow(seconds)``: sleeps, for timeout and cancellation tests.
    """
    server = MCPServer("demo", log_level="WARNING")

    @server.tool(
        title="Echo",
        annotations=mcp_types.ToolAnnotations(
            title="Echo", read_only_hint=True, idempotent_hint=True
        ),
    )
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @server.tool(
        annotations=mcp_types.ToolAnnotations(destructive_hint=True, open_world_hint=False)
    )
    def delete_file(path: str) -> str:
        """Delete a file (pretends to)."""
        return f"deleted {path}"

    @server.tool()
    def fail(message: str) -> str:
        """Always fail with the given message."""
        raise ToolError(message)

    @server.tool()
    async def slow(seconds: float) -> str:
        """Sleep, then report how long."""
        await anyio.sleep(seconds)
        return f"slept {seconds}s"

    return server


def paginated_server(count: int = 250, page_size: int = 40) -> Server[Any]:
    """``tools/list`` spread over pages: `count` tools named ``tool_000``..., `page_size` a page.

    The cursor is the index of the page's first tool; an unknown cursor is INVALID_PARAMS, as
    the spec asks. Calling a tool answers with its name.
    """
    tools = [
        mcp_types.Tool(
            name=f"tool_{i:03d}",
            description=f"Paginated tool number {i}.",
            input_schema={"type": "object", "properties": {}},
        )
        for i in range(count)
    ]

    async def list_tools(
        ctx: ServerRequestContext[Any], params: mcp_types.PaginatedRequestParams | None
    ) -> mcp_types.ListToolsResult:
        cursor = params.cursor if params is not None else None
        first = 0
        if cursor is not None:
            if not cursor.isdigit() or int(cursor) >= count:
                raise MCPError(code=mcp_types.INVALID_PARAMS, message=f"invalid cursor {cursor!r}")
            first = int(cursor)
        end = first + page_size
        return mcp_types.ListToolsResult(
            tools=tools[first:end], next_cursor=str(end) if end < count else None
        )

    async def call_tool(
        ctx: ServerRequestContext[Any], params: mcp_types.CallToolRequestParams
    ) -> mcp_types.CallToolResult:
        return mcp_types.CallToolResult(
            content=[mcp_types.TextContent(type="text", text=f"called {params.name}")]
        )

    return Server("paginated", on_list_tools=list_tools, on_call_tool=call_tool)


def legacy_only_server() -> AppFactory:
    """A server that speaks only the ``initialize`` handshake, like one built before 2026-07-28.

    ``mcp.Client`` in ``mode="auto"`` gets an error for its ``server/discover`` probe, falls back
    to the handshake and negotiates "2025-11-25"; a client pinned to "2026-07-28" fails. One
    tool, ``echo(text)``.

    Streamable HTTP: a request announcing a non-handshake ``MCP-Protocol-Version`` gets what a
    2025 server answers, HTTP 400 with a JSON-RPC INVALID_REQUEST error. SSE: this SDK's SSE
    server is not handshake-only either (the client's first request picks the era, so the
    probe would lock the connection to 2026-07-28); this one serves the handshake-only loop,
    as SSE servers of the older SDKs did, which refuses the probe before ``initialize``.
    """
    server = Server("legacy-only", on_list_tools=_echo_tool_list, on_call_tool=_echo_tool_call)
    return _HandshakeOnly(server)


_ECHO_TOOL = mcp_types.Tool(
    name="echo",
    description="Return the text unchanged.",
    input_schema={
        "type": "object",
        "properties": {"text": {"type": "string"}},
        "required": ["text"],
    },
    annotations=mcp_types.ToolAnnotations(read_only_hint=True),
)


async def _echo_tool_list(
    ctx: ServerRequestContext[Any], params: mcp_types.PaginatedRequestParams | None
) -> mcp_types.ListToolsResult:
    return mcp_types.ListToolsResult(tools=[_ECHO_TOOL])


async def _echo_tool_call(
    ctx: ServerRequestContext[Any], params: mcp_types.CallToolRequestParams
) -> mcp_types.CallToolResult:
    text = str((params.arguments or {}).get("text", ""))
    return mcp_types.CallToolResult(content=[mcp_types.TextContent(type="text", text=text)])


@dataclass
class _HandshakeOnly:
    """Serves a low-level `Server` with the handshake-only SSE loop (see `legacy_only_server`)."""

    server: Server[Any]

    def build_asgi_app(self, transport: Transport) -> ASGIApp:
        if transport == "sse":
            return _lowlevel_sse_app(self.server, handshake_only=True)
        app = self.server.streamable_http_app()

        async def refuse_modern(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                version = Request(scope).headers.get("mcp-protocol-version")
                if version is not None and version not in HANDSHAKE_PROTOCOL_VERSIONS:
                    message = f"Bad Request: Unsupported protocol version: {version}"
                    error = mcp_types.JSONRPCError(
                        jsonrpc="2.0",
                        id=None,
                        error=mcp_types.ErrorData(code=mcp_types.INVALID_REQUEST, message=message),
                    )
                    body = error.model_dump_json(by_alias=True)
                    response = Response(body, status_code=400, media_type="application/json")
                    return await response(scope, receive, send)
            await app(scope, receive, send)

        return refuse_modern


PROTECTED_TOKEN = "s3cret-token"
PROTECTED_HEADER = ("X-Api-Key", "k-123")


def protected_server(
    token: str = PROTECTED_TOKEN,
    header: tuple[str, str] = PROTECTED_HEADER,
    inner: Servable | None = None,
) -> AppFactory:
    """`inner` (default: `demo_server()`) behind a bearer token and one extra header.

    Without ``Authorization: Bearer <token>`` every request gets 401 (with a
    ``WWW-Authenticate: Bearer`` challenge); with the token but without the right `header` it
    gets 403. Both are checked on every request, the SSE message POSTs included, so a client
    must send them each time, not only when connecting.
    """
    return _RequireCredentials(inner if inner is not None else demo_server(), token, header)


@dataclass
class _RequireCredentials:
    """The credential check in front of `inner`'s app (see `protected_server`)."""

    inner: Servable
    token: str
    header: tuple[str, str]

    def build_asgi_app(self, transport: Transport) -> ASGIApp:
        app = _asgi_app_for(self.inner, transport)
        expected_auth = f"Bearer {self.token}"
        name, expected_value = self.header[0].lower(), self.header[1]

        async def check(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                headers = Request(scope).headers
                if headers.get("authorization") != expected_auth:
                    response = Response(
                        '{"error": "invalid_token"}',
                        status_code=401,
                        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
                        media_type="application/json",
                    )
                    return await response(scope, receive, send)
                if headers.get(name) != expected_value:
                    response = Response(f"missing or wrong {self.header[0]}", status_code=403)
                    return await response(scope, receive, send)
            await app(scope, receive, send)

        return check


class MutableServer:
    """A server whose tools the test changes while it runs ("tool changed since review").

    Start it with `start(server)` / `mcp_factory(server)`; the change is visible to the next
    ``tools/list``. Calling a tool answers ``called <name> with <arguments as JSON>``; an unknown
    name is a tool error. No cache hint is sent, so ``mcp.Client`` re-lists from the server
    every time rather than serving a stale listing from its response cache.
    """

    def __init__(self, tools: list[mcp_types.Tool] | None = None) -> None:
        # Replaced wholesale, never mutated in place: the server thread reads it concurrently.
        self._tools: dict[str, mcp_types.Tool] = {tool.name: tool for tool in tools or ()}
        self.server: Server[Any] = Server(
            "mutable", on_list_tools=self._list_tools, on_call_tool=self._call_tool
        )

    @property
    def tools(self) -> list[mcp_types.Tool]:
        return list(self._tools.values())

    def add_tool(
        self,
        name: str,
        description: str = "",
        input_schema: dict[str, Any] | None = None,
        annotations: mcp_types.ToolAnnotations | None = None,
    ) -> mcp_types.Tool:
        """Add (or replace) a tool; the schema defaults to an object without properties."""
        tool = mcp_types.Tool(
            name=name,
            description=description,
            input_schema=input_schema or {"type": "object", "properties": {}},
            annotations=annotations,
        )
        self._tools = {**self._tools, name: tool}
        return tool

    def change_tool(self, name: str, **changes: Any) -> mcp_types.Tool:
        """Change fields of a tool, by `mcp_types.Tool` attribute name (``description=``,
        ``input_schema=``, ``annotations=``, ``title=``...)."""
        tool = self._tools[name].model_copy(update=changes)
        self._tools = {**self._tools, name: tool}
        return tool

    def remove_tool(self, name: str) -> None:
        self._tools = {key: tool for key, tool in self._tools.items() if key != name}

    def build_asgi_app(self, transport: Transport) -> ASGIApp:
        return _asgi_app_for(self.server, transport)

    async def _list_tools(
        self, ctx: ServerRequestContext[Any], params: mcp_types.PaginatedRequestParams | None
    ) -> mcp_types.ListToolsResult:
        return mcp_types.ListToolsResult(tools=self.tools)

    async def _call_tool(
        self, ctx: ServerRequestContext[Any], params: mcp_types.CallToolRequestParams
    ) -> mcp_types.CallToolResult:
        known = params.name in self._tools
        text = (
            f"called {params.name} with {json.dumps(params.arguments or {}, sort_keys=True)}"
            if known
            else f"unknown tool {params.name!r}"
        )
        return mcp_types.CallToolResult(
            content=[mcp_types.TextContent(type="text", text=text)], is_error=not known
        )


def mutable_server() -> MutableServer:
    """A `MutableServer` starting with one tool, ``lookup(query: str)``, read-only."""
    server = MutableServer()
    server.add_tool(
        "lookup",
        description="Look something up.",
        input_schema={
            "type": "object",
            "properties": {"query": {"type": "string"}},
            "required": ["query"],
        },
        annotations=mcp_types.ToolAnnotations(read_only_hint=True),
    )
    return server


# --------------------------------------------------------------------------------------------
# Misbehaving endpoints
# --------------------------------------------------------------------------------------------

_HttpHandler = Callable[[Scope, Receive, Send], Awaitable[None]]


def _plain_http(handler: _HttpHandler) -> ASGIApp:
    """Let a bare HTTP handler run under ``lifespan="on"``, which insists on the lifespan
    handshake: acknowledge it here and pass only HTTP requests on."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await handler(scope, receive, send)
            return
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    return app


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def hanging_server(stage: Literal["connect", "tools/list"] = "connect") -> Servable:
    """A server that never answers.

    ``stage="connect"``: every request is accepted and then left without a response (not even
    the status line) until the client goes away. ``stage="tools/list"``: a real server that
    answers the handshake and then never answers ``tools/list``.

    The client must bring its own timeout. ``mcp.Client(read_timeout_seconds=...)`` bounds
    each request, but on Streamable HTTP the ``mode="auto"`` probe has a fixed 10 s of its own
    before the fallback handshake starts, and on SSE the opening GET is bounded only by
    ``sse_client(sse_read_timeout=...)``; ``anyio.fail_after`` bounds everything. Stopping the
    server drops what is still hanging after a second's grace (uvicorn logs the cancellation).
    """
    if stage == "connect":

        async def never_answer(scope: Scope, receive: Receive, send: Send) -> None:
            await _wait_for_disconnect(receive)

        return _plain_http(never_answer)

    async def list_tools_forever(
        ctx: ServerRequestContext[Any], params: mcp_types.PaginatedRequestParams | None
    ) -> mcp_types.ListToolsResult:
        await anyio.sleep_forever()
        raise AssertionError("sleep_forever() returned")

    return Server("hanging", on_list_tools=list_tools_forever, on_call_tool=_echo_tool_call)


_HUGE_PLACEHOLDER = b"@@huge-description@@"


def huge_reply_server(size_bytes: int = 20_000_000) -> AppFactory:
    """A real server whose ``tools/list`` reply carries a tool description of `size_bytes`.

    The handshake is normal. The description is streamed in 64 KiB chunks without a
    Content-Length, so a client cannot tell the size up front and is only safe if it caps
    what it reads. On a 2026-07-28 Streamable HTTP connection the reply is one JSON body; on a
    handshake-era one or over SSE it is one SSE event, which the SDK client refuses past 1 MiB.
    """
    tool = mcp_types.Tool(
        name="huge",
        description=_HUGE_PLACEHOLDER.decode(),
        input_schema={"type": "object", "properties": {}},
    )

    async def list_tools(
        ctx: ServerRequestContext[Any], params: mcp_types.PaginatedRequestParams | None
    ) -> mcp_types.ListToolsResult:
        return mcp_types.ListToolsResult(tools=[tool])

    return _ExpandPlaceholder(Server("huge", on_list_tools=list_tools), size_bytes)


@dataclass
class _ExpandPlaceholder:
    """Rewrites the real server's responses on the way out, replacing the placeholder
    description by `size_bytes` of text sent as it is generated."""

    server: Server[Any]
    size_bytes: int

    def build_asgi_app(self, transport: Transport) -> ASGIApp:
        app = _asgi_app_for(self.server, transport)
        chunk = b"x" * 65536

        async def expand(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                return await app(scope, receive, send)

            async def send_expanded(message: Message) -> None:
                if message["type"] == "http.response.start":
                    # The body grows, so the length the server declared no longer holds.
                    headers = [
                        (k, v) for k, v in message["headers"] if k.lower() != b"content-length"
                    ]
                    return await send({**message, "headers": headers})
                body = message.get("body", b"")
                if message["type"] != "http.response.body" or _HUGE_PLACEHOLDER not in body:
                    return await send(message)
                before, after = body.split(_HUGE_PLACEHOLDER, 1)
                await send({"type": "http.response.body", "body": before, "more_body": True})
                for offset in range(0, self.size_bytes, len(chunk)):
                    piece = chunk[: self.size_bytes - offset]
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
                await send({**message, "body": after})

            await app(scope, receive, send_expanded)

        return expand


def broken_stream_server(content_type: str = "text/event-stream") -> ASGIApp:
    """Answers every request 200 with `content_type`, sends part of a body, drops the connection.

    The partial body is the start of a JSON-RPC response (as an SSE ``message`` event for
    ``text/event-stream``). uvicorn logs "ASGI callable returned without completing
    response." at ERROR for each request; that is the drop. Over SSE the SDK client then waits
    for the ``endpoint`` event forever instead of failing, so bound it with ``anyio.fail_after``.
    """
    partial = b'{"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": "ec'
    if content_type.startswith("text/event-stream"):
        partial = b"event: message\ndata: " + partial

    async def drop_mid_body(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", content_type.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": partial, "more_body": True})
        # Returning with the body unfinished makes uvicorn close the connection.

    return _plain_http(drop_mid_body)


def garbage_server(content_type: str = "application/json") -> ASGIApp:
    """Answers every request 200 with an HTML page labelled `content_type`: not JSON at all,
    let alone JSON-RPC."""
    return _plain_http(
        Response("<html><body><h1>Hello!</h1></body></html>", media_type=content_type)
    )


_WEBSITE_PAGE = (
    "<!doctype html><html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>"
)


def not_mcp_server(post_status: Literal[404, 405] = 405) -> ASGIApp:
    """An ordinary website: 200 with an HTML page for GET and HEAD, `post_status` with an HTML
    error page for anything else (POST, DELETE)."""
    home = Response(_WEBSITE_PAGE.format(title="Welcome"), media_type="text/html")
    title = "404 Not Found" if post_status == 404 else "405 Method Not Allowed"
    refused = Response(
        _WEBSITE_PAGE.format(title=title),
        status_code=post_status,
        media_type="text/html",
        headers={"Allow": "GET, HEAD"} if post_status == 405 else None,
    )

    async def website(scope: Scope, receive: Receive, send: Send) -> None:
        await (home if scope["method"] in ("GET", "HEAD") else refused)(scope, receive, send)

    return _plain_http(website)


def error_500_server() -> ASGIApp:
    """Answers every request 500 Internal Server Error, plain text."""
    return _plain_http(Response("Internal Server Error", status_code=500))


def foreign_endpoint_sse_server(target_url: str) -> ASGIApp:
    """An SSE server whose ``endpoint`` event tells the client to post its messages to another
    origin (`target_url`): a client that obeyed would send its token there."""

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-store")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        event = f"event: endpoint\ndata: {target_url}\n\n".encode()
        await send({"type": "http.response.body", "body": event, "more_body": True})
        await _wait_for_disconnect(receive)

    return _plain_http(handler)


def redirect_server(target_url: str) -> ASGIApp:
    """Answers every request 307 Temporary Redirect to `target_url` (usually another running
    server's `url`: a different port is a different origin, which the SDK does not follow)."""
    return _plain_http(Response(status_code=307, headers={"Location": target_url}))


# --------------------------------------------------------------------------------------------
# pytest fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture
def mcp_factory() -> Iterator[Callable[..., RunningServer]]:
    """``mcp_factory(target, transport="streamable_http", host="127.0.0.1")`` starts `target`
    (anything `start` takes, e.g. ``paginated_server(count=5)``); every server started is
    stopped at teardown."""
    with contextlib.ExitStack() as running:

        def factory(
            target: Servable, transport: Transport = "streamable_http", host: str = _HOST
        ) -> RunningServer:
            return running.enter_context(start(target, transport, host))

        yield factory


@pytest.fixture(params=TRANSPORTS)
def mcp_demo(
    request: pytest.FixtureRequest, mcp_factory: Callable[..., RunningServer]
) -> RunningServer:
    """`demo_server()` running, once per transport."""
    return mcp_factory(demo_server(), request.param)


@pytest.fixture
def mcp_demo_http(mcp_factory: Callable[..., RunningServer]) -> RunningServer:
    """`demo_server()` running over Streamable HTTP."""
    return mcp_factory(demo_server(), "streamable_http")


@pytest.fixture
def mcp_demo_sse(mcp_factory: Callable[..., RunningServer]) -> RunningServer:
    """`demo_server()` running over SSE."""
    return mcp_factory(demo_server(), "sse")
