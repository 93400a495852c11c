"""The one seam between Toolgate and the network: speaking MCP to remote servers.

Everything that leaves the machine for an MCP server goes through `list_tools`, `call_tool`
and its async twin `acall_tool` here. `list_tools` and `call_tool` (a sync; a worker's call
unless pooled) open a fresh session over the server's transport (Streamable HTTP or the older
SSE transport; "auto" tries Streamable HTTP and falls back to SSE), with the connection guard
of `netguard`, timeouts, and a cap on response size; `acall_tool` (the web process, and a
worker's call on its process's loop thread) leases an open Streamable HTTP session from
`mcp_pool` instead, built the same way. The SDK negotiates the protocol era itself: it
probes the 2026-07-28 `server/discover` and falls back to the `initialize` handshake (a
pooled session adopts the era its key's first session found).

Every failure comes out as `McpError` with a short code, a message fit for an admin page
(never the URL's path or query, never a token), and `reached_server`: False only when the
request provably never got to the server, which is what makes a retry safe.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import html
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlsplit

import anyio
import httpx2
import mcp_types
import re2
from django.conf import settings
from mcp import Client, MCPError
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import LOG_LEVEL_META_KEY
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError

from integrations import limits, mcp_pool, netguard
from integrations.logging import redacting

logger = logging.getLogger(__name__)

CLIENT_INFO = mcp_types.Implementation(name="toolgate", version="0.1.0")

STREAMABLE_HTTP = "streamable_http"
SSE = "sse"
AUTO = "auto"


class McpError(Exception):
    """A conversation with an MCP server failed.

    `code` is one of `CODES`: refused, unreachable, timeout, unauthorized, not_mcp, redirect,
    server_error, protocol, too_large, and for OAuth servers (`integrations.oauth`)
    needs_reconnect, insufficient_scope, oauth (the authorization server failed).
    `retryable` defaults to `not reached_server`; an error only a human can fix is not.
    """

    CODES = (
        "refused", "unreachable", "timeout", "unauthorized", "not_mcp", "redirect",
        "server_error", "protocol", "too_large", "needs_reconnect", "insufficient_scope", "oauth",
    )  # fmt: skip

    def __init__(self, code, message, *, reached_server=True, retryable=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reached_server = reached_server
        self.retryable = (not reached_server) if retryable is None else retryable


MIN_SECRET_CHARS = 4  # shorter "secrets" would redact ordinary words
_SECRET_KEY_WORDS = re.compile(r"key|token|secret|pass|auth|sig|cred|session", re.IGNORECASE)


def _secret_looking(text, key=""):
    """Whether a URL path segment or query value looks like it carries a key: long, or mixing
    letters and digits, or under a key-like query name. Plain words ("mcp", "customers") are
    left alone, or redaction would mangle every result that mentions them."""
    text = unquote(text)
    if len(text) < MIN_SECRET_CHARS:
        return False
    if key and _SECRET_KEY_WORDS.search(key):
        return True
    mixed = any(c.isdigit() for c in text) and any(c.isalpha() for c in text)
    return len(text) >= 20 or (len(text) >= 8 and mixed)


@functools.lru_cache(maxsize=64)
def secret_forms(secrets):
    """Every form in which the `secrets` may come back: as they are, URL-decoded and -encoded,
    HTML- and JSON-escaped, and base64 (standard and URL-safe, at each of the three offsets a
    secret can have inside a longer base64 text)."""
    forms = set()
    for secret in secrets:
        for variant in {secret, unquote(secret)}:
            quoted = quote(variant, safe="")
            forms.update([variant, quoted, quoted.lower(), quote_plus(variant)])
            forms.update([quote(variant), html.escape(variant), json.dumps(variant)[1:-1]])
            every = variant.encode().hex().upper()
            forms.update(["%" + "%".join(every[i : i + 2] for i in range(0, len(every), 2))])
            forms.update(_base64_forms(variant.encode()))
    return tuple(sorted((f for f in forms if len(f) >= MIN_SECRET_CHARS), key=len, reverse=True))


_URL_SAFE = str.maketrans("+/", "-_")


def _base64_forms(data):
    """The base64 characters that depend on `data` alone, whatever precedes or follows it."""
    forms = []
    for offset, skip in ((0, 0), (1, 2), (2, 3)):
        padded = b"\0" * offset + data
        text = base64.b64encode(padded).decode().rstrip("=")
        if len(padded) % 3:
            text = text[:-1]  # its last character also depends on what comes next
        core = text[skip:]
        if len(core) >= 8:
            forms += [core, core.translate(_URL_SAFE)]
    return forms


@functools.lru_cache(maxsize=64)
def _redaction_pattern(forms):
    # RE2: one linear pass over the text whatever the number of forms (literals only).
    return re2.compile("|".join(re2.escape(form) for form in forms))


# Up to this many characters times forms, a substring test per form finds a clean text sooner
# than RE2's Python wrapper (which encodes the text and walks it in Python) gets going.
SCAN_BY_FORM = 8192


def _redact_text(text, forms):
    if not forms or not text:
        return text
    if len(text) * len(forms) <= SCAN_BY_FORM and not any(form in text for form in forms):
        return text  # the common case: a short result that echoes nothing
    return _redaction_pattern(forms).sub("[redacted]", text)


_JSON = json.JSONEncoder(ensure_ascii=False)  # json.dumps(ensure_ascii=False) makes one per call


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach one MCP server. Holds secrets: never log or pickle it."""

    url: str
    transport: str = AUTO
    headers: dict = field(default_factory=dict)
    allow_private_network: bool = False
    # An httpx2 auth for every request (OAuth's `integrations.oauth.BearerAuth`), and what
    # identifies the credential it carries without being it ("" when there is none). The
    # auth's `secrets` (its tokens) are redacted like the others.
    auth: httpx2.Auth | None = field(default=None, compare=False)
    credential: str = ""
    server_pk: int | None = field(default=None, compare=False)  # whose pooled sessions these are

    @property
    def origin(self):
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"

    def redact(self, value):
        """`value` (text, or any JSON value) without this endpoint's own secrets.

        The one redaction of what a server sends back (results, error text, tool listings):
        the URL, its credentials, secret-looking path segments and query values, the token and
        every header value, each also URL-encoded, HTML- and JSON-escaped and base64-encoded
        (at any offset inside a longer base64 text, such as a Basic credential), are replaced
        by "[redacted]". JSON values are redacted as their JSON text, keys included.
        """
        if isinstance(value, str):
            return _redact_text(value, self._secret_forms)
        if value is None or isinstance(value, bool | int | float):
            return value
        text = _JSON.encode(value)
        redacted = _redact_text(text, self._secret_forms)
        if redacted == text:
            return value
        try:
            return json.loads(redacted)
        except ValueError:  # a secret spanning JSON syntax: nothing of it can be kept
            return "[redacted]"

    @property
    def _secret_forms(self):
        # Not cached on the endpoint: an OAuth refresh changes the tokens mid-conversation.
        return secret_forms(self._secrets())

    def _secrets(self):
        tokens = getattr(self.auth, "secrets", ())  # OAuth's tokens, as they are now
        return _fixed_secrets(self.url, tuple(self.headers.values())) + _long_enough(tokens)


