"""The ASGI app of the agent MCP endpoint, mounted at `/mcp/` by config/asgi.py.

| path | what |
|---|---|
| `/mcp/<server>/` | one server's tools, their own names: Streamable HTTP |
| `/mcp/<server>/sse` (+ `/mcp/<server>/messages/`) | the same over the legacy SSE transport |
| `/mcp/` | every server of the agent, tools named `<server>__<tool>` (approvals/mcp/tools.py) |
| `/mcp/sse` (+ `/mcp/messages/`) | the same over SSE |

Before the SDK sees a request (and, for a POST of a declared length up to 8 KiB, after its
body is read, so that a `tools/call` is looked up with the agent, in one hop): the agent's
token (`Authorization: Bearer …`, 401 with `WWW-Authenticate` when missing or wrong, the same
for an inactive agent), the server (a server that doesn't exist, is disabled or is not the
agent's: the same 404), the per-agent rate limit of the JSON API (429 with `Retry-After`, and
a JSON-RPC error body, which MCP clients hand to the caller of the request instead of a bare
"error response"), and the agent's last use. Bodies are capped at the JSON API's
`API_MAX_BODY_BYTES` (413), not the SDK's 4 MiB. The SDK's transports then check Host and
Origin (DNS-rebinding protection, from ALLOWED_HOSTS and MCP_ALLOWED_ORIGINS) and serve both
protocol eras: Streamable HTTP sessions of the `initialize` handshake (owned by the agent and
endpoint that opened them: another token or endpoint gets "Session not found") and the
2026-07-28 stateless requests. On the handshake era, JSON-RPC batches (2025-03-26) and
malformed messages are dealt with by `approvals.mcp.batches` before the SDK sees the request.
"""

import contextlib
import json
from urllib.parse import parse_qs

import anyio
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.sse import SseServerTransport
from mcp.server.streamable_http import MCP_PROTOCOL_VERSION_HEADER, MCP_SESSION_ID_HEADER
from mcp.server.transport_security import (
    RequestBodyLimitMiddleware,
    TransportSecuritySettings,
)
from mcp_types import INVALID_REQUEST
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from approvals.agent_auth import agent_for, rate_limited, touch
from approvals.mcp import batches, calls, sessions, tools
from approvals.mcp.events import SessionManager, TooManySessions
from approvals.mcp.server import (
    CALLER,
    LISTED,
    Caller,
    Lookup,
    ToolgateServer,
    listed_for_request,
)
from approvals.models import Refused, open_tool_call
from approvals.policy import agent_refusal
from approvals.running import replies_first
from integrations.limits import unstorable

PREFIX = "/mcp"
_UNREAD = batches.UNREAD  # a body that isn't JSON (the SDK answers it), or none was read whole


def transport_security():
    hosts = [host for host in settings.ALLOWED_HOSTS if host != "*" and not host.startswith(".")]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=hosts + [f"{host}:*" for host in hosts],
        allowed_origins=list(settings.MCP_ALLOWED_ORIGINS),
    )


def route(path):
    """(server name or "" for all, transport: "http" | "sse" | "messages"), or None."""
    if path not in (PREFIX, PREFIX + "/") and not path.startswith(PREFIX + "/"):
        return None
    parts = [part for part in path[len(PREFIX) :].split("/") if part]
    kind = "http"
    if parts and parts[-1] in ("sse", "messages"):
        kind = parts.pop()
    if len(parts) > 1 or (parts and unstorable(parts[0])):  # no query may see a NUL
        return None
    return (parts[0] if parts else ""), kind


