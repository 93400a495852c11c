import json

from django.contrib import admin, messages
from django.contrib.admin.models import LogEntry
from django.contrib.contenttypes.models import ContentType
from django.urls import reverse
from django.utils import timezone
from django.utils.decorators import method_decorator
from django.utils.html import format_html, format_html_join
from django.views.decorators.debug import sensitive_post_parameters

from approvals.forms import NotificationChannelForm
from approvals.models import Refused, Status, ToolCall
from approvals.notifications import Delivery, DeliveryStatus, NotificationChannel
from approvals.rules import PolicyRule
from approvals.views import DECIDE
from integrations.admin import LogsPolicyChanges, admin_time, status_badge
from integrations.models import Agent, McpServer, Tool


def _pretty_json(value):
    text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)
    return format_html('<pre class="tg-json">{}</pre>', text)


@admin.register(ToolCall)
class ToolCallAdmin(admin.ModelAdmin):
    """The audit trail: a read-only view of each call, except deciding pending ones from the
    list (the same `approve`/`deny` the queue page uses)."""

    # Status and who decided come first, so they stay visible at 1280 px.
    list_display = [
        "id", "status_badge", "tool_label", "agent", "decision", "requested_at", "finished_at",
    ]  # fmt: skip
    list_display_links = ["id", "status_badge"]
    list_filter = ["status", "decided_by", "server_name", "agent"]
    list_select_related = ["agent", "decided_by_user"]
    search_fields = ["server_name", "tool_name", "note"]
    date_hierarchy = "requested_at"
    actions = ["approve", "deny"]
    fieldsets = [
        (
            "Request",
            {
                "fields": [
                    "agent",
                    "tool_label",
                    "tool_fingerprint",
                    "arguments_json",
                    "idempotency_key",
                ]
            },
        ),
        ("Decision", {"fields": ["status_badge", "decision", "note", "reason_list", "call_page"]}),
        ("Result", {"fields": ["outcome", "result_json", "result_warnings", "error"]}),
        ("Timeline", {"fields": ["timeline"]}),
    ]
    readonly_fields = [field for _, options in fieldsets for field in options["fields"]]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False  # an audit record: the change page is a view, with no Save buttons

    def has_delete_permission(self, request, obj=None):
        return False

    # A call's arguments and result often carry personal data: shown, like on the approvers'
    # pages, only to those who may decide calls (approvers, superusers); others see that
    # something is stored. (Credentials are never shown: integrations/secret_admin.py.)
    CALL_DATA = {
        "arguments_json": "arguments_hidden",
        "result_json": "result_hidden",
        "result_warnings": "result_warnings_hidden",  # they may quote the result
        "error": "error_hidden",  # an upstream's error text can echo the arguments
    }

    def get_fieldsets(self, request, obj=None):
        fieldsets = super().get_fieldsets(request, obj)
        if request.user.has_perm(DECIDE):
            return fieldsets
        return [
            (title, {**options, "fields": [self.CALL_DATA.get(f, f) for f in options["fields"]]})
            for title, options in fieldsets
        ]

    def get_readonly_fields(self, request, obj=None):
        return [*super().get_readonly_fields(request, obj), *self.CALL_DATA.values()]

    @admin.display(description="Arguments")
    def arguments_hidden(self, call):
        return "Shown only to approvers (and on the approvers' page of the call)."

    @admin.display(description="Result")
    def result_hidden(self, call):
        return "Shown only to approvers (and on the approvers' page of the call)."

    @admin.display(description="Warnings about the result")
    def result_warnings_hidden(self, call):
        return "Shown only to approvers." if call.warnings else "—"

    @admin.display(description="Error")
    def error_hidden(self, call):
        if not call.error_code:
            return "—"
        return format_html(
            "<code>{}</code> (the message is shown only to approvers)", call.error_code
        )

    def change_view(self, request, object_id, form_url="", extra_context=None):
        title = f"Tool call #{object_id}" if str(object_id).isdigit() else "Tool call"
        extra_context = {"title": title, "subtitle": None, **(extra_context or {})}
        return super().change_view(request, object_id, form_url, extra_context)

    @admin.display(description="Status", ordering="status")
    def status_badge(self, call):
        return status_badge(call.get_status_display(), call.status)

    @admin.display(description="Tool", ordering="tool_name")
    def tool_label(self, call):
        return format_html("<code>{} / {}</code>", call.server_name, call.tool_name)

    @admin.display(description="Decided by", ordering="decided_by")
    def decision(self, call):
        if not call.decided_by:
            return "—"
        who = call.get_decided_by_display()
        if call.decided_by_user:
            who = f"{who}: {call.decided_by_user.get_username()}"
        return format_html("{}<br><small>{}</small>", who, admin_time(call.decided_at))

    @admin.display(description="Arguments")
    def arguments_json(self, call):
        if call.purged_at:
            return f"Removed after the retention period ({admin_time(call.purged_at)})."
        if call.edited:
            return format_html(
                "{}<p>Edited by the approver; the agent asked for:</p>{}",
                _pretty_json(call.arguments),
                _pretty_json(call.requested_arguments),
            )
        return _pretty_json(call.arguments)

    @admin.display(description="Reasons")
    def reason_list(self, call):
        """The policy's reasons, stored on the call when it decided (and when an edit or a
        later check added one)."""
        reasons = [r for r in call.reasons or [] if isinstance(r, dict)]
        if not reasons:
            return "—"
        items = ((r.get("message", ""), r.get("code", "")) for r in reasons)
        rows = format_html_join("", "<li>{} <code>{}</code></li>", items)
        return format_html('<ul class="tg-reasons">{}</ul>', rows)

    @admin.display(description="Approvers' page")
    def call_page(self, call):
        url = reverse("approvals:call", args=[call.pk])
        return format_html('<a href="{}">{}</a>', url, url)

    @admin.display(description="Outcome")
    def outcome(self, call):
        if call.status == Status.SUCCEEDED:
            return "The tool reported an error" if call.is_error else "The tool ran"
        if call.is_final:
            return call.get_status_display()
        return f"Not finished ({call.get_status_display().lower()})"

    @admin.display(description="Result")
    def result_json(self, call):
        if call.purged_at:
            return "Removed after the retention period."
        if call.result_content is None and call.structured_content is None:
            return "—"
        blocks = [
            format_html('<pre class="tg-json">{}</pre>', block["text"])
            if block.get("type") == "text" and isinstance(block.get("text"), str)
            else _pretty_json(block)
            for block in call.result_content or []
            if isinstance(block, dict)
        ]
        if call.structured_content is not None:
            blocks.append(_pretty_json(call.structured_content))
        return format_html_join("", "{}", ((block,) for block in blocks))

    @admin.display(description="Warnings about the result")
    def result_warnings(self, call):
        items = ((w.get("message", w.get("code", "")),) for w in call.warnings or [])
        return format_html_join("", '<p class="tg-error">⚠ {}</p>', items) or "—"

    @admin.display(description="Error")
    def error(self, call):
        if not (call.error_code or call.error_message):
            return "—"
        return format_html(
            '<span class="tg-error">{}</span> <code>{}</code>', call.error_message, call.error_code
        )

    @admin.display(description="Timeline")
    def timeline(self, call):
        events = [
            ("Requested", call.requested_at),
            ("Decided", call.decided_at),
            ("Started", call.started_at),
            ("Finished", call.finished_at),
        ]
        if call.status == Status.PENDING_APPROVAL:
            events.append(("Expires", call.expires_at))
        items = [(label, admin_time(at)) for label, at in events if at]
        if call.attempts > 1:
            items.append(("Attempts", call.attempts))
        rows = format_html_join("", "<li>{}: {}</li>", items)
        return format_html('<ul class="tg-timeline">{}</ul>', rows)

    def _decide(self, request, queryset, decision):
        done = 0
        for call in queryset.filter(status=Status.PENDING_APPROVAL):
            try:
                done += getattr(call, decision)(request.user)
            except Refused as exc:  # e.g. its server needs reconnecting: still pending
                self.message_user(request, f"#{call.pk}: {exc.message}", messages.WARNING)
        self.message_user(request, f"{done} call(s) {decision}d.")

    @admin.action(description="Approve selected pending calls", permissions=["decide"])
    def approve(self, request, queryset):
        self._decide(request, queryset, "approve")

    @admin.action(description="Deny selected pending calls", permissions=["decide"])
    def deny(self, request, queryset):
        self._decide(request, queryset, "deny")

    def has_decide_permission(self, request):
        return request.user.has_perm("approvals.decide_toolcall")


