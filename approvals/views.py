"""The approvers' pages: the queue of pending tool calls and the history of decided ones."""

import json
from functools import wraps

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_POST

from approvals.models import Status, ToolCall
from approvals.pii import find_personal_data
from integrations.models import Agent, ApprovalMode, McpServer

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
        .select_related("agent", "tool", "server")
        .order_by("requested_at", "id")
    )


def _card(call, user):
    """What the template needs to show one pending call."""
    tool = call.tool
    server = call.server
    can_always_allow = (
        server is not None
        and tool is not None
        and server.approval_mode == ApprovalMode.FINE_GRAINED
        and not tool.needs_review
        and user.has_perm("integrations.change_tool")
    )
    return {
        "call": call,
        "tool": tool,
        "arguments": json.dumps(call.arguments, indent=2, ensure_ascii=False, sort_keys=True),
        "changed": tool is not None
        and (tool.changed_since_review or call.tool_fingerprint != tool.reviewed_fingerprint),
        "scanner_warnings": (tool.warnings if tool else [])[:20],
        "personal_data": find_personal_data(call.arguments),
        "can_always_allow": can_always_allow,
    }


@require_GET
@approver_required
def queue(request):
    pending = _pending(request)
    total = pending.count()
    shown = list(pending[: settings.QUEUE_PAGE_SIZE])
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
    call = get_object_or_404(ToolCall.objects.select_related("agent", "tool", "server"), pk=call_id)
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
    call = get_object_or_404(ToolCall.objects.select_related("tool", "server"), pk=call_id)
    decision = request.POST.get("decision")
    note = request.POST.get("note", "").strip()[:2000]
    if decision == "approve":
        done = call.approve(request.user, note)
    elif decision == "deny":
        done = call.deny(request.user, note)
    elif decision == "approve_always":
        if not _card(call, request.user)["can_always_allow"]:
            raise PermissionDenied("This tool can't be set to always allow here.")
        done = call.approve_and_always_allow(request.user, note)
    else:
        return JsonResponse({"error": "Unknown decision."}, status=400)
    call = ToolCall.objects.select_related("decided_by_user").get(pk=call.pk)
    message = _decided_message(call) if done else call.why_not_pending()
    if request.headers.get("Accept") == "application/json":
        return JsonResponse(
            {"ok": bool(done), "status": call.status, "final": call.is_final, "message": message},
            status=200 if done else 409,
        )
    (messages.success if done else messages.warning)(request, f"#{call.pk}: {message}")
    back = request.POST.get("next", "")
    if back and url_has_allowed_host_and_scheme(back, {request.get_host()}, request.is_secure()):
        return redirect(back)
    return redirect("approvals:queue")


def _decided_message(call):
    if call.status == Status.DENIED:
        return "Denied."
    return "Approved; running…"


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
            "calls": [(call, _outcome(call)) for call in page[:size]],
            "older": older,
            "query": query.urlencode(),
            "filters": request.GET,
            "statuses": Status.choices,
            "choices": _filter_choices(),
            "now": timezone.now(),
        },
    )
