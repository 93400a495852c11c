"""Tool calls: one agent request each, whatever the policy made of it.

Every state change is one conditional UPDATE (`filter(pk=…, status=FROM).update(status=TO)`)
that acts only if it changed a row. Two approvers clicking at once, a double click or a task
message delivered twice therefore end in exactly one outcome. Work is enqueued only after the
transaction commits, and the sweeper re-enqueues approved calls that no worker picked up.
"""

import asyncio
import json
import logging
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import anyio
from asgiref.sync import sync_to_async
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import connection, models, transaction
from django.urls import reverse
from django.utils import timezone
from django.utils.crypto import salted_hmac

from approvals import policy, running, wakeup
from approvals.rules import PolicyRule
from integrations import limits, mcp_client, scanner, statements
from integrations.fields import EncryptedJSONField, EncryptedTextField
from integrations.models import Agent, McpServer, Tool
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


# A result up to this size (canonical JSON) is handed to the waiting agent before it is recorded
# (`ToolCall.arun`'s `on_outcome`): scanning it for warnings in the loop costs about a query.
REPLY_BEFORE_RECORD_BYTES = 16 * 1024
# A result up to this size (canonical JSON) is scanned for warnings in the record's own hop to
# the shared database thread (`ToolCall.arun`); a larger one on a thread of its own first. The
# server sets what a scan costs: at most ~1.6 ms for this size, ~2 s for 300,000 characters of
# "send send ...", during which every agent's database work would wait (config/asgi.py).
SCAN_IN_HOP_BYTES = 256

