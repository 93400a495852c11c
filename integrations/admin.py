from django.contrib import admin, messages
from django.db.models import Count, Q
from django.http import JsonResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.decorators import method_decorator
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe
from django.utils.text import Truncator
from django.views.decorators.debug import sensitive_post_parameters

from approvals import policy
from integrations.audit import describe_form
from integrations.forms import McpServerForm
from integrations.models import HINTS, Agent, McpServer, SyncState, Tool, ToolApproval


def sync_status(server):
    """One line saying where the server's tool sync stands."""
    if server.sync_state == SyncState.SYNCING:
        return "Syncing…"
    if server.sync_state == SyncState.QUEUED:
        return "Sync queued…"
    if server.last_error:
        return "Error"
    if server.last_synced_at is None:
        return "Never synced"
    return "OK"


class LogsPolicyChanges:
    """Admin-log messages that say what changed, from what to what (`describe_form`), so the
    object's History tells who loosened or tightened the policy. Secret fields are named only."""

    secret_fields = ()

    def construct_change_message(self, request, form, formsets, add=False):
        parts = [describe_form(form, self.secret_fields, add)]
        for formset in formsets or ():
            for inline in formset.forms:
                if inline.has_changed() and inline.instance.pk:
                    parts.append(f"{inline.instance}: {describe_form(inline)}")
        return " ".join(part for part in parts if part) or "No fields changed."


def review_label(tool):
    """The tool's review state in words, from the policy's own review reasons."""
    if tool.removed:
        return "Removed from server"
    reasons = policy.review_reasons(tool)
    return " · ".join(str(policy.Code(r.code).label) for r in reasons) or "—"


def policy_label(tool):
    """What the policy does with a call to the tool (any allowed agent, before arguments)."""
    decision = policy.decide(None, tool, rules=policy.applicable_rules(None, tool))
    return f"{policy.Outcome(decision.outcome).label}: {decision.message}"


class ToolInline(admin.TabularInline):
    model = Tool
    fields = ["name", "title", "hint_badges", "review_state", "approval", "policy"]
    readonly_fields = ["name", "title", "hint_badges", "review_state", "policy"]
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False

    @admin.display(description="Hints (claimed by the server)")
    def hint_badges(self, tool):
        return ", ".join(tool.hints) or "—"

    def get_queryset(self, request):
        return policy.with_active_rules(super().get_queryset(request))

    @admin.display(description="Review")
    def review_state(self, tool):
        return review_label(tool)

    @admin.display(description="Policy")
    def policy(self, tool):
        return policy_label(tool)