def _authenticate(authorization, server_name, method, checks_headers=False, wanted=None):
    """(caller, status, retry_after), in one hop to the database thread. The `Caller`, or an
    HTTP status to refuse with: 401 (no such active agent), 404 (no such server for this
    agent, whether it doesn't exist or isn't the agent's); then one request counted against
    its rate limit (`retry_after`: seconds to wait, 0 within it; ending a session, DELETE, is
    never refused), and within it the agent's last use recorded.

    `wanted`: the (tool name, arguments) of the `tools/call` a POST holds, or None. That call
    is looked up here (`open_tool_call`: the tool, found through the agent's servers, with its
    server, which on a server's endpoint is then the server to check; on `/mcp/`, first the
    tool as listed, which names its server), as the JSON API does with its agent's lookup,
    and handed to the call's handler (`Caller.lookup`); on `/mcp/` only within the rate limit.
    With `checks_headers` (a 2026-07-28 POST whose `Mcp-Param-*` headers the SDK may check, see
    `_serve_modern`) it also finds out whether the tool called may declare such headers (with
    no call looked up: any tool of the server)."""
    close_old_connections()  # this thread is long-lived; drop connections that went stale
    agent = agent_for(authorization)
    if agent is None:
        return None, 401, 0
    lookup, declares_headers = None, None
    if server_name:
        opened = wanted and _open(agent, server_name, *wanted)
        server = opened.call.server if opened else agent.servers.filter(name=server_name).first()
        if server is None or agent_refusal(agent, server, assigned=True):
            return None, 404, 0
        if checks_headers and opened:
            declares_headers = tools.declares_headers(opened.call.tool)
        elif checks_headers:
            declares_headers = tools.may_declare_headers(server)
        lookup = wanted and Lookup(*wanted, request=opened)
    retry_after = rate_limited(agent)
    if retry_after and method != "DELETE":  # ending a session frees, never costs
        return Caller(agent, server_name), None, retry_after
    touch(agent)
    if wanted and not server_name:  # within the rate limit: this one costs every tool's queries
        lookup = _look_up_combined(agent, *wanted)
    return Caller(agent, server_name, declares_headers, lookup), None, 0


def _look_up_combined(agent, name, arguments):
    """The `Lookup` of a call of `name` on `/mcp/`: the tool as listed (every tool's queries:
    the name depends on the agent's other tools), and its request."""
    listed = None if unstorable(name) else tools.listed_tool(agent, "", name)
    opened = listed and _open(agent, listed["server"], listed["name"], arguments)
    return Lookup(name, arguments, request=opened, listed=listed)


def _open(agent, server_name, tool_name, arguments):
    """The request of a `tools/call` looked up (`open_tool_call`), if it names a server the
    agent may use; else None, and the call's handler looks it up again (and refuses it)."""
    try:
        opened = open_tool_call(agent, server_name, tool_name, arguments)
    except Refused:  # a name or arguments no query may see
        return None
    return opened if opened.call.server else None


