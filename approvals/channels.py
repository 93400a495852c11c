"""Sending notifications: what a message says, and the three ways it leaves (e-mail, Slack,
signed webhook).

A message is built when it is sent, from the current state of what each delivery is about, so
a call decided meanwhile is skipped rather than announced. Messages name the tool, agent and
server, why a human is needed and the kinds of personal data detected, and link to the page
where a person acts. They carry no secret (no server URL, token or header; no channel URL or
signing secret) and no argument values unless the channel's `include_arguments` is on.

Slack and webhook URLs are reached through `netguard.guarded_client`, the connection guard of
MCP servers: HTTPS unless the channel allows HTTP, no private addresses unless the channel
allows them, redirects followed only within the same origin (307/308, which keep the body).

Failures: `TransientDeliveryError` (connection errors and timeouts, HTTP 429 and 5xx, SMTP 4xx)
is retried by the task; anything else (other HTTP 4xx, a refused address, SMTP 5xx) is final.
"""

import hashlib
import hmac
import json
import logging
import smtplib
import time
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import anyio
import httpx2
from django.conf import settings
from django.core.mail import EmailMessage, get_connection
from django.urls import reverse
from django.utils import timezone
from django.utils.timesince import timesince

from approvals.notifications import TEST_EVENT, ChannelKind, Delivery, DeliveryStatus
from integrations import netguard
from integrations.logging import redact as redact_urls

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Toolgate-Signature"
DELIVERY_HEADER = "X-Toolgate-Delivery"
EVENT_HEADER = "X-Toolgate-Event"
MAX_RESPONSE_BYTES = 64 * 1024
SLACK_DIGEST_ITEMS = 10  # Slack allows 50 blocks a message; the rest is a link to the queue
PERSONAL_DATA_KINDS = {
    "email": "e-mail address",
    "phone": "phone number",
    "card_number": "card number",
    "iban": "IBAN",
    "national_id": "national ID number",
    "secret": "secret or credential",
}


class DeliveryError(Exception):
    """A message could not be delivered and will not be retried."""


class TransientDeliveryError(DeliveryError):
    """A failure worth retrying later: the receiver may well take the same message then."""


@dataclass
class Notice:
    """One delivery's content, the same for every kind of channel."""

    delivery: Delivery
    title: str
    url: str
    facts: list = field(default_factory=list)  # (label, value)
    reasons: list = field(default_factory=list)  # {"code", "message"}
    data: dict = field(default_factory=dict)


def absolute(path):
    return urljoin(settings.SITE_URL.rstrip("/") + "/", path.lstrip("/"))


# --------------------------------------------------------------------------- what it is about


def subject_of(event, obj):
    """(server id, agent id, one-line summary) of what `event` is about, for the filters and
    the delivery log."""
    from approvals.models import ToolCall
    from integrations.models import McpServer, Tool

    if isinstance(obj, ToolCall):
        text = f"{obj.agent.name} → {obj.server_name} / {obj.tool_name} (call #{obj.pk})"
        return obj.server_id, obj.agent_id, text
    if isinstance(obj, Tool):
        return obj.server_id, None, f"{obj.server.name} / {obj.name}"
    if isinstance(obj, McpServer):
        return obj.pk, None, obj.name
    return getattr(obj, "server_id", None), getattr(obj, "agent_id", None), str(obj.summary)


def call_reasons(call):
    """Why the call needs a human, as {code, message}: the reasons the policy stored on the
    call when it decided it (approvals/policy.py)."""
    return list(call.reasons)


def personal_data_kinds(call):
    from approvals.pii import find_personal_data

    kinds = {finding["kind"] for finding in find_personal_data(call.arguments)}
    return sorted(PERSONAL_DATA_KINDS.get(kind, kind) for kind in kinds)


CALL_TITLES = {
    "call.pending": "{agent} asks to run {tool}",
    "call.reminder": "Still waiting for a decision: {agent} asks to run {tool}",
    "call.unknown": "A worker was lost while running {tool} for {agent}: check whether it ran",
}


def _call_notice(delivery, call, channel):
    now = timezone.now()
    tool = f"{call.server_name} / {call.tool_name}"
    kinds = personal_data_kinds(call)
    reasons = call_reasons(call) if delivery.event != "call.unknown" else []
    facts = [("Tool", tool), ("Agent", call.agent.name), ("Server", call.server_name)]
    facts.append(("Waiting for", timesince(call.requested_at, now)))
    if kinds:
        facts.append(("Personal data", ", ".join(kinds)))
    data = {
        "call_id": call.pk,
        "status": call.status,
        "server": call.server_name,
        "tool": call.tool_name,
        "tool_title": call.tool.title if call.tool else "",
        "agent": call.agent.name,
        "requested_at": call.requested_at.isoformat(),
        "expires_at": call.expires_at.isoformat() if call.expires_at else None,
        "waited_seconds": int((now - call.requested_at).total_seconds()),
        "reasons": reasons,
        "personal_data": kinds,
    }
    if channel.include_arguments:
        data["arguments"] = call.arguments
        facts.append(("Arguments", json.dumps(call.arguments, ensure_ascii=False)[:2000]))
    title = CALL_TITLES[delivery.event].format(agent=call.agent.name, tool=tool)
    url = absolute(reverse("approvals:call", args=[call.pk]))
    return Notice(delivery, title, url, facts, reasons, data)


