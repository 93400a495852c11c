"""Tool calls: one agent request each, whatever the policy made of it.

Every state change is one conditional UPDATE (`filter(pk=…, status=FROM).update(status=TO)`)
that acts only if it changed a row. Two approvers clicking at once, a double click or a task
message delivered twice therefore end in exactly one outcome. Work is enqueued only after the
transaction commits, and the sweeper re-enqueues approved calls that no worker picked up.
"""

import json
import logging
from datetime import timedelta

from django.conf import settings
from django.db import models, transaction
from django.utils import timezone

from integrations import mcp_client, scanner
from integrations.models import Agent, McpServer, Tool, ToolApproval
from integrations.queueing import enqueue_on_commit

logger = logging.getLogger(__name__)


class Status(models.TextChoices):
    PENDING_APPROVAL = "pending_approval", "Pending approval"
    APPROVED = "approved", "Approved"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    DENIED = "denied", "Denied"
    EXPIRED = "expired", "Expired"
    CANCELLED = "cancelled", "Cancelled"
    BLOCKED = "blocked", "Blocked"
    UNKNOWN = "unknown", "Unknown (worker lost mid-call)"


FINAL_STATUSES = {
    Status.SUCCEEDED,
    Status.FAILED,
    Status.DENIED,
    Status.EXPIRED,
    Status.CANCELLED,
    Status.BLOCKED,
    Status.UNKNOWN,
}


class DecidedBy(models.TextChoices):
    AUTO = "auto", "Auto-approved"
    HUMAN = "human", "Human"
    POLICY = "policy", "Policy"


