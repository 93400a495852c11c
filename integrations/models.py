"""MCP servers and the tools they offer."""

import difflib
import hashlib
import hmac
import json
import logging
import secrets
from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import urlsplit

from django.conf import settings
from django.db import models, transaction
from django.db.models import F, Q
from django.utils import timezone

from integrations import limits, mcp_client, oauth, scanner, statements
from integrations.fields import EncryptedJSONField, EncryptedTextField
from integrations.queueing import enqueue_on_commit

logger = logging.getLogger(__name__)


class Transport(models.TextChoices):
    AUTO = "auto", "Auto (Streamable HTTP, then SSE)"
    STREAMABLE_HTTP = "streamable_http", "Streamable HTTP"
    SSE = "sse", "SSE"


class ApprovalMode(models.TextChoices):
    ALWAYS_ASK = "always_ask", "Always Ask (Recommended)"
    FINE_GRAINED = "fine_grained", "Fine-Grained Tool Approval"
    NO_APPROVAL = "no_approval", "No Approval"


class AuthKind(models.TextChoices):
    NONE = "none", "None"
    SECRET_TOKEN = "secret_token", "Secret token"
    OAUTH = "oauth", "OAuth 2.1"


class SyncState(models.TextChoices):
    IDLE = "idle", "Idle"
    QUEUED = "queued", "Queued"
    SYNCING = "syncing", "Syncing"


@dataclass
class SyncResult:
    ok: bool
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    error: str = ""
    skipped: bool = False  # another sync of this server was already running
    touched: list = field(default_factory=list)  # ids of the tools added or changed
    refused: list = field(default_factory=list)  # why listed tools were not stored

    def __str__(self):
        if self.skipped:
            return "already being synced"
        if not self.ok:
            return f"failed: {self.error}"
        counts = (
            f"{self.added} added, {self.changed} changed, {self.removed} removed, "
            f"{self.unchanged} unchanged"
        )
        return counts + (f", {len(self.refused)} refused" if self.refused else "")

    @property
    def refusals(self):
        """The refused tools as one message for the server's page ("" when none)."""
        if not self.refused:
            return ""
        shown = "; ".join(self.refused[:5])
        more = f"; and {len(self.refused) - 5} more" if len(self.refused) > 5 else ""
        return f"{len(self.refused)} tool(s) refused and not stored: {shown}{more}."


