"""Approvers are told: e-mail to a real SMTP server, Slack and signed webhooks to a real HTTP
receiver on loopback, all sent by the real Celery worker."""

import json
import os
import re
import signal
import sqlite3
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from approvals.models import Status, ToolCall
from approvals.notifications import Delivery, NotificationChannel, notify
from approvals.tasks import flush_notifications, remind_pending_calls
from integrations.models import Agent, ApprovalMode, McpServer, Tool
from tests.conftest import (
    _database_url,
    private_broker,
    release_private_broker,
    spawn_worker,
    wait_until,
)
from tests.receivers import HttpReceiver

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parent.parent
SERVER_SECRET_PATH = "mcp/k-7f3a9c2e5b1d"
SERVER_TOKEN = "srv-token-4c8e1a9f7b2d"
WEBHOOK_SECRET = "whsec-0123456789abcdef"
ARGUMENT_VALUE = "ARG-VALUE-91b7e3"


def make_world():
    server = McpServer.objects.create(
        name="crm", url=f"https://crm.example/{SERVER_SECRET_PATH}", secret_token=SERVER_TOKEN,
        approval_mode=ApprovalMode.ALWAYS_ASK,
    )  # fmt: skip
    definition = {"name": "send_email", "title": "Send e-mail", "inputSchema": {"type": "object"}}
    tool = Tool.objects.create_from_definition(server, definition, timezone.now())
    agent, token = Agent.create_with_token("support-bot", [server])
    return server, tool, agent, token


def channel(kind, url="", **fields):
    fields.setdefault("allow_private_network", True)
    fields.setdefault("allow_http", True)
    if kind == "webhook":
        fields.setdefault("secret", WEBHOOK_SECRET)
    name = f"{kind}-{NotificationChannel.objects.count()}"
    return NotificationChannel.objects.create(name=name, kind=kind, url=url, **fields)


def ask(client, token, arguments=None):
    body = {"server": "crm", "tool": "send_email", "arguments": arguments or {"to": ARGUMENT_VALUE}}
    response = client.post(
        "/api/v1/tool-calls", json.dumps(body), content_type="application/json",
        headers={"Authorization": f"Bearer {token}"},
    )  # fmt: skip
    assert response.status_code == 201, response.content
    return ToolCall.objects.get(pk=response.json()["id"])


def pending_call(server, tool, agent, **fields):
    fields.setdefault("arguments", {"to": ARGUMENT_VALUE})
    return ToolCall.objects.create(
        agent=agent, server=server, tool=tool, server_name="crm", tool_name="send_email",
        tool_fingerprint=tool.fingerprint, status=Status.PENDING_APPROVAL,
        expires_at=timezone.now() + timedelta(minutes=10), **fields,
    )  # fmt: skip


def readme_verifier():
    """The signature check the README gives receivers, run as written there."""
    readme = (ROOT / "README.md").read_text()
    block = next(
        code
        for code in re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
        if "def verify_toolgate_signature" in code
    )
    namespace = {}
    exec(block, namespace)  # noqa: S102 - our own README
    return namespace["verify_toolgate_signature"]


def bodies(receiver):
    return [json.loads(request.body) for request in receiver.requests]


def statuses(channel):
    return sorted(Delivery.objects.filter(channel=channel).values_list("status", flat=True))


