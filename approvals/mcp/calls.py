"""One `tools/call` from an agent, from request to answer.

The request goes through the one request path (`arequest_tool_call`: the policy, one
`ToolCall` row, its audit; `afinish_tool_call` when the app looked it up with the agent). Then,
by what the policy made of it:
- auto-approved: run here, in this web process, so the server's progress and log
  notifications reach the agent while it runs (`ToolCall.arun`, the same claim as a worker's);
- waiting for a human: a task for clients that support tasks; for the others the request is
  held open with a progress notification at once and every MCP_PROGRESS_INTERVAL seconds, for
  at most MCP_APPROVAL_HOLD seconds, then answered with an `isError` result saying the call is
  still pending. The same agent repeating the same call (same tool, same requested arguments)
  re-attaches to it instead of queueing a second request: while it is not final, and once
  after it finished if the hold ended ("still pending", or a restart) and the repeat comes
  within MCP_REATTACH_WINDOW seconds of the outcome (`ToolCall.twin_to_reattach`). A held
  request that is cancelled (`notifications/cancelled`, or the client going away) cancels its
  pending call; one ended by the web process shutting down doesn't.
- refused: `-32602` (invalid params) for an unknown, disabled or unavailable tool, for
  arguments that fail the tool's schema and for names or arguments no row could store
  (`bad_request`: \\u0000, unpaired surrogates, 1e999, over-long names; the same check as the
  JSON API's, in the one request path); an `isError` result with the reason for anything else
  the policy refuses.
"""

import contextlib
import time

import anyio
from asgiref.sync import sync_to_async
from django.conf import settings
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS

from approvals.mcp import tasks, tools
from approvals.models import Refused, ToolCall, afinish_tool_call, arequest_tool_call
from approvals.policy import Code
from approvals.running import run_here
from approvals.waiting import wait_until_final

# The ASGI scope key of a 2026-07-28 `tools/call`'s tool as listed to the caller, looked up
# before the SDK runs the request (approvals/mcp/app.py): (name, served tool or None).
LISTED = "toolgate.mcp.listed"

# Refusals that mean "no such tool for you": answered alike, so they reveal nothing.
UNKNOWN = {
    Code.UNKNOWN_SERVER, Code.SERVER_DISABLED, Code.AGENT_INACTIVE, Code.AGENT_NOT_ALLOWED,
    Code.UNKNOWN_TOOL, Code.TOOL_REMOVED, Code.TOOL_DISABLED,
}  # fmt: skip


class PROCESS:
    """`stopping` is set while the endpoint shuts down (approvals/mcp/app.py): a held request
    ended by that leaves its call pending, for the agent to re-attach to."""

    stopping = False


async def call_tool(ctx, caller, params):
    arguments = params.arguments or {}
    try:
        call, created = await _request(ctx, caller, params.name, arguments)
    except Refused as refused:
        return _refusal(refused, params.name)
    if created and call.claimed_at_insert:  # auto-approved, stored `running` to run here
        await _run_here(ctx, caller, call)
    if not created or not call.is_final:  # else `call` is as the run stored it
        call = await _reload(call)  # a twin re-attached to is read with few of its fields
    wants_task, modern = tasks.wants_task(ctx, params)
    if wants_task and not modern:
        return tasks.created(call, modern=False)  # a 2025-11-25 task request gets a task
    if call.is_final:
        return tools.call_result(call)
    if wants_task:
        return tasks.created(call, modern=True)
    return await _hold(ctx, call)


async def _target(ctx, caller, name):
    """(server, tool) for a tool name on this endpoint; on `/mcp/`, from the lookup done
    before the request reached the SDK (a 2026-07-28 request) or done here."""
    if caller.scope:
        return caller.scope, name
    listed = ctx.request.scope.get(LISTED) if ctx.request is not None else None
    if caller.looked_up(name) is not None:
        tool = caller.looked_up(name).listed
    elif listed is not None and listed[0] == name:
        tool = listed[1]
    else:
        tool = (await sync_to_async(tools.served_tools)(caller.agent, "")).get(name)
    if tool is None:
        raise MCPError(code=INVALID_PARAMS, message=f"Unknown tool: {name}")
    return tool["server"], tool["name"]


async def _request(ctx, caller, name, arguments):
    """The async request path: its decision (schema, personal data, rules) runs off the thread
    all the web process's database work shares, unless provably cheap (`decide_here`): then
    it is made in the hop that stores the call, under the agent's re-attach lock like the
    store; a retry re-attaches to its pending twin. The call looked up with the agent
    (`Caller.lookup`: this request's, for this very tool and these arguments) is not looked up
    again. Not stored in the agent's hop, as the JSON API's is: the SDK may still refuse the
    request after that hop (Host and Origin, the session), and a call stored then would be
    pending for the approvers, or `running` and never run."""
    lookup = caller.looked_up(name, arguments)
    if lookup is not None and lookup.request is not None:
        return await afinish_tool_call(lookup.request, run_here=True, reattach=True, try_here=True)
    server_name, tool_name = await _target(ctx, caller, name)
    return await arequest_tool_call(
        caller.agent, server_name, tool_name, arguments, run_here=True, reattach=True, try_here=True
    )


def _refusal(refused, name):
    if refused.code in UNKNOWN:
        raise MCPError(code=INVALID_PARAMS, message=f"Unknown tool: {name}")
    if refused.code in (Code.INVALID_ARGUMENTS, Code.VALIDATION_TIMEOUT):
        raise MCPError(
            code=INVALID_PARAMS, message=refused.message, data={"details": refused.details}
        )
    if refused.code == "bad_request":  # a name or arguments nothing could use: the client's
        raise MCPError(code=INVALID_PARAMS, message=refused.message)
    return {
        "content": [{"type": "text", "text": f"Refused by Toolgate's policy: {refused.message}"}],
        "isError": True,
        "resultType": "complete",
        "_meta": {tools.META + "refusal": {"code": refused.code, "message": refused.message}},
    }


async def _reload(call):
    return await ToolCall.objects.select_related("decided_by_user").aget(pk=call.pk)


async def _run_here(ctx, caller, call):
    """Run the auto-approved call in this process, passing on the server's progress and log
    notifications while it runs."""

    async def progress(value, total, message):
        with contextlib.suppress(Exception):  # the agent may be gone; the call goes on
            await ctx.session.report_progress(value, total, message)

    async def log(level, data, logger):
        with contextlib.suppress(Exception):
            await caller.log(ctx, level, data, logger)

    await run_here(call, on_progress=progress, on_log=log)


async def _hold(ctx, call):
    deadline = time.monotonic() + settings.MCP_APPROVAL_HOLD
    step = 0
    try:
        while True:
            await ctx.session.report_progress(step, None, tasks.status_message(call))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                await sync_to_async(call.hand_back)()  # "repeat the call for its outcome"
                return tools.call_result(call)
            await wait_until_final(call.pk, min(settings.MCP_PROGRESS_INTERVAL, remaining))
            call = await _reload(call)
            if call.is_final:
                return tools.call_result(call)
            step += 1
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            if PROCESS.stopping:  # a restart: the client will repeat the call, as if told to
                await sync_to_async(call.hand_back)()
            else:  # the client cancelled or went away
                await sync_to_async(call.cancel)()
        raise