@functools.lru_cache(maxsize=64)
def _fixed_secrets(url, header_values):
    """The secrets of the URL and the headers (see `Endpoint.redact`), found once for each,
    not on every redaction."""
    parts = urlsplit(url)
    found = [url, parts.netloc.rpartition("@")[0], parts.password or ""]
    found += [url.partition("#")[0], url.partition("?")[0]]
    found += [parts.path] if _secret_looking(parts.path) else []
    found += [parts.query] if parts.query else []
    found += [value for key, value in parse_qsl(parts.query) if _secret_looking(value, key)]
    found += [segment for segment in parts.path.split("/") if _secret_looking(segment)]
    for value in header_values:
        found += [value, value.rpartition(" ")[2]]  # "Bearer <token>" and the token
    return _long_enough(found)


def _long_enough(secrets):
    return tuple(secret for secret in secrets if secret and len(secret) >= MIN_SECRET_CHARS)


@dataclass
class ToolListing:
    tools: list  # tool definitions in MCP wire form (camelCase keys)
    server_info: dict
    protocol_version: str
    transport: str


@dataclass
class ToolResult:
    content: list
    structured_content: dict | None
    is_error: bool
    truncated_from: int | None = None  # bytes of the whole result, when it was cut to fit
    size: int | None = None  # bytes of the canonical JSON of what is kept, when measured

    @classmethod
    def capped(cls, content, structured_content, is_error):
        """The result as it may be stored: at most MCP_MAX_RESULT_BYTES of canonical JSON.

        A larger one keeps its first content blocks (the text of the one that crosses the
        limit cut short), drops the structured content if it no longer fits, and ends with a
        text block saying so; `truncated_from` tells the caller. The call still succeeded:
        the tool ran, so failing it would invite the agent to run it again.
        """
        limit = settings.MCP_MAX_RESULT_BYTES
        size = limits.canonical_size([content, structured_content])
        if size <= limit:
            return cls(content, structured_content, is_error, size=size)
        room = max(limit - 512, 0)  # for the marker
        kept, used = [], 0
        for block in content:
            block_size = limits.canonical_size(block)
            if used + block_size > room:
                cut = _cut_text_block(block, room - used)
                kept += [cut] if cut else []
                used = room
                break
            kept.append(block)
            used += block_size
        if (
            structured_content is not None
            and used + limits.canonical_size(structured_content) > room
        ):
            structured_content = None
        marker = (
            f"[Toolgate: this result was {size:,} bytes, over the {limit:,}-byte limit for a "
            "stored result; what follows this point was not kept.]"
        )
        kept.append({"type": "text", "text": marker})
        return cls(kept, structured_content, is_error, truncated_from=size)


