"""The agent API, `/api/v1/`: JSON in and out, `Authorization: Bearer <agent token>`.

The views are async so that an agent waiting for an outcome (`?wait=`) holds a coroutine, not
a thread or a process: one web process holds hundreds of waiting agents (see config/asgi.py and
approvals/waiting.py). The database work is plain Django code run through `sync_to_async`.
"""

import contextvars
import json
from functools import wraps

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core import signals
from django.core.exceptions import RequestDataTooBig
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt

from approvals.agent_auth import agent_for, rate_limited, touch
from approvals.models import Refused, Status, ToolCall, afinish_tool_call, open_tool_call
from approvals.policy import tools_for_agent
from approvals.running import hop_that_stores, run_here
from approvals.waiting import wait_until_final
from integrations.limits import MAX_BODY_DEPTH, unstorable  # noqa: F401 - MAX_BODY_DEPTH for tests

# Set by the API's ASGI handler (config/asgi.py), which doesn't send Django's request_started
# itself: its receivers (the database connection's checks) then run in the request's first
# hop to the database thread (`_admit`) instead of a hop of their own.
START_IN_FIRST_HOP = contextvars.ContextVar("START_IN_FIRST_HOP", default=False)


def error(status, code, message, **extra):
    return JsonResponse({"error": {"code": code, "message": message, **extra}}, status=status)


def api(*methods, prepare=None):
    """Authenticate the agent, check the method and rate-limit it; the view gets
    `request.agent`. `prepare(request, agent)`, if given, is the view's first database work,
    done in the same hop as the agent's lookup once the request got that far; the view gets
    what it returned as `request.prepared`."""

    def decorator(view):
        @csrf_exempt
        @wraps(view)
        async def wrapper(request, *args, **kwargs):
            # META's own key, not `request.headers`: building that mapping of every header
            # was ~7 µs of the loop's CPU a request (issue 11), for this one.
            header = request.META.get("HTTP_AUTHORIZATION", "")
            allowed = request.method in methods
            # `prepare` may store a call for this request to run (`_open_call`).
            agent, retry_after, prepared = await hop_that_stores(
                _admit, header, allowed, prepare, request
            )
            if agent is None:
                response = error(401, "unauthorized", "Missing or invalid agent token.")
                response["WWW-Authenticate"] = 'Bearer realm="toolgate"'
                return response
            if not allowed:
                return error(405, "method_not_allowed", f"Use {' or '.join(methods)}.")
            if retry_after:
                response = error(429, "rate_limited", "Too many requests; slow down.")
                response["Retry-After"] = str(retry_after)
                return response
            request.agent, request.prepared = agent, prepared
            return await view(request, *args, **kwargs)

        return wrapper

    return decorator


def _admit(header, allowed, prepare, request):
    """(agent, retry_after, prepared) in one hop to the database thread: the agent of the
    token, its last use recorded; then, for a method the view takes, one request counted
    against its rate limit; then, within the limit, the view's `prepare`. First Django's
    `request_started`, when the handler left it to this hop (config/asgi.py)."""
    if START_IN_FIRST_HOP.get():
        signals.request_started.send(sender=None)
    agent = agent_for(header)
    if agent is None:
        return None, 0, None
    touch(agent)
    if not allowed:
        return agent, 0, None
    retry_after = rate_limited(agent)
    if retry_after or prepare is None:
        return agent, retry_after, None
    return agent, 0, prepare(request, agent)


def _wait_seconds(request):
    raw = request.GET.get("wait")
    if raw is None:
        return 0
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1
    if not 0 <= seconds <= settings.API_MAX_WAIT:
        raise ValueError(f"wait must be a number of seconds from 0 to {settings.API_MAX_WAIT}.")
    return seconds


def decision_json(call):
    """Who decided the call, when, with which note, and whether they edited the arguments."""
    if not call.decided_by:
        return None
    return {
        "by": call.decided_by,
        "user": call.decided_by_user.get_username() if call.decided_by_user else None,
        "note": call.note,
        "at": _time(call.decided_at),
        "edited": call.edited,
    }


def call_json(call):
    result = None
    if call.status == Status.SUCCEEDED:
        result = {
            "content": call.result_content or [],
            "structured_content": call.structured_content,
            "is_error": bool(call.is_error),
        }
    error_ = {"code": call.error_code, "message": call.error_message} if call.error_code else None
    return {
        "id": call.pk,
        "status": call.status,
        "server": call.server_name,
        "tool": call.tool_name,
        "arguments": call.arguments,  # those that ran, when an approver edited them
        "decision": decision_json(call),
        "reasons": call.reasons,
        "result": result,
        "warnings": call.warnings,
        "error": error_,
        "created_at": _time(call.requested_at),
        "started_at": _time(call.started_at),
        "finished_at": _time(call.finished_at),
        "expires_at": _time(call.expires_at),
    }


def _time(value):
    return value.isoformat() if value else None


async def _call_after_wait(agent, call_id, seconds):
    """The agent's call, once it is final or after `seconds`, whichever comes first."""
    calls = ToolCall.objects.select_related("decided_by_user").filter(agent=agent)
    call = await calls.filter(pk=call_id).afirst()
    if call is None or call.is_final or seconds <= 0:
        return call
    await wait_until_final(call.pk, seconds)
    return await calls.filter(pk=call_id).afirst()


@api("GET")
async def tools(request):
    served = await sync_to_async(tools_for_agent)(request.agent)
    return JsonResponse({"tools": [tool.as_json() for tool in served]})


def _refusal(refused):
    extra = {"details": refused.details} if refused.details else {}
    return error(refused.status, refused.code, refused.message, **extra)