@admin.register(McpServer)
class McpServerAdmin(LogsPolicyChanges, admin.ModelAdmin):
    form = McpServerForm
    secret_fields = McpServerForm.secret_fields
    list_display = [
        "name",
        "origin",
        "transport",
        "approval_mode",
        "enabled",
        "status",
        "tool_count",
        "last_synced_at",
        "short_error",
    ]
    list_filter = ["enabled", "approval_mode", "transport"]
    search_fields = ["name", "description"]
    actions = ["sync_now"]
    inlines = [ToolInline]
    readonly_fields = ["sync_progress", "last_synced_at", "last_error", "server_details"]
    fieldsets = [
        (None, {"fields": ["name", "description"]}),
        (
            "Connection",
            {
                "fields": [
                    "url",
                    "transport",
                    "secret_token",
                    "clear_secret_token",
                    "headers_text",
                    "clear_headers",
                    "allow_private_network",
                    "allow_http",
                ]
            },
        ),
        (
            "Tool approval",
            {"fields": ["approval_mode", "personal_data_needs_approval", "enabled"]},
        ),
        (
            "Tool sync",
            {"fields": ["sync_progress", "last_synced_at", "last_error", "server_details"]},
        ),
    ]

    @method_decorator(sensitive_post_parameters("url", "secret_token", "headers_text"))
    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        return super().changeform_view(request, object_id, form_url, extra_context)

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(live_tools=Count("tools", filter=Q(tools__removed_at__isnull=True)))
        )

    def get_fieldsets(self, request, obj=None):
        if obj is None:  # nothing to report before the first save
            return self.fieldsets[:-1]
        return self.fieldsets

    def get_urls(self):
        status = path(
            "<int:server_id>/sync-status/",
            self.admin_site.admin_view(self.sync_status_view),
            name="integrations_mcpserver_sync_status",
        )
        return [status, *super().get_urls()]

    def sync_status_view(self, request, server_id):
        """Polled by the change page while a sync runs."""
        server = get_object_or_404(McpServer, pk=server_id)
        if not self.has_view_permission(request, server):
            return JsonResponse({"error": "forbidden"}, status=403)
        return JsonResponse(
            {
                "state": server.sync_state,
                "status": sync_status(server),
                "last_error": server.last_error,
                "tools": server.tools.filter(removed_at__isnull=True).count(),
            }
        )

    @admin.display(description="URL")
    def origin(self, server):
        return server.origin

    @admin.display(description="Tools", ordering="live_tools")
    def tool_count(self, server):
        return server.live_tools

    @admin.display(description="Status")
    def status(self, server):
        return sync_status(server) if server.enabled else "Disabled"

    @admin.display(description="Last error")
    def short_error(self, server):
        return Truncator(server.last_error).chars(80) or "—"

    @admin.display(description="Sync status")
    def sync_progress(self, server):
        url = reverse("admin:integrations_mcpserver_sync_status", args=[server.pk])
        return format_html(
            '<span id="sync-status" data-status-url="{}" data-state="{}">{}</span>',
            url,
            server.sync_state,
            sync_status(server),
        )

    @admin.display(description="Server")
    def server_details(self, server):
        info = server.server_info or {}
        rows = [
            ("Name", info.get("name")),
            ("Version", info.get("version")),
            ("Protocol", info.get("protocol_version")),
            ("Transport used", info.get("transport")),
        ]
        rows = [(label, value) for label, value in rows if value]
        return format_html_join(mark_safe("<br>"), "{}: {}", rows) or "—"

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        if obj.enabled:
            obj.request_sync()
            messages.info(
                request,
                f"Testing the connection to {obj.origin} and listing its tools in the "
                "background. The server's page shows the outcome.",
            )

    @admin.action(description="Sync tools now")
    def sync_now(self, request, queryset):
        for server in queryset:
            server.request_sync()
        self.message_user(request, f"Sync queued for {queryset.count()} server(s).")

    class Media:
        js = ["integrations/sync-status.js"]


class HintFilter(admin.SimpleListFilter):
    title = "hint"
    parameter_name = "hint"

    def lookups(self, request, model_admin):
        return [(key, label) for key, label in HINTS.items()]

    def queryset(self, request, queryset):
        if self.value() in HINTS:
            return queryset.filter(**{f"annotations__{self.value()}": True})
        return queryset


class NeedsReviewFilter(admin.SimpleListFilter):
    title = "review"
    parameter_name = "review"

    def lookups(self, request, model_admin):
        return [("needed", "Needs review"), ("ok", "Reviewed")]

    def queryset(self, request, queryset):
        needing = Tool.objects.needing_review().values("pk")
        if self.value() == "needed":
            return queryset.filter(pk__in=needing)
        if self.value() == "ok":
            return queryset.exclude(pk__in=needing)
        return queryset


class RemovedFilter(admin.SimpleListFilter):
    title = "on server"
    parameter_name = "removed"

    def lookups(self, request, model_admin):
        return [("no", "Listed"), ("yes", "Removed")]

    def queryset(self, request, queryset):
        if self.value() in ("yes", "no"):
            return queryset.filter(removed_at__isnull=self.value() == "no")
        return queryset