def _tool_notice(delivery, tool, channel):
    reasons = []
    if tool.changed_since_review:
        reasons.append({"code": "tool_changed", "message": "Its definition changed since review."})
    for warning in tool.warnings[:5]:
        reasons.append({"code": "tool_flagged", "message": str(warning.get("message", ""))})
    if not reasons:
        reasons.append({"code": "tool_new", "message": "It is new and not yet reviewed."})
    name = f"{tool.server.name} / {tool.name}"
    url = absolute(reverse("admin:integrations_tool_change", args=[tool.pk]))
    facts = [("Tool", name), ("Server", tool.server.name)]
    data = {"tool_id": tool.pk, "server": tool.server.name, "tool": tool.name, "reasons": reasons}
    return Notice(delivery, f"The tool {name} needs a review", url, facts, reasons, data)


def _server_notice(delivery, server, channel):
    url = absolute(reverse("admin:integrations_mcpserver_change", args=[server.pk]))
    failures = server.sync_failures
    facts = [("Server", server.name), ("Failed syncs in a row", str(failures))]
    facts.append(("Last error", server.last_error[:500]))
    data = {"server": server.name, "failures": failures, "last_error": server.last_error[:500]}
    title = f"Syncing the MCP server {server.name} keeps failing"
    return Notice(delivery, title, url, facts, [], data)


def _test_notice(delivery, obj, channel):
    title = f"Test message from Toolgate to the channel {channel.name}"
    url = absolute(reverse("approvals:queue"))
    return Notice(delivery, title, url, [("Channel", channel.name)], [], {"channel": channel.name})


def _other_notice(delivery, obj, channel):
    """Any other event: an object with `get_absolute_url()` and `summary` (see notifications)."""
    summary = str(obj.summary)[:500]
    return Notice(delivery, summary, absolute(obj.get_absolute_url()), [], [], {"summary": summary})


NOTICES = {
    "call.pending": _call_notice,
    "call.reminder": _call_notice,
    "call.unknown": _call_notice,
    "tool.needs_review": _tool_notice,
    "server.sync_failing": _server_notice,
    TEST_EVENT: _test_notice,
}
STILL_RELEVANT = {
    "call.pending": lambda call: call.status == "pending_approval",
    "call.reminder": lambda call: call.status == "pending_approval",
}


def build_notice(delivery, channel):
    """The notice for `delivery`, or the reason it is no longer worth sending."""
    obj = delivery.obj
    if obj is None:
        return None, "What this was about no longer exists."
    relevant = STILL_RELEVANT.get(delivery.event)
    if relevant and not relevant(obj):
        return None, f"Not sent: the call is {obj.get_status_display().lower()} by now."
    builder = NOTICES.get(delivery.event, _other_notice)
    return builder(delivery, obj, channel), ""


# --------------------------------------------------------------------------- sending


def send_message(channel, deliveries, *, final):
    """Send one message for `deliveries` (all SENDING, one message id) and record the attempt
    on each. Raises TransientDeliveryError when it should be tried again (not when `final`)."""
    notices = []
    for delivery in deliveries:
        notice, why_not = build_notice(delivery, channel)
        if notice is None:
            _record(delivery, DeliveryStatus.SKIPPED, why_not, attempt=False)
        else:
            notices.append(notice)
    if not notices:
        return
    pending = [notice.delivery for notice in notices]
    try:
        SENDERS[channel.kind](channel, notices, pending[0].message_id)
    except DeliveryError as exc:
        error = channel.redact(redact_urls(str(exc)))[:1000]
        retry = isinstance(exc, TransientDeliveryError) and not final
        for delivery in pending:
            _record(delivery, DeliveryStatus.SENDING if retry else DeliveryStatus.FAILED, error)
        logger.warning("Notification to channel %s failed: %s", channel.name, error)
        if retry:
            raise TransientDeliveryError(error) from None
        return
    for delivery in pending:
        _record(delivery, DeliveryStatus.SENT, "")
    logger.info("Sent %d notification(s) to channel %s", len(pending), channel.name)


def _record(delivery, status, error, attempt=True):
    now = timezone.now()
    fields = {"status": status, "last_error": error, "updated_at": now}
    if attempt:
        fields["attempts"] = delivery.attempts + 1
    if status == DeliveryStatus.SENT:
        fields["sent_at"] = now
    Delivery.objects.filter(pk=delivery.pk).update(**fields)


