"""Celery tasks for tool calls and notifications. They take a primary key (or a message id)
and are safe to receive twice: work is claimed with a conditional UPDATE, so a redelivered
message finds nothing to do."""

import random
from datetime import datetime

from celery import shared_task
from django.conf import settings
from django.db import OperationalError as DatabaseOperationalError
from django.utils import timezone

from approvals import anomalies, metrics, notifications
from approvals.channels import TransientDeliveryError, send_message
from approvals.models import ToolCall
from approvals.notifications import Delivery, DeliveryStatus, NotificationChannel


@shared_task(bind=True, max_retries=None)
def run_tool_call(self, call_id):
    call = ToolCall.objects.filter(pk=call_id).first()
    if call is None:
        return
    if call.run():
        # The request provably never reached the server: try again later, with jitter. The
        # number of attempts is bounded by TOOL_CALL_MAX_ATTEMPTS on the call itself.
        countdown = min(2**call.attempts, 60) + random.uniform(0, 1)  # noqa: S311
        raise self.retry(countdown=countdown)


@shared_task
def sweep_tool_calls():
    return ToolCall.sweep()


@shared_task
def purge_tool_call_data():
    return ToolCall.purge_old_data()


@shared_task(
    autoretry_for=(DatabaseOperationalError,),
    retry_backoff=1,
    retry_backoff_max=30,
    retry_jitter=True,
    max_retries=8,
)
def flush_notifications(channel_id):
    """Send what is queued for a channel now, or once its digest window ends.

    Retried on database errors ("database is locked" once SQLite's busy timeout is spent, a
    dropped connection): a flush that failed is often the only one enqueued for its deliveries,
    which would otherwise wait for `resend_stalled`. Safe to retry: the window and the
    deliveries are claimed with conditional UPDATEs, so an attempt that failed half-way left
    at most a claimed window, whose end the next attempt waits for."""
    channel = NotificationChannel.objects.filter(pk=channel_id).first()
    if channel is None:
        return
    outcome = channel.flush()
    if outcome is None:
        return
    if isinstance(outcome, datetime):  # the digest window is taken: try when it ends
        wait = max((outcome - timezone.now()).total_seconds(), 0) + 0.5
        flush_notifications.apply_async((channel_id,), countdown=wait)
    else:
        send_notification.delay(str(outcome))


@shared_task(
    bind=True,
    autoretry_for=(TransientDeliveryError,),
    retry_backoff=settings.NOTIFY_RETRY_BACKOFF,
    retry_backoff_max=600,
    retry_jitter=True,
    max_retries=settings.NOTIFY_MAX_ATTEMPTS - 1,
)
def send_notification(self, message_id):
    """Send one message (one delivery or a digest). Only TransientDeliveryError is retried;
    the last attempt marks the deliveries failed instead of raising."""
    deliveries = list(
        Delivery.objects.filter(message_id=message_id, status=DeliveryStatus.SENDING)
        .select_related("channel")
        .order_by("pk")
    )
    if not deliveries:
        return  # sent already (a redelivered message), or put back by resend_stalled
    final = self.request.retries >= self.max_retries
    send_message(deliveries[0].channel, deliveries, final=final)


@shared_task
def remind_pending_calls():
    return notifications.send_reminders()


@shared_task
def resend_stalled_notifications():
    return notifications.resend_stalled()


@shared_task
def detect_anomalies():
    return anomalies.scan()


@shared_task
def update_metric_totals():
    """Keep /metrics' checkpoint fresh, so a scrape never has to catch up on its own."""
    metrics.current_totals()
