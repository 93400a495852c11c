"""Notification channels: added in the admin or from a shell, secrets write-only, a test
message whose outcome the person asking sees."""

import json

import mcp_types
import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from mcp.server import Server
from mcp.shared.exceptions import MCPError

from approvals.channels import _call_notice, send_message, slack_payload
from approvals.notifications import EVENTS, Delivery, NotificationChannel
from integrations.models import Agent, McpServer
from tests.receivers import HttpReceiver
from tests.test_notifications import make_world, pending_call

pytestmark = pytest.mark.django_db

HOOK_PATH = "/hooks/hk-5ecret-path-77"
SECRET = "signing-secret-0123456789"


def form(**overrides):
    data = {
        "name": "pager", "kind": "webhook", "recipients_text": "", "url": "", "secret": "",
        "events": ["call.pending", "call.reminder"], "enabled": "on",
    }  # fmt: skip
    data.update(overrides)
    return {key: value for key, value in data.items() if value is not None}


def add(admin_client, **overrides):
    return admin_client.post("/admin/approvals/notificationchannel/add/", form(**overrides))


def test_an_admin_adds_a_webhook_whose_url_and_secret_are_never_shown(admin_client, receiver):
    url = receiver.url(HOOK_PATH)
    response = add(
        admin_client, url=url, secret=SECRET, allow_http="on", allow_private_network="on"
    )
    assert response.status_code == 302, response.content.decode()
    channel = NotificationChannel.objects.get()
    assert (channel.url, channel.secret, channel.events) == (url, SECRET, form()["events"])
    with connection.cursor() as cursor:
        cursor.execute("SELECT url, secret FROM approvals_notificationchannel")
        stored = cursor.fetchone()
    assert HOOK_PATH not in stored[0] and SECRET not in stored[1]

    pages = [
        admin_client.get(f"/admin/approvals/notificationchannel/{channel.pk}/change/"),
        admin_client.get("/admin/approvals/notificationchannel/"),
    ]
    for page in pages:
        html = page.content.decode()
        assert HOOK_PATH not in html and SECRET not in html
    assert f"Stored: {receiver.origin}/…" in pages[0].content.decode()

    # Saving again with the secret fields left blank keeps them.
    response = admin_client.post(
        f"/admin/approvals/notificationchannel/{channel.pk}/change/",
        form(name="pager-2", allow_http="on", allow_private_network="on"),
    )
    assert response.status_code == 302
    channel.refresh_from_db()
    assert (channel.name, channel.url, channel.secret) == ("pager-2", url, SECRET)


def test_a_user_who_may_only_view_channels_sees_no_secret(client):
    channel = NotificationChannel.objects.create(
        name="pager", kind="webhook", url=f"https://hooks.example{HOOK_PATH}", secret=SECRET
    )
    viewer = User.objects.create_user("viewer", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_notificationchannel"))
    client.force_login(viewer)
    page = client.get(f"/admin/approvals/notificationchannel/{channel.pk}/change/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "https://hooks.example/…" in html
    assert "Stored (never shown)" in html
    assert HOOK_PATH not in html and SECRET not in html


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"url": "http://hooks.example/x", "secret": SECRET}, "url", "must start with https://"),
        ({"url": "https://hooks.example/x"}, "secret", "A webhook needs a signing secret."),
        ({"url": "https://hooks.example/x", "secret": "short"}, "secret", "at least 16"),
        ({"kind": "slack"}, "url", "Enter the URL."),
        ({"kind": "email", "recipients_text": "ops@example.com, nope"}, "recipients_text",
         "“nope” is not an e-mail address."),
        ({"kind": "email"}, "recipients_text", "Enter at least one e-mail address."),
        ({"kind": "email", "recipients_text": "a@example.com", "events": None}, "events",
         "This field is required."),
        ({"kind": "sms"}, "kind", "Select a valid choice."),
    ],
)  # fmt: skip
def test_the_admin_refuses_bad_channels_and_says_why(admin_client, overrides, field, message):
    response = add(admin_client, **overrides)
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert any(message in error for error in errors[field]), errors
    assert not NotificationChannel.objects.exists()
    assert "https://hooks.example/x" not in response.content.decode()


def test_send_a_test_message_shows_the_outcome(admin_client):
    receiver = HttpReceiver(answers=[200, (404, "no_service")])
    try:
        channel = NotificationChannel.objects.create(
            name="slack", kind="slack", url=receiver.url("/services/T/B/x"),
            allow_http=True, allow_private_network=True,
        )  # fmt: skip
        action = {"action": "send_test_message", "_selected_action": [channel.pk]}
        url = "/admin/approvals/notificationchannel/"
        ok = admin_client.post(url, action, follow=True).content.decode()
        failed = admin_client.post(url, action, follow=True).content.decode()
    finally:
        receiver.close()
    assert "The test message to slack was sent." in ok
    assert "The test message to slack failed:" in failed
    assert "answered HTTP 404: no_service" in failed
    assert "/services/T/B/x" not in failed
    assert list(Delivery.objects.order_by("pk").values_list("event", "status")) == [
        ("test", "sent"),
        ("test", "failed"),
    ]
    assert "Test message from Toolgate" in receiver.requests[0].body.decode()