@admin.register(NotificationChannel)
class NotificationChannelAdmin(admin.ModelAdmin):
    """Channels: the URL and signing secret are write-only (never rendered, not even read-only)."""

    form = NotificationChannelForm
    list_display = ["name", "kind", "target", "event_list", "enabled"]
    list_filter = ["kind", "enabled"]
    search_fields = ["name"]
    filter_horizontal = ["servers", "agents"]
    actions = ["send_test_message"]
    fieldsets = [
        (None, {"fields": ["name", "kind", "enabled"]}),
        ("Where to", {"fields": ["recipients_text", "url", "secret"]}),
        ("What", {"fields": ["events", "servers", "agents", "include_arguments"]}),
        ("Connection", {"fields": ["allow_private_network", "allow_http"]}),
    ]

    # What a user who may only view channels sees instead of the form's fields: never the
    # decrypted URL or secret, which a read-only view would otherwise print.
    VIEW_ONLY = {"url": "url_shown", "secret": "secret_shown", "recipients_text": "target"}

    @method_decorator(sensitive_post_parameters("url", "secret"))
    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        return super().changeform_view(request, object_id, form_url, extra_context)

    def get_fieldsets(self, request, obj=None):
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None or self.has_change_permission(request, obj):
            return fieldsets
        return [
            (title, {**options, "fields": [self.VIEW_ONLY.get(f, f) for f in options["fields"]]})
            for title, options in fieldsets
        ]

    @admin.display(description="Events")
    def event_list(self, channel):
        return ", ".join(channel.events) or "—"

    @admin.display(description="URL")
    def url_shown(self, channel):
        return channel.target or "—"

    @admin.display(description="Signing secret")
    def secret_shown(self, channel):
        return "Stored (never shown)" if channel.secret else "—"

    @admin.action(description="Send a test message", permissions=["change"])
    def send_test_message(self, request, queryset):
        for channel in queryset:
            delivery = channel.send_test()
            if delivery.status == DeliveryStatus.SENT:
                text = f"The test message to {channel.name} was sent."
                self.message_user(request, text, messages.SUCCESS)
            else:
                text = f"The test message to {channel.name} failed: {delivery.last_error}"
                self.message_user(request, text, messages.ERROR)


