import time
from urllib.parse import quote

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Q
from django.http import JsonResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import formats, timezone
from django.utils.decorators import method_decorator
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe
from django.utils.text import Truncator
from django.utils.timesince import timesince, timeuntil
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_POST

from approvals import policy
from integrations import oauth, oauth_http
from integrations.audit import describe_form
from integrations.fields import DecryptionError, decrypt, encrypt
from integrations.forms import McpServerForm
from integrations.models import (
    HINTS,
    Agent,
    McpServer,
    SyncState,
    Tool,
    ToolApproval,
    hash_token,
)

SECRET_POST_FIELDS = ("url", "secret_token", "headers_text", "oauth_client_secret")


def _credential(server):
    """The server's OAuth credential when it uses OAuth (select_related'ed on list pages)."""
    if not server.uses_oauth:
        return None
    try:
        return server.oauth
    except oauth.OAuthCredential.DoesNotExist:
        return None


def sync_status(server):
    """One line saying where the server's tool sync stands."""
    credential = _credential(server)
    if credential is not None and (credential.needs_reconnect or credential.needs_sign_in):
        return credential.state_label
    if server.sync_state == SyncState.SYNCING:
        return "Syncing…"
    if server.sync_state == SyncState.QUEUED:
        return "Sync queued…"
    if server.last_error:
        return "Error"
    if server.last_synced_at is None:
        return "Never synced"
    return "OK"


def status_badge(label, kind):
    """A status word that stands out in lists and pages (styled by integrations/admin.css)."""
    return format_html('<span class="tg-status tg-status-{}">{}</span>', kind, label)


def admin_time(value):
    """A time as the admin shows it (with seconds, like the history), or an em dash."""
    return formats.localize(timezone.template_localtime(value)) if value else "—"


def _server_status_kind(server):
    if not server.enabled:
        return "off"
    credential = _credential(server)
    if credential is not None and (credential.needs_reconnect or credential.needs_sign_in):
        return "error"  # someone has to connect it
    if server.sync_state != SyncState.IDLE:
        return "busy"
    if server.last_error:
        return "error"
    return "ok" if server.last_synced_at else "never"


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
    """The tool's review state in words, from the policy's own review reasons; what needs a
    human stands out."""
    if tool.removed:
        return status_badge("Removed from server", "off")
    reasons = policy.review_reasons(tool)
    label = " · ".join(str(policy.Code(r.code).label) for r in reasons)
    return status_badge(label, "error") if label else "—"