LIVE_STATUSES = [Status.PENDING_APPROVAL, Status.APPROVED, Status.RUNNING]  # may still run

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
    # Arguments and results often carry personal data: encrypted at rest, like the servers'
    # secrets, and so never rendered in the admin (integrations/secret_admin.py).
    arguments = EncryptedJSONField(default=dict, help_text="The arguments the call runs with.")
    requested_arguments = EncryptedJSONField(
        null=True,
        blank=True,
        help_text="What the agent asked for, when an approver edited the arguments.",
    )
    arguments_size = models.PositiveIntegerField(
        default=0, help_text="Bytes of the arguments' canonical JSON, as requested."
    )
    idempotency_key = models.CharField(max_length=200, blank=True)
    # A keyed digest of the requested arguments (`arguments_digest`): a retried MCP call is
    # matched by it without decrypting anything, and it tells nothing without SECRET_KEY.
    arguments_digest = models.CharField(max_length=64, blank=True, editable=False)
    handed_back_at = models.DateTimeField(
        null=True,
        blank=True,
        editable=False,
        help_text="When an MCP client was last told the call is still pending: its repeat of "
        "the call may then re-attach once, even after the call finished.",
    )

    status = models.CharField(max_length=20, choices=Status, db_index=True)
    decided_by = models.CharField(max_length=10, choices=DecidedBy, blank=True)
    decided_by_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    note = models.TextField(blank=True)
    reasons = models.JSONField(
        default=list,
        blank=True,
        help_text="Why the policy decided as it did: {code, message} pairs (approvals/policy.py).",
    )

    result_content = EncryptedJSONField(null=True, blank=True)
    structured_content = EncryptedJSONField(null=True, blank=True)
    is_error = models.BooleanField(null=True, blank=True)
    # Encrypted like the result it is about: a warning may quote the result's text.
    warnings = EncryptedJSONField(
        default=list, blank=True, help_text="Result text that looks like instructions to the model."
    )
    purged_at = models.DateTimeField(
        null=True, blank=True, help_text="When arguments and result were removed (retention)."
    )
    # Encrypted too: an elicitation's text and an upstream error can echo the arguments.
    declined_requests = EncryptedJSONField(
        default=list,
        blank=True,
        help_text="Requests the server made during the call (sampling, elicitation) that "
        "Toolgate declined.",
    )
    error_code = models.CharField(max_length=40, blank=True)
    error_message = EncryptedTextField(blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)

    # Not a column: True on the very object a request stored as `running` to run it itself
    # (`_store` with `run_here`); `arun` then needs no claim, and takes the flag, so that one
    # object runs once.
    claimed_at_insert = False

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
            # The dashboard and the anomaly scan read time windows; the metrics read what
            # finished or was decided since their checkpoint; "never called before" is a seek.
            models.Index(fields=["requested_at"]),
            models.Index(fields=["finished_at"]),
            models.Index(fields=["decided_at"]),
            models.Index(fields=["agent", "server_name", "tool_name", "requested_at"]),
            # Re-attaching an MCP client's retry: the agent's calls with these arguments that
            # are not finished (NULL) or finished within MCP_REATTACH_WINDOW.
            models.Index(fields=["agent", "arguments_digest", "finished_at"]),
        ]

    def __str__(self):
        return f"#{self.pk} {self.server_name}/{self.tool_name} ({self.status})"

    def save(self, *args, **kwargs):
        if self.pk is None and not (self.arguments_size and self.arguments_digest):
            canonical = limits.canonical_json(self.arguments).encode()
            self.arguments_size = self.arguments_size or len(canonical)
            self.arguments_digest = self.arguments_digest or _digest(
                self.server_name, self.tool_name, canonical
            )
        if self.pk is None and not args and not kwargs:
            # The ORM's INSERT, its SQL built once per connection (integrations/statements.py):
            # every request stores its call.
            statements.insert(self)
        else:
            super().save(*args, **kwargs)

    @property
    def is_final(self):
        return self.status in FINAL_STATUSES

    def _transition(self, sources, target, where=None, refresh=True, **fields):
        """Move from one of `sources` to `target` (when the row also matches `where`) in one
        conditional UPDATE; True if this call moved it, False if something else got there
        (then this instance is read again, unless not `refresh`)."""
        fields["status"] = target
        # `ToolCall.objects.filter(…).update(…)`, its SQL built once per connection
        # (integrations/statements.py): a waited call's result is written here.
        filters = {"pk": self.pk, "status__in": list(sources), **(where or {})}
        changed = statements.update(ToolCall, filters, **fields)
        if changed:
            for name, value in fields.items():
                setattr(self, name, value)
            if target in FINAL_STATUSES:
                wakeup.ring(self.pk)
        elif refresh:
            self.refresh_from_db()
        return changed == 1

    @classmethod
    def twin_to_reattach(cls, agent, server_name, tool_name, arguments):
        """The agent's call of this tool, requested with exactly these arguments, that an MCP
        client's repeat of the call re-attaches to instead of queueing a second request for
        the approvers (and maybe running the tool twice), or None. That is a call that went to
        a human (only those have an expiry) and is not finished yet, or one the client was
        told is still pending (`hand_back`) and that finished within MCP_REATTACH_WINDOW:
        the repeat gets its outcome, once; a later repeat is a new call. Matched on the
        requested arguments, so an approver's edit doesn't break it."""
        since = timezone.now() - timedelta(seconds=settings.MCP_REATTACH_WINDOW)
        digest = _digest(server_name, tool_name, limits.canonical_json(arguments).encode())
        candidates = _TWIN_CANDIDATES.rows(agent=agent.pk, digest=digest, since=since)
        for twin in sorted(candidates, key=lambda call: call.pk, reverse=True):
            # The repeat takes the mark: only the next hand-back makes the call re-attachable
            # after it finished, and a finished call goes to the one repeat that cleared it.
            marked = cls.objects.filter(pk=twin.pk, handed_back_at__isnull=False)
            if twin.finished_at is None:
                if twin.handed_back_at:
                    marked.update(handed_back_at=None)
                return twin
            if marked.update(handed_back_at=None):
                return twin
        return None

    def hand_back(self):
        """An MCP client is told the call is still pending and to repeat it for the outcome."""
        ToolCall.objects.filter(pk=self.pk).update(handed_back_at=timezone.now())

    @property
    def edited(self):
        """Whether an approver changed the arguments before approving."""
        return self.requested_arguments is not None

    def approve(self, user, note="", arguments=None):
        """A human approves, optionally with edited `arguments`. False when it can't be: someone
        else decided first, it expired, or the policy now refuses it (it is then cancelled,
        with the reason). Edited arguments the policy refuses (schema, deny rules) raise
        `Refused` and leave the call pending, and so does a server that needs reconnecting
        (policy step 7: an admin's reconnect, not a cancellation, is the way out)."""
        refusal = self.refusal_now()
        if refusal and refusal.after_reconnect:
            raise Refused(refusal.status, refusal.code, refusal.message)
        if refusal:
            self.cancel_by_policy(refusal.reasons[0])
            return False
        now = timezone.now()
        approved = self._transition(
            [Status.PENDING_APPROVAL],
            Status.APPROVED,
            decided_by=DecidedBy.HUMAN,
            decided_by_user=user,
            decided_at=now,
            note=note,
            where={"expires_at__gt": now},
            **self._edit(arguments),
        )
        if approved:
            self.enqueue()
        else:
            self.expire_if_due()
        return approved

    def _edit(self, arguments):
        """The fields that record an approver's edit of the arguments ({} for no edit), once
        the policy has accepted the edited arguments."""
        if arguments is None or arguments == self.arguments:
            return {}
        decision = policy.decide(
            self.agent, self.tool, arguments,
            fingerprint=self.tool_fingerprint, requested_at=self.requested_at,
        )  # fmt: skip
        if decision.outcome == policy.Outcome.REFUSE:
            details = list(decision.details) or None
            raise Refused(decision.status, decision.code, decision.message, details)
        new = [r for r in decision.reasons_json() if r not in self.reasons]
        if decision.outcome == policy.Outcome.RUN:
            new = []  # the edit asks nothing of a human beyond this approval
        return {
            "arguments": arguments,
            "requested_arguments": self.arguments,
            "reasons": [*self.reasons, *new],
        }

    def approve_and_always_allow(self, user, scope, note="", arguments=None):
        """Approve, and create the allow rule of `scope` ({"agent": "this" | "every",
        "arguments": "any" | "same", "duration": a key of ALWAYS_ALLOW_DURATIONS}) for the
        next calls. Returns (approved, rule); no rule when the approval failed."""
        with transaction.atomic():
            if not self.approve(user, note, arguments):
                return False, None
            rule = PolicyRule.always_allow(self, user, **scope)
        return True, rule

    def refusal_now(self):
        """The policy again, with everything as it is now (the agent, its servers, the server,
        the tool, the rules): the refusing Decision if the call must not go ahead, else None.
        Checked when an approver decides and just before the worker runs the call."""
        self.agent = Agent.objects.get(pk=self.agent_id)
        tools = Tool.objects.select_related("server__oauth")
        self.tool = tools.filter(pk=self.tool_id).first()
        self.server = self.tool.server if self.tool else None
        decision = policy.decide(
            self.agent, self.tool, self.arguments, validate=False,
            fingerprint=self.tool_fingerprint, requested_at=self.requested_at,
        )  # fmt: skip
        return decision if decision.outcome == policy.Outcome.REFUSE else None

    def cancel_if_refused(self):
        """Cancel the pending call, with the reason, if the policy now refuses it for good (not
        only until its server is reconnected)."""
        decision = self.refusal_now()
        if not decision or decision.after_reconnect:
            return False
        return self.cancel_by_policy(decision.reasons[0])

    def cancel_by_policy(self, reason):
        """Cancel the pending call because of `reason` (a policy Reason), e.g. its agent was
        deactivated. True if this cancelled it."""
        now = timezone.now()
        return self._transition(
            [Status.PENDING_APPROVAL],
            Status.CANCELLED,
            decided_by=DecidedBy.POLICY,
            decided_at=now,
            finished_at=now,
            error_code=reason.code,
            error_message=reason.message,
            reasons=[*self.reasons, reason.as_json()],
        )

    def why_not_pending(self):
        """For an approver whose decision came too late, and the call page: what happened, in
        the words of the history ("Denied by alice at 12:03:04: not today.")."""
        if self.status == Status.EXPIRED:
            return "This request expired before a decision; nothing was run."
        if self.status == Status.CANCELLED and self.decided_by == DecidedBy.POLICY:
            return f"Cancelled by the policy: {self.error_message}"
        if self.status == Status.CANCELLED:
            return "The agent cancelled this request."
        if self.status == Status.BLOCKED:
            return f"Blocked by the policy: {self.error_message}"
        if self.decided_by == DecidedBy.HUMAN:
            return self.human_decision()
        return f"This request is {self.get_status_display().lower()}."

    def human_decision(self):
        """ "Denied by alice at 12:03:04: not today." (the approver's time zone is the site's)."""
        who = self.decided_by_user.get_username() if self.decided_by_user else "an approver"
        verb = "Denied" if self.status == Status.DENIED else "Approved"
        at = timezone.localtime(self.decided_at).strftime("%H:%M:%S")
        return f"{verb} by {who} at {at}" + (f": {sentence(self.note)}" if self.note else ".")

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
        """Claim the call and run it once (in a worker). Returns True when it should be retried
        later.

        Only errors that prove the request never reached the server put the call back to
        `approved` for a retry (and not those only a human can fix, such as a server that
        needs reconnecting); anything else is final, so a call is never run twice.
        """
        if not self._claim():
            return False
        declined = []
        try:
            result = mcp_client.call_tool(
                self.server.endpoint(),
                self.tool.name,  # the stored full name, which the fingerprint check vouched for
                self.arguments,
                transport=self.server.server_info.get("transport"),
                on_declined=declined.append,
                pooled=True,  # on this process's loop thread, on an open session if one is idle
            )
        except Exception as exc:
            return self._record_failure(exc, declined)
        self._record(result, declined)
        return False

    async def arun(self, *, on_progress=None, on_log=None, on_outcome=None):
        """`run()` in the caller's event loop, for an agent waiting in the web process: the same
        claim (`approved → running`) and finish transitions, so exactly-once holds. A web
        process lost mid-call leaves the call `running`, and the sweeper makes it `unknown`.
        A call that must be retried (it never reached the server) goes to a worker.

        A call this very request stored as `running` (`claimed_at_insert`: the policy decided
        it moments ago, from the rows as they are) is not claimed again, nor the policy asked
        again: the insert was its claim.

        `on_outcome()`, if given, is called once a result of at most REPLY_BEFORE_RECORD_BYTES
        is on this instance as it is about to be recorded, before it is (approvals/running.py:
        the agent's reply need not wait for the record's commit). A larger result, and any
        failure, are recorded first.
        """
        if self.claimed_at_insert:
            self.claimed_at_insert = False
        elif not await sync_to_async(self._claim)():
            return
        declined = []
        try:
            endpoint = await self._aendpoint()
            result = await mcp_client.acall_tool(
                endpoint,
                self.tool.name,  # the stored full name, which the fingerprint check vouched for
                self.arguments,
                transport=self.server.server_info.get("transport"),
                on_progress=on_progress,
                on_log=on_log,
                on_declined=declined.append,
            )
        except Exception as exc:
            retry = await sync_to_async(self._record_failure)(exc, declined)
            if retry:
                await sync_to_async(self.enqueue)()
            return
        if on_outcome is None or not _small(result):
            await self._arecord(result, declined)
            return
        # Small: its warnings are found here, in the loop, at about a query's cost. Only this
        # run moves a `running` call on, bar the sweeper after TOOL_CALL_LOST_AFTER, long past
        # any call here (MCP_CALL_TIMEOUT): the record will store exactly what is set here.
        fields = self._finished(**self._result_fields(result, declined))
        for name, value in {**fields, "status": Status.SUCCEEDED}.items():
            setattr(self, name, value)
        on_outcome()
        try:  # not read again if something else moved the call: the reply is made from `self`
            recorded = await sync_to_async(self._transition)(
                [Status.RUNNING], Status.SUCCEEDED, refresh=False, **fields
            )
        except Exception:  # the agent has its result; the sweeper will make the call `unknown`
            logger.exception("Tool call %s ran, but its result could not be recorded", self.pk)
            return
        if not recorded:
            logger.warning(
                "Tool call %s ran and its agent has the result, but the call was no longer "
                "running when the result was to be recorded (the sweeper?): not stored",
                self.pk,
            )

    async def _arecord(self, result, declined):
        """`_record` from the loop, with a result over SCAN_IN_HOP_BYTES scanned for warnings
        off the shared database thread first."""
        if result.size is not None and result.size <= SCAN_IN_HOP_BYTES:
            await sync_to_async(self._record)(result, declined)
            return
        fields = await sync_to_async(self._result_fields, thread_sensitive=False)(result, declined)
        await sync_to_async(self._finish)(Status.SUCCEEDED, **fields)

    async def _aendpoint(self):
        if self.server.uses_oauth:
            # endpoint() may renew an OAuth token, which waits on the authorization server.
            return await sync_to_async(self.server.endpoint, thread_sensitive=False)()
        return self.server.endpoint()  # no database, no network: not worth a thread

    def _claim(self, recheck=True):
        """Take the call from `approved` to `running` and ask the policy again (unless not
        `recheck`); False when someone else has it, it is no longer approved, or the policy
        now refuses it (then it failed, with the reason)."""
        if not self._transition([Status.APPROVED], Status.RUNNING, started_at=timezone.now()):
            return False
        refusal = self.refusal_now() if recheck else None
        if refusal:
            reasons = [*self.reasons, *refusal.reasons_json()]
            self._finish(
                Status.FAILED,
                error_code=refusal.code,
                error_message=refusal.message,
                reasons=reasons,
            )
            return False
        return True

    def _record(self, result, declined=()):
        self._finish(Status.SUCCEEDED, **self._result_fields(result, declined))

    @staticmethod
    def _result_fields(result, declined=()):
        return {
            "result_content": result.content,
            "structured_content": result.structured_content,
            "is_error": result.is_error,
            "warnings": _result_warnings(result),
            "declined_requests": list(declined),
        }

    def _record_failure(self, exc, declined=()):
        """Write a failed run onto the row; True when it never reached the server and may be
        retried."""
        if isinstance(exc, SoftTimeLimitExceeded):  # the worker's limit, not the server's
            exc = mcp_client.McpError(
                "timeout",
                f"The call ran past the worker's time limit ({settings.TOOL_CALL_TIME_LIMIT} s)."
                " It may have reached the server; it will not be run again on its own.",
            )
        elif not isinstance(exc, mcp_client.McpError):
            logger.error("Tool call %s failed unexpectedly", self.pk, exc_info=exc)
            exc = mcp_client.McpError("internal", "Internal error.")
        if declined:
            ToolCall.objects.filter(pk=self.pk).update(declined_requests=list(declined))
        return self._failed(exc)

    def _failed(self, exc):
        retryable = exc.retryable and self.attempts + 1 < settings.TOOL_CALL_MAX_ATTEMPTS
        if retryable:
            moved = self._transition(
                [Status.RUNNING], Status.APPROVED, attempts=self.attempts + 1, started_at=None
            )
            return moved
        self._finish(Status.FAILED, error_code=exc.code, error_message=exc.message)
        return False

    def _finish(self, status, **fields):
        self._transition([Status.RUNNING], status, **self._finished(**fields))

    def _finished(self, **fields):
        """The fields a run's end writes, besides the status."""
        return {"finished_at": timezone.now(), "attempts": self.attempts + 1, **fields}

    @classmethod
    def purge_old_data(cls, days=None):
        """Remove arguments and results of calls finished more than `days` ago. Who called which
        tool, when, who decided and the outcome stay in the audit trail."""
        days = settings.TOOL_CALL_RETENTION_DAYS if days is None else days
        cutoff = timezone.now() - timedelta(days=days)
        return cls.objects.filter(finished_at__lt=cutoff, purged_at__isnull=True).update(
            arguments={},
            arguments_digest="",
            requested_arguments=None,
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


def _small(result):
    return result.size is not None and result.size <= REPLY_BEFORE_RECORD_BYTES


def _result_warnings(result):
    """Text in a tool's result that looks like instructions to the model (prompt injection),
    and whether the result was cut to the size a stored result may have."""
    text = "\n".join(
        block.get("text", "") for block in result.content if block.get("type") == "text"
    )
    if result.structured_content:
        text += "\n" + json.dumps(result.structured_content, ensure_ascii=False)
    warnings = scanner.scan_result_text(text)
    if result.truncated_from:
        limit = settings.MCP_MAX_RESULT_BYTES
        message = (
            f"The result was {result.truncated_from:,} bytes, over the {limit:,}-byte limit: "
            "only its start was kept."
        )
        warnings.append({"code": "result_truncated", "message": message, "field": "result"})
    return warnings


class Refused(Exception):
    """A tool-call request the policy refused; `status` is the HTTP status to answer with."""

    def __init__(self, status, code, message, details=None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details = details or None


def request_tool_call(
    agent, server_name, tool_name, arguments, idempotency_key="", run_here=False, reattach=False
):
    """Decide a new request by the policy and store it, with the policy's reasons. Returns
    (call, created). The one request path of every entry point; the web process's (JSON API,
    MCP endpoint) is `arequest_tool_call`, the same steps.

    A refused request raises `Refused` and leaves only a `blocked` call behind, for the audit.
    An auto-approved call is enqueued for a worker after commit, unless `run_here`: then it is
    stored already claimed (`running`, `claimed_at_insert`) and the caller runs it itself
    (`await call.arun()`); should the caller never get to run it, the sweeper makes it
    `unknown` like any call lost mid-run. With `reattach`, the agent's `twin_to_reattach` of
    the request, if any, is returned instead of a new call (the MCP endpoint's retries).
    """
    request = _open_request(agent, server_name, tool_name, arguments, idempotency_key)
    if request.undecided:
        request.decide()
    return _close_request(request, run_here, reattach)


async def arequest_tool_call(
    agent,
    server_name,
    tool_name,
    arguments,
    idempotency_key="",
    run_here=False,
    reattach=False,
    try_here=False,
):
    """`request_tool_call` for the web process, where all API database work shares one thread
    (config/asgi.py): the decision, whose cost the server's schema, the agent's arguments and
    the rules' conditions set (schema validation, personal data, CEL), runs on the validation
    threads instead, bounded by its deadline, so no request waits behind another's.

    With `reattach` (see `afinish_tool_call`), a retry re-attaches to its pending twin; with
    `try_here`, a cheap decision is made in the hop that stores the call."""
    request = await sync_to_async(_open_request)(
        agent, server_name, tool_name, arguments, idempotency_key
    )
    return await afinish_tool_call(request, run_here, reattach, try_here)


async def afinish_tool_call(request, run_here=False, reattach=False, try_here=False):
    """The rest of `arequest_tool_call` for a request `open_tool_call` looked up: the decision
    on the validation threads, then the call stored (one hop). A caller already on the
    database thread may first try `request.decide_here()` and, if it decided,
    `request.close(run_here)` there instead. With `try_here` (a caller that has no hop of its
    own to try it in: the MCP endpoint's `tools/call`), a request with no rule conditions is
    first decided in the hop that stores it, when `decide_here` allows (one hop fewer); past
    its budget, on the validation threads as before.

    With `reattach`, the agent's `twin_to_reattach` of the request, if any, is returned instead
    of a new call, looked up in the hop that would store the new one; and one agent's requests
    are decided and stored one at a time in this process, so identical calls sent at once (a
    client retrying without waiting, several of its sessions) re-attach to one pending call
    instead of each queueing one for the approvers. The decision of an agent's calls already
    runs one at a time (`off_the_shared_thread`)."""
    if not reattach:
        return await _afinish(request, run_here, try_here=try_here)
    locks = _REATTACH_LOCKS.setdefault(asyncio.get_running_loop(), {})
    async with locks.setdefault(request.call.agent_id, anyio.Lock()):
        return await _afinish(request, run_here, reattach=True, try_here=try_here)


# event loop -> {agent pk: the lock its re-attaching requests take}; a lock is bound to a loop
_REATTACH_LOCKS = weakref.WeakKeyDictionary()


async def _afinish(request, run_here, reattach=False, try_here=False):
    from approvals.validation import InvalidArguments, off_the_shared_thread

    if try_here and request.undecided and request.rules == []:  # else `decide_here` won't
        stored = await running.hop_that_stores(request.close_if_cheap, run_here, reattach)
        if stored is not None:
            return stored
    if request.undecided:
        try:
            await off_the_shared_thread(request.call.agent_id, request.decide)
        except InvalidArguments as exc:  # the check overran its own deadline
            request.decision = policy.schema_refusal(exc)
    return await running.hop_that_stores(request.close, run_here, reattach)


@dataclass
class _Request:
    """A request between its steps: looked up (database), decided (no database: it may run on
    a validation thread, or where it is when provably cheap), then stored (database)."""

    call: ToolCall
    existing: bool = False  # a call already stored for the idempotency key
    decision: "policy.Decision | None" = None
    rules: list | None = None

    @property
    def undecided(self):
        return not self.existing and self.decision is None

    def decide(self):
        call = self.call
        with _no_queries():
            self.decision = policy.decide(
                call.agent, call.tool, call.arguments, rules=self.rules, assigned=True
            )

    def decide_here(self):
        """Decide on this thread if that is provably cheap, and say whether it is decided.

        For the JSON API's first hop to the shared database thread, where nothing whose cost
        a server or an agent controls may run (config/asgi.py): then the call is stored in the
        same hop (`close`), two hops fewer than by the validation threads (issue 11). Cheap
        means no rule conditions to evaluate (CEL over the arguments), and the schema check
        `within_budget` (small arguments and schema, the validator already built, 1 ms of CPU);
        otherwise nothing is decided here and `afinish_tool_call` decides as before."""
        from approvals.validation import OverBudget, within_budget

        if not self.undecided:
            return True
        if self.rules is None or self.rules:
            return False
        try:
            with within_budget():
                self.decide()
        except OverBudget:
            self.decision = None
            return False
        return True

    def close(self, run_here=False, reattach=False):
        """Store the decided request (database): (call, created), or raise `Refused`."""
        return _close_request(self, run_here, reattach)

    def close_if_cheap(self, run_here=False, reattach=False):
        """`close` if `decide_here` decided (on the database thread): (call, created), or raise
        `Refused`; None if the decision is left to the validation threads."""
        return self.close(run_here, reattach) if self.decide_here() else None


@contextmanager
def _no_queries():
    """Fail loudly if the decision reaches for the database: on a validation thread it would
    open a connection of its own, outside the request's."""

    def refuse(execute, sql, params, many, context):
        raise RuntimeError("The policy's decision must not query the database here.")

    with connection.execute_wrapper(refuse):
        yield


def open_tool_call(agent, server_name, tool_name, arguments, idempotency_key=""):
    """The first step of `arequest_tool_call` without re-attaching (database work only, no
    decision), for a caller that does it in a hop of its own (the JSON API: with the agent's
    lookup); `afinish_tool_call` does the rest. Raises `Refused`."""
    return _open_request(agent, server_name, tool_name, arguments, idempotency_key)


def _open_request(agent, server_name, tool_name, arguments, idempotency_key):
    """Look the request up: the call already stored for its idempotency key, or a new call
    (unsaved) with everything its decision needs loaded, or the refusal found on the way.
    Checks what was sent before any query uses it."""
    refused = _unusable_request(server_name, tool_name, arguments)
    if refused:
        raise refused  # nothing can match it or store it; no column is cut to fit it
    if idempotency_key:
        existing = ToolCall.objects.filter(agent=agent, idempotency_key=idempotency_key).first()
        if existing:
            _check_same_request(existing, server_name, tool_name, arguments)
            return _Request(existing, existing=True)
    server, tool, decision = policy.find_tool(agent, server_name, tool_name)
    call = ToolCall(
        agent=agent,
        server=server,
        tool=tool,
        server_name=server_name,
        tool_name=tool_name,
        tool_fingerprint=tool.fingerprint if tool else "",
        arguments=arguments,
        idempotency_key=idempotency_key,
    )
    if decision is not None:
        return _Request(call, decision=decision)
    # The decision reads no more rows: the tool was found through the agent's servers
    # (`assigned`), and its rules are read now (none, without a query, if the server has none).
    return _Request(call, rules=policy.applicable_rules(agent, tool))


def _check_same_request(call, server_name, tool_name, arguments):
    """A key names one request: reused for another tool or other arguments, it is refused
    rather than answered with the first call, which the agent would take for the new one's."""
    sent = call.requested_arguments if call.edited else call.arguments
    same = (call.server_name, call.tool_name) == (server_name, tool_name)
    if not same or limits.canonical_json(sent) != limits.canonical_json(arguments):
        raise Refused(
            409, "idempotency_key_reused",
            f"This idempotency key was already used for another request (call {call.pk}): "
            "use a new key for a new request.",
        )  # fmt: skip


def _close_request(request, run_here, reattach=False):
    """Store the decided request (or refuse it), unless it was already stored: the call of its
    idempotency key or, with `reattach`, its twin (looked up first: whatever the decision, a
    retry of a call that went to a human gets that call)."""
    call, decision = request.call, request.decision
    if request.existing:
        return call, False
    if reattach:
        twin = ToolCall.twin_to_reattach(
            call.agent, call.server_name, call.tool_name, call.arguments
        )
        if twin:
            return twin, False
    call.reasons = decision.reasons_json()
    if decision.outcome == policy.Outcome.REFUSE:
        refused = Refused(decision.status, decision.code, decision.message, list(decision.details))
        _block(call, refused)
        raise refused
    return _store(call, decision, run_here)


def sentence(text):
    """`text` ending with a full stop unless it already ends a sentence."""
    text = text.rstrip()
    return text if text.endswith((".", "!", "?", "…")) else text + "."


def _digest(server_name, tool_name, canonical_arguments):
    """HMAC-SHA256, keyed by SECRET_KEY, of a call's server, tool and canonical arguments:
    equal for equal requests, and no help in guessing arguments without the key."""
    names = json.dumps([server_name, tool_name]).encode()  # no raw NUL: unambiguous
    value = names + b"\0" + canonical_arguments
    return salted_hmac(DIGEST_SALT, value, algorithm="sha256").hexdigest()


DIGEST_SALT = "approvals.ToolCall.arguments_digest"


MAX_TOOL_NAME = 128  # the MCP naming rules; longer names are refused at sync


def _unusable_request(server_name, tool_name, arguments):
    """A request no server, tool or row could take, whatever the entry point (the JSON API,
    the MCP endpoint): a name too long for its column or the MCP rules, or a name or
    arguments the database or a JSON encoder would refuse (`limits.unstorable`)."""
    for what, value in (("server", server_name), ("tool", tool_name), ("arguments", arguments)):
        problem = limits.unstorable(value)
        if problem:
            return Refused(400, "bad_request", f"{what} can't be used: {problem}.")
    server_limit = McpServer._meta.get_field("name").max_length
    if len(server_name) > server_limit:
        return Refused(400, "bad_request", f"server must be at most {server_limit} characters.")
    if len(tool_name) > MAX_TOOL_NAME:
        return Refused(
            400, "bad_request", f"tool must be at most {MAX_TOOL_NAME} characters (the MCP limit)."
        )
    return None


def _block(call, refused):
    now = timezone.now()
    call.status, call.decided_by, call.decided_at, call.finished_at = (
        Status.BLOCKED, DecidedBy.POLICY, now, now
    )  # fmt: skip
    call.error_code, call.error_message = refused.code, refused.message
    call.idempotency_key = ""  # a refused request must not claim the key
    if refused.code in (policy.Code.INVALID_ARGUMENTS, policy.Code.VALIDATION_TIMEOUT):
        call.arguments = {}  # may be huge or malformed; the error says what was wrong
    call.save()


def _store(call, decision, run_here):
    now = timezone.now()
    if decision.outcome == policy.Outcome.RUN:
        call.status, call.decided_by, call.decided_at = Status.APPROVED, DecidedBy.AUTO, now
        if run_here:
            # Stored already claimed, in the insert's own commit: no worker, sweeper or other
            # request can claim a row that was never `approved`, and this request runs it
            # (`arun`) without a claim of its own. Lost with its web process, it stays
            # `running` and the sweeper makes it `unknown`, like a call whose worker vanished.
            call.status, call.started_at = Status.RUNNING, now
    else:
        call.status = Status.PENDING_APPROVAL
        call.expires_at = now + timedelta(seconds=settings.APPROVAL_TIMEOUT)
    try:
        # Only a key can make the insert fail for a race (below); a savepoint for it, so that
        # a caller's transaction survives. Without one, the insert is its own commit.
        with transaction.atomic() if call.idempotency_key else nullcontext():
            call.save()
    except Exception:
        # Two requests with one idempotency key raced; the first one stored wins.
        if call.idempotency_key:
            existing = ToolCall.objects.filter(
                agent=call.agent, idempotency_key=call.idempotency_key
            ).first()
            if existing:
                _check_same_request(existing, call.server_name, call.tool_name, call.arguments)
                return existing, False
        raise
    call.claimed_at_insert = call.status == Status.RUNNING
    if call.claimed_at_insert:
        running.stored_to_run(call)  # run even if the request is cancelled before it can
    if call.status == Status.PENDING_APPROVAL:
        notify("call.pending", call)
    elif call.status == Status.APPROVED:
        call.enqueue()
    return call, True


def _twin_candidates(filters):
    not_finished = models.Q(finished_at__isnull=True, status__in=LIVE_STATUSES)
    handed_back = models.Q(finished_at__gte=filters.sentinel("since"), handed_back_at__isnull=False)
    # Only the digest index, so that no call's large arguments are read: the digest names the
    # server and the tool (their columns would steer the planner to the (agent, server_name,
    # tool_name, …) index), and the few candidates are ordered by the caller (ORDER BY id would
    # steer it to (agent, id)).
    return ToolCall.objects.filter(
        not_finished | handed_back,
        agent=filters.sentinel("agent"), arguments_digest=filters.sentinel("digest"),
        expires_at__isnull=False,
    ).only("pk", "finished_at", "handed_back_at").order_by()[:20]  # fmt: skip


# `twin_to_reattach`'s query, its SQL built once per connection (integrations/statements.py):
# every MCP `tools/call` asks it first.
_TWIN_CANDIDATES = statements.Query(
    _twin_candidates,
    agent=Agent._meta.pk,
    digest=ToolCall._meta.get_field("arguments_digest"),
    since=ToolCall._meta.get_field("finished_at"),
)


class AnomalyKind(models.TextChoices):
    CALL_RATE = "call_rate", "Calls far above the usual rate"
    REFUSALS = "refusals", "Burst of refusals"
    NEW_TOOL = "new_tool", "Tool never called before"
    PERSONAL_DATA = "personal_data", "Spike of personal-data warnings"
    OFF_HOURS = "off_hours", "Calls outside usual hours"
    LARGE_ARGUMENTS = "large_arguments", "Arguments far larger than usual"


class Anomaly(models.Model):
    """An unusual pattern in the audit trail, found by the periodic scan (approvals/anomalies.py).

    `key` names the pattern (kind, subject and window), so a pattern that several scans see is
    stored, and announced, once; later scans only refresh its numbers.
    """

    kind = models.CharField(max_length=20, choices=AnomalyKind)
    key = models.CharField(max_length=64, unique=True, editable=False)
    agent = models.ForeignKey(
        Agent, null=True, blank=True, on_delete=models.SET_NULL, related_name="anomalies"
    )
    server_name = models.CharField(max_length=100, blank=True)
    tool_name = models.CharField(max_length=200, blank=True)
    window_start = models.DateTimeField()
    window_end = models.DateTimeField()
    numbers = models.JSONField(default=dict, help_text="What was seen, against what is usual.")
    first_seen_at = models.DateTimeField(default=timezone.now)
    last_seen_at = models.DateTimeField(default=timezone.now)
    acknowledged_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    acknowledged_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-first_seen_at", "-id"]
        verbose_name_plural = "anomalies"
        indexes = [models.Index(fields=["first_seen_at"])]

    def __str__(self):
        return f"{self.get_kind_display()}: {self.subject}"

    def get_absolute_url(self):
        return reverse("approvals:anomaly", args=[self.pk])

    @property
    def server_id(self):
        """The server it concerns, if any, for notification channels filtered by server."""
        if not self.server_name:
            return None
        return McpServer.objects.filter(name=self.server_name).values_list("pk", flat=True).first()

    @property
    def subject(self):
        """Who or what behaved unusually, in words."""
        tool = f"{self.server_name} / {self.tool_name}" if self.tool_name else self.server_name
        if self.agent_id and tool:
            return f"{self.agent.name} on {tool}"
        return self.agent.name if self.agent_id else tool

    @property
    def summary(self):
        """One sentence for a person: what was seen, against what is usual."""
        from approvals.anomalies import summary

        return summary(self)

    def calls(self):
        """The tool calls behind this anomaly, newest first."""
        from approvals.anomalies import calls_behind

        return calls_behind(self)

    def acknowledge(self, user):
        """A human has looked at it. False when someone already had."""
        now = timezone.now()
        rows = Anomaly.objects.filter(pk=self.pk, acknowledged_at__isnull=True)
        if rows.update(acknowledged_by=user, acknowledged_at=now) != 1:
            self.refresh_from_db()
            return False
        self.acknowledged_by, self.acknowledged_at = user, now
        return True


class MetricTotals(models.Model):
    """Running totals of the audit trail up to `through`, kept by approvals/metrics.py so that a
    Prometheus scrape only aggregates what happened since (docs/architecture.md, "Metrics")."""

    through = models.DateTimeField()
    totals = models.JSONField(default=dict)

    def __str__(self):
        return f"Metric totals through {self.through:%Y-%m-%d %H:%M}"


# Last: the notification models live in their own module and register here, with the app.
from approvals.notifications import Delivery, NotificationChannel, notify  # noqa: E402, F401