def test_the_delivery_log_is_read_only(admin_client):
    channel = NotificationChannel.objects.create(name="m", kind="email", recipients=["a@b.example"])
    delivery = Delivery.objects.create(channel=channel, event="call.pending", last_error="boom")
    page = admin_client.get(f"/admin/approvals/delivery/{delivery.pk}/change/")
    assert page.status_code == 200
    assert "boom" in page.content.decode()
    assert b'type="submit"' not in page.content.split(b"<footer")[0].split(b"</h1>")[-1]
    assert admin_client.get("/admin/approvals/delivery/add/").status_code == 403


def test_the_command_adds_lists_and_tests_channels(monkeypatch, capsys, settings, mailbox):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", mailbox.port
    McpServer.objects.create(name="crm", url="https://crm.example/mcp")
    monkeypatch.setenv("HOOK_URL", f"https://hooks.example{HOOK_PATH}")
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    call_command("notification_channel", "add", "--kind", "email", "--name", "ops",
                 "--to", "ops@example.com", "lead@example.com")  # fmt: skip
    call_command("notification_channel", "add", "--kind", "webhook", "--name", "pager",
                 "--url-env", "HOOK_URL", "--secret-env", "HOOK_SECRET",
                 "--event", "call.pending", "--server", "crm")  # fmt: skip
    pager = NotificationChannel.objects.get(name="pager")
    assert pager.events == ["call.pending"]
    assert [server.name for server in pager.servers.all()] == ["crm"]
    assert pager.secret == SECRET

    call_command("notification_channel", "list")
    listing = capsys.readouterr().out
    assert "ops@example.com, lead@example.com" in listing
    assert "https://hooks.example/…" in listing
    assert HOOK_PATH not in listing and SECRET not in listing

    call_command("notification_channel", "test", "ops")
    assert "ops: test message sent." in capsys.readouterr().out
    [mail] = mailbox.messages
    assert mail["To"] == "ops@example.com, lead@example.com"
    assert "Test message from Toolgate" in mail["Subject"]

    with pytest.raises(CommandError, match="the test message failed: Could not reach"):
        call_command("notification_channel", "test", "pager")  # hooks.example does not resolve


def test_the_command_keeps_every_repeated_value_and_the_agent_filters():
    McpServer.objects.create(name="crm", url="https://crm.example/mcp")
    McpServer.objects.create(name="wiki", url="https://wiki.example/mcp")
    Agent.create_with_token("support-bot", [])
    Agent.create_with_token("sales-bot", [])
    call_command("notification_channel", "add", "--kind", "email", "--name", "ops",
                 "--to", "a@example.com", "--to", "b@example.com", "c@example.com",
                 "--event", "call.pending", "--event", "call.reminder", "call.unknown",
                 "--server", "crm", "--server", "wiki",
                 "--agent", "support-bot", "--agent", "sales-bot",
                 "--include-arguments")  # fmt: skip
    ops = NotificationChannel.objects.get(name="ops")
    assert ops.recipients == ["a@example.com", "b@example.com", "c@example.com"]
    assert ops.events == ["call.pending", "call.reminder", "call.unknown"]
    assert sorted(server.name for server in ops.servers.all()) == ["crm", "wiki"]
    assert sorted(agent.name for agent in ops.agents.all()) == ["sales-bot", "support-bot"]
    assert ops.include_arguments


def test_a_channel_added_without_options_wants_everything_without_arguments():
    call_command("notification_channel", "add", "--kind", "email", "--name", "ops",
                 "--to", "a@example.com")  # fmt: skip
    ops = NotificationChannel.objects.get(name="ops")
    assert ops.events == list(EVENTS)
    assert not ops.servers.exists() and not ops.agents.exists()
    assert not ops.include_arguments


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kind", "webhook", "--name", "x", "--url-env", "UNSET_VAR_X"], "UNSET_VAR_X is empty"),
        (["--kind", "email", "--name", "x", "--to", "a@example.com", "--server", "nope"],
         "No MCP server named nope"),
        (["--kind", "email", "--name", "x", "--to", "a@example.com", "--agent", "nobody"],
         "No agent named nobody"),
        (["--kind", "email", "--name", "x", "--to", "not-an-address"], "not an e-mail address"),
        (["--kind", "slack", "--name", "x"], "url: Enter the URL."),
    ],
)  # fmt: skip
def test_the_command_refuses_bad_input(args, message):
    with pytest.raises(CommandError, match=message):
        call_command("notification_channel", "add", *args)
    assert not NotificationChannel.objects.exists()


