"""The approvers' pages: the queue of pending tool calls and the history of decided ones."""

import difflib
import json
from functools import wraps

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db.models import Prefetch
from django.http import JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_POST

from approvals import policy
from approvals.models import DecidedBy, Refused, Status, ToolCall
from approvals.pii import find_personal_data
from approvals.rules import ALWAYS_ALLOW_DURATIONS, PolicyRule, same_arguments_condition
from integrations.limits import unstorable
from integrations.models import Agent, McpServer

DECIDE = "approvals.decide_toolcall"


def approver_required(view):
    """Logged in (else to the login page) and allowed to decide tool calls (else 403)."""

    @login_required
    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if not request.user.has_perm(DECIDE):
            raise PermissionDenied("You need the permission to decide tool calls.")
        return view(request, *args, **kwargs)

    return wrapper


def _filters(request):
    """The queue and history filters from the query string, as ORM lookups."""
    lookups = {}
    for param, lookup in (
        ("server", "server_name"),
        ("agent", "agent__name"),
        ("tool", "tool_name"),
    ):
        value = request.GET.get(param, "").strip()
        if value:
            lookups[lookup] = value
    return lookups


def _pending(request):
    return (
        ToolCall.objects.filter(status=Status.PENDING_APPROVAL, **_filters(request))
        .select_related("agent", "tool__server__oauth", "server")
        .order_by("requested_at", "id")
    )


def _for_cards(calls):
    """What the cards' policy questions read, loaded once for all of them."""
    rules = PolicyRule.objects.active()
    return calls.prefetch_related(
        "agent__servers",
        Prefetch("tool__server__policy_rules", queryset=rules, to_attr="active_rules"),
    )


ADD_RULE = "approvals.add_policyrule"


def _card(call, user):
    """What the template needs to show one pending call."""
    tool = call.tool
    return {
        "call": call,
        "tool": tool,
        "arguments": pretty(call.arguments),
        "reasons": call.reasons,
        "changed": tool is not None
        and (tool.changed_since_review or call.tool_fingerprint != tool.reviewed_fingerprint),
        "tool_diff": tool.changes_since_review() if tool is not None else "",
        "scanner_warnings": (tool.warnings if tool else [])[:20],
        "personal_data": find_personal_data(call.arguments),
        "always_allow": _always_allow_offer(call) if user.has_perm(ADD_RULE) else None,
        **_reconnect_notice(tool, user),
    }


def _reconnect_notice(tool, user):
    """Why no approval is accepted while the server needs reconnecting (policy step 7), and
    where to reconnect it for those who may."""
    if tool is None or not tool.server.reconnect_reason:
        return {}
    url = ""
    if user.has_perm("integrations.change_mcpserver"):
        url = reverse("admin:integrations_mcpserver_change", args=[tool.server_id])
    return {"needs_reconnect": policy.reconnect_reason(tool.server), "reconnect_url": url}


def _always_allow_offer(call):
    """The scopes "approve and always allow" can offer for `call`, or None where such a rule
    would not change what happens to the same request next time (the policy decides)."""
    if not policy.always_allow_changes_outcome(call):
        return None
    return {
        "same_arguments": same_arguments_condition(call.arguments) is not None,
        "durations": [(key, words) for key, (words, _) in ALWAYS_ALLOW_DURATIONS.items()],
    }


def pretty(arguments):
    return json.dumps(arguments, indent=2, ensure_ascii=False, sort_keys=True)


@require_GET
@approver_required
def queue(request):
    pending = _pending(request)
    total = pending.count()
    shown = list(_for_cards(pending)[: settings.QUEUE_PAGE_SIZE])
    return render(
        request,
        "approvals/queue.html",
        {
            "cards": [_card(call, request.user) for call in shown],
            "total": total,
            "filters": request.GET,
            "choices": _filter_choices(),
            "poll_interval": settings.QUEUE_POLL_SECONDS * 1000,
        },
    )


def _filter_choices():
    return {
        "servers": McpServer.objects.order_by("name").values_list("name", flat=True),
        "agents": Agent.objects.order_by("name").values_list("name", flat=True),
    }