def _cut_text_block(block, room):
    """A text block cut to about `room` bytes of JSON, or None if no room or not text."""
    if block.get("type") != "text" or room < 64:
        return None
    text = str(block.get("text", ""))
    keep = room - 64
    while True:  # escaping can make the JSON longer than the text: shrink until it fits
        cut = {**block, "text": text.encode()[:keep].decode("utf-8", "ignore")}
        size = limits.canonical_size(cut)
        if size <= room or keep <= 0:
            return cut
        keep = keep * room // size - 1


@dataclass
class _HttpTrace:
    """What the HTTP layer saw, so an opaque SDK error can be explained (the SDK folds a 401
    into a generic JSON-RPC error), and the way to stop the conversation at once when a guard
    refuses something: the SDK's SSE reader swallows exceptions and then waits for an
    `endpoint` event that never comes, until the whole timeout has passed."""

    origin: tuple = ()
    url: str = ""
    statuses: list = field(default_factory=list)
    guard_error: Exception | None = None  # the SDK's SSE reader swallows these; keep them here
    cancel: Callable[[], None] | None = None  # set by `_run`: ends the conversation now
    bytes_left: int | None = None  # what all responses of this conversation may still carry
    byte_limit: int | None = None
    posts: int = 0  # POSTs that set out
    unsent: int = 0  # POSTs that could not connect (refused too), so never reached the server

    def on_connect_error(self, request):
        if request.method == "POST":
            self.unsent += 1

    def never_reached(self):
        """Whether the conversation provably never got a request to the server: no POST of it
        connected, one could not, and no response came back (on an open session, the SDK
        reports that as a closed connection). One POST that could not connect says nothing of
        the others: a server asking for something mid-call (an elicitation) gets Toolgate's
        answer on a new connection, which may fail after the call itself went out."""
        return 0 < self.unsent == self.posts and not self.statuses

    def fail(self, error):
        """Record why the conversation must end, and end it now."""
        if self.guard_error is None:
            self.guard_error = error
        if self.cancel is not None:
            self.cancel()

    def off_origin(self, url):
        """An McpError if `url` (an httpx2.URL) is not on the server's origin, else None."""
        same = (url.scheme, url.host, url.port) == self.origin
        upgrade = (url.host, self.origin[0], url.scheme) == (self.origin[1], "http", "https")
        if same or upgrade:
            return None
        return McpError(
            "refused",
            f"The server tried to send the conversation to another origin "
            f"({url.scheme}://{url.host}{f':{url.port}' if url.port else ''}); "
            "nothing was sent there.",
            reached_server=True,
        )

    async def on_request(self, request):
        """Refuse to send anything (the token and headers above all) off the server's origin,
        whatever a redirect or an SSE `endpoint` event says."""
        error = self.off_origin(request.url)
        if error is not None:
            self.fail(error)
            raise error
        if request.method == "POST":
            self.posts += 1

    async def on_response(self, response):
        self.statuses.append(response.status_code)
        events = response.headers.get("content-type", "").startswith("text/event-stream")
        if events or self.bytes_left is not None:
            response.stream = _Watched(response.stream, self, events)

    def count(self, received):
        """Take `received` bytes from the conversation's budget; past it, stop now."""
        if self.bytes_left is None:
            return
        self.bytes_left -= received
        if self.bytes_left < 0:
            error = McpError(
                "too_large",
                f"The server's responses exceeded the {self.byte_limit:,}-byte total allowed "
                "for one sync.",
            )
            self.fail(error)
            raise error

    def on_guard_error(self, exc):
        self.fail(exc)

    def worst_status(self):
        failures = [s for s in self.statuses if s >= 300]
        return failures[-1] if failures else None

    def check_endpoint(self, data):
        """The SSE `endpoint` event names where messages go: on another origin, stop now."""
        try:
            url = httpx2.URL(self.url).join(data.decode("utf-8", "replace").strip())
        except httpx2.InvalidURL:
            url = httpx2.URL("invalid://endpoint")
        error = self.off_origin(url)
        if error is not None:
            self.fail(error)
            raise error