class McpApp:
    def __init__(self):
        self.server = ToolgateServer()
        self.manager = None
        self.sse = SseServerTransport(
            "/messages/",
            security_settings=transport_security(),
            max_request_body_size=settings.API_MAX_BODY_BYTES,
        )

    @contextlib.asynccontextmanager
    async def running(self):
        """Run a session manager (one per lifespan: the SDK's can't be restarted) and the
        tool-list watcher. Each session keeps its recent events, so a client can resume a
        broken stream (approvals/mcp/events.py)."""
        self.manager = SessionManager(
            app=self.server,
            security_settings=transport_security(),
            max_request_body_size=settings.API_MAX_BODY_BYTES,  # the JSON API's (413 over it)
        )
        # Nested, not one `async with`: the watcher stops before the session manager does.
        calls.PROCESS.stopping = False
        async with self.manager.run():  # noqa: SIM117
            async with anyio.create_task_group() as group:
                group.start_soon(sessions.watch)
                try:
                    yield
                finally:
                    calls.PROCESS.stopping = True  # before the manager cancels its sessions
                    group.cancel_scope.cancel()

    async def __call__(self, scope, receive, send):
        where = route(scope["path"])
        if where is None:
            return await _error(send, 404, "not_found", "There is no MCP endpoint at this URL.")
        server_name, kind = where
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        post = scope["method"] == "POST" and kind == "http"
        parsed, receive = await _small_body(headers, receive) if post else (_UNREAD, receive)
        wanted = _wanted_call(parsed)
        checks_headers = post and _modern(headers)  # the SDK may ask for a tool's schema
        checks_headers &= parsed is _UNREAD or _called_tool(parsed, headers) is not None
        caller, status, retry_after = await sync_to_async(_authenticate)(
            headers.get("authorization"), server_name, scope["method"], checks_headers, wanted
        )
        if status == 401:
            return await _unauthorized(send)
        if status == 404:
            return await _error(send, 404, "not_found", "There is no MCP endpoint at this URL.")
        if retry_after:
            return await _rate_limited(send, retry_after)
        scope = {**scope, "user": _user(caller.agent, server_name), CALLER: caller}
        async with replies_first():  # a result replied with is recorded before this ends
            await self._serve(scope, receive, send, server_name, kind, headers, parsed)

    async def _serve(self, scope, receive, send, server_name, kind, headers, parsed=_UNREAD):
        if scope["method"] == "POST" and kind != "sse":
            checked = _Envelope(self._route, server_name, kind, headers, parsed=parsed)
            await RequestBodyLimitMiddleware(checked, settings.API_MAX_BODY_BYTES)(
                scope, receive, send
            )
        else:
            await self._route(scope, receive, send, server_name, kind, headers)

    async def _route(self, scope, receive, send, server_name, kind, headers, message=_UNREAD):
        """`message`: the POSTed body as parsed by `_Envelope` (`_UNREAD` if it isn't JSON, or
        for any other method), passed on so nothing parses it again before the SDK does."""
        if kind == "messages":
            session_id = "sse:" + (_query(scope, "session_id") or "")
            with sessions.request(session_id, "POST", send) as send:
                await self.sse.handle_post_message(scope, receive, send)
        elif kind == "sse":
            await self._sse(scope, receive, send, server_name)
        elif _modern(headers):
            await self._serve_modern(scope, receive, send, server_name, headers, message)
        elif MCP_SESSION_ID_HEADER in headers:
            with sessions.request(headers[MCP_SESSION_ID_HEADER], scope["method"], send) as send:
                await batches.serve(self.manager.handle_request, scope, receive, send, message)
        else:  # no session yet: an `initialize` opens one, within the agent's bound
            try:
                await batches.serve(self.manager.handle_request, scope, receive, send, message)
            except TooManySessions:
                await _too_many_sessions(send)

    async def _serve_modern(self, scope, receive, send, server_name, headers, message):
        """A 2026-07-28 request. Before the SDK runs a `tools/call` that has arguments or
        `Mcp-Param-*` headers, it checks those headers against the tool's listed schema
        (`ToolgateServer.get_tool_input_schema`); the tool as listed is looked up here, that
        one tool on a server's endpoint, instead of the SDK listing every tool for it on each
        call. When no tool of the server declares such headers, there is nothing to check
        whatever the tool's schema (`Caller.declares_headers`), and nothing is looked up. On
        `/mcp/` the same lookup names the tool's server for the call."""
        name = _called_tool(message, headers, every=not server_name)
        if name is None:
            return await self.manager.handle_request(scope, receive, send)
        caller = scope[CALLER]
        lookup = caller.looked_up(name)
        if not server_name and lookup is not None:
            listed = lookup.listed  # looked up with the agent
        elif caller.declares_headers is False:
            listed = None  # as good as any schema here: one without `x-mcp-header` checks none
        else:
            listed = None  # a name no query may see (a NUL) is listed nowhere
            if not unstorable(name):
                listed = await sync_to_async(tools.listed_tool)(caller.agent, caller.scope, name)
            scope[LISTED] = (name, listed)
        with listed_for_request((name, listed)):
            await self.manager.handle_request(scope, receive, send)

    async def _sse(self, scope, receive, send, server_name):
        root = f"{PREFIX}/{server_name}" if server_name else PREFIX
        scope = {**scope, "root_path": root}  # the `endpoint` event names root + /messages/
        watch = sessions.SseStream(send)
        with contextlib.suppress(ValueError), watch:  # ValueError: refused, and answered
            async with self.sse.connect_sse(scope, receive, watch.send) as (read, write):
                await self.server.run(read, write, self.server.create_initialization_options())


