"""Telling approvers: notification channels, the delivery log, and `notify()`, the one seam.

`notify(event, obj)` is what the rest of Toolgate calls when something needs a person. It
writes one `Delivery` per enabled channel that wants the event (and whose server and agent
filters match), and enqueues `flush_notifications` for each after commit, on the
`notifications` queue. The request or task that called it never waits on a mail server.

A channel sends at most one message per `NOTIFY_BATCH_SECONDS`: the first delivery goes out at
once and claims the window (a conditional UPDATE on `batch_until`); what arrives during the
window goes out as one digest when it ends. Each message is retried with backoff and jitter
for transient failures only (`approvals/channels.py` says which), every attempt recorded on
its deliveries.

Events and the object each is about:

- `call.pending`, `call.reminder`, `call.unknown`: a `ToolCall`;
- `tool.needs_review`: a `Tool`;
- `server.sync_failing`: an `McpServer`;
- `anomaly` (and any later event): any model instance with `get_absolute_url()` (the path of
  the page where a person acts on it) and `summary` (one line of text); optional `server_id`
  and `agent_id` attributes let channel filters apply to it.

Channel filters narrow the events that concern a server or an agent: an event that concerns
no agent (a tool to review, a failing sync) passes an agent filter, and likewise for servers.
"""

import logging
import uuid
from datetime import timedelta

from django.apps import apps
from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from integrations.fields import EncryptedTextField
from integrations.mcp_client import Endpoint
from integrations.models import Agent, McpServer
from integrations.queueing import enqueue_on_commit

logger = logging.getLogger(__name__)

EVENTS = {
    "call.pending": "A call needs a human",
    "call.reminder": "A call is still waiting (reminder, once)",
    "call.unknown": "A worker was lost mid-call",
    "tool.needs_review": "A tool is new, changed or flagged at a sync",
    "server.sync_failing": "A server's sync keeps failing",
    "anomaly": "An unusual approval pattern",
}
TEST_EVENT = "test"  # "Send a test message": never subscribed to, always sent when asked
DIGEST_MAX = 100  # deliveries in one message; more wait for the next window


class ChannelKind(models.TextChoices):
    EMAIL = "email", "E-mail"
    SLACK = "slack", "Slack (incoming webhook)"
    WEBHOOK = "webhook", "Webhook (signed JSON)"


class DeliveryStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    SENDING = "sending", "Sending"
    SENT = "sent", "Sent"
    FAILED = "failed", "Failed"
    SKIPPED = "skipped", "Skipped"


def all_events():
    return list(EVENTS)


class NotificationChannel(models.Model):
    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=10, choices=ChannelKind)
    recipients = models.JSONField(
        "e-mail addresses", default=list, blank=True, help_text="For e-mail channels."
    )
    url = EncryptedTextField(
        "URL", blank=True, help_text="Slack incoming-webhook or webhook URL: stored encrypted."
    )
    secret = EncryptedTextField(
        "signing secret", blank=True, help_text="Webhooks: signs every body. Stored encrypted."
    )
    events = models.JSONField(default=all_events)
    servers = models.ManyToManyField(
        McpServer, blank=True, related_name="+", help_text="Only these servers (none: all)."
    )
    agents = models.ManyToManyField(
        Agent, blank=True, related_name="+", help_text="Only these agents (none: all)."
    )
    enabled = models.BooleanField(default=True)
    include_arguments = models.BooleanField(
        default=False,
        help_text="Put the calls' argument values in messages. Off: only which kinds of "
        "personal data were detected.",
    )
    allow_private_network = models.BooleanField(
        default=False, help_text="Allow a URL on loopback, private or link-local addresses."
    )
    allow_http = models.BooleanField(
        "allow plain HTTP", default=False, help_text="Allow an http:// URL (sent unencrypted)."
    )
    batch_until = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    @property
    def origin(self):
        """Scheme and host of the URL: the only part of it that is safe to show."""
        return Endpoint(url=self.url).origin if self.url else ""

    @property
    def target(self):
        """Where messages go, safe to show: the addresses, or the URL's origin."""
        if self.kind == ChannelKind.EMAIL:
            return ", ".join(self.recipients)
        return f"{self.origin}/…" if self.url else ""

    def redact(self, text):
        """`text` without this channel's URL (path, query) or signing secret."""
        if not self.url:
            return text
        return Endpoint(url=self.url, headers={"secret": self.secret or ""}).redact(text)

    def wants(self, event, server_id, agent_id):
        """Whether this channel asked for `event` about this server and agent. Uses the
        prefetched `servers` and `agents`."""
        if not self.enabled or event not in self.events:
            return False
        servers = {server.pk for server in self.servers.all()}
        agents = {agent.pk for agent in self.agents.all()}
        if servers and server_id is not None and server_id not in servers:
            return False
        return not (agents and agent_id is not None and agent_id not in agents)

    def claim_window(self):
        """Claim the right to send now: True unless a message went out less than
        NOTIFY_BATCH_SECONDS ago (then `batch_until` says when the window ends)."""
        now = timezone.now()
        claimed = (
            NotificationChannel.objects.filter(pk=self.pk)
            .filter(Q(batch_until__isnull=True) | Q(batch_until__lte=now))
            .update(batch_until=now + timedelta(seconds=settings.NOTIFY_BATCH_SECONDS))
        )
        if not claimed:
            self.refresh_from_db(fields=["batch_until"])
        return claimed == 1

    def flush(self):
        """Put what is queued for this channel into one message. Returns the message id, None
        when there is nothing to send, or the time to try again when the window is taken."""
        queued = self.deliveries.filter(status=DeliveryStatus.QUEUED)
        if not queued.exists():
            return None
        if not self.claim_window():
            return self.batch_until
        ids = list(queued.order_by("pk").values_list("pk", "delivery_id")[:DIGEST_MAX])
        if not ids:
            # Sent by a flush whose window ended while this one waited. Keep the window: giving
            # it back (batch_until=None) could let a flush that just failed to claim it read
            # None as "nothing to wait for", and drop its deliveries.
            return None
        message_id = ids[0][1] if len(ids) == 1 else uuid.uuid4()
        Delivery.objects.filter(pk__in=[pk for pk, _ in ids], status=DeliveryStatus.QUEUED).update(
            status=DeliveryStatus.SENDING, message_id=message_id, updated_at=timezone.now()
        )
        return message_id

    def send_test(self):
        """Send a test message now, once, and return its delivery (sent or failed). For the
        admin action and `notification_channel test`: the person asking sees the outcome."""
        from approvals import channels

        delivery = Delivery.about(
            self, channel=self, event=TEST_EVENT, summary=f"Test message to {self.name}"
        )
        delivery.status, delivery.message_id = DeliveryStatus.SENDING, delivery.delivery_id
        delivery.save()
        channels.send_message(self, [delivery], final=True)
        delivery.refresh_from_db()
        return delivery