_SSE_LINE = re.compile(rb"\r\n|\r|\n")


class _Watched(httpx2.AsyncByteStream):
    """A response body passed through unchanged, counted against the conversation's byte
    budget; for an event stream, its first `endpoint` event is checked as it goes by (see
    `_HttpTrace.check_endpoint`)."""

    MAX_LINE = 64 * 1024

    def __init__(self, stream, trace, events):
        self._stream, self._trace, self._events = stream, trace, events

    async def __aiter__(self):
        watching, pending, event, data = self._events, b"", b"", []
        async for chunk in self._stream:
            self._trace.count(len(chunk))
            if watching:
                *lines, pending = _SSE_LINE.split(pending + chunk)
                for line in lines:
                    if line.startswith(b"event:"):
                        event = line[6:].strip()
                    elif line.startswith(b"data:"):
                        data.append(line[5:].removeprefix(b" "))
                    elif not line and event == b"endpoint":
                        self._trace.check_endpoint(b"\n".join(data))
                        watching = False  # the SDK takes the first endpoint event only
                        break
                    elif not line:
                        event, data = b"", []
                watching = watching and len(pending) <= self.MAX_LINE
            yield chunk

    async def aclose(self):
        await self._stream.aclose()

    def worst_status(self):
        failures = [s for s in self.statuses if s >= 300]
        return failures[-1] if failures else None


def list_tools(endpoint):
    """Connect, list every tool (following pagination to the end), disconnect."""
    return anyio.run(_list_tools, endpoint)


def call_tool(
    endpoint, name, arguments, *, transport=None, timeout=None, on_declined=None, pooled=False
):
    """Call one tool and return its result. `transport` pins the transport a sync found.

    `pooled` (a worker's call): when MCP_POOL_SESSIONS is not 0, `acall_tool` on the process's
    loop thread (`mcp_pool.run_in_loop_thread`), so the next call to the same server finds
    the session open; otherwise a fresh session in an event loop of the call's own.
    """
    timeout = timeout or settings.MCP_CALL_TIMEOUT
    if pooled and settings.MCP_POOL_SESSIONS > 0:
        from integrations import mcp_pool

        options = {"transport": transport, "timeout": timeout, "on_declined": on_declined}
        call = partial(acall_tool, endpoint, name, arguments, **options)
        return mcp_pool.run_in_loop_thread(call)
    upstream = _UpstreamRequests(endpoint, None, None, on_declined)
    call = partial(_call_tool, endpoint, name, arguments, transport, timeout, upstream)
    return anyio.run(call)