def policy_label(tool):
    """What the policy does with a call to the tool (any allowed agent, before arguments)."""
    decision = policy.decide(None, tool, rules=policy.applicable_rules(None, tool))
    if decision.after_reconnect:  # policy step 7: only until an admin reconnects the server
        then = policy.Outcome(decision.after_reconnect).label.lower()
        return f"Needs reconnecting, then {then}: {decision.reasons[1].message}"
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
    # What matters first, so it stays visible at 1280 px: status, tools, sync time, error.
    list_display = [
        "name",
        "status",
        "tool_count",
        "last_synced_at",
        "short_error",
        "approval_mode",
        "enabled",
        "origin",
        "transport",
    ]
    list_filter = ["enabled", "approval_mode", "transport", "auth_kind"]
    search_fields = ["name", "description"]
    actions = ["sync_now"]
    inlines = [ToolInline]
    # Shown on the change page and sent again by the sync-status endpoint while a sync runs,
    # so the page can update them in place (static/integrations/sync-status.js).
    sync_panel = ["sync_progress", "last_synced_at", "last_error", "server_details"]
    readonly_fields = [*sync_panel, "oauth_status", "oauth_state"]
    tools_template = "admin/integrations/mcpserver/tools.html"  # also swapped in by the page
    fieldsets = [
        (None, {"fields": ["name", "description"]}),
        (
            "Connection",
            {
                "fields": [
                    "url",
                    "transport",
                    "headers_text",
                    "clear_headers",
                    "allow_private_network",
                    "allow_http",
                ]
            },
        ),
        (
            "Authentication",
            {
                "fields": [
                    "auth_kind",
                    "secret_token",
                    "clear_secret_token",
                    "oauth_grant",
                    "oauth_client_id",
                    "oauth_client_secret",
                    "clear_oauth_client_secret",
                    "oauth_scope",
                    "oauth_issuer",
                    "oauth_status",
                ]
            },
        ),
        (
            "Tool approval",
            {"fields": ["approval_mode", "personal_data_needs_approval", "enabled"]},
        ),
        ("Tool sync", {"fields": sync_panel}),
    ]

    @method_decorator(sensitive_post_parameters(*SECRET_POST_FIELDS))
    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        if object_id and self._connectable(request, object_id):
            url = reverse("admin:integrations_mcpserver_oauth_connect", args=[object_id])
            extra_context = {**(extra_context or {}), "oauth_connect_url": url}
        return super().changeform_view(request, object_id, form_url, extra_context)

    def _connectable(self, request, object_id):
        server = McpServer.objects.filter(pk=object_id).first()
        return server is not None and server.uses_oauth and self.has_change_permission(request)

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .select_related("oauth")
            .annotate(live_tools=Count("tools", filter=Q(tools__removed_at__isnull=True)))
        )

    def get_fieldsets(self, request, obj=None):
        # Only what applies: nothing to report before the first save, no "remove" box for a
        # token, headers or client secret that aren't stored.
        absent = McpServerForm.nothing_to_remove(obj, obj and _credential(obj))
        return [
            (title, {**options, "fields": [f for f in options["fields"] if f not in absent]})
            for title, options in self._fieldsets_for(request, obj)
        ]

    def _fieldsets_for(self, request, obj):
        authentication = self.fieldsets[2][1]["fields"][:-1]
        if obj is None:  # nothing to report before the first save
            return [*self.fieldsets[:2], ("Authentication", {"fields": authentication}),
                    self.fieldsets[3]]  # fmt: skip
        if not self.has_change_permission(request, obj):  # the state, without the button
            authentication = [*authentication, "oauth_state"]
            return [*self.fieldsets[:2], ("Authentication", {"fields": authentication}),
                    *self.fieldsets[3:]]  # fmt: skip
        return self.fieldsets

    def get_inlines(self, request, obj):
        return self.inlines if obj is not None else []  # a new server has no tools yet

    def get_urls(self):
        status = path(
            "<int:server_id>/sync-status/",
            self.admin_site.admin_view(self.sync_status_view),
            name="integrations_mcpserver_sync_status",
        )
        connect = path(
            "<int:server_id>/oauth-connect/",
            self.admin_site.admin_view(self.oauth_connect_view),
            name="integrations_mcpserver_oauth_connect",
        )
        return [status, connect, *super().get_urls()]

    @method_decorator(require_POST)
    def oauth_connect_view(self, request, server_id):
        """Connect / Reconnect: off to the authorization server (or, for client credentials,
        a token right away)."""
        server = get_object_or_404(McpServer, pk=server_id)
        credential = oauth.credential_for(server)
        back = reverse("admin:integrations_mcpserver_change", args=[server.pk])
        if not self.has_change_permission(request, server):
            return JsonResponse({"error": "forbidden"}, status=403)
        if credential is None:
            messages.error(request, "This server does not use OAuth 2.1; save it with OAuth first.")
            return redirect(back)
        return self._connect(request, credential, back)

    def _connect(self, request, credential, back):
        try:
            if credential.grant == oauth.Grant.CLIENT_CREDENTIALS:
                credential.connect_client_credentials(request.user)
            else:
                authorization = credential.start_sign_in(
                    user=request.user, session_key=request.session.session_key
                )
                return self._to_authorization_server(request, credential, authorization)
        except oauth_http.OAuthProblem as problem:
            messages.error(request, f"Could not connect {credential.server.name}: {problem}")
            return redirect(back)
        credential.server.request_sync()
        messages.success(request, f"Connected {credential.server.name}. Syncing its tools.")
        return redirect(back)

    def sync_status_view(self, request, server_id):
        """Polled by the change page while a sync runs: the sync panel's fields as the page
        shows them, and once the sync has ended the tools table, for the page to put in place
        without reloading (which would lose what the admin is typing)."""
        server = get_object_or_404(self.get_queryset(request), pk=server_id)
        if not self.has_view_permission(request, server):
            return JsonResponse({"error": "forbidden"}, status=403)
        data = {
            "state": server.sync_state,
            "status": sync_status(server),
            "last_error": server.last_error,
            "tools": server.live_tools,
            "fields": self._sync_panel_html(request, server),
        }
        if server.sync_state == SyncState.IDLE:
            data["tools_html"] = self._tools_html(request, server)
        return JsonResponse(data)

    def _sync_panel_html(self, request, server):
        """Each field of the "Tool sync" panel, rendered by the admin's own read-only field."""
        form = self.get_form(request, server, change=True)(instance=server)
        return {
            name: str(helpers.AdminReadonlyField(form, name, False, model_admin=self).contents())
            for name in self.sync_panel
        }

    def _tools_html(self, request, server):
        """The tools table exactly as the change page renders it (same template, formset and
        permissions), for the page to swap in."""
        formsets, inlines = [], []
        for formset_class, inline in self.get_formsets_with_inlines(request, server):
            prefix = formset_class.get_default_prefix()
            kwargs = self.get_formset_kwargs(request, server, inline, prefix)
            formsets.append(formset_class(**kwargs))
            inlines.append(inline)
        context = {
            "inline_admin_formsets": self.get_inline_formsets(request, formsets, inlines, server),
            "original": server,
        }
        return render_to_string(self.tools_template, context, request=request)

    @admin.display(description="URL")
    def origin(self, server):
        return server.origin

    @admin.display(description="Tools", ordering="live_tools")
    def tool_count(self, server):
        return server.live_tools

    @admin.display(description="Status")
    def status(self, server):
        label = sync_status(server) if server.enabled else "Disabled"
        return status_badge(label, _server_status_kind(server))

    @admin.display(description="Last error")
    def short_error(self, server):
        if not server.last_error:
            return "—"
        return format_html(
            '<span class="tg-error" title="{}">{}</span>',
            server.last_error,
            Truncator(server.last_error).chars(160),
        )

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

    @admin.display(description="OAuth connection")
    def oauth_state(self, server):
        return self.oauth_status(server, button=False)

    @admin.display(description="OAuth connection")
    def oauth_status(self, server, button=True):
        credential = _credential(server)
        if credential is None:
            return "—"
        rows = [(label, value) for label, value in _oauth_rows(credential) if value]
        reason = step_up = ""
        if credential.needs_reconnect:
            reason = format_html(
                "<p><strong>Needs reconnecting:</strong> {}</p>", credential.reconnect_reason
            )
        if credential.step_up_scope:
            step_up = format_html(
                "<p><strong>The server asks for a wider scope</strong> ({}): reconnect to grant "
                "it.</p>", credential.step_up_scope,
            )  # fmt: skip
        label = "Reconnect" if credential.access_token or credential.needs_reconnect else "Connect"
        action = format_html(
            '<p><button type="submit" form="oauth-connect" class="button">{}</button></p>', label
        ) if button else ""  # fmt: skip
        return format_html(
            '<div id="oauth-status"><strong>{}</strong>{}{}{}{}</div>',
            credential.state_label, format_html_join("", "<div>{}: {}</div>", rows), reason,
            step_up, action,
        )  # fmt: skip

    def _to_authorization_server(self, request, credential, authorization):
        context = {
            **self.admin_site.each_context(request),
            "title": f"Connecting {credential.server.name}",
            "server": credential.server,
            "issuer": credential.issuer,
            "authorization_url": authorization.url,
        }
        template = "admin/integrations/mcpserver/oauth_redirect.html"
        response = TemplateResponse(request, template, context)
        response["Cache-Control"] = "no-store"
        return response

    def save_related(self, request, form, formsets, change):
        # After the form's own related save, which writes the OAuth credential: a server that
        # still needs a sign-in is not synced (it could only fail, and race the sign-in).
        super().save_related(request, form, formsets, change)
        obj = form.instance
        credential = oauth.credential_for(obj) if obj.uses_oauth else None
        if credential is not None and credential.needs_sign_in:
            messages.info(request, f"Connect {obj.name} to its authorization server to sync it.")
        elif obj.enabled:
            obj.request_sync()
            messages.info(
                request,
                f"Testing the connection to {obj.origin} and listing its tools in the "
                "background. The server's page shows the outcome.",
            )

    def response_add(self, request, obj, post_url_continue=None):
        """A new OAuth server goes straight to its sign-in: saving is the one click."""
        credential = oauth.credential_for(obj) if obj.uses_oauth else None
        if credential is None or not credential.needs_sign_in:
            return super().response_add(request, obj, post_url_continue)
        back = reverse("admin:integrations_mcpserver_change", args=[obj.pk])
        return self._connect(request, credential, back)

    @admin.action(description="Sync tools now")
    def sync_now(self, request, queryset):
        for server in queryset:
            server.request_sync()
        self.message_user(request, f"Sync queued for {queryset.count()} server(s).")

    class Media:
        js = ["integrations/sync-status.js", "integrations/auth-fields.js"]