def test_a_call_that_needs_a_human_reaches_email_slack_and_webhook(
    celery_worker, client, mailbox, receiver
):
    *_, token = make_world()
    NotificationChannel.objects.create(name="team", kind="email", recipients=["ops@example.com"])
    channel("slack", receiver.url("/services/T0/B0/slack"))
    hook = channel("webhook", receiver.url("/hooks/toolgate"))

    call = ask(client, token)

    wait_until(lambda: mailbox.messages and len(receiver.requests) == 2, timeout=60)
    link = f"{settings.SITE_URL}/approvals/{call.pk}/"
    mail = mailbox.messages[0]
    assert mail["To"] == "ops@example.com"
    assert "support-bot asks to run crm / send_email" in mail["Subject"]
    assert link in mail.get_content()
    assert "The server's mode is Always Ask." in mail.get_content()

    by_path = {request.path: request for request in receiver.requests}
    blocks = json.loads(by_path["/services/T0/B0/slack"].body)["blocks"]
    assert blocks[0] == {
        "type": "header",
        "text": {"type": "plain_text", "text": "support-bot asks to run crm / send_email",
                 "emoji": False},
    }  # fmt: skip
    facts = [field["text"] for field in blocks[1]["fields"]]
    assert facts[:3] == ["*Tool*\ncrm / send_email", "*Agent*\nsupport-bot", "*Server*\ncrm"]
    assert facts[3].startswith("*Waiting for*\n")
    assert "Why it needs you" in blocks[2]["text"]["text"]
    assert blocks[-1]["type"] == "actions"
    assert blocks[-1]["elements"][0]["url"] == link

    request = by_path["/hooks/toolgate"]
    verify = readme_verifier()
    assert verify(WEBHOOK_SECRET, request.headers, request.body)
    assert not verify("another-secret-0000", request.headers, request.body)
    payload = json.loads(request.body)
    assert request.headers["X-Toolgate-Delivery"] == payload["id"]
    assert request.headers["X-Toolgate-Event"] == "call.pending"
    [item] = payload["notifications"]
    assert item["event"] == "call.pending" and item["url"] == link
    assert item["data"]["call_id"] == call.pk
    assert item["data"]["reasons"] == [
        {"code": "always_ask", "message": "The server's mode is Always Ask."}
    ]
    assert Delivery.objects.get(channel=hook).delivery_id.hex == payload["id"].replace("-", "")
    wait_until(lambda: set(Delivery.objects.values_list("status", flat=True)) == {"sent"})


def test_a_tampered_body_fails_the_signature(celery_worker, receiver):
    server, tool, agent, _ = make_world()
    channel("webhook", receiver.url())
    pending_call(server, tool, agent)
    notify("call.pending", ToolCall.objects.get())
    wait_until(lambda: receiver.requests)
    request = receiver.requests[0]
    verify = readme_verifier()
    assert verify(WEBHOOK_SECRET, request.headers, request.body)
    assert not verify(WEBHOOK_SECRET, request.headers, request.body.replace(b"crm", b"crn"))


def test_a_receiver_answering_500_then_200_sees_one_retry_and_one_success(celery_worker):
    receiver = HttpReceiver(answers=[500, 200])
    try:
        server, tool, agent, _ = make_world()
        hook = channel("webhook", receiver.url())
        with transaction.atomic():
            call = pending_call(server, tool, agent)
            notify("call.pending", call)
        wait_until(lambda: statuses(hook) == ["sent"], timeout=60)
        delivery = Delivery.objects.get(channel=hook)
        assert delivery.attempts == 2
        assert delivery.last_error == ""
        assert len(receiver.requests) == 2
        first, second = receiver.requests
        assert first.headers["X-Toolgate-Delivery"] == second.headers["X-Toolgate-Delivery"]
    finally:
        receiver.close()


def test_a_400_is_not_retried(celery_worker):
    receiver = HttpReceiver(answers=[(400, "invalid_payload")])
    try:
        server, tool, agent, _ = make_world()
        slack = channel("slack", receiver.url())
        notify("call.pending", pending_call(server, tool, agent))
        wait_until(lambda: statuses(slack) == ["failed"], timeout=60)
        time.sleep(3)  # a retry, were there one, comes within about a second
        delivery = Delivery.objects.get(channel=slack)
        assert delivery.attempts == 1
        assert "answered HTTP 400: invalid_payload" in delivery.last_error
        assert len(receiver.requests) == 1
    finally:
        receiver.close()


def test_a_receiver_failing_every_time_is_given_up_after_the_last_attempt(celery_worker):
    receiver = HttpReceiver(answers=[503] * 10)
    try:
        server, tool, agent, _ = make_world()
        hook = channel("webhook", receiver.url())
        notify("call.pending", pending_call(server, tool, agent))
        wait_until(lambda: statuses(hook) == ["failed"], timeout=90)
        delivery = Delivery.objects.get(channel=hook)
        assert delivery.attempts == 3  # NOTIFY_MAX_ATTEMPTS of the test worker
        assert "answered HTTP 503" in delivery.last_error
        assert len(receiver.requests) == 3
    finally:
        receiver.close()