class Delivery(models.Model):
    """One event for one channel: the delivery log. Deliveries sent together (a digest) share
    a `message_id`; a message of one delivery uses its `delivery_id`."""

    delivery_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    channel = models.ForeignKey(
        NotificationChannel, on_delete=models.CASCADE, related_name="deliveries"
    )
    event = models.CharField(max_length=40)
    # What it is about, as "app_label.model" and primary key (not a generic foreign key: its
    # content-type ids are cached per process, and the object may be gone by the time we send).
    object_type = models.CharField(max_length=100, blank=True)
    object_id = models.PositiveBigIntegerField(null=True)
    summary = models.CharField(max_length=300, blank=True)
    status = models.CharField(
        max_length=10, choices=DeliveryStatus, default=DeliveryStatus.QUEUED, db_index=True
    )
    message_id = models.UUIDField(null=True, blank=True, db_index=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "deliveries"
        indexes = [models.Index(fields=["channel", "status"])]

    def __str__(self):
        return f"{self.event} to {self.channel} ({self.status})"

    @classmethod
    def about(cls, obj, **fields):
        return cls(object_type=obj._meta.label_lower, object_id=obj.pk, **fields)

    @property
    def obj(self):
        """What the delivery is about, fetched again (None when it was deleted)."""
        if not self.object_type:
            return None
        model = apps.get_model(self.object_type)
        return model.objects.filter(pk=self.object_id).first()


def notify(event, obj):
    """Queue `event` about `obj` for every channel that wants it; sent after commit."""
    from approvals.channels import subject_of

    server_id, agent_id, summary = subject_of(event, obj)
    channels = NotificationChannel.objects.filter(enabled=True).prefetch_related(
        "servers", "agents"
    )
    for channel in channels:
        if channel.wants(event, server_id, agent_id):
            Delivery.about(obj, channel=channel, event=event, summary=summary[:300]).save()
            enqueue_on_commit(_flush_task(), channel.pk)


def _flush_task():
    from approvals.tasks import flush_notifications

    return flush_notifications


def send_reminders():
    """`call.reminder` for calls pending longer than APPROVAL_REMINDER_AFTER, once each: the
    conditional UPDATE of `reminded_at` lets only one run remind a call."""
    from approvals.models import Status, ToolCall

    now = timezone.now()
    due = ToolCall.objects.filter(
        status=Status.PENDING_APPROVAL,
        reminded_at__isnull=True,
        requested_at__lte=now - timedelta(seconds=settings.APPROVAL_REMINDER_AFTER),
        expires_at__gt=now,
    )
    reminded = 0
    for call in due.select_related("agent")[:500]:
        claimed = ToolCall.objects.filter(
            pk=call.pk, status=Status.PENDING_APPROVAL, reminded_at__isnull=True
        ).update(reminded_at=now)
        if claimed:
            notify("call.reminder", call)
            reminded += 1
    return reminded


def resend_stalled():
    """The safety net: flush channels whose deliveries were never flushed (the broker was down
    at commit), and put back messages whose worker vanished between retries (sent again: a
    receiver may see one twice, with the same delivery id)."""
    now = timezone.now()
    late = now - timedelta(seconds=settings.NOTIFY_BATCH_SECONDS + 60)
    lost = now - timedelta(minutes=15)
    Delivery.objects.filter(status=DeliveryStatus.SENDING, updated_at__lt=lost).update(
        status=DeliveryStatus.QUEUED, message_id=None, updated_at=now
    )
    channel_ids = set(
        Delivery.objects.filter(status=DeliveryStatus.QUEUED, updated_at__lt=late).values_list(
            "channel_id", flat=True
        )
    )
    for channel_id in channel_ids:
        _flush_task().delay(channel_id)
    return len(channel_ids)