class ToolCall(models.Model):
    agent = models.ForeignKey(Agent, on_delete=models.PROTECT, related_name="tool_calls")
    server = models.ForeignKey(
        McpServer, null=True, blank=True, on_delete=models.SET_NULL, related_name="tool_calls"
    )
    tool = models.ForeignKey(
        Tool, null=True, blank=True, on_delete=models.SET_NULL, related_name="tool_calls"
    )
    # Copies, so the audit trail survives a server or tool being deleted or changed.
    server_name = models.CharField(max_length=100)
    tool_name = models.CharField(max_length=200)
    tool_fingerprint = models.CharField(max_length=64, blank=True)
    arguments = models.JSONField(default=dict)
    idempotency_key = models.CharField(max_length=200, blank=True)

    status = models.CharField(max_length=20, choices=Status, db_index=True)
    decided_by = models.CharField(max_length=10, choices=DecidedBy, blank=True)
    decided_by_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    note = models.TextField(blank=True)

    result_content = models.JSONField(null=True, blank=True)
    structured_content = models.JSONField(null=True, blank=True)
    is_error = models.BooleanField(null=True, blank=True)
    warnings = models.JSONField(
        default=list, blank=True, help_text="Result text that looks like instructions to the model."
    )
    purged_at = models.DateTimeField(
        null=True, blank=True, help_text="When arguments and result were removed (retention)."
    )
    error_code = models.CharField(max_length=40, blank=True)
    error_message = models.TextField(blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)

    requested_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    reminded_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-requested_at", "-id"]
        permissions = [("decide_toolcall", "Can approve or deny tool calls")]
        constraints = [
            models.UniqueConstraint(
                "agent",
                "idempotency_key",
                condition=~models.Q(idempotency_key=""),
                name="unique_idempotency_key_per_agent",
            )
        ]
        # The queue reads pending calls oldest first; the history pages by id, newest first,
        # optionally filtered by one of these columns.
        indexes = [
            models.Index(fields=["status", "requested_at"]),
            models.Index(fields=["status", "id"]),
            models.Index(fields=["server_name", "id"]),
            models.Index(fields=["tool_name", "id"]),
            models.Index(fields=["agent", "id"]),
        ]

    def __str__(self):
        return f"#{self.pk} {self.server_name}/{self.tool_name} ({self.status})"

    @property
    def is_final(self):
        return self.status in FINAL_STATUSES

    def _transition(self, sources, target, where=None, **fields):
        """Move from one of `sources` to `target` (when the row also matches `where`) in one
        conditional UPDATE; True if this call moved it, False if something else got there."""
        fields["status"] = target
        rows = ToolCall.objects.filter(pk=self.pk, status__in=sources, **(where or {}))
        changed = rows.update(**fields)
        if changed:
            for name, value in fields.items():
                setattr(self, name, value)
        else:
            self.refresh_from_db()
        return changed == 1

    def approve(self, user, note=""):
        """A human approves. False when someone else decided first, or it expired."""
        now = timezone.now()
        approved = self._transition(
            [Status.PENDING_APPROVAL],
            Status.APPROVED,
            decided_by=DecidedBy.HUMAN,
            decided_by_user=user,
            decided_at=now,
            note=note,
            where={"expires_at__gt": now},
        )
        if approved:
            self.enqueue()
        else:
            self.expire_if_due()
        return approved

    def approve_and_always_allow(self, user, note=""):
        """Approve, and from now on let the tool run without asking (Fine-Grained mode)."""
        approved = self.approve(user, note)
        if approved and self.tool_id:
            Tool.objects.filter(pk=self.tool_id).update(approval=ToolApproval.AUTO_APPROVED)
        return approved

    def why_not_pending(self):
        """For an approver whose decision came too late: what happened instead."""
        who = self.decided_by_user.get_username() if self.decided_by_user else None
        if self.status == Status.EXPIRED:
            return "This request expired before a decision; nothing was run."
        if self.status == Status.CANCELLED:
            return "The agent cancelled this request."
        if self.decided_by == DecidedBy.HUMAN and self.status == Status.DENIED:
            return f"Already denied by {who}."
        if self.decided_by == DecidedBy.HUMAN:
            return f"Already approved by {who}."
        return f"This request is {self.get_status_display().lower()}."

    def deny(self, user, note=""):
        now = timezone.now()
        denied = self._transition(
            [Status.PENDING_APPROVAL],
            Status.DENIED,
            decided_by=DecidedBy.HUMAN,
            decided_by_user=user,
            decided_at=now,
            finished_at=now,
            note=note,
            where={"expires_at__gt": now},
        )
        if not denied:
            self.expire_if_due()
        return denied

    def cancel(self):
        return self._transition(
            [Status.PENDING_APPROVAL], Status.CANCELLED, finished_at=timezone.now()
        )

    def expire_if_due(self):
        now = timezone.now()
        return self._transition(
            [Status.PENDING_APPROVAL],
            Status.EXPIRED,
            finished_at=now,
            where={"expires_at__lte": now},
        )

    def enqueue(self):
        """Run the call in a worker after commit; if the broker is down, the sweeper enqueues
        it again once TOOL_CALL_REQUEUE_AFTER has passed."""
        from approvals.tasks import run_tool_call

        enqueue_on_commit(run_tool_call, self.pk)

    def run(self):
        """Claim the call and run it once. Returns True when it should be retried later.

        Only errors that prove the request never reached the server put the call back to
        `approved` for a retry; anything else is final, so a call is never run twice.
        """
        if not self._transition([Status.APPROVED], Status.RUNNING, started_at=timezone.now()):
            return False  # someone else has it, or it is no longer approved
        problem = self._refuse_reason()
        if problem:
            self._finish(Status.FAILED, error_code=problem[0], error_message=problem[1])
            return False
        try:
            result = mcp_client.call_tool(
                self.server.endpoint(),
                self.tool_name,
                self.arguments,
                transport=self.server.server_info.get("transport"),
            )
        except mcp_client.McpError as exc:
            return self._failed(exc)
        except Exception:
            logger.exception("Tool call %s failed unexpectedly", self.pk)
            self._finish(Status.FAILED, error_code="internal", error_message="Internal error.")
            return False
        self._finish(
            Status.SUCCEEDED,
            result_content=result.content,
            structured_content=result.structured_content,
            is_error=result.is_error,
            warnings=_result_warnings(result),
        )
        return False

    def _refuse_reason(self):
        """Why an approved call must not run now, or None. Checked by the worker at run time."""
        tool = self.tool and Tool.objects.select_related("server").filter(pk=self.tool.pk).first()
        if tool is None or tool.removed:
            return ("tool_removed", "The tool is no longer offered by the server.")
        if not tool.server.enabled:
            return ("server_disabled", "The MCP server has been disabled.")
        if tool.approval == "disabled":
            return ("tool_disabled", "The tool has been disabled.")
        if tool.fingerprint != self.tool_fingerprint:
            return (
                "tool_changed",
                "The tool's definition changed after this call was requested; it was not run.",
            )
        self.tool, self.server = tool, tool.server
        return None

    def _failed(self, exc):
        retryable = not exc.reached_server and self.attempts + 1 < settings.TOOL_CALL_MAX_ATTEMPTS
        if retryable:
            moved = self._transition(
                [Status.RUNNING], Status.APPROVED, attempts=self.attempts + 1, started_at=None
            )
            return moved
        self._finish(Status.FAILED, error_code=exc.code, error_message=exc.message)
        return False

    def _finish(self, status, **fields):
        self._transition(
            [Status.RUNNING],
            status,
            finished_at=timezone.now(),
            attempts=self.attempts + 1,
            **fields,
        )

    @classmethod
    def purge_old_data(cls, days=None):
        """Remove arguments and results of calls finished more than `days` ago. Who called which
        tool, when, who decided and the outcome stay in the audit trail."""
        days = settings.TOOL_CALL_RETENTION_DAYS if days is None else days
        cutoff = timezone.now() - timedelta(days=days)
        return cls.objects.filter(finished_at__lt=cutoff, purged_at__isnull=True).update(
            arguments={},
            result_content=None,
            structured_content=None,
            warnings=[],
            purged_at=timezone.now(),
        )

    @classmethod
    def sweep(cls):
        """Expire overdue requests, re-enqueue approved calls nobody picked up, and hand calls
        whose worker vanished mid-call to a human as `unknown` (they may have run)."""
        now = timezone.now()
        expired = cls.objects.filter(status=Status.PENDING_APPROVAL, expires_at__lte=now).update(
            status=Status.EXPIRED, finished_at=now
        )
        stale = now - timedelta(seconds=settings.TOOL_CALL_REQUEUE_AFTER)
        waiting = list(
            cls.objects.filter(status=Status.APPROVED, decided_at__lt=stale).values_list(
                "pk", flat=True
            )
        )
        from approvals.tasks import run_tool_call

        for pk in waiting:
            run_tool_call.delay(pk)
        lost_before = now - timedelta(seconds=settings.TOOL_CALL_LOST_AFTER)
        lost = cls.objects.filter(status=Status.RUNNING, started_at__lt=lost_before)
        unknown = sum(call.mark_unknown() for call in lost)
        return {"expired": expired, "requeued": len(waiting), "unknown": unknown}

    def mark_unknown(self):
        """The worker vanished mid-call: a human must find out whether it ran. Never re-run."""
        marked = self._transition(
            [Status.RUNNING],
            Status.UNKNOWN,
            finished_at=timezone.now(),
            error_code="worker_lost",
            error_message="The worker stopped while running this call; it may or may not have "
            "reached the server. It will not be run again on its own.",
        )
        if marked:
            notify("call.unknown", self)
        return marked