def _oauth_rows(credential):
    connected = None
    if credential.connected_at:
        who = credential.connected_by.get_username() if credential.connected_by else None
        connected = f"{_when(credential.connected_at)}" + (f" by {who}" if who else "")
    expires = None
    if credential.access_token and credential.expires_at:
        expires = _when(credential.expires_at)
    elif credential.access_token:
        expires = "not said by the server"
    return [
        ("Connected", connected),
        ("Scopes granted", credential.granted_scope if credential.access_token else None),
        ("Access token expires", expires),
        (
            "Last refresh",
            _when(credential.last_refreshed_at) if credential.last_refreshed_at else None,
        ),
        ("Authorization server", credential.issuer),
        ("Client", credential.get_client_source_display() if credential.client_source else None),
        ("Grant", credential.get_grant_display()),
    ]


def _when(moment):
    if moment is None:
        return None
    local = timezone.localtime(moment).strftime("%Y-%m-%d %H:%M:%S %Z")
    if -60 < (moment - timezone.now()).total_seconds() <= 0:
        return f"{local} (just now)"
    if moment >= timezone.now():
        return f"{local} (in {timeuntil(moment)})"
    return f"{local} ({timesince(moment)} ago)"


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


def mcp_url(server_name=""):
    """The agent MCP endpoint of one server, or of all of them (approvals/mcp/app.py)."""
    path = f"/mcp/{quote(server_name)}/" if server_name else "/mcp/"
    return settings.SITE_URL.rstrip("/") + path