async def acall_tool(
    endpoint,
    name,
    arguments,
    *,
    transport=None,
    timeout=None,
    on_progress=None,
    on_log=None,
    on_declined=None,
):
    """`call_tool` in the caller's event loop, for a call whose agent waits in the web process.

    `on_progress(progress, total, message)` and `on_log(level, data, logger)` (both async)
    receive the server's progress and log notifications while the call runs; without them
    none is asked for. The server's requests to sample the agent's model or to elicit input
    are declined (a sampling error, an elicitation "decline"), and `on_declined(entry)` is
    told of each for the audit.

    Over Streamable HTTP the call runs on a pooled open session (`mcp_pool`) when
    MCP_POOL_SESSIONS is not 0.
    """
    timeout = timeout or settings.MCP_CALL_TIMEOUT
    upstream = _UpstreamRequests(endpoint, on_progress, on_log, on_declined)
    pooled = settings.MCP_POOL_SESSIONS > 0
    return await _call_tool(endpoint, name, arguments, transport, timeout, upstream, pooled)


async def _list_tools(endpoint):
    async def listing(client, transport):
        tools = await _all_tools(client)
        info = client.server_info
        return ToolListing(
            tools=endpoint.redact(tools),
            server_info=endpoint.redact(
                info.model_dump(mode="json", exclude_none=True) if info else {}
            ),
            protocol_version=client.protocol_version,
            transport=transport,
        )

    return await _with_fallback(
        endpoint, listing, settings.MCP_SYNC_TIMEOUT, {}, max_bytes=settings.MCP_SYNC_MAX_BYTES
    )


async def _call_tool(endpoint, name, arguments, transport, timeout, upstream, pooled=False):
    async def call(client, _transport):
        meta = None
        if upstream.on_log and client.protocol_version in MODERN_PROTOCOL_VERSIONS:
            meta = {LOG_LEVEL_META_KEY: "debug"}  # a 2026-07-28 server logs what a request asks
        elif upstream.on_log:
            with contextlib.suppress(MCPError):  # a server without logging still runs the call
                await client.set_logging_level("debug")
        client.session.validate_tool_result = _no_output_check
        result = await client.call_tool(
            name, arguments, progress_callback=upstream.progress, meta=meta
        )
        if not isinstance(result, mcp_types.CallToolResult):
            raise McpError("protocol", "The server answered the tool call with an unknown result.")
        return ToolResult.capped(
            endpoint.redact([_wire(block) for block in result.content]),
            endpoint.redact(result.structured_content),
            bool(result.is_error),
        )

    if transport in (STREAMABLE_HTTP, SSE) and transport != endpoint.transport:
        endpoint = replace(endpoint, transport=transport)
    options = upstream.client_options()
    return await _with_fallback(
        endpoint, call, timeout, options, upstream=upstream if pooled else None
    )


async def _no_output_check(name, result):
    """Stands in for the SDK's `ClientSession.validate_tool_result`, which checks a result's
    structured content against the output schema the server lists at that moment (its own
    `tools/list` on the session, not the definition a human reviewed), with jsonschema's
    `pattern` on Python's backtracking `re`, in the event loop: a server listing `^(a|a)*$`
    and answering 40 "a"s and a "!" held the web process's loop, every agent's requests with
    it, for hours, past every timeout (CPU, no await). Toolgate passes a result on as the
    server sent it: the tool ran either way, and failing the call would invite a second run.
    The SDK has no switch for it; the method is public and looked up on the session per call
    (`tests/test_mcp_client.py` pins that it is no longer run)."""


