"""Tool calls that wait for a human, as MCP tasks.

Two forms of the same thing, chosen by the protocol the client speaks:
- 2025-11-25 (handshake era): the client puts `task` in `tools/call` when the tool says
  `execution.taskSupport: "optional"` and Toolgate's `initialize` advertises `tasks`; the
  answer is `{"task": {...}}`; then `tasks/get`, `tasks/result` (waits for the outcome),
  `tasks/cancel` and `tasks/list`.
- 2026-07-28 (the `io.modelcontextprotocol/tasks` extension): when the request's capabilities
  name the extension, the answer is the task itself with `resultType: "task"`; then
  `tasks/get` (the result inline once completed), `tasks/cancel` and `tasks/update`.

A task id is `toolcall-<id>`: tasks are the agent's own tool calls, looked up for the agent
that authenticated, so an id names nothing another agent can reach. Statuses: a call waiting
for a human, approved or running is `working` with a message saying which; a call that ran
(whatever the tool answered) is `completed`, a denied call too (its result says so, like the
held request's); `cancelled` is cancelled; expired, failed, unknown and blocked calls are
`failed`. `ttl` is the longest a call can take to become final (APPROVAL_TIMEOUT plus
TOOL_CALL_LOST_AFTER); the poll interval is a hundred-and-twentieth of the approval timeout,
between 1 and 5 seconds.
"""

from asgiref.sync import sync_to_async
from django.conf import settings
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, RequestParams

from approvals.mcp.tools import call_result, cancelled_message
from approvals.models import Status, ToolCall
from approvals.waiting import wait_until_final

EXTENSION = "io.modelcontextprotocol/tasks"
RELATED_TASK = "io.modelcontextprotocol/related-task"
PREFIX = "toolcall-"
_FAILED = {Status.EXPIRED, Status.FAILED, Status.UNKNOWN, Status.BLOCKED}


class TaskParams(RequestParams):
    task_id: str


class UpdateTaskParams(TaskParams):
    input_responses: dict | None = None


def task_id(call):
    return f"{PREFIX}{call.pk}"


def status_of(call):
    if call.status in (Status.SUCCEEDED, Status.DENIED):
        return "completed"
    if call.status == Status.CANCELLED:
        return "cancelled"
    if call.status in _FAILED:
        return "failed"
    return "working"


def status_message(call):
    who = call.decided_by_user.get_username() if call.decided_by_user_id else "the policy"
    since = call.requested_at.isoformat(timespec="seconds")
    return {
        Status.PENDING_APPROVAL: f"Waiting for approval by a human since {since}.",
        Status.APPROVED: f"Approved by {who}, waiting to run.",
        Status.RUNNING: f"Approved by {who}, running.",
        Status.SUCCEEDED: "The tool ran; the result is available.",
        Status.DENIED: f"Denied by {who}; the tool was not run.",
        Status.CANCELLED: cancelled_message(call),
    }.get(call.status, call.error_message or call.get_status_display())


def task(call, *, modern):
    """The task's common fields, in the form of the protocol era."""
    ttl_ms = (settings.APPROVAL_TIMEOUT + settings.TOOL_CALL_LOST_AFTER) * 1000
    poll_ms = int(min(5.0, max(1.0, settings.APPROVAL_TIMEOUT / 120)) * 1000)
    updated = call.finished_at or call.started_at or call.decided_at or call.requested_at
    fields = {
        "taskId": task_id(call),
        "status": status_of(call),
        "statusMessage": status_message(call),
        "createdAt": call.requested_at.isoformat(),
        "lastUpdatedAt": updated.isoformat(),
    }
    if modern:
        return {**fields, "ttlMs": ttl_ms, "pollIntervalMs": poll_ms}
    return {**fields, "ttl": ttl_ms, "pollInterval": poll_ms}


def created(call, *, modern):
    """The answer to a `tools/call` that became a task."""
    if modern:
        return {"resultType": "task", **task(call, modern=True)}
    return {"task": task(call, modern=False)}


def detailed(call):
    """A 2026-07-28 `tasks/get` answer: the task, with its result or error once it has one."""
    answer = task(call, modern=True)
    if answer["status"] == "completed":
        answer["result"] = call_result(call)
    elif answer["status"] == "failed":
        answer["error"] = {"code": -32603, "message": status_message(call)}
    return answer


def wants_task(ctx, params):
    """Whether this `tools/call` may be answered with a task, and in which form (modern?)."""
    if ctx.protocol_version == "2025-11-25":
        return "task" in (ctx.params or {}), False
    capabilities = ctx.session.client_capabilities
    extensions = (capabilities.extensions if capabilities else None) or {}
    return EXTENSION in extensions, True


def _load(agent, raw_id):
    pk = raw_id.removeprefix(PREFIX) if raw_id.startswith(PREFIX) else ""
    call = None
    if pk.isascii() and pk.isdigit() and len(pk) < 19:  # not "²" (isdigit, int() refuses it)
        call = ToolCall.objects.select_related("decided_by_user").filter(pk=pk, agent=agent).first()
    if call is None:
        raise MCPError(code=INVALID_PARAMS, message=f"Failed to retrieve task: no task {raw_id}.")
    return call


async def load(agent, raw_id):
    return await sync_to_async(_load)(agent, raw_id)


async def get(agent, params, modern):
    call = await load(agent, params.task_id)
    return detailed(call) if modern else task(call, modern=False)


async def result(agent, params):
    """2025-11-25 `tasks/result`: wait until the call is final, then its tool result."""
    call = await load(agent, params.task_id)
    while not call.is_final:
        await wait_until_final(call.pk, 30)
        call = await load(agent, params.task_id)
    answer = call_result(call)
    answer["_meta"][RELATED_TASK] = {"taskId": task_id(call)}
    return answer


async def cancel(agent, params, modern):
    call = await load(agent, params.task_id)
    cancelled = await sync_to_async(call.cancel)()
    if modern:
        return {}
    if not cancelled and call.is_final:
        raise MCPError(
            code=INVALID_PARAMS,
            message=f"Cannot cancel task {params.task_id}: it is {status_of(call)}.",
        )
    call = await load(agent, params.task_id)
    return task(call, modern=False)


async def listing(agent):
    def recent():  # the calls that waited for a human: only they get an expiry
        calls = ToolCall.objects.select_related("decided_by_user").filter(
            agent=agent, expires_at__isnull=False
        )
        return [task(call, modern=False) for call in calls.order_by("-id")[:100]]

    return {"tasks": await sync_to_async(recent)()}