def agent_endpoints(agent):
    """Where an agent connects: the JSON API, and the MCP endpoint for all its servers and for
    each one (from SITE_URL, as the agent reaches Toolgate)."""
    return {
        "api": settings.SITE_URL.rstrip("/") + "/api/v1/",
        "mcp": mcp_url(),
        "mcp_servers": [(server.name, mcp_url(server.name)) for server in agent.servers.all()],
    }


class TokenReveal:
    """A new agent token on its way to the page that shows it once (post/redirect/get).

    The token never goes into a URL, a message or a cookie: it waits, encrypted, in the session
    of the admin who made it, for the one page view that takes it, and for TTL seconds at most.
    """

    SESSION_KEY = "toolgate.agent_tokens"
    TTL = 300

    def __init__(self, request):
        self.session = request.session

    def put(self, agent, token):
        now = time.time()
        waiting = {
            pk: entry
            for pk, entry in self.session.get(self.SESSION_KEY, {}).items()
            if now - entry["at"] < self.TTL
        }
        waiting[str(agent.pk)] = {"token": encrypt(token), "at": now}
        self.session[self.SESSION_KEY] = waiting

    def take(self, agent):
        """The token waiting for `agent`, once; None if there is none, it is too old, or the
        agent's token has been replaced since."""
        waiting = dict(self.session.get(self.SESSION_KEY, {}))
        entry = waiting.pop(str(agent.pk), None)
        if entry is None:
            return None
        self.session[self.SESSION_KEY] = waiting
        if time.time() - entry["at"] >= self.TTL:
            return None
        try:
            token = decrypt(entry["token"])
        except DecryptionError:
            return None
        return token if hash_token(token) == agent.token_hash else None


@admin.register(Agent)
class AgentAdmin(LogsPolicyChanges, admin.ModelAdmin):
    list_display = ["name", "is_active", "server_list", "last_used_at", "token_hint", "created_at"]
    list_filter = ["is_active", "servers"]
    search_fields = ["name", "description"]
    filter_horizontal = ["servers"]
    fields = [
        "name",
        "description",
        "servers",
        "is_active",
        "token_hint",
        "connection",
        "last_used_at",
    ]
    readonly_fields = ["token_hint", "connection", "last_used_at"]
    actions = ["rotate_token"]

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("servers")

    def get_urls(self):
        token = path(
            "<int:agent_id>/token/",
            self.admin_site.admin_view(self.token_view),
            name="integrations_agent_token",
        )
        return [token, *super().get_urls()]

    @admin.display(description="MCP servers")
    def server_list(self, agent):
        return ", ".join(server.name for server in agent.servers.all()) or "—"

    @admin.display(description="How it connects")
    def connection(self, agent):
        """Where the agent points its MCP client or API calls (with its token as a Bearer
        header): the same list as on the page that shows a new token."""
        if agent.pk is None:
            return "Shown once the agent is saved."
        return render_to_string(
            "admin/integrations/agent/endpoints.html", {"endpoints": agent_endpoints(agent)}
        )

    def save_model(self, request, obj, form, change):
        if not change:
            request._new_agent_token = obj.set_new_token()
        super().save_model(request, obj, form, change)

    def response_add(self, request, obj, post_url_continue=None):
        return self._show_token(request, obj, request._new_agent_token)

    def _show_token(self, request, agent, token):
        TokenReveal(request).put(agent, token)
        return redirect("admin:integrations_agent_token", agent.pk)

    def token_view(self, request, agent_id):
        """Shows a new token once; a reload finds it gone (and says how to get a new one)."""
        agent = get_object_or_404(Agent, pk=agent_id)
        if not self.has_view_permission(request, agent):
            raise PermissionDenied
        token = TokenReveal(request).take(agent)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"API token for {agent.name}",
            "agent": agent,
            "token": token,
            "endpoints": agent_endpoints(agent),
        }
        return TemplateResponse(request, "admin/integrations/agent/token.html", context)

    @admin.action(description="Rotate the API token (shows the new one once)")
    def rotate_token(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Rotate one agent at a time.", level=messages.WARNING)
            return None
        agent = queryset.get()
        return self._show_token(request, agent, agent.rotate_token())