class _Envelope:
    """The JSON-RPC envelope of a POST, checked before the SDK reads it: handshake-era
    transports take a request whose `id` is an object, a float or a boolean for a
    notification (answered 202, never answered again: the client waits forever) and answer a
    batch with a dump of validation errors as invalid params. Both are invalid requests
    (-32600), as the 2026-07-28 transport already says; a batch is left to
    `approvals.mcp.batches` (2025-03-26 sessions may send them) once each of its ids is
    usable, except on the legacy SSE transport, which takes one message per POST. Runs inside
    the JSON API's body limit, so the body arrives whole and bounded."""

    def __init__(self, app, *args, parsed=_UNREAD):
        self.app, self.args, self.parsed = app, args, parsed  # parsed: by `_small_body`

    async def __call__(self, scope, receive, send):
        message = await receive()
        whole = message["type"] == "http.request" and not message.get("more_body", False)
        value = _UNREAD
        if whole:
            value = self.parsed if self.parsed is not _UNREAD else _parse(message.get("body", b""))
        problem = envelope_problem(value, batches=self.args[1] != "messages")
        if problem:
            return await _jsonrpc_error(send, INVALID_REQUEST, problem)
        replayed = [message]

        async def replay():
            return replayed.pop() if replayed else await receive()

        await self.app(scope, replay, send, *self.args, message=value)


# A POSTed body of a declared length up to this is read and parsed before the agent's lookup,
# so that the `tools/call` it holds is looked up in the same hop (parsing it is then bounded at
# about a query's cost, in the loop); a larger one is read only once the agent is known.
PARSE_FIRST_BYTES = 8 * 1024


async def _small_body(headers, receive):
    """(the body parsed, a `receive` that replays it) for a body whose declared length is at
    most PARSE_FIRST_BYTES, read whole as one message; else (`_UNREAD`, `receive`), with
    what was read (nothing, for a larger or undeclared length) replayed."""
    declared = headers.get("content-length", "")
    if not declared.isdigit() or int(declared) > PARSE_FIRST_BYTES:
        return _UNREAD, receive
    messages, size, more = [], 0, True
    while more and size <= PARSE_FIRST_BYTES:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    parsed = _UNREAD
    if not more and size <= PARSE_FIRST_BYTES and messages[-1]["type"] == "http.request":
        body = b"".join(message.get("body", b"") for message in messages)
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        parsed = _parse(body)
    messages.reverse()

    async def replay():
        return messages.pop() if messages else await receive()

    return parsed, replay


def _wanted_call(message):
    """(tool name, arguments) of a `tools/call` message that names a tool and has arguments
    that are an object (or none), or None."""
    if not isinstance(message, dict) or message.get("method") != "tools/call":
        return None
    params = message.get("params")
    name = params.get("name") if isinstance(params, dict) else None
    arguments = params.get("arguments") if isinstance(params, dict) else None
    if not isinstance(name, str) or not isinstance(arguments, dict | None):
        return None
    return name, arguments or {}