@require_GET
@approver_required
def queue_state(request):
    """Polled by the queue page: which calls are pending now. One small query."""
    ids = list(_pending(request).values_list("pk", flat=True)[: settings.QUEUE_PAGE_SIZE])
    total = ToolCall.objects.filter(status=Status.PENDING_APPROVAL, **_filters(request)).count()
    return JsonResponse({"pending": ids, "total": total})


@require_GET
@approver_required
def card(request, call_id):
    """One pending call's card, for the page to insert when it appears."""
    calls = _for_cards(ToolCall.objects.select_related("agent", "tool__server", "server"))
    call = get_object_or_404(calls, pk=call_id)
    return render(request, "approvals/_card.html", {"card": _card(call, request.user)})


@require_GET
@approver_required
def call_page(request, call_id):
    """One call: its card while it waits for a decision, its outcome after. The target of
    every notification link; opening it decides nothing (mail scanners open links)."""
    calls = ToolCall.objects.select_related("agent", "tool", "server", "decided_by_user")
    call = get_object_or_404(calls, pk=call_id)
    context = {"call": call, "outcome": _outcome(call), "next": request.path}
    if call.status == Status.PENDING_APPROVAL:
        context["card"] = _card(call, request.user)
    return render(request, "approvals/call.html", context)


@require_GET
@approver_required
def call_state(request, call_id):
    """A call's status and outcome, polled by the page after a decision."""
    call = get_object_or_404(ToolCall.objects.select_related("decided_by_user"), pk=call_id)
    return JsonResponse({"status": call.status, "final": call.is_final, "outcome": _outcome(call)})


def _history_outcome(call):
    if call.status == Status.DENIED and call.decided_by == DecidedBy.HUMAN:
        who = call.decided_by_user.get_username() if call.decided_by_user else "an approver"
        return f"Denied by {who}."
    return _outcome(call)


def _outcome(call):
    if call.status == Status.SUCCEEDED:
        text = " ".join(
            block.get("text", f"[{block.get('type')}]") for block in call.result_content or []
        )
        prefix = "Tool error: " if call.is_error else "Succeeded: "
        return prefix + text[:500]
    if call.status in (Status.FAILED, Status.UNKNOWN):
        return f"{call.get_status_display()}: {call.error_message}"
    if call.status == Status.PENDING_APPROVAL:
        return "Pending approval"
    if call.status in (Status.APPROVED, Status.RUNNING):
        return f"{call.get_status_display()}…"
    return call.why_not_pending()


@require_POST
@approver_required
def decide(request, call_id):
    calls = ToolCall.objects.select_related("agent", "tool__server", "server")
    call = get_object_or_404(calls, pk=call_id)
    decision = request.POST.get("decision")
    note = request.POST.get("note", "").strip()[:2000]
    rule = None
    try:
        arguments = _edited_arguments(request.POST.get("arguments"))
        if decision == "approve":
            done = call.approve(request.user, note, arguments)
        elif decision == "deny":
            done = call.deny(request.user, note)
        elif decision == "approve_always":
            scope = _always_allow_scope(request, call)
            done, rule = call.approve_and_always_allow(request.user, scope, note, arguments)
        else:
            return JsonResponse({"error": "Unknown decision."}, status=400)
    except (ValueError, Refused) as exc:
        return _not_accepted(request, call, exc)
    call = ToolCall.objects.select_related("decided_by_user").get(pk=call.pk)
    message = _decided_message(call, rule) if done else call.why_not_pending()
    if request.headers.get("Accept") == "application/json":
        return JsonResponse(
            {
                "ok": bool(done), "status": call.status, "final": call.is_final,
                "message": message, "diff": arguments_diff(call),
            },
            status=200 if done else 409,
        )  # fmt: skip
    (messages.success if done else messages.warning)(request, f"#{call.pk}: {message}")
    back = request.POST.get("next", "")
    if back and url_has_allowed_host_and_scheme(back, {request.get_host()}, request.is_secure()):
        return redirect(back)
    return redirect("approvals:queue")