@admin.register(Delivery)
class DeliveryAdmin(admin.ModelAdmin):
    """The delivery log: every notification, its attempts and its last (redacted) error."""

    list_display = ["created_at", "event", "channel", "summary", "status", "attempts", "sent_at"]
    list_filter = ["status", "event", "channel"]
    list_select_related = ["channel"]
    search_fields = ["summary"]
    date_hierarchy = "created_at"
    fields = [
        "event", "channel", "summary", "status", "attempts", "last_error", "delivery_id",
        "message_id", "created_at", "updated_at", "sent_at",
    ]  # fmt: skip
    readonly_fields = fields

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class ExpiredFilter(admin.SimpleListFilter):
    title = "in force"
    parameter_name = "expired"

    def lookups(self, request, model_admin):
        return [("no", "Active"), ("yes", "Expired")]

    def queryset(self, request, queryset):
        if self.value() == "no":
            return queryset.active()
        if self.value() == "yes":
            return queryset.filter(expires_at__lte=timezone.now())
        return queryset


@admin.register(PolicyRule)
class PolicyRuleAdmin(LogsPolicyChanges, admin.ModelAdmin):
    """Rules on the arguments of calls. The condition is compiled when saved (model `clean`),
    so one that doesn't compile is refused with the position of the error."""

    list_display = [
        "id", "server", "tool", "agent", "action", "condition", "in_force", "expires_at", "note",
        "created_by", "source",
    ]  # fmt: skip
    list_filter = ["action", ExpiredFilter, "server"]
    list_select_related = ["server", "tool", "agent", "created_by"]
    search_fields = ["condition", "note", "server__name", "tool__name", "agent__name"]
    autocomplete_fields = ["tool"]
    fields = [
        "server", "tool", "agent", "action", "condition", "expires_at", "note", "created_by",
        "source", "created_at",
    ]  # fmt: skip
    readonly_fields = ["created_by", "source", "created_at"]

    def save_model(self, request, obj, form, change):
        if not change:
            obj.created_by = request.user
        super().save_model(request, obj, form, change)

    @admin.display(description="In force", boolean=True)
    def in_force(self, rule):
        return not rule.expired

    @admin.display(description="Made by")
    def source(self, rule):
        if rule.created_from_call_id:
            return format_html("“Approve and always allow” on call #{}", rule.created_from_call_id)
        return "An admin"


@admin.register(LogEntry)
class PolicyLogAdmin(admin.ModelAdmin):
    """The admin log of every change to the policy (servers, tools, agents, rules), who made it
    and when: read-only."""

    list_display = ["action_time", "user", "content_type", "object_repr", "action", "message"]
    list_filter = ["content_type", "action_flag", "user"]
    search_fields = ["object_repr", "change_message", "user__username"]
    list_select_related = ["user", "content_type"]
    date_hierarchy = "action_time"

    def get_queryset(self, request):
        types = ContentType.objects.get_for_models(McpServer, Tool, Agent, PolicyRule).values()
        return super().get_queryset(request).filter(content_type__in=types)

    @admin.display(description="Action", ordering="action_flag")
    def action(self, entry):
        return {1: "Added", 2: "Changed", 3: "Deleted"}.get(entry.action_flag, "")

    @admin.display(description="What changed")
    def message(self, entry):
        return entry.get_change_message()

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
