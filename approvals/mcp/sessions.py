"""Agents' MCP sessions in this process, to tell them when their tool list changes.

A session of the handshake era has a `_Session` mark, found by the id the client sends with
every request: `Mcp-Session-Id` (Streamable HTTP) or the `session_id` of the SSE message URL.
The app wraps each request of a session in `request()`; a session is forgotten on DELETE,
when its SSE stream ends (`SseStream` reads the id from the stream's `endpoint` event), or by
`prune()` once no request has been in flight for the SDK's own idle timeout.

`watch()` runs in the web process: every MCP_LIST_CHANGED_INTERVAL seconds it recomputes the
tool list of each (agent, endpoint) that has a session which listed its tools, one query each,
and sends `notifications/tools/list_changed` to the sessions whose last list differs, all at
once (each within SEND_TIMEOUT, so a session that doesn't read its stream delays no other's
news). Changes made anywhere (a worker's sync, an admin's approval setting or review) are
seen because the list is read from the database. 2026-07-28 clients have no session: they
see the change on their next `tools/list`.
"""

import contextlib
import hashlib
import json
import logging
import re
import time

import anyio
from asgiref.sync import sync_to_async
from django.conf import settings
from mcp.server.streamable_http import MCP_SESSION_ID_HEADER
from mcp.server.streamable_http_manager import DEFAULT_SESSION_IDLE_TIMEOUT
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS

from approvals.mcp import tools
from integrations.models import Agent

logger = logging.getLogger(__name__)

SEND_TIMEOUT = 2  # seconds for one session to take its notification
_by_id = {}  # Mcp-Session-Id, or "sse:" + the SSE session id -> _Session
_SSE_ID = re.compile(rb"session_id=([0-9a-f]{32})")


class _Session:
    def __init__(self):
        self.agent_id = self.scope = self.digest = self.session = None
        self.log_level = None  # what `logging/setLevel` asked for; None: no log messages
        self.in_flight, self.last_seen = 0, time.monotonic()


@contextlib.contextmanager
def request(session_id, method, send):
    """Around one HTTP request of the session `session_id`; yields the `send` to answer with.
    A session the client ended (DELETE) is forgotten, and so is an id the SDK doesn't know (it
    answers 404) unless a session of that id listed tools: another agent's request with a
    session's id is answered 404 too, and must not make the session lose its notifications."""
    mark = _by_id.get(session_id) or _by_id.setdefault(session_id, _Session())
    mark.in_flight += 1
    status = []

    async def watched(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])
        await send(message)

    try:
        yield watched
    finally:
        mark.in_flight -= 1
        mark.last_seen = time.monotonic()
        if method == "DELETE" or (status[:1] == [404] and mark.digest is None):
            _by_id.pop(session_id, None)


def prune(idle_seconds=DEFAULT_SESSION_IDLE_TIMEOUT):
    now = time.monotonic()
    for key, mark in list(_by_id.items()):
        if mark.in_flight == 0 and now - mark.last_seen > idle_seconds:
            _by_id.pop(key, None)


class SseStream:
    """Wraps an SSE stream's ASGI `send`: the session is in flight while the stream is open."""

    def __init__(self, send):
        self._send, self.key = send, None

    async def send(self, message):
        if self.key is None and message["type"] == "http.response.body":
            found = _SSE_ID.search(message.get("body", b""))
            if found:
                self.key = "sse:" + found.group(1).decode()
                _by_id.setdefault(self.key, _Session()).in_flight += 1
        await self._send(message)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.key:
            _by_id.pop(self.key, None)


def current(ctx):
    """The mark of the session `ctx` belongs to, or None (2026-07-28 requests have none)."""
    request = ctx.request
    if request is None:
        return None
    session_id = request.headers.get(MCP_SESSION_ID_HEADER)
    if session_id is None and request.query_params.get("session_id"):
        session_id = "sse:" + request.query_params["session_id"]
    return _by_id.get(session_id or "")


def listed(ctx, caller, tool_list):
    """A session's client has just been given `tool_list`."""
    mark = current(ctx)
    if mark is None or ctx.protocol_version not in HANDSHAKE_PROTOCOL_VERSIONS:
        return
    mark.agent_id, mark.scope, mark.session = caller.agent.pk, caller.scope, ctx.session
    mark.digest = digest(tool_list)


def digest(tool_list):
    return hashlib.sha256(json.dumps(tool_list, sort_keys=True).encode()).hexdigest()


def tool_list(agent, scope):
    """The MCP tool list of an agent on an endpoint, as `tools/list` answers it."""
    if agent is None or not agent.is_active:
        return []
    return [
        tools.mcp_tool(name, served) for name, served in tools.served_tools(agent, scope).items()
    ]


def _current_digests(keys):
    agents = Agent.objects.in_bulk({agent_id for agent_id, _ in keys})
    return {key: digest(tool_list(agents.get(key[0]), key[1])) for key in keys}


async def notify_changes():
    prune()
    marks = [mark for mark in list(_by_id.values()) if mark.digest is not None]
    if not marks:
        return 0
    now = await sync_to_async(_current_digests)({(m.agent_id, m.scope) for m in marks})
    told = []
    # All at once: one after the other, each session that doesn't read its stream (an agent
    # can stall its own SSE stream with replies it never reads) held every later session,
    # and the next check, up for SEND_TIMEOUT.
    async with anyio.create_task_group() as group:
        for mark in marks:
            new = now[(mark.agent_id, mark.scope)]
            if new != mark.digest:
                mark.digest = new
                group.start_soon(_tell, mark, told)
    return len(told)


async def _tell(mark, told):
    # A session gone since has nothing to hear; one that doesn't read its stream gives up its
    # notification after SEND_TIMEOUT.
    with contextlib.suppress(Exception), anyio.move_on_after(SEND_TIMEOUT):
        await mark.session.send_tool_list_changed()
        told.append(mark)


async def watch():
    while True:
        await anyio.sleep(settings.MCP_LIST_CHANGED_INTERVAL)
        try:
            await notify_changes()
        except Exception:  # a database hiccup: try again at the next tick
            logger.warning("Could not check agents' tool lists for changes", exc_info=True)