@admin.register(Tool)
class ToolAdmin(LogsPolicyChanges, admin.ModelAdmin):
    list_display = [
        "name", "server", "title", "hint_badges", "approval", "review", "policy", "last_seen_at"
    ]  # fmt: skip
    list_editable = ["approval"]
    list_filter = ["server", "approval", HintFilter, NeedsReviewFilter, RemovedFilter]
    list_select_related = ["server"]
    search_fields = ["name", "title", "description", "server__name"]
    actions = ["set_auto_approved", "set_requires_approval", "set_disabled", "mark_reviewed"]
    fields = [
        "server",
        "name",
        "title",
        "description",
        "hint_badges",
        "approval",
        "review",
        "policy",
        "warning_list",
        "changes",
        "input_schema",
        "output_schema",
        "annotations",
        "fingerprint",
        "reviewed_fingerprint",
        "reviewed_at",
        "reviewed_by",
        "first_seen_at",
        "last_seen_at",
        "removed_at",
    ]
    readonly_fields = [f for f in fields if f != "approval"]

    def has_add_permission(self, request):
        return False  # tools come from syncing their server

    def get_queryset(self, request):
        return policy.with_active_rules(super().get_queryset(request))

    @admin.display(description="Scanner warnings")
    def warning_list(self, tool):
        if not tool.warnings:
            return "—"
        items = ((w.get("message", w.get("code")), w.get("field", "")) for w in tool.warnings)
        rows = format_html_join("", "<li>{} <code>{}</code></li>", items)
        return format_html("<ul>{}</ul>", rows)

    @admin.display(description="Changes since review")
    def changes(self, tool):
        diff = tool.changes_since_review()
        return format_html("<pre>{}</pre>", diff) if diff else "—"

    @admin.display(description="Hints (claimed)")
    def hint_badges(self, tool):
        return ", ".join(tool.hints) or "—"

    @admin.display(description="Review")
    def review(self, tool):
        return review_label(tool)

    @admin.display(description="Policy")
    def policy(self, tool):
        return policy_label(tool)

    def _set_approval(self, request, queryset, approval):
        count = sum(tool.set_approval(request.user, approval) for tool in queryset)
        self.message_user(request, f"{count} tool(s) set to {ToolApproval(approval).label}.")

    @admin.action(description="Set to Auto-approved", permissions=["change"])
    def set_auto_approved(self, request, queryset):
        self._set_approval(request, queryset, ToolApproval.AUTO_APPROVED)

    @admin.action(description="Set to Requires approval", permissions=["change"])
    def set_requires_approval(self, request, queryset):
        self._set_approval(request, queryset, ToolApproval.REQUIRES_APPROVAL)

    @admin.action(description="Set to Disabled", permissions=["change"])
    def set_disabled(self, request, queryset):
        self._set_approval(request, queryset, ToolApproval.DISABLED)

    @admin.action(
        description="Mark reviewed (accept the current definition)", permissions=["change"]
    )
    def mark_reviewed(self, request, queryset):
        tools = list(queryset)
        for tool in tools:
            tool.mark_reviewed(request.user)
        self.message_user(request, f"{len(tools)} tool(s) marked reviewed.")


@admin.register(Agent)
class AgentAdmin(LogsPolicyChanges, admin.ModelAdmin):
    list_display = ["name", "is_active", "token_hint", "server_list", "last_used_at", "created_at"]
    list_filter = ["is_active", "servers"]
    search_fields = ["name", "description"]
    filter_horizontal = ["servers"]
    fields = ["name", "description", "servers", "is_active", "token_hint", "last_used_at"]
    readonly_fields = ["token_hint", "last_used_at"]
    actions = ["rotate_token"]

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("servers")

    @admin.display(description="MCP servers")
    def server_list(self, agent):
        return ", ".join(server.name for server in agent.servers.all()) or "—"

    def save_model(self, request, obj, form, change):
        if not change:
            request._new_agent_token = obj.set_new_token()
        super().save_model(request, obj, form, change)

    def response_add(self, request, obj, post_url_continue=None):
        return self._show_token(request, obj, request._new_agent_token)

    def _show_token(self, request, agent, token):
        # Rendered straight into this one response: the token is never stored, put in a
        # message (cookie) or shown again.
        context = {**self.admin_site.each_context(request), "agent": agent, "token": token,
                   "opts": self.model._meta, "title": f"API token for {agent.name}"}  # fmt: skip
        response = TemplateResponse(request, "admin/integrations/agent/token.html", context)
        response["Cache-Control"] = "no-store"
        return response

    @admin.action(description="Rotate the API token (shows the new one once)")
    def rotate_token(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Rotate one agent at a time.", level=messages.WARNING)
            return None
        agent = queryset.get()
        return self._show_token(request, agent, agent.rotate_token())