def _edited_arguments(text):
    """The arguments an approver typed into the card's editor, parsed and checked like an
    agent's (a JSON object the database can store), or None when the editor wasn't sent."""
    if text is None:
        return None
    if len(text.encode()) > settings.API_MAX_BODY_BYTES:
        raise ValueError(
            f"The edited arguments are larger than {settings.API_MAX_BODY_BYTES} bytes."
        )
    try:
        arguments = json.loads(text, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise ValueError(f"The edited arguments are not valid JSON ({where}: {exc.msg}).") from None
    except (ValueError, RecursionError):
        raise ValueError("The edited arguments are not valid JSON.") from None
    if not isinstance(arguments, dict):
        raise ValueError("The edited arguments must be a JSON object ({…}).")
    problem = unstorable(arguments)
    if problem:
        raise ValueError(f"The edited arguments can't be stored: {problem}.")
    return arguments


def _no_constants(name):
    raise ValueError(name)


def _always_allow_scope(request, call):
    if not request.user.has_perm(ADD_RULE):
        raise PermissionDenied("You need the permission to add policy rules.")
    if not policy.always_allow_changes_outcome(call):
        raise ValueError("Always allowing this tool would not change what happens next time.")
    scope = {
        "agent": request.POST.get("scope_agent", "this"),
        "arguments": request.POST.get("scope_arguments", "any"),
        "duration": request.POST.get("scope_duration", "forever"),
    }
    if scope["agent"] not in ("this", "every") or scope["arguments"] not in ("any", "same"):
        raise ValueError("Choose whom and which arguments to always allow.")
    if scope["duration"] not in ALWAYS_ALLOW_DURATIONS:
        raise ValueError("Choose how long to always allow.")
    if scope["arguments"] == "same" and same_arguments_condition(call.arguments) is None:
        raise ValueError("These arguments can't be made into a rule (personal data, or size).")
    return scope


def _not_accepted(request, call, exc):
    """A decision refused for what the approver sent (edited arguments, scope): the call is
    untouched, still pending, and the approver can correct it."""
    message = exc.message if isinstance(exc, Refused) else str(exc)
    details = (exc.details or []) if isinstance(exc, Refused) else []
    if request.headers.get("Accept") == "application/json":
        body = {"ok": False, "retry": True, "status": call.status, "final": False,
                "message": message, "details": details}  # fmt: skip
        return JsonResponse(body, status=422)
    messages.error(request, f"#{call.pk}: {' '.join([message, *details])}")
    return redirect("approvals:queue")


def _decided_message(call, rule=None):
    if call.status == Status.DENIED:
        return "Denied."
    text = "Approved with edited arguments; running…" if call.edited else "Approved; running…"
    if rule:
        until = f"until {rule.expires_at:%Y-%m-%d %H:%M}" if rule.expires_at else "until revoked"
        text += f" Rule #{rule.pk} now allows the next calls ({until})."
    return text


def arguments_diff(call):
    """What the approver changed: a diff from the requested arguments to those that ran."""
    if not call.edited:
        return ""
    before = pretty(call.requested_arguments).splitlines()
    after = pretty(call.arguments).splitlines()
    diff = difflib.unified_diff(before, after, "requested", "approved", lineterm="")
    return "\n".join(diff)


@require_GET
@approver_required
def history(request):
    """Decided and finished calls, newest first, paginated by id (no COUNT over the table)."""
    # "Not pending" rather than a list of statuses: the database can then walk the primary key
    # backwards and stop after one page instead of sorting every matching row.
    calls = ToolCall.objects.exclude(status=Status.PENDING_APPROVAL).filter(**_filters(request))
    status = request.GET.get("status", "")
    if status in Status.values:
        calls = calls.filter(status=status)
    before = request.GET.get("before", "")
    if before.isdigit():
        calls = calls.filter(pk__lt=int(before))
    size = settings.HISTORY_PAGE_SIZE
    page = list(calls.select_related("agent", "decided_by_user").order_by("-pk")[: size + 1])
    older = page[size - 1].pk if len(page) > size else None
    query = request.GET.copy()
    query.pop("before", None)
    return render(
        request,
        "approvals/history.html",
        {
            "calls": [(call, _history_outcome(call), arguments_diff(call)) for call in page[:size]],
            "older": older,
            "query": query.urlencode(),
            "filters": request.GET,
            "statuses": Status.choices,
            "choices": _filter_choices(),
            "now": timezone.now(),
        },
    )