# Bodies up to this size are parsed on the database thread, in the agent's hop (parsing one
# is then bounded at about a query's cost); a larger one, whose parsing costs what the agent
# makes it cost, is parsed in the loop, as before, and looked up in a hop of its own.
PARSE_IN_HOP_BYTES = 8 * 1024


def _open_call(request, agent):
    """(wait, the request looked up: `open_tool_call`, the call stored or None), or the error
    response: `tool_calls`'s database work, in the agent's hop (`api(prepare=…)`). The call is
    stored here too, (call, created), when its decision was cheap enough to make here
    (`decide_here`: two hops fewer); else `tool_calls` has it decided and stored. None for a
    body over PARSE_IN_HOP_BYTES: `tool_calls` does all this itself."""
    if not _small_body(request):
        return None
    checked = _checked_body(request)
    if isinstance(checked, JsonResponse):
        return checked
    opened = _opened(agent, *checked)
    if isinstance(opened, JsonResponse):
        return opened
    wait, looked_up, _ = opened
    try:
        return wait, looked_up, looked_up.close_if_cheap(run_here=wait > 0)
    except Refused as refused:
        return _refusal(refused)


def _small_body(request):
    """Whether the body is at most PARSE_IN_HOP_BYTES, declared and read (`_parse` says what is
    wrong with any other)."""
    declared = request.META.get("CONTENT_LENGTH") or "0"
    if not declared.isdigit() or int(declared) > PARSE_IN_HOP_BYTES:
        return False
    try:
        return len(request.body) <= PARSE_IN_HOP_BYTES
    except RequestDataTooBig:
        return False


def _checked_body(request):
    """(wait, body), or the error response."""
    try:
        return _wait_seconds(request), _parse(request)
    except ValueError as exc:
        return error(400, "bad_request", str(exc))
    except _TooLarge:
        limit = settings.API_MAX_BODY_BYTES
        return error(413, "too_large", f"The request body is larger than {limit} bytes.")


def _opened(agent, wait, body):
    try:
        opened = open_tool_call(
            agent, body["server"], body["tool"], body["arguments"], body["idempotency_key"]
        )
    except Refused as refused:
        return _refusal(refused)
    return wait, opened, None


@api("POST", prepare=_open_call)
async def tool_calls(request):
    prepared = request.prepared
    if prepared is None:  # a large body: parsed here, looked up in a hop of its own
        prepared = _checked_body(request)
        if not isinstance(prepared, JsonResponse):
            prepared = await sync_to_async(_opened)(request.agent, *prepared)
    if isinstance(prepared, JsonResponse):
        return prepared
    wait, opened, stored = prepared
    try:
        call, created = stored or await afinish_tool_call(opened, run_here=wait > 0)
    except Refused as refused:
        return _refusal(refused)
    if created and call.claimed_at_insert:
        await run_here(call, wait)  # the agent waits: run it here rather than through a worker
    if not call.is_final:  # else `call` is as it was stored, its result included
        call = await _call_after_wait(request.agent, call.pk, wait)
    return JsonResponse(call_json(call), status=201 if created else 200)


@api("GET")
async def tool_call(request, call_id):
    try:
        wait = _wait_seconds(request)
    except ValueError as exc:
        return error(400, "bad_request", str(exc))
    call = await _call_after_wait(request.agent, call_id, wait)
    if call is None:
        return error(404, "not_found", f"No tool call {call_id} for this agent.")
    return JsonResponse(call_json(call))


@api("POST")
async def cancel(request, call_id):
    call = await ToolCall.objects.filter(pk=call_id, agent=request.agent).afirst()
    if call is None:
        return error(404, "not_found", f"No tool call {call_id} for this agent.")
    if not await sync_to_async(call.cancel)():
        return error(
            409, "wrong_state", f"The call is {call.status}; only a pending call can be cancelled."
        )
    call = await _call_after_wait(request.agent, call.pk, 0)
    return JsonResponse(call_json(call))


@csrf_exempt
async def not_found(request):
    return error(404, "not_found", f"There is no API endpoint at {request.path}.")


class _TooLarge(Exception):
    pass


def _parse(request):
    """The POST body as a checked dict, or ValueError / _TooLarge saying what is wrong."""
    declared = request.META.get("CONTENT_LENGTH") or "0"
    if not declared.isdigit() or int(declared) > settings.API_MAX_BODY_BYTES:
        raise _TooLarge
    try:
        if len(request.body) > settings.API_MAX_BODY_BYTES:
            raise _TooLarge
    except RequestDataTooBig:
        raise _TooLarge from None
    try:
        body = json.loads(request.body, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        raise ValueError("The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ValueError("The body must be a JSON object.")
    problem = unstorable(body)
    if problem:
        raise ValueError(f"The body is valid JSON, but {problem}.")
    unknown = set(body) - {"server", "tool", "arguments", "idempotency_key"}
    if unknown:
        raise ValueError(f"Unknown field(s): {', '.join(sorted(unknown))}.")
    for name in ("server", "tool"):
        if not isinstance(body.get(name), str) or not body[name]:
            raise ValueError(f"{name} must be a non-empty string.")
    body.setdefault("arguments", {})
    if not isinstance(body["arguments"], dict):
        raise ValueError("arguments must be a JSON object.")
    key = body.setdefault("idempotency_key", "")
    if key is None:
        body["idempotency_key"] = ""
    elif not isinstance(key, str) or len(key) > 200:
        raise ValueError("idempotency_key must be a string of at most 200 characters.")
    return body


def _no_constants(name):
    raise ValueError(f"{name} is not valid JSON")