def one_line(text):
    """`text` as one line of printable characters. Names, reasons and errors come from MCP
    servers (a sync error quotes the server's own message): a line break in them would let a
    server write whole lines of a message, such as an "Open:" link to its own site."""
    printable = "".join(ch if ch.isprintable() else " " for ch in str(text))
    return " ".join(printable.split())


def _title(notices):
    if len(notices) == 1:
        return notices[0].title
    return f"{len(notices)} notifications from Toolgate"


def _queue_url():
    return absolute(reverse("approvals:queue"))


# E-mail -------------------------------------------------------------------------------------


def _subject(notices):
    return one_line("[Toolgate] " + _title(notices))[:200]


def _email_body(notices):
    parts = []
    for notice in notices:
        lines = [one_line(notice.title), ""]
        lines += [f"{label}: {one_line(value)}" for label, value in notice.facts]
        if notice.reasons:
            lines += ["", "Why it needs you:"]
            lines += [f"- {one_line(reason['message'])}" for reason in notice.reasons]
        lines += ["", f"Open: {notice.url}"]
        parts.append("\n".join(lines))
    footer = "\n\nDecisions are made on the page (approve or deny there); opening a link never "
    footer += f"decides anything.\nQueue: {_queue_url()}\n"
    return "\n\n----\n\n".join(parts) + footer


def send_email(channel, notices, message_id):
    message = EmailMessage(
        subject=_subject(notices),
        body=_email_body(notices),
        from_email=settings.DEFAULT_FROM_EMAIL,
        to=list(channel.recipients),
        headers={DELIVERY_HEADER: str(message_id)},
    )
    try:
        with get_connection(fail_silently=False, timeout=settings.NOTIFY_TIMEOUT) as connection:
            connection.send_messages([message])
    except smtplib.SMTPRecipientsRefused as exc:
        codes = [code for code, _ in exc.recipients.values()]
        _smtp_failure(min(codes), "every recipient was refused")
    except smtplib.SMTPResponseException as exc:
        _smtp_failure(exc.smtp_code, _text(exc.smtp_error))
    except (smtplib.SMTPException, OSError) as exc:
        raise TransientDeliveryError(f"Could not talk to the mail server: {exc}") from None


def _smtp_failure(code, text):
    error = TransientDeliveryError if 400 <= code < 500 else DeliveryError
    raise error(f"The mail server answered {code}: {text[:300]}")


def _text(value):
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


# Slack --------------------------------------------------------------------------------------