def test_it_refuses_a_webhook_on_a_private_address(celery_worker, receiver):
    server, tool, agent, _ = make_world()
    hook = channel("webhook", receiver.url(), allow_private_network=False)
    notify("call.pending", pending_call(server, tool, agent))
    wait_until(lambda: statuses(hook) == ["failed"], timeout=60)
    delivery = Delivery.objects.get(channel=hook)
    assert delivery.attempts == 1
    assert "private network addresses are not allowed for this channel" in delivery.last_error
    assert receiver.requests == []


def test_a_temporary_smtp_error_is_retried(celery_worker, mailbox):
    server, tool, agent, _ = make_world()
    team = NotificationChannel.objects.create(name="t", kind="email", recipients=["a@example.com"])
    mailbox.refuse_with, mailbox.refusals_left = "451 4.3.0 Try again later", 1
    notify("call.pending", pending_call(server, tool, agent))
    wait_until(lambda: statuses(team) == ["sent"], timeout=60)
    assert Delivery.objects.get(channel=team).attempts == 2
    assert len(mailbox.messages) == 1


def test_a_permanent_smtp_error_is_not_retried(celery_worker, mailbox):
    server, tool, agent, _ = make_world()
    team = NotificationChannel.objects.create(name="t", kind="email", recipients=["a@example.com"])
    mailbox.refuse_with, mailbox.refusals_left = "550 5.1.1 No such user", 99
    notify("call.pending", pending_call(server, tool, agent))
    wait_until(lambda: statuses(team) == ["failed"], timeout=60)
    delivery = Delivery.objects.get(channel=team)
    assert delivery.attempts == 1
    assert "The mail server answered 550" in delivery.last_error
    assert mailbox.messages == []


def test_many_calls_arriving_together_make_one_digest_per_window(celery_worker, receiver):
    server, tool, agent, _ = make_world()
    hook = channel("webhook", receiver.url())
    with transaction.atomic():
        for _ in range(5):
            notify("call.pending", pending_call(server, tool, agent))
    wait_until(lambda: len(receiver.requests) == 1, timeout=60)
    with transaction.atomic():  # within the window the first message opened
        for _ in range(3):
            notify("call.pending", pending_call(server, tool, agent))
    wait_until(lambda: len(receiver.requests) == 2, timeout=60)
    time.sleep(1)
    first, second = bodies(receiver)
    assert len(first["notifications"]) == 5
    assert len(second["notifications"]) == 3
    assert receiver.requests[0].headers["X-Toolgate-Event"] == "digest"
    assert len(receiver.requests) == 2
    assert statuses(hook) == ["sent"] * 8