def _parse(body):
    """The body as the SDK's transports parse it (`json.loads`), or `_UNREAD`."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the stack
        return _UNREAD


def envelope_problem(value, batches=True):
    """Why a POSTed body (parsed: `_parse`) is not a JSON-RPC message (or, with `batches`, a
    batch of at most MAX_BATCH whose requests have distinct ids) with usable ids, or None (the
    SDK answers bodies that aren't JSON itself)."""
    if value is _UNREAD:
        return None
    if isinstance(value, list):
        if not batches:
            return "Batches are not supported here: send one JSON-RPC message per request."
        if len(value) > MAX_BATCH:
            return f"A batch may hold at most {MAX_BATCH} messages."
        return next(filter(None, map(_id_problem, value)), None) or _repeated_id(value)
    return _id_problem(value)


# A batch's messages run at once, as one request of the per-agent rate limit: bounded.
MAX_BATCH = 32


def _repeated_id(batch):
    """Why the requests of a batch can't all be answered: two share an id as the SDK keys a
    session's requests in flight (`str(id)`, so 1 and "1" too). `approvals.mcp.batches` sends
    them at once; the second took the first's place, both calls ran, and neither answer came."""
    ids = [str(m["id"]) for m in batch if isinstance(m, dict) and "method" in m and "id" in m]
    if len(ids) != len(set(ids)):
        return 'The requests of a batch must have distinct ids (1 and "1" count as one).'
    return None


def _id_problem(message):
    if isinstance(message, dict) and "method" in message and "id" in message:
        request_id = message["id"]
        if isinstance(request_id, bool) or not isinstance(request_id, str | int):
            return "A request's id must be a string or an integer."
    return None


async def _jsonrpc_error(send, code, message):
    body = json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": message}})
    body = body.encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 400, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _called_tool(message, headers, every=False):
    """The tool a 2026-07-28 `tools/call` names, if the SDK will look up its schema for it:
    exactly when it does (`_mcp_param_rejection`: arguments that are an object, and either
    some of them or an `Mcp-Param-*` header); with `every`, for any `tools/call`. Else None."""
    if not isinstance(message, dict) or message.get("method") != "tools/call":
        return None
    params = message.get("params") or {}
    name = params.get("name") if isinstance(params, dict) else None
    if not isinstance(name, str):
        return None
    if every:
        return name
    arguments = params.get("arguments")
    if arguments is not None and not isinstance(arguments, dict):
        return None
    if not arguments and not any(header.startswith("mcp-param-") for header in headers):
        return None
    return name


def _modern(headers):
    """A 2026-07-28 request: it has no session, whatever `Mcp-Session-Id` it carries, so none
    is tracked for it (a made-up id would stay in memory until the idle timeout)."""
    return headers.get(MCP_PROTOCOL_VERSION_HEADER) in MODERN_PROTOCOL_VERSIONS


def _query(scope, name):
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(name)
    return values[0] if values else None


def _user(agent, server_name):
    """Who owns the SDK sessions this request opens: the agent, on this endpoint only."""
    token = AccessToken(
        token="agent",  # noqa: S106 - a label: the SDK compares client_id and claims
        client_id=f"agent-{agent.pk}",
        scopes=[],
        claims={"iss": f"toolgate:{PREFIX}/{server_name}"},
    )
    return AuthenticatedUser(token)


async def _error(send, status, code, message, extra_headers=()):
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send(
        {"type": "http.response.start", "status": status, "headers": [*headers, *extra_headers]}
    )
    await send({"type": "http.response.body", "body": body})


RATE_LIMITED = -32000  # JSON-RPC's implementation-defined server error; `data.code` says which


async def _rate_limited(send, retry_after):
    """429 with `Retry-After`, before the JSON-RPC layer (no session or request is touched), with
    a JSON-RPC error as the body: the id is null (the request was not read), and clients answer
    their pending request with it (the SDK does), so the agent's model reads why and how long."""
    message = f"Too many requests from this agent; retry after {retry_after} seconds."
    error = {"code": RATE_LIMITED, "message": message,
             "data": {"code": "rate_limited", "retry_after": retry_after}}  # fmt: skip
    body = json.dumps({"jsonrpc": "2.0", "id": None, "error": error}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(retry_after).encode()),
    ]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _too_many_sessions(send):
    """429 for an `initialize` beyond the agent's open sessions, with a JSON-RPC error body
    (as `_rate_limited`'s) that says how to get one: end a session, or let one idle out."""
    limit = settings.MCP_MAX_SESSIONS_PER_AGENT
    message = (
        f"This agent already has {limit} open MCP sessions, the most it may have: end one "
        "(DELETE with its Mcp-Session-Id) or reuse one."
    )
    error = {"code": RATE_LIMITED, "message": message,
             "data": {"code": "too_many_sessions", "limit": limit}}  # fmt: skip
    body = json.dumps({"jsonrpc": "2.0", "id": None, "error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _unauthorized(send):
    challenge = (
        'Bearer realm="toolgate", error="invalid_token", '
        'error_description="Missing or invalid agent token: send Authorization: Bearer <token>"'
    )
    await _error(
        send, 401, "unauthorized",
        "Missing or invalid agent token. Send the agent's token as Authorization: Bearer <token>.",
        [(b"www-authenticate", challenge.encode())],
    )  # fmt: skip
