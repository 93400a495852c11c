"""Agents' MCP sessions in this process, to tell them when their tool list changes.

A session of the handshake era (Streamable HTTP with `Mcp-Session-Id`, or SSE) gets a
`_Session` mark when it opens: the app sets it in a context variable before the SDK starts the
session's server task, which inherits it, so every handler of that session sees the same mark
(pinned by tests/test_mcp_endpoint.py). Marks are held weakly: when the SDK ends a session
(closed, deleted, idle), its task and context go and the mark with them.

`watch()` runs in the web process: every MCP_LIST_CHANGED_INTERVAL seconds it recomputes the
tool list of each (agent, endpoint) that has a session which listed its tools, one query each,
and sends `notifications/tools/list_changed` to the sessions whose last list differs. Changes
made anywhere (a worker's sync, an admin's approval setting or review) are seen because the
list is read from the database. 2026-07-28 clients have no session: they see the change on
their next `tools/list`.
"""

import contextlib
import contextvars
import hashlib
import json
import logging
import weakref

import anyio
from asgiref.sync import sync_to_async
from django.conf import settings
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS

from approvals.mcp import tools
from integrations.models import Agent

logger = logging.getLogger(__name__)

_current = contextvars.ContextVar("toolgate_mcp_session", default=None)
_open = weakref.WeakSet()


class _Session:
    def __init__(self):
        self.agent_id = self.scope = self.digest = self.session = None
        self.log_level = None  # what `logging/setLevel` asked for; None: no log messages


def open_session():
    """Mark the session about to be opened in this context."""
    mark = _Session()
    _current.set(mark)
    return mark


def current():
    return _current.get()


def listed(ctx, caller, tool_list):
    """A session's client has just been given `tool_list`."""
    mark = _current.get()
    if mark is None or ctx.protocol_version not in HANDSHAKE_PROTOCOL_VERSIONS:
        return
    mark.agent_id, mark.scope, mark.session = caller.agent.pk, caller.scope, ctx.session
    mark.digest = digest(tool_list)
    _open.add(mark)


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
    marks = [mark for mark in list(_open) if mark.digest is not None]
    if not marks:
        return 0
    now = await sync_to_async(_current_digests)({(m.agent_id, m.scope) for m in marks})
    told = 0
    for mark in marks:
        new = now[(mark.agent_id, mark.scope)]
        if new != mark.digest:
            mark.digest = new
            with contextlib.suppress(Exception):  # a session gone since: nothing to tell
                await mark.session.send_tool_list_changed()
                told += 1
    return told


async def watch():
    while True:
        await anyio.sleep(settings.MCP_LIST_CHANGED_INTERVAL)
        try:
            await notify_changes()
        except Exception:  # a database hiccup: try again at the next tick
            logger.warning("Could not check agents' tool lists for changes", exc_info=True)