class McpServer(models.Model):
    name = models.CharField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    url = EncryptedTextField(
        "server URL", help_text="May contain a secret key: it is stored encrypted and never shown."
    )
    transport = models.CharField(max_length=20, choices=Transport, default=Transport.AUTO)
    auth_kind = models.CharField(
        "authentication", max_length=20, choices=AuthKind, default=AuthKind.NONE
    )
    secret_token = EncryptedTextField(
        blank=True, help_text="Sent as “Authorization: Bearer …”. Stored encrypted, never shown."
    )
    headers = EncryptedJSONField(
        "HTTP headers", default=dict, blank=True, help_text="Stored encrypted, never shown."
    )
    approval_mode = models.CharField(
        max_length=20, choices=ApprovalMode, default=ApprovalMode.ALWAYS_ASK
    )
    enabled = models.BooleanField(default=True)
    allow_private_network = models.BooleanField(
        default=False,
        help_text="Allow connecting to loopback, private and link-local addresses. "
        "Only for servers you run on your own network.",
    )
    allow_http = models.BooleanField(
        "allow plain HTTP",
        default=False,
        help_text="Allow an http:// URL. The token and headers then travel unencrypted.",
    )
    personal_data_needs_approval = models.BooleanField(
        "personal data needs approval",
        default=True,
        help_text="Calls whose arguments look like they carry personal data or secrets (e-mail "
        "addresses, phone, card or ID numbers, API keys) always wait for a human, in every mode.",
    )

    sync_state = models.CharField(max_length=10, choices=SyncState, default=SyncState.IDLE)
    sync_started_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_synced_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_error = models.TextField(blank=True, editable=False)
    sync_failures = models.PositiveIntegerField("failed syncs in a row", default=0, editable=False)
    failed_syncs_total = models.PositiveIntegerField(
        "failed syncs", default=0, editable=False, help_text="Since the server was added."
    )
    server_info = models.JSONField(default=dict, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "MCP server"

    def __str__(self):
        return self.name

    def save(self, *args, **kwargs):
        if self.auth_kind == AuthKind.NONE and self.secret_token:
            self.auth_kind = AuthKind.SECRET_TOKEN  # a stored token is what authenticates it
        super().save(*args, **kwargs)

    @property
    def origin(self):
        """Scheme and host of the URL: the only part of it that is safe to show."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")

    @property
    def uses_oauth(self):
        return self.auth_kind == AuthKind.OAUTH

    @property
    def reconnect_reason(self):
        """Why only an admin's reconnect can make the server usable again (its OAuth grant was
        refused or dropped), or "". Reads the `oauth` relation: select_related it for lists."""
        if not self.uses_oauth:
            return ""
        try:
            return self.oauth.reconnect_reason
        except oauth.OAuthCredential.DoesNotExist:
            return ""

    def endpoint(self):
        """How to reach the server now. For OAuth, renews the access token first when it is
        about to expire; raises `mcp_client.McpError` (`NeedsReconnect`) when it can't be
        used. Synchronous: from async code, `await sync_to_async(server.endpoint,
        thread_sensitive=False)()` (a renewal may wait on the authorization server)."""
        headers = dict(self.headers or {})
        auth = None
        if self.uses_oauth:
            credential = oauth.credential_for(self)
            if credential is None:
                raise oauth.NeedsReconnect(self.name)
            auth = credential.bearer()
        elif self.secret_token:
            headers["Authorization"] = f"Bearer {self.secret_token}"
        return mcp_client.Endpoint(
            url=self.url,
            transport=self.transport,
            headers=headers,
            allow_private_network=self.allow_private_network,
            auth=auth,
            credential=auth.identity if auth else "",
            server_pk=self.pk,
        )

    def request_sync(self):
        """Mark the server queued and enqueue a sync once the surrounding transaction commits."""
        from integrations.tasks import sync_server

        McpServer.objects.filter(pk=self.pk, sync_state=SyncState.IDLE).update(
            sync_state=SyncState.QUEUED
        )
        enqueue_on_commit(sync_server, self.pk, on_failure=self._sync_not_queued)

    def _sync_not_queued(self):
        # Counted as a failed sync: `last_error` alone would read as a sync that only
        # refused some tools (see `sync_failing`).
        McpServer.objects.filter(pk=self.pk, sync_state=SyncState.QUEUED).update(
            sync_state=SyncState.IDLE,
            last_error="The sync could not be queued: the task broker is unreachable. "
            "It is retried at the next periodic sync.",
            sync_failures=models.F("sync_failures") + 1,
            failed_syncs_total=models.F("failed_syncs_total") + 1,
        )

    @property
    def sync_failing(self):
        """Whether the latest sync failed. `last_error` alone does not say: a sync that
        succeeded but refused some tools leaves the refusals there, with no failure counted."""
        return self.sync_failures > 0

    def sync_tools(self):
        """Fetch the tool list and bring our tools up to date. Failures go to `last_error`.

        Two syncs of one server never overlap: the sync claims the server with a conditional
        UPDATE, and a claim older than the sync timeout counts as abandoned by a dead worker.
        """
        if not self._claim_sync():
            return SyncResult(ok=False, skipped=True)
        try:
            listing = mcp_client.list_tools(self.endpoint())
        except mcp_client.McpError as exc:
            self._sync_failed(exc.message)
            return SyncResult(ok=False, error=exc.message)
        except Exception:
            self._sync_failed("Internal error while syncing; see the worker log.")
            raise
        with transaction.atomic():
            result = self._apply_listing(listing.tools)
            info = {
                **listing.server_info,
                "protocol_version": listing.protocol_version,
                "transport": listing.transport,
            }
            self._finish_sync(
                last_error=result.refusals,
                last_synced_at=timezone.now(),
                server_info=info,
                sync_failures=0,
            )
        self._notify_tools_to_review(result.touched)
        return result

    def _sync_failed(self, error):
        """Record the failure; at NOTIFY_SYNC_FAILURES in a row, tell people, once until a sync
        succeeds (syncs of one server never overlap, so the count is exact)."""
        from approvals.notifications import notify

        self._finish_sync(
            last_error=error,
            sync_failures=models.F("sync_failures") + 1,
            failed_syncs_total=models.F("failed_syncs_total") + 1,
        )
        self.refresh_from_db(fields=["sync_failures", "failed_syncs_total"])
        if self.sync_failures == settings.NOTIFY_SYNC_FAILURES:
            notify("server.sync_failing", self)

    def _notify_tools_to_review(self, tool_ids):
        from approvals.notifications import notify

        for tool in Tool.objects.filter(pk__in=tool_ids).select_related("server"):
            if tool.needs_review:
                notify("tool.needs_review", tool)

    def _claim_sync(self):
        now = timezone.now()
        abandoned = now - timedelta(seconds=settings.MCP_SYNC_TIMEOUT * 2)
        claimed = (
            McpServer.objects.filter(pk=self.pk)
            .filter(Q(sync_started_at__isnull=True) | Q(sync_started_at__lt=abandoned))
            .update(sync_state=SyncState.SYNCING, sync_started_at=now)
        )
        return claimed == 1

    def _finish_sync(self, **fields):
        fields.update(sync_state=SyncState.IDLE, sync_started_at=None)
        McpServer.objects.filter(pk=self.pk).update(**fields)
        for name, value in fields.items():
            setattr(self, name, value)

    def _apply_listing(self, definitions):
        now = timezone.now()
        existing = {tool.name: tool for tool in self.tools.all()}
        other_tools = list(
            Tool.objects.listed().exclude(server=self).values_list("server__name", "name")
        )
        result = SyncResult(ok=True)
        seen = set()
        for definition in definitions:
            refusal = limits.tool_refusal(definition)
            if refusal:
                result.refused.append(refusal)
                continue
            name = definition["name"]
            if name in seen:
                continue  # a duplicate keeps the first definition
            seen.add(name)
            warnings = scanner.scan_tool(definition, other_tools=other_tools)
            tool = existing.get(name)
            if tool is None:
                tool = Tool.objects.create_from_definition(self, definition, now, warnings)
                result.added += 1
                result.touched.append(tool.pk)
            elif tool.update_definition(definition, now, warnings):
                result.changed += 1
                result.touched.append(tool.pk)
            else:
                result.unchanged += 1
        gone = [tool.pk for name, tool in existing.items() if name not in seen and not tool.removed]
        result.removed = Tool.objects.filter(pk__in=gone).update(removed_at=now)
        return result


class ToolApproval(models.TextChoices):
    AUTO_APPROVED = "auto_approved", "Auto-approved"
    REQUIRES_APPROVAL = "requires_approval", "Requires approval"
    DISABLED = "disabled", "Disabled"


HINTS = {
    "readOnlyHint": "read-only",
    "destructiveHint": "destructive",
    "idempotentHint": "idempotent",
    "openWorldHint": "open-world",
}


def fingerprint(definition):
    """SHA-256 of the canonical JSON of a tool's whole definition.

    `_meta` is left out: it is the server's per-response bookkeeping, not part of what the tool
    does, and including it would flag unchanged tools as changed.
    """
    body = {key: value for key, value in definition.items() if key != "_meta"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class ToolQuerySet(models.QuerySet):
    def listed(self):
        return self.filter(removed_at__isnull=True)

    def needing_review(self):
        """The tools whose `needs_review` is true, as one filter (the admin's review filter)."""
        never = Q(reviewed_fingerprint="")
        changed = ~never & ~Q(fingerprint=F("reviewed_fingerprint"))
        flagged = ~Q(warnings=[]) & (
            Q(reviewed_by__isnull=True) | ~Q(fingerprint=F("reviewed_fingerprint"))
        )
        return self.filter(never | changed | flagged)


class ToolManager(models.Manager):
    def create_from_definition(self, server, definition, now, warnings=()):
        fp = fingerprint(definition)
        # What the server offers at its first successful sync is the baseline, reviewed: adding
        # the server is the admin's review of what it offered then. A tool that appears later,
        # or one the scanner flags, has no reviewed definition until a human marks it reviewed.
        baseline = server.last_synced_at is None and not warnings
        tool = self.create(
            server=server,
            name=definition["name"],
            approval=ToolApproval.REQUIRES_APPROVAL,
            reviewed_fingerprint=fp if baseline else "",
            reviewed_definition=definition if baseline else None,
            first_seen_at=now,
            last_seen_at=now,
            warnings=list(warnings),
            **Tool.fields_from_definition(definition),
        )
        ToolRevision.objects.get_or_create(
            tool=tool, fingerprint=fp, defaults={"definition": definition}
        )
        return tool


class Tool(models.Model):
    server = models.ForeignKey(McpServer, on_delete=models.CASCADE, related_name="tools")
    name = models.CharField(max_length=200)
    title = models.CharField(max_length=200, blank=True)
    description = models.TextField(blank=True)
    input_schema = models.JSONField(default=dict)
    output_schema = models.JSONField(null=True, blank=True)
    annotations = models.JSONField(default=dict, blank=True)
    definition = models.JSONField(default=dict, help_text="The whole definition as last listed.")
    approval = models.CharField(
        "approval setting",
        max_length=20,
        choices=ToolApproval,
        default=ToolApproval.REQUIRES_APPROVAL,
        help_text="Used when the server's approval mode is Fine-Grained.",
    )
    fingerprint = models.CharField(max_length=64)
    reviewed_fingerprint = models.CharField(max_length=64, blank=True)
    reviewed_definition = models.JSONField(null=True, blank=True)
    reviewed_at = models.DateTimeField(null=True, blank=True)
    reviewed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    warnings = models.JSONField(default=list, blank=True)
    first_seen_at = models.DateTimeField()
    last_seen_at = models.DateTimeField()
    removed_at = models.DateTimeField(null=True, blank=True)

    objects = ToolManager.from_queryset(ToolQuerySet)()

    class Meta:
        ordering = ["server__name", "name"]
        constraints = [models.UniqueConstraint("server", "name", name="unique_tool_per_server")]
        indexes = [models.Index(fields=["server", "removed_at"])]

    def __str__(self):
        return f"{self.server.name} / {self.name}"

    @staticmethod
    def fields_from_definition(definition):
        annotations = definition.get("annotations") or {}
        return {
            "title": str(definition.get("title") or annotations.get("title") or "")[:200],
            "description": str(definition.get("description") or ""),
            "input_schema": definition.get("inputSchema") or {},
            "output_schema": definition.get("outputSchema"),
            "annotations": annotations,
            "definition": definition,
            "fingerprint": fingerprint(definition),
        }

    @property
    def removed(self):
        return self.removed_at is not None

    @property
    def ever_reviewed(self):
        """Whether some definition of the tool was reviewed (the first sync's, or a human's)."""
        return bool(self.reviewed_fingerprint)

    @property
    def changed_since_review(self):
        return self.ever_reviewed and self.fingerprint != self.reviewed_fingerprint

    @property
    def flagged(self):
        """Scanner warnings no human has looked at in this definition."""
        reviewed_by_human = self.reviewed_by_id is not None and not self.changed_since_review
        return bool(self.warnings) and not (reviewed_by_human and self.ever_reviewed)

    @property
    def needs_review(self):
        """New and never reviewed, changed since review, or flagged: a human must look before
        it runs on its own. (`ToolQuerySet.needing_review` is the same test in SQL.)"""
        return not self.ever_reviewed or self.changed_since_review or self.flagged

    @property
    def hints(self):
        """The annotation hints the server claims, as labels. Claims, never guarantees."""
        return [label for key, label in HINTS.items() if self.annotations.get(key) is True]

    def update_definition(self, definition, now, warnings=()):
        """Record the definition from a sync; True when it differs from the last one seen.

        A change keeps the tool (its calls and settings stay attached) and leaves the reviewed
        fingerprint alone, so the tool needs a human until someone reviews it again.
        """
        fields = self.fields_from_definition(definition)
        changed = fields["fingerprint"] != self.fingerprint
        if changed:
            for name, value in fields.items():
                setattr(self, name, value)
            ToolRevision.objects.get_or_create(
                tool=self, fingerprint=self.fingerprint, defaults={"definition": definition}
            )
        changed = changed or self.warnings != list(warnings)
        self.warnings = list(warnings)
        self.last_seen_at, self.removed_at = now, None
        self.save()
        return changed

    def changes_since_review(self):
        """A unified diff from the reviewed definition to the current one ("" when none; the
        whole definition for a tool never reviewed)."""
        if self.ever_reviewed and not self.changed_since_review:
            return ""

        def lines(definition):
            text = json.dumps(definition or {}, indent=2, sort_keys=True, ensure_ascii=False)
            return text.splitlines()

        before = lines(self.reviewed_definition) if self.ever_reviewed else []
        after = lines(self.definition)
        diff = difflib.unified_diff(before, after, "reviewed", "current", lineterm="")
        return "\n".join(diff)

    def mark_reviewed(self, user):
        """Accept the current definition as reviewed by `user` (in the admin log); returns the
        diff accepted ("" when nothing changed since the last review)."""
        from integrations.audit import log_change

        diff = self.changes_since_review()
        self.reviewed_fingerprint = self.fingerprint
        self.reviewed_definition = self.definition
        self.reviewed_at, self.reviewed_by = timezone.now(), user
        self.save(
            update_fields=[
                "reviewed_fingerprint",
                "reviewed_definition",
                "reviewed_at",
                "reviewed_by",
            ]
        )
        flags = f", with {len(self.warnings)} scanner warning(s)" if self.warnings else ""
        log_change(user, self, f"Marked reviewed (definition {self.fingerprint[:12]}{flags}).")
        return diff

    def set_approval(self, user, setting):
        """Change the Fine-Grained approval setting, in the admin log as `user`'s change."""
        from integrations.audit import log_change

        before = self.get_approval_display()
        if Tool.objects.filter(pk=self.pk).exclude(approval=setting).update(approval=setting):
            self.approval = setting
            message = f"Changed approval setting: {before} → {self.get_approval_display()}."
            log_change(user, self, message)
            return True
        return False


class ToolRevision(models.Model):
    """Every distinct definition a tool has had, so any past call can be traced to what the
    tool looked like when it was requested."""

    tool = models.ForeignKey(Tool, on_delete=models.CASCADE, related_name="revisions")
    fingerprint = models.CharField(max_length=64)
    definition = models.JSONField()
    first_seen_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["first_seen_at"]
        constraints = [
            models.UniqueConstraint("tool", "fingerprint", name="unique_revision_per_tool")
        ]

    def __str__(self):
        return f"{self.tool} @ {self.fingerprint[:12]}"


def hash_token(token):
    # Agent tokens are 256 random bits, so a fast hash is enough: there is nothing to brute
    # force. Looking the hash up by index leaks nothing useful through timing.
    return hashlib.sha256(token.encode()).hexdigest()


class Agent(models.Model):
    TOKEN_PREFIX = "tg_"  # noqa: S105 - a prefix, not a secret

    name = models.CharField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    servers = models.ManyToManyField(McpServer, blank=True, related_name="agents")
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    token_hint = models.CharField(max_length=12, editable=False, help_text="Start of the token.")
    is_active = models.BooleanField("active", default=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    def set_new_token(self):
        """Give the agent a new token and return it. Only its hash is kept: show it now."""
        token = self.TOKEN_PREFIX + secrets.token_urlsafe(32)
        self.token_hash = hash_token(token)
        self.token_hint = token[:10]
        return token

    @classmethod
    def create_with_token(cls, name, servers=(), **fields):
        """Create an agent allowed on `servers`; returns (agent, token). Show the token now:
        only its hash is kept."""
        agent = cls(name=name, **fields)
        token = agent.set_new_token()
        agent.save()
        agent.servers.set(servers)
        return agent, token

    def rotate_token(self):
        token = self.set_new_token()
        self.save(update_fields=["token_hash", "token_hint"])
        return token

    @classmethod
    def authenticate(cls, token):
        if not token or not token.startswith(cls.TOKEN_PREFIX) or len(token) > 200:
            return None
        digest = hash_token(token)
        found = _AGENT_BY_TOKEN.rows(digest=digest)
        agent = found[0] if found else None
        # The index lookup already only matches the exact hash; comparing again in constant
        # time keeps the check honest should the lookup ever become a prefix or range match.
        if agent is None or not hmac.compare_digest(agent.token_hash, digest):
            return None
        return agent


# `Agent.objects.filter(token_hash=…, is_active=True).first()`, its SQL built once per connection
# (integrations/statements.py): at every API and MCP request.
_AGENT_BY_TOKEN = statements.Query(
    lambda filters: Agent.objects.filter(token_hash=filters.sentinel("digest"), is_active=True)[:1],
    digest=Agent._meta.get_field("token_hash"),
)