@pytest.mark.skipif(
    connection.vendor != "sqlite", reason="SQLite's writer lock and its busy timeout"
)
def test_a_flush_that_finds_the_database_locked_is_tried_again(receiver, tmp_path):
    """The flake of the digest test: a flush that met "database is locked" was dropped, and its
    deliveries waited for resend_stalled. Here the lock outlasts the worker's busy timeout."""
    server, tool, agent, _ = make_world()
    hook = channel("webhook", receiver.url())
    call = pending_call(server, tool, agent)
    Delivery.about(call, channel=hook, event="call.pending", summary="waits").save()
    broker, broker_env, _ = private_broker(tmp_path / "broker", "locked")
    log = tmp_path / "worker.log"
    worker = spawn_worker(f"{_database_url()}?timeout=1", broker_env, log)
    writer = sqlite3.connect(connection.settings_dict["NAME"], isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # another process writing, for longer than 1 s
        with broker:
            flush_notifications.apply_async(args=[hook.pk], connection=broker)
        wait_until(lambda: "database is locked" in log.read_text(), timeout=30)
        writer.execute("COMMIT")
        wait_until(lambda: statuses(hook) == ["sent"], timeout=60)
    finally:
        writer.close()
        os.killpg(worker.pid, signal.SIGKILL)  # nothing left to finish
        worker.wait(timeout=20)
        release_private_broker(broker, "locked")
    [item] = bodies(receiver)[0]["notifications"]
    assert item["data"]["call_id"] == call.pk


def test_a_slack_digest_lists_the_calls_and_links_the_queue(celery_worker, receiver):
    server, tool, agent, _ = make_world()
    channel("slack", receiver.url())
    with transaction.atomic():
        calls = [pending_call(server, tool, agent) for _ in range(12)]
        for call in calls:
            notify("call.pending", call)
    wait_until(lambda: receiver.requests, timeout=60)
    blocks = bodies(receiver)[0]["blocks"]
    assert blocks[0]["text"]["text"] == "12 notifications from Toolgate"
    links = [block["text"]["text"] for block in blocks if block["type"] == "section"]
    assert len(links) == 10
    assert links[0].startswith(f"<{settings.SITE_URL}/approvals/{calls[0].pk}/|")
    assert blocks[-2]["elements"][0]["text"] == "and 2 more"
    assert blocks[-1]["elements"][0]["url"] == f"{settings.SITE_URL}/approvals/"


def test_the_reminder_fires_once(celery_worker, receiver):
    server, tool, agent, _ = make_world()
    hook = channel("webhook", receiver.url(), events=["call.reminder"])
    old = timezone.now() - timedelta(seconds=settings.APPROVAL_REMINDER_AFTER + 5)
    call = pending_call(server, tool, agent, requested_at=old)
    pending_call(server, tool, agent)  # not due yet

    for _ in range(3):
        remind_pending_calls.delay()
    wait_until(lambda: statuses(hook) == ["sent"], timeout=60)
    remind_pending_calls.delay()
    time.sleep(4)  # time for the last run, which finds nothing left to remind
    assert statuses(hook) == ["sent"]
    [item] = bodies(receiver)[0]["notifications"]
    assert item["event"] == "call.reminder"
    assert item["data"]["call_id"] == call.pk
    assert len(receiver.requests) == 1


def test_a_call_decided_before_the_message_goes_out_is_not_announced(celery_worker, receiver):
    server, tool, agent, _ = make_world()
    hook = channel("webhook", receiver.url())
    with transaction.atomic():
        call = pending_call(server, tool, agent)
        notify("call.pending", call)
        call.deny(None, "no")
    wait_until(lambda: statuses(hook) == ["skipped"], timeout=60)
    assert "the call is denied by now" in Delivery.objects.get().last_error
    assert receiver.requests == []


def test_no_secret_and_no_argument_value_reaches_any_payload_or_log(celery_worker, client, mailbox):
    # A hostile receiver echoes the request path (the secret part of the URL) in its errors.
    receiver = HttpReceiver(answers=[(500, "boom at {path}"), (400, "bad {path}")] * 2)
    try:
        *_, token = make_world()
        NotificationChannel.objects.create(name="m", kind="email", recipients=["o@example.com"])
        slack = channel("slack", receiver.url("/services/T0/B0/sl4ck-s3cr3t-p4th"))
        hook = channel("webhook", receiver.url("/hooks/wh-s3cr3t-p4th?key=q-s3cr3t"))
        ask(client, token, {"to": ARGUMENT_VALUE, "api_key": "sk-live-" + "z" * 24})
        wait_until(
            lambda: (
                mailbox.messages and statuses(slack) == ["failed"] and statuses(hook) == ["failed"]
            ),
            timeout=90,
        )
        secrets = [
            SERVER_SECRET_PATH, SERVER_TOKEN, WEBHOOK_SECRET, ARGUMENT_VALUE, "sk-live-",
            "sl4ck-s3cr3t-p4th", "wh-s3cr3t-p4th", "q-s3cr3t",
        ]  # fmt: skip
        seen = [mailbox.messages[0].as_string()]
        seen += [request.body.decode() for request in receiver.requests]
        seen += [json.dumps(request.headers) for request in receiver.requests]
        seen += [f"{d.summary} {d.last_error}" for d in Delivery.objects.all()]
        seen.append(Path(celery_worker.log).read_text())
        for text in seen:
            for secret in secrets:
                assert secret not in text
        assert "[redacted]" in Delivery.objects.get(channel=hook).last_error
        payload = json.loads(receiver.requests[0].body)
        assert "secret or credential" in json.dumps(payload)  # the kind, not the value
    finally:
        receiver.close()


def test_a_channel_may_ask_for_the_argument_values(celery_worker, receiver):
    server, tool, agent, _ = make_world()
    channel("webhook", receiver.url(), include_arguments=True)
    notify("call.pending", pending_call(server, tool, agent))
    wait_until(lambda: receiver.requests, timeout=60)
    [item] = bodies(receiver)[0]["notifications"]
    assert item["data"]["arguments"] == {"to": ARGUMENT_VALUE}