class _UpstreamRequests:
    """What a server may send Toolgate during a call, besides the result: progress and log
    notifications (passed on when someone listens, without the server's secrets: message,
    data and logger name), sampling and elicitation requests (declined: Toolgate has no
    model or user to lend a server). Roots are not offered (no callback, so the capability
    isn't advertised) and the SDK refuses a `roots/list` itself."""

    def __init__(self, endpoint, on_progress, on_log, on_declined):
        self.endpoint = endpoint
        self.on_progress, self.on_log, self.on_declined = on_progress, on_log, on_declined

    def client_options(self):
        options = {
            "sampling_callback": self.decline_sampling,
            "elicitation_callback": self.decline_elicitation,
        }
        if self.on_log:
            options.update(logging_callback=self.log)
        return options

    @property
    def progress(self):
        return self._progress if self.on_progress else None

    async def _progress(self, progress, total, message):
        await self.on_progress(progress, total, message and self.endpoint.redact(message))

    async def log(self, params):
        logger_name = params.logger and self.endpoint.redact(params.logger)
        await self.on_log(params.level, self._redacted(params.data), logger_name)

    def _redacted(self, data):
        """The server's log data without the server's own secrets (it goes to the agent)."""
        if isinstance(data, str):
            return self.endpoint.redact(data)
        try:
            return json.loads(self.endpoint.redact(json.dumps(data)))
        except (TypeError, ValueError):
            return self.endpoint.redact(str(data))

    async def decline_sampling(self, context, params):
        self._declined("sampling/createMessage", "")
        return declined_sampling()

    async def decline_elicitation(self, context, params):
        self._declined("elicitation/create", getattr(params, "message", ""))
        return declined_elicitation()

    def _declined(self, method, message):
        logger.info("Declined %s from %s during a tool call", method, self.endpoint.origin)
        if self.on_declined:
            entry = {"method": method, "at": datetime.now(UTC).isoformat()}
            if message:
                entry["message"] = self.endpoint.redact(str(message))[:500]
            self.on_declined(entry)


def declined_sampling():
    return mcp_types.ErrorData(
        code=-1, message="Declined: Toolgate does not let MCP servers sample the agent's model."
    )


def declined_elicitation():
    return mcp_types.ElicitResult(action="decline")