def mrkdwn(text):
    """Slack's escaping, on one line: names from MCP servers and agents can't make links,
    mentions or lines of their own."""
    return one_line(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _markup(text):
    """A mrkdwn text object that Slack shows as written: `verbatim` stops it turning bare URLs,
    channel names and mentions in a server's text into links (our own `<url|…>` still work)."""
    return {"type": "mrkdwn", "text": text, "verbatim": True}


def _plain(text, limit):
    return {"type": "plain_text", "text": one_line(text)[:limit] or " ", "emoji": False}


def _button(text, url):
    return {"type": "button", "text": _plain(text, 75), "url": url[:3000], "style": "primary"}


def slack_payload(notices):
    """Block Kit: a header, the facts, why it needs a human, a button to the page."""
    if len(notices) == 1:
        return _slack_single(notices[0])
    return _slack_digest(notices)


def _slack_single(notice):
    blocks = [{"type": "header", "text": _plain(notice.title, 150)}]
    if notice.facts:
        fields = [
            _markup(f"*{mrkdwn(label)}*\n{mrkdwn(value)}"[:2000])
            for label, value in notice.facts[:10]
        ]
        blocks.append({"type": "section", "fields": fields})
    if notice.reasons:
        lines = "\n".join(f"• {mrkdwn(reason['message'])}" for reason in notice.reasons)
        blocks.append({"type": "section", "text": _markup(f"*Why it needs you*\n{lines}")})
    blocks.append({"type": "actions", "elements": [_button("Open in Toolgate", notice.url)]})
    return {"text": mrkdwn(notice.title)[:3000], "blocks": blocks}  # the fallback is mrkdwn


def _slack_digest(notices):
    title = _title(notices)
    blocks = [{"type": "header", "text": _plain(title, 150)}]
    for notice in notices[:SLACK_DIGEST_ITEMS]:
        line = f"<{notice.url}|{mrkdwn(notice.title)[:300]}>"
        blocks.append({"type": "section", "text": _markup(line)})
    more = len(notices) - SLACK_DIGEST_ITEMS
    if more > 0:
        blocks.append({"type": "context", "elements": [_markup(f"and {more} more")]})
    blocks.append({"type": "actions", "elements": [_button("Open the queue", _queue_url())]})
    return {"text": title, "blocks": blocks}


def send_slack(channel, notices, message_id):
    body = json.dumps(slack_payload(notices), ensure_ascii=False).encode()
    post(channel, body, {"Content-Type": "application/json"})


# Webhooks -----------------------------------------------------------------------------------


def webhook_payload(notices, message_id):
    items = [
        {
            "delivery_id": str(notice.delivery.delivery_id),
            "event": notice.delivery.event,
            "created_at": notice.delivery.created_at.isoformat(),
            "title": notice.title,
            "url": notice.url,
            "data": notice.data,
        }
        for notice in notices
    ]
    return {"id": str(message_id), "sent_at": timezone.now().isoformat(), "notifications": items}


def sign(secret, timestamp, body):
    """The signature header's value: HMAC-SHA256 of "<timestamp>." + body, keyed by the secret."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def send_webhook(channel, notices, message_id):
    body = json.dumps(webhook_payload(notices, message_id), ensure_ascii=False).encode()
    event = notices[0].delivery.event if len(notices) == 1 else "digest"
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Toolgate-Webhook/1",
        DELIVERY_HEADER: str(message_id),
        EVENT_HEADER: event,
        SIGNATURE_HEADER: sign(channel.secret, int(time.time()), body),
    }
    post(channel, body, headers)


SENDERS = {
    ChannelKind.EMAIL: send_email,
    ChannelKind.SLACK: send_slack,
    ChannelKind.WEBHOOK: send_webhook,
}


# HTTP through the connection guard ----------------------------------------------------------


def post(channel, body, headers):
    """POST `body` to the channel's URL through the connection guard; raise DeliveryError."""
    try:
        netguard.validate_url(channel.url, allow_http=channel.allow_http)
    except netguard.UrlRefused as exc:
        raise DeliveryError(f"The channel's URL is refused: {exc}") from None
    anyio.run(_post, channel, body, headers)


async def _post(channel, body, headers):
    timeout = httpx2.Timeout(settings.NOTIFY_TIMEOUT)
    client = netguard.guarded_client(
        allow_private_network=channel.allow_private_network,
        extra_blocked=settings.MCP_EXTRA_BLOCKED_NETWORKS,
        extra_allowed=settings.MCP_EXTRA_ALLOWED_NETWORKS,
        timeout=timeout,
        max_response_bytes=MAX_RESPONSE_BYTES,
    )
    origin = channel.origin
    try:
        # One deadline for the whole send: httpx's timeouts are per read, and a receiver that
        # sends a byte just before each runs out would hold the worker (or the admin's test
        # message) for hours.
        with anyio.fail_after(settings.NOTIFY_TIMEOUT):
            async with client:
                status, text = await _post_following(client, channel.url, body, headers, origin)
    except TimeoutError:
        raise TransientDeliveryError(f"{origin} did not answer in time.") from None
    _check_status(status, text, origin)


async def _post_following(client, url, body, headers, origin):
    """(status, text) of the POST, after same-origin 307/308 redirects (at most three)."""
    for _hop in range(4):
        status, location, text = await _post_once(client, url, body, headers, origin)
        target = urljoin(url, location) if location else ""
        if status in (307, 308) and target and _origin(target) == _origin(url):
            url = target
            continue
        break
    return status, text


async def _post_once(client, url, body, headers, origin):
    try:
        async with client.stream("POST", url, content=body, headers=headers) as response:
            text = ""
            if response.status_code >= 300:
                text = (await response.aread())[:300].decode(errors="replace")
            return response.status_code, response.headers.get("location", ""), text
    except netguard.AddressRefused as exc:
        why = "private network addresses are not allowed for this channel"
        if exc.reason.startswith("in blocked range"):
            why = "that range is blocked for every destination"
        raise DeliveryError(f"Refused to connect to {origin} ({exc.reason}): {why}.") from None
    except netguard.ResponseTooLarge:
        raise DeliveryError(f"{origin} answered with a body too large to read.") from None
    except httpx2.TimeoutException:
        raise TransientDeliveryError(f"{origin} did not answer in time.") from None
    except httpx2.TransportError as exc:
        raise TransientDeliveryError(f"Could not reach {origin}: {type(exc).__name__}.") from None


def _origin(url):
    parts = urlsplit(url)
    return (parts.scheme, parts.hostname, parts.port)


def _check_status(status, text, origin):
    if 200 <= status < 300:
        return
    answered = f"{origin} answered HTTP {status}"
    if 300 <= status < 400:
        raise DeliveryError(f"{answered}, a redirect: not followed to another origin.")
    detail = answered + (f": {text.strip()[:200]}" if text.strip() else "")
    if status == 429 or status >= 500:
        raise TransientDeliveryError(detail)
    raise DeliveryError(detail)
