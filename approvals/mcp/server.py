"""The SDK's low-level MCP `Server`, with Toolgate's handlers.

The tool list is per agent and per endpoint, so handlers find who is asking in the HTTP
request the SDK hands them (`ctx.request.scope`, set by `approvals.mcp.app`).
"""

import contextlib
import contextvars
import warnings
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.conf import settings
from mcp.server import Server
from mcp.server.caching import CacheHint
from mcp.server.lowlevel.server import NotificationOptions
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from mcp_types import (
    INVALID_PARAMS,
    CallToolRequestParams,
    ListToolsResult,
    PaginatedRequestParams,
    ServerTasksCapability,
    SetLevelRequestParams,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError

from approvals.mcp import calls, sessions, tasks, tools

CALLER = "toolgate.mcp.caller"  # the ASGI scope key of the authenticated `Caller`
LISTED = calls.LISTED
_listed = contextvars.ContextVar("toolgate.mcp.listed", default=None)
LOG_LEVELS = ["debug", "info", "notice", "warning", "error", "critical", "alert", "emergency"]

# The SDK marks the logging feature deprecated as of 2026-07-28; handshake-era clients still use
# `logging/setLevel`, and Toolgate serves them.
warnings.filterwarnings("ignore", "The logging capability is deprecated", MCPDeprecationWarning)


@dataclass(frozen=True)
class Caller:
    """The agent behind a request, and the endpoint: a server's name, or "" for `/mcp/`."""

    agent: object
    scope: str
    # On a server's endpoint, for a 2026-07-28 POST: whether the tool called (not knowing it, a
    # tool of the server) may declare `Mcp-Param-*` headers (`tools.may_declare_headers`);
    # None: not looked up.
    declares_headers: bool | None = None
    # The POST's `tools/call`, looked up with the agent; None: its handler looks it up itself.
    lookup: "Lookup | None" = None

    def looked_up(self, name, arguments=None):
        """The `Lookup` of the call of `name` (with these `arguments`), if it is the one done."""
        lookup = self.lookup
        if lookup is None or lookup.name != name:
            return None
        return lookup if arguments is None or lookup.arguments == arguments else None

    async def log(self, ctx, level, data, logger):
        """Pass on a log message from the upstream server, if the agent asked for that level:
        per request on 2026-07-28 (the SDK applies the request's opt-in), per session before."""
        if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            mark = sessions.current(ctx)
            wanted = mark and mark.log_level
            if not wanted or LOG_LEVELS.index(level) < LOG_LEVELS.index(wanted):
                return
        await ctx.session.send_log_message(level, data, logger, related_request_id=ctx.request_id)


@dataclass(frozen=True)
class Lookup:
    """A POST's `tools/call` (its MCP name and arguments), looked up with its agent, before the
    SDK runs it (approvals/mcp/app.py), so its handler (`calls.call_tool`) needs no hop for it."""

    name: str
    arguments: dict
    # The call's request (`open_tool_call`); None: the handler looks it up again, and refuses it.
    request: object = None
    # On `/mcp/`: the tool as listed to the agent (`tools.listed_tool`), which names its server;
    # None: not listed.
    listed: dict | None = None


@contextlib.contextmanager
def listed_for_request(listed):
    """While the SDK serves one 2026-07-28 request: the (name, tool as listed) it may ask
    `listed_schema` for."""
    token = _listed.set(listed)
    try:
        yield
    finally:
        _listed.reset(token)


def listed_schema(name):
    """The SDK's `get_tool_input_schema`: the input schema `tools/list` gives the caller for
    `name` (None: not listed), against which it checks a 2026-07-28 call's `Mcp-Param-*`
    headers. Without it the SDK runs `tools/list` itself on every such call."""
    listed = _listed.get()
    if listed is None or listed[0] != name:  # the SDK skips the check, and logs this
        raise LookupError(f"The tool {name!r} was not looked up before the request ran.")
    return None if listed[1] is None else tools.mcp_tool(name, listed[1])["inputSchema"]


def _list_ttl_ms():
    return int(settings.MCP_LIST_CHANGED_INTERVAL * 1000)


def caller(ctx):
    return ctx.request.scope[CALLER]


class ToolgateServer(Server):
    def __init__(self):
        super().__init__(
            "toolgate",
            version="0.1.0",
            instructions="Tools of MCP servers, through Toolgate: some calls wait for a human "
            "to approve them.",
            on_list_tools=list_tools,
            on_call_tool=call_tool,
            # 2026-07-28 clients may keep the list as long as sessions wait to hear of a change.
            cache_hints={"tools/list": CacheHint(ttl_ms=_list_ttl_ms(), scope="private")},
            get_tool_input_schema=listed_schema,
        )
        self.add_request_handler("logging/setLevel", SetLevelRequestParams, set_level)
        for method, params, handler in TASK_METHODS:
            self.add_request_handler(method, params, handler)
        self.extensions = {tasks.EXTENSION: {}}
        self.middleware.append(_LegacyTaskCalls())

    def get_capabilities(self, notification_options=None, *args, **kwargs):
        """Tool list changes are announced to sessions; 2025-11-25 tasks are served."""
        capabilities = super().get_capabilities(
            NotificationOptions(tools_changed=True), *args, **kwargs
        )
        if kwargs.get("protocol_version") not in MODERN_PROTOCOL_VERSIONS:
            capabilities.tasks = ServerTasksCapability.model_validate(
                {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}
            )
        return capabilities


async def list_tools(ctx, params: PaginatedRequestParams | None):
    who = caller(ctx)
    tool_list = await sync_to_async(sessions.tool_list)(who.agent, who.scope)
    sessions.listed(ctx, who, tool_list)
    return ListToolsResult.model_validate({"tools": tool_list})


async def call_tool(ctx, params: CallToolRequestParams):
    return await calls.call_tool(ctx, caller(ctx), params)


async def set_level(ctx, params):
    if params.level not in LOG_LEVELS:
        raise MCPError(code=INVALID_PARAMS, message=f"Unknown log level {params.level!r}.")
    mark = sessions.current(ctx)
    if mark is not None:
        mark.log_level = params.level
    return {}


class _LegacyTaskCalls:
    """A 2025-11-25 `tools/call` that asks for a task is answered with `{"task": …}`, which the
    SDK's result check for `tools/call` would reject; this middleware answers it in its place
    (the SDK lets a middleware that doesn't call on return its own result)."""

    async def __call__(self, ctx, call_next):
        asks = ctx.method == "tools/call" and "task" in (ctx.params or {})
        if not asks or ctx.protocol_version != "2025-11-25":
            return await call_next(ctx)
        try:
            params = CallToolRequestParams.model_validate(ctx.params, by_name=False)
        except ValidationError:
            raise MCPError(code=INVALID_PARAMS, message="Invalid tools/call parameters.") from None
        return await calls.call_tool(ctx, caller(ctx), params)


def _modern(ctx):
    return ctx.protocol_version in MODERN_PROTOCOL_VERSIONS


async def get_task(ctx, params):
    return await tasks.get(caller(ctx).agent, params, _modern(ctx))


async def task_result(ctx, params):
    return await tasks.result(caller(ctx).agent, params)


async def cancel_task(ctx, params):
    return await tasks.cancel(caller(ctx).agent, params, _modern(ctx))


async def list_tasks(ctx, params):
    return await tasks.listing(caller(ctx).agent)


async def update_task(ctx, params):
    await tasks.load(caller(ctx).agent, params.task_id)  # Toolgate never asks for input
    return {}


TASK_METHODS = [
    ("tasks/get", tasks.TaskParams, get_task),
    ("tasks/result", tasks.TaskParams, task_result),
    ("tasks/cancel", tasks.TaskParams, cancel_task),
    ("tasks/list", PaginatedRequestParams, list_tasks),
    ("tasks/update", tasks.UpdateTaskParams, update_task),
]