def _result_warnings(result):
    """Text in a tool's result that looks like instructions to the model (prompt injection)."""
    text = "\n".join(
        block.get("text", "") for block in result.content if block.get("type") == "text"
    )
    if result.structured_content:
        text += "\n" + json.dumps(result.structured_content, ensure_ascii=False)
    return scanner.scan_result_text(text)


class Refused(Exception):
    """A tool-call request the policy refused; `status` is the HTTP status to answer with."""

    def __init__(self, status, code, message, details=None):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


def request_tool_call(agent, server_name, tool_name, arguments, idempotency_key=""):
    """Decide a new request by the policy and store it. Returns (call, created).

    A refused request raises `Refused` and leaves only a `blocked` call behind, for the audit.
    """
    from approvals.validation import InvalidArguments, validate_arguments

    if idempotency_key:
        existing = ToolCall.objects.filter(agent=agent, idempotency_key=idempotency_key).first()
        if existing:
            return existing, False
    server = McpServer.objects.filter(name=server_name).first()
    tool = server and Tool.objects.listed().filter(server=server, name=tool_name).first()
    call = ToolCall(
        agent=agent,
        server=server,
        tool=tool,
        server_name=server_name[:100],
        tool_name=tool_name[:200],
        tool_fingerprint=tool.fingerprint if tool else "",
        arguments=arguments,
        idempotency_key=idempotency_key,
    )
    try:
        refusal = _refusal(agent, server, tool, server_name, tool_name)
        if refusal:
            raise refusal
        try:
            validate_arguments(arguments, tool.input_schema)
        except InvalidArguments as exc:
            raise Refused(
                422, "invalid_arguments", "The arguments do not match the tool's input schema.",
                exc.messages,
            ) from None  # fmt: skip
    except Refused as refused:
        _block(call, refused)
        raise
    return _store(call, tool)


