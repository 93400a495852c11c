"""The admin's lists at 1280 px in a real Chromium: the columns that matter are on screen
without scrolling sideways (servers: tools, last synced, last error; tool calls: status,
decided by; tools: review), and status and errors stand out."""

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from approvals.models import Status, ToolCall
from integrations.models import Agent, McpServer, Tool
from tests.browser import log_in
from tests.conftest import launch_chromium

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

LONG_ERROR = (
    "Could not connect to https://mcp.orders.example.com over Streamable HTTP: HTTP 401 "
    "Unauthorized. Check the secret token and the headers; the server said: invalid "
    "credentials for this key, please rotate it in the vendor's console and try again."
)


@pytest.fixture
def world(django_user_model):
    django_user_model.objects.create_superuser("root", password="pw-root-123")
    now = timezone.now()
    broken = McpServer.objects.create(
        name="orders-production-eu-west", url="https://mcp.orders.example.com/v1/mcp/endpoint",
        last_error=LONG_ERROR, description="Orders",
    )  # fmt: skip
    healthy = McpServer.objects.create(
        name="crm", url="https://crm.example.com/mcp", last_synced_at=now,
        approval_mode="fine_grained",
    )  # fmt: skip
    for i, name in enumerate(["refund_order_with_a_rather_long_name", "lookup_customer_record"]):
        Tool.objects.create(
            server=healthy, name=name, title=f"A long and descriptive title for tool {i}" * 2,
            description="x", fingerprint="new" if i == 0 else "a", reviewed_fingerprint="a",
            first_seen_at=now, last_seen_at=now,
            annotations={"destructiveHint": True, "openWorldHint": True, "idempotentHint": True},
        )  # fmt: skip
    agent, _ = Agent.create_with_token("customer-support-assistant", [healthy, broken])
    for status in (Status.FAILED, Status.SUCCEEDED, Status.PENDING_APPROVAL):
        ToolCall.objects.create(
            agent=agent, server=healthy, server_name="crm",
            tool_name="refund_order_with_a_rather_long_name", status=status,
            decided_by="policy" if status == Status.FAILED else "",
            decided_at=now, finished_at=now, expires_at=now + timezone.timedelta(hours=1),
        )  # fmt: skip


@pytest.fixture
def page(chromium_path, live_server, world, monkeypatch):
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with launch_chromium(chromium_path) as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        log_in(page, f"{live_server.url}/admin/login/", "root", "pw-root-123")
        yield page


def assert_on_screen(page, columns):
    """Each column's header lies wholly inside the window: no sideways scrolling needed."""
    for column in columns:
        header = page.locator(f"#result_list th.column-{column}")
        expect(header).to_be_visible()
        box = header.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 1280, (column, box)


def test_the_server_list_shows_status_tools_sync_and_error(page, live_server):
    page.goto(f"{live_server.url}/admin/integrations/mcpserver/")
    assert_on_screen(page, ["name", "status", "tool_count", "last_synced_at", "short_error"])
    error = page.locator("td.field-short_error .tg-error")
    expect(error).to_contain_text("HTTP 401")
    plain = page.locator("td.field-tool_count").first
    assert error.evaluate("e => getComputedStyle(e).color") != plain.evaluate(
        "e => getComputedStyle(e).color"
    )  # the error is in the error colour
    expect(page.locator(".tg-status-error")).to_have_text("Error")
    expect(page.locator(".tg-status-ok")).to_have_text("OK")


def test_the_tool_call_list_shows_status_and_who_decided(page, live_server):
    page.goto(f"{live_server.url}/admin/approvals/toolcall/")
    assert_on_screen(page, ["id", "status_badge", "tool_label", "agent", "decision"])
    expect(page.locator(".tg-status-failed")).to_have_text("Failed")
    expect(page.locator(".tg-status-pending_approval")).to_have_text("Pending approval")


def test_the_tool_list_shows_review_and_the_approval_setting(page, live_server):
    page.goto(f"{live_server.url}/admin/integrations/tool/")
    assert_on_screen(page, ["name", "server", "review", "approval"])
    expect(page.locator(".tg-status-error")).to_have_text("Changed since review")