def test_testing_an_unknown_channel_fails():
    with pytest.raises(CommandError, match="No notification channel named 'nope'"):
        call_command("notification_channel", "test", "nope")


def slack_channel(receiver):
    return NotificationChannel.objects.create(
        name="slack", kind="slack", url=receiver.url("/services/T/B/x"),
        allow_http=True, allow_private_network=True,
    )  # fmt: skip


def test_a_receiver_answering_a_byte_at_a_time_fails_at_the_timeout(settings):
    settings.NOTIFY_TIMEOUT = 1
    receiver = HttpReceiver(trickle=(60, 0.25))  # 15 s, each byte well within the timeout
    try:
        delivery = slack_channel(receiver).send_test()
    finally:
        receiver.close()
    assert delivery.status == "failed"
    assert delivery.last_error == f"{receiver.origin} did not answer in time."


def test_redirects_are_followed_only_within_the_same_origin():
    other = HttpReceiver()
    receiver = HttpReceiver(
        answers=[
            (307, "", {"Location": "/moved"}),
            200,
            (302, "", {"Location": other.url("/elsewhere")}),
        ]
    )
    try:
        channel = slack_channel(receiver)
        assert channel.send_test().status == "sent"
        failed = channel.send_test()
    finally:
        receiver.close()
        other.close()
    assert [request.path for request in receiver.requests] == [
        "/services/T/B/x",
        "/moved",
        "/services/T/B/x",
    ]
    assert failed.status == "failed"
    assert "a redirect: not followed to another origin" in failed.last_error
    assert other.requests == []


def test_names_from_servers_cannot_make_slack_links_or_mentions():
    server, tool, agent, _ = make_world()
    call = pending_call(server, tool, agent)
    call.tool_name = "x<!channel> <https://evil.example|click>"
    channel = NotificationChannel(name="s", kind="slack")
    payload = slack_payload([_call_notice(Delivery(event="call.pending"), call, channel)])

    def mrkdwn_texts(value):
        if isinstance(value, dict):
            if value.get("type") == "mrkdwn":
                yield value["text"]
            for item in value.values():
                yield from mrkdwn_texts(item)
        elif isinstance(value, list):
            for item in value:
                yield from mrkdwn_texts(item)

    texts = [payload["text"], *mrkdwn_texts(payload["blocks"])]
    assert any("x&lt;!channel&gt; &lt;https://evil.example|click&gt;" in text for text in texts)
    for text in texts:
        assert "<!channel>" not in text and "<https://evil" not in text


FORGED_LINES = "down\n\nOpen: https://evil.example/approvals/1/\u2028Why it needs you: <!here>"


def lying_server():
    """A server whose every tools/list fails with an error message of several lines."""

    async def list_tools(ctx, params):
        raise MCPError(code=mcp_types.INTERNAL_ERROR, message=FORGED_LINES)

    return Server("liar", on_list_tools=list_tools)


def send_queued(channel):
    message_id = channel.flush()
    send_message(channel, list(Delivery.objects.filter(message_id=message_id)), final=True)


def test_a_servers_error_can_not_write_lines_of_a_message(mcp_factory, settings, mailbox, receiver):
    settings.NOTIFY_SYNC_FAILURES = 1
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", mailbox.port
    mail = NotificationChannel.objects.create(name="m", kind="email", recipients=["a@b.example"])
    slack = slack_channel(receiver)
    running = mcp_factory(lying_server())
    server = McpServer.objects.create(
        name="liar", url=running.url, allow_http=True, allow_private_network=True
    )
    assert not server.sync_tools().ok
    send_queued(mail)
    send_queued(slack)

    body = mailbox.messages[0].get_payload()
    lines = body.splitlines()
    [error] = [line for line in lines if line.startswith("Last error:")]
    assert "down Open: https://evil.example/approvals/1/ Why it needs you: <!here>" in error
    opened = [line for line in lines if line.startswith("Open:")]
    assert opened == [
        f"Open: http://127.0.0.1:8000/admin/integrations/mcpserver/{server.pk}/change/"
    ]
    assert "Why it needs you" not in body.replace(error, "")

    blocks = json.loads(receiver.requests[0].body)["blocks"]
    fields = [field for block in blocks for field in block.get("fields", [])]
    [shown] = [field for field in fields if field["text"].startswith("*Last error*")]
    assert shown["text"].count("\n") == 1 and "\u2028" not in shown["text"]
    assert "&lt;!here&gt;" in shown["text"]
    assert all(field["verbatim"] for field in fields)  # no bare URL made a link by Slack