async def _all_tools(client):
    tools, cursor, seen_cursors = [], None, set()
    for _page in range(settings.MCP_SYNC_MAX_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools.extend(_wire(tool) for tool in page.tools)
        if len(tools) > settings.MCP_MAX_TOOLS:
            raise McpError(
                "too_large", f"The server lists more than {settings.MCP_MAX_TOOLS} tools."
            )
        cursor = page.next_cursor
        if not cursor:
            return tools
        if cursor in seen_cursors:
            raise McpError("protocol", "The server's tool list pages loop back on themselves.")
        seen_cursors.add(cursor)
    raise McpError(
        "too_large", f"The server's tool list has more than {settings.MCP_SYNC_MAX_PAGES} pages."
    )


def _wire(model):
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


async def _with_fallback(
    endpoint, operation, timeout, client_options, max_bytes=None, upstream=None
):
    """Run `operation` over the endpoint's transport; for "auto", fall back from Streamable
    HTTP to SSE when the first attempt shows the server doesn't speak it. `max_bytes` caps
    what all responses of one attempt may carry together. With `upstream` (the call's
    `_UpstreamRequests`), a Streamable HTTP attempt runs on a pooled session."""
    run = partial(_run, operation=operation, timeout=timeout, client_options=client_options)
    run = partial(run, max_bytes=max_bytes, upstream=upstream)
    if endpoint.transport != AUTO:
        return await run(endpoint, endpoint.transport)
    try:
        return await run(endpoint, STREAMABLE_HTTP)
    except McpError as first:
        if first.code not in ("not_mcp", "protocol"):
            raise
        try:
            return await run(endpoint, SSE)
        except McpError:
            raise first from None


async def _run(
    endpoint, transport, operation, timeout, client_options, max_bytes=None, upstream=None
):
    try:
        origin = url_origin(endpoint.url)
    except httpx2.InvalidURL:
        raise McpError("refused", "The server URL is not valid.", reached_server=False) from None
    trace = _HttpTrace(origin=origin, url=endpoint.url)
    trace.bytes_left = trace.byte_limit = max_bytes
    with redacting(endpoint.redact):  # the SDK logs what the server sent, its secrets too
        return await _attempt(
            endpoint, transport, operation, timeout, trace, client_options, upstream
        )


async def _attempt(endpoint, transport, operation, timeout, trace, client_options, upstream):
    try:
        # One scope for both ways to stop: the deadline, and a guard (`_HttpTrace.fail`).
        with anyio.CancelScope(deadline=anyio.current_time() + timeout) as stop:
            trace.cancel = stop.cancel
            if upstream is not None and transport == STREAMABLE_HTTP:
                return await _on_pooled_session(endpoint, transport, operation, trace, upstream)
            async with _client(endpoint, transport, trace, client_options) as client:
                return await operation(client, transport)
        raise trace.guard_error or TimeoutError()
    except McpError as exc:
        exc.message = endpoint.redact(exc.message)
        raise
    except BaseException as exc:
        error = _explain(_leaf(exc), endpoint, transport, trace)
        if error is None:
            raise
        error.message = endpoint.redact(error.message)
        raise error from None


@functools.lru_cache(maxsize=256)
def url_origin(url):
    """(scheme, host, port) of `url`; raises httpx2.InvalidURL. Parsed once per URL: httpx2's
    parser costs more than the rest of a pooled call's own work."""
    parsed = httpx2.URL(url)
    return (parsed.scheme, parsed.host, parsed.port)


@dataclass
class _Lease:
    """What a pooled session relays to while it runs one call (`mcp_pool.Relay`)."""

    trace: _HttpTrace
    upstream: _UpstreamRequests
    auth: httpx2.Auth | None


async def _on_pooled_session(endpoint, transport, operation, trace, upstream):
    """`operation` on a leased open session; back to the pool only if nothing went wrong."""
    pool = mcp_pool.pool()
    session = await pool.lease(endpoint, transport, _Lease(trace, upstream, endpoint.auth))
    healthy = False
    try:
        result = await operation(session.client, transport)
        healthy = trace.guard_error is None
        return result
    finally:
        pool.release(session, healthy)


def _client(endpoint, transport, trace, client_options, *, auth=None, mode="auto", **options):
    """An SDK client over the guarded HTTP client. `trace` is the conversation's `_HttpTrace`
    (or a pooled session's relay to its current call's), `auth` the one to send with (the
    endpoint's by default), `mode` and `options` go to the SDK (a pooled session's era)."""
    auth = endpoint.auth if auth is None else auth
    guard = {
        "allow_private_network": endpoint.allow_private_network,
        "extra_blocked": settings.MCP_EXTRA_BLOCKED_NETWORKS,
        "extra_allowed": settings.MCP_EXTRA_ALLOWED_NETWORKS,
        "max_response_bytes": settings.MCP_MAX_RESPONSE_BYTES,
        "on_guard_error": trace.on_guard_error,
    }
    timeout = httpx2.Timeout(settings.MCP_READ_TIMEOUT, connect=settings.MCP_CONNECT_TIMEOUT)
    if transport == SSE:
        connection = sse_client(
            endpoint.url,
            headers=endpoint.headers,
            timeout=settings.MCP_CONNECT_TIMEOUT,
            sse_read_timeout=settings.MCP_READ_TIMEOUT,
            httpx_client_factory=_traced(netguard.guarded_client_factory(**guard), trace),
            auth=auth,
        )
    else:
        http_client = netguard.guarded_client(
            headers=endpoint.headers,
            timeout=timeout,
            auth=auth,
            on_connect_error=trace.on_connect_error,
            **guard,
        )
        http_client.event_hooks = {"request": [trace.on_request], "response": [trace.on_response]}
        connection = streamable_http_client(endpoint.url, http_client=http_client)
        connection = _closing(http_client, connection)
    return Client(
        connection,
        read_timeout_seconds=settings.MCP_READ_TIMEOUT,
        client_info=CLIENT_INFO,
        cache=None,  # a sync must see the server's list as it is now
        mode=mode,
        **client_options,
        **options,
    )


def _traced(factory, trace):
    def make_client(headers=None, timeout=None, auth=None):
        client = factory(headers=headers, timeout=timeout, auth=auth)
        client.event_hooks = {"request": [trace.on_request], "response": [trace.on_response]}
        return client

    return make_client


class _closing:
    """Enter a transport and close the httpx client we made for it afterwards."""

    def __init__(self, http_client, transport):
        self.http_client, self.transport = http_client, transport

    async def __aenter__(self):
        await self.http_client.__aenter__()
        try:
            return await self.transport.__aenter__()
        except BaseException:
            await self.http_client.__aexit__(None, None, None)
            raise

    async def __aexit__(self, *exc_info):
        try:
            return await self.transport.__aexit__(*exc_info)
        finally:
            await self.http_client.__aexit__(None, None, None)


def _leaf(exc):
    """The most telling exception inside (possibly nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, anyio.get_cancelled_exc_class())]
        exc = (inner or exc.exceptions)[0]
    return exc


_STATUS_ERRORS = {
    401: ("unauthorized", "The server refused the credentials (HTTP 401): check the secret token."),
    403: ("unauthorized", "The server refused access (HTTP 403): check the token and headers."),
    404: ("not_mcp", "No MCP endpoint at this URL (HTTP 404)."),
    405: ("not_mcp", "No MCP endpoint at this URL (HTTP 405 Method Not Allowed)."),
    406: ("not_mcp", "The URL did not accept MCP requests (HTTP 406)."),
    415: ("not_mcp", "The URL did not accept MCP requests (HTTP 415)."),
}


def _explain(exc, endpoint, transport, trace):
    """Turn whatever the SDK or HTTP stack raised into an McpError, or None to re-raise."""
    where = f"{endpoint.origin} over {_label(transport)}"
    status = trace.worst_status()
    exc = trace.guard_error or getattr(endpoint.auth, "failure", None) or exc
    if isinstance(exc, McpError):
        return exc
    if isinstance(exc, netguard.AddressRefused):  # refused then, maybe after the call went out
        return McpError("refused", str(exc), reached_server=not trace.never_reached())
    if trace.never_reached():
        return McpError("unreachable", f"Could not connect to {where}.", reached_server=False)
    if isinstance(exc, netguard.ResponseTooLarge):
        limit = settings.MCP_MAX_RESPONSE_BYTES
        return McpError("too_large", f"{where}: a response exceeded the {limit:,} byte limit.")
    if isinstance(exc, TimeoutError | httpx2.TimeoutException):
        reached = not isinstance(exc, httpx2.ConnectTimeout)
        return McpError("timeout", f"{where}: no answer in time.", reached_server=reached)
    if isinstance(exc, httpx2.ConnectError | ConnectionRefusedError | OSError) and not status:
        return McpError("unreachable", f"Could not connect to {where}.", reached_server=False)
    if status and status in _STATUS_ERRORS:
        code, message = _STATUS_ERRORS[status]
        return McpError(code, f"{where}: {message}")
    if status and 300 <= status < 400:
        message = f"{where}: the server redirected to another location, which is not followed."
        return McpError("redirect", message)
    if status and status >= 500:
        return McpError("server_error", f"{where}: the server failed (HTTP {status}).")
    if isinstance(exc, MCPError) and exc.code == mcp_types.REQUEST_TIMEOUT:
        return McpError("timeout", f"{where}: no answer in time.")
    if isinstance(exc, MCPError):
        # Redact before cutting: a cut could split a secret and let its first half through.
        detail = endpoint.redact(exc.error.message if exc.error else str(exc))[:300]
        return McpError("protocol", f"{where}: the server answered with an error: {detail}")
    if isinstance(exc, ValidationError | json.JSONDecodeError | httpx2.HTTPError | ValueError):
        return McpError("protocol", f"{where}: the reply is not valid MCP ({type(exc).__name__}).")
    if isinstance(exc, Exception):
        logger.warning("Unexpected MCP failure with %s: %s", endpoint.origin, type(exc).__name__)
        return McpError("protocol", f"{where}: the conversation failed ({type(exc).__name__}).")
    return None


def _label(transport):
    return {STREAMABLE_HTTP: "Streamable HTTP", SSE: "SSE"}.get(transport, transport)
