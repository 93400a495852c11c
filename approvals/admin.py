from django.contrib import admin

from approvals.models import Status, ToolCall


@admin.register(ToolCall)
class ToolCallAdmin(admin.ModelAdmin):
    """The audit trail: read-only, except deciding pending calls."""

    list_display = [
        "id", "requested_at", "agent", "server_name", "tool_name", "status", "decided_by",
        "decided_by_user", "finished_at",
    ]  # fmt: skip
    list_filter = ["status", "decided_by", "server_name", "agent"]
    list_select_related = ["agent", "decided_by_user"]
    search_fields = ["server_name", "tool_name", "note"]
    date_hierarchy = "requested_at"
    actions = ["approve", "deny"]

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in ToolCall._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def _decide(self, request, queryset, decision):
        done = 0
        for call in queryset.filter(status=Status.PENDING_APPROVAL):
            done += getattr(call, decision)(request.user)
        self.message_user(request, f"{done} call(s) {decision}d.")

    @admin.action(description="Approve selected pending calls", permissions=["decide"])
    def approve(self, request, queryset):
        self._decide(request, queryset, "approve")

    @admin.action(description="Deny selected pending calls", permissions=["decide"])
    def deny(self, request, queryset):
        self._decide(request, queryset, "deny")

    def has_decide_permission(self, request):
        return request.user.has_perm("approvals.decide_toolcall")