def _refusal(agent, server, tool, server_name, tool_name):
    if server is None:
        return Refused(404, "unknown_server", f"There is no MCP server named {server_name!r}.")
    if not agent.servers.filter(pk=server.pk).exists():
        return Refused(
            403, "server_not_allowed", f"This agent may not use the MCP server {server_name!r}."
        )
    if not server.enabled:
        return Refused(403, "server_disabled", f"The MCP server {server_name!r} is disabled.")
    if tool is None:
        return Refused(404, "unknown_tool", f"{server_name!r} has no tool named {tool_name!r}.")
    if tool.effective_approval == "blocked":
        return Refused(403, "tool_disabled", f"The tool {tool_name!r} is disabled.")
    return None


def _personal_data_needs_a_human(call, tool):
    from approvals.pii import find_personal_data

    return tool.server.personal_data_needs_approval and bool(find_personal_data(call.arguments))


def _block(call, refused):
    now = timezone.now()
    call.status, call.decided_by, call.decided_at, call.finished_at = (
        Status.BLOCKED, DecidedBy.POLICY, now, now
    )  # fmt: skip
    call.error_code, call.error_message = refused.code, refused.message
    call.idempotency_key = ""  # a refused request must not claim the key
    if refused.code == "invalid_arguments":
        call.arguments = {}  # may be huge or malformed; the error says what was wrong
    call.save()


def _store(call, tool):
    now = timezone.now()
    if tool.effective_approval == "auto" and not _personal_data_needs_a_human(call, tool):
        call.status, call.decided_by, call.decided_at = Status.APPROVED, DecidedBy.AUTO, now
    else:
        call.status = Status.PENDING_APPROVAL
        call.expires_at = now + timedelta(seconds=settings.APPROVAL_TIMEOUT)
    try:
        with transaction.atomic():
            call.save()
    except Exception:
        # Two requests with one idempotency key raced; the first one stored wins.
        if call.idempotency_key:
            existing = ToolCall.objects.filter(
                agent=call.agent, idempotency_key=call.idempotency_key
            ).first()
            if existing:
                return existing, False
        raise
    if call.status == Status.APPROVED:
        call.enqueue()
    else:
        notify("call.pending", call)
    return call, True


# Last: the notification models live in their own module and register here, with the app.
from approvals.notifications import Delivery, NotificationChannel, notify  # noqa: E402, F401
